//! The pprof exporter's directory: files written whole (a temporary name, then renamed, so a
//! reader never sees half a file) and a budget of files and bytes kept by removing the oldest.

use std::collections::{HashSet, VecDeque};
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use super::{PprofFile, PprofRotation};

pub struct PprofDirectory {
    directory: PathBuf,
    rotation: PprofRotation,
    /// The `*.pb.gz` files in the directory with their sizes, oldest first.
    files: VecDeque<(PathBuf, u64)>,
    names: HashSet<PathBuf>,
    bytes: u64,
}

const SUFFIX: &str = ".pb.gz";

impl PprofDirectory {
    /// Creates `directory` if missing, checks that a file can be written there and takes the
    /// `*.pb.gz` files already in it into the budget (oldest by modification time first).
    pub fn open(directory: &Path, rotation: PprofRotation) -> anyhow::Result<PprofDirectory> {
        let context = |what: &str, e: io::Error| {
            anyhow::anyhow!(
                "pprof exporter: directory {}: {what}: {e}",
                directory.display()
            )
        };
        fs::create_dir_all(directory).map_err(|e| context("cannot create it", e))?;
        let probe = directory.join(".podscope-write-check.tmp");
        fs::write(&probe, b"").map_err(|e| context("cannot write into it", e))?;
        let _ = fs::remove_file(&probe);
        let mut existing = Vec::new();
        for entry in fs::read_dir(directory).map_err(|e| context("cannot list it", e))? {
            let entry = entry.map_err(|e| context("cannot list it", e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                // A file a previous run did not finish writing.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_file() && name.ends_with(SUFFIX) {
                let modified = meta.modified().ok();
                existing.push((modified, name, entry.path(), meta.len()));
            }
        }
        existing.sort();
        let mut dir = PprofDirectory {
            directory: directory.to_path_buf(),
            rotation,
            files: VecDeque::new(),
            names: HashSet::new(),
            bytes: 0,
        };
        for (_, _, path, size) in existing {
            dir.track(path, size);
        }
        dir.keep_within_budget();
        Ok(dir)
    }

    /// Writes `file` under its name (with `-1`, `-2`… before `.pb.gz` if that name is taken),
    /// then removes the oldest files while the directory is over its budget (never the file
    /// just written). Returns the file's path.
    pub fn write(&mut self, file: &PprofFile) -> io::Result<PathBuf> {
        let path = self.free_path(&file.name);
        let temporary = self.directory.join(format!(".{}.tmp", file.name));
        let written = (|| {
            let mut out = fs::File::create(&temporary)?;
            out.write_all(&file.bytes)?;
            out.sync_data()?;
            fs::rename(&temporary, &path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&temporary);
            return Err(e);
        }
        self.track(path.clone(), file.bytes.len() as u64);
        self.keep_within_budget();
        Ok(path)
    }

    /// Files in the directory and their bytes, as the budget counts them.
    pub fn usage(&self) -> (usize, u64) {
        (self.files.len(), self.bytes)
    }

    fn free_path(&self, name: &str) -> PathBuf {
        let stem = name.strip_suffix(SUFFIX).unwrap_or(name);
        let mut path = self.directory.join(name);
        let mut n = 1;
        while self.names.contains(&path) || path.exists() {
            path = self.directory.join(format!("{stem}-{n}{SUFFIX}"));
            n += 1;
        }
        path
    }

    fn track(&mut self, path: PathBuf, size: u64) {
        self.bytes += size;
        self.names.insert(path.clone());
        self.files.push_back((path, size));
    }

    fn keep_within_budget(&mut self) {
        let max_bytes = self.rotation.max_bytes();
        while self.files.len() > self.rotation.max_files
            || (self.bytes > max_bytes && self.files.len() > 1)
        {
            let Some((oldest, size)) = self.files.pop_front() else {
                break;
            };
            match fs::remove_file(&oldest) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Left in place, it is no longer counted: the budget stays a bound on what
                // this exporter keeps adding.
                Err(e) => {
                    tracing::warn!(file = %oldest.display(), error = %e, "pprof exporter: cannot remove an old file")
                }
            }
            self.names.remove(&oldest);
            self.bytes -= size;
        }
    }
}

/// Whether `error` says the disk (or the user's quota on it) is full.
pub fn is_disk_full(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}
