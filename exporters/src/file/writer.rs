//! Appending lines to a file with size-based rotation.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::RotationConfig;

pub struct RotatingWriter {
    path: PathBuf,
    file: File,
    size: u64,
    rotation: Option<RotationConfig>,
}

impl RotatingWriter {
    pub fn open(path: &Path, rotation: Option<RotationConfig>) -> anyhow::Result<Self> {
        let file = open_append(path)
            .map_err(|e| anyhow::anyhow!("file exporter: cannot open {}: {e}", path.display()))?;
        let size = file.metadata()?.len();
        Ok(RotatingWriter {
            path: path.to_path_buf(),
            file,
            size,
            rotation,
        })
    }

    /// Appends one line (already ending in `\n`) and flushes it to the OS.
    pub fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        if let Some(rotation) = &self.rotation {
            let limit = rotation.max_megabytes * 1024 * 1024;
            // A file is rotated before a line would push it past the limit, unless it is empty
            // (a single line larger than the limit still gets written).
            if self.size > 0 && self.size + line.len() as u64 > limit {
                self.rotate(rotation.max_backups)?;
            }
        }
        self.file.write_all(line)?;
        self.file.flush()?;
        self.size += line.len() as u64;
        Ok(())
    }

    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn rotate(&mut self, max_backups: usize) -> io::Result<()> {
        let backup = |n: usize| PathBuf::from(format!("{}.{n}", self.path.display()));
        if max_backups == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(backup(max_backups));
            for n in (1..max_backups).rev() {
                if backup(n).exists() {
                    std::fs::rename(backup(n), backup(n + 1))?;
                }
            }
            std::fs::rename(&self.path, backup(1))?;
        }
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}
