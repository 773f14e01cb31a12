use std::path::PathBuf;

use podscope_core::{ComponentConfig, FieldError};
use serde::Deserialize;

/// `exporters: file:` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The file to append to (required). Its directory must exist.
    pub path: PathBuf,
    /// Size-based rotation; off when absent.
    #[serde(default)]
    pub rotation: Option<RotationConfig>,
}

/// `rotation:` — when the file would grow past `max_megabytes`, it becomes `path.1`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RotationConfig {
    /// Size in MiB at which the file is rotated. Default 100.
    pub max_megabytes: u64,
    /// Rotated files kept (`path.1` newest … `path.N` oldest). Default 100.
    pub max_backups: usize,
}

impl Default for RotationConfig {
    fn default() -> Self {
        RotationConfig {
            max_megabytes: 100,
            max_backups: 100,
        }
    }
}

impl ComponentConfig for FileConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.path.as_os_str().is_empty() {
            errors.push(FieldError::new("path", "must not be empty"));
        }
        if let Some(r) = &self.rotation {
            if r.max_megabytes == 0 {
                errors.push(FieldError::new(
                    "rotation.max_megabytes",
                    "must be at least 1",
                ));
            }
        }
        errors
    }
}
