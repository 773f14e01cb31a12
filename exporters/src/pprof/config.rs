use std::path::PathBuf;

use podscope_core::{ComponentConfig, FieldError};
use serde::Deserialize;

/// `exporters: pprof:` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PprofConfig {
    /// The directory the files are written into (required). Created at start if missing; the
    /// agent fails to start if it cannot create it or write into it. It is the exporter's own:
    /// every `*.pb.gz` file in it counts toward the rotation budget and may be removed.
    pub directory: PathBuf,
    /// How many files and bytes the directory may hold; the oldest files are removed first.
    #[serde(default)]
    pub rotation: PprofRotation,
}

/// `rotation:` — the directory's budget, checked after each file written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PprofRotation {
    /// Files kept at most. Default 10000.
    pub max_files: usize,
    /// MiB the files may take together. Default 256.
    pub max_megabytes: u64,
}

impl Default for PprofRotation {
    fn default() -> Self {
        PprofRotation {
            max_files: 10_000,
            max_megabytes: 256,
        }
    }
}

impl PprofRotation {
    pub fn max_bytes(&self) -> u64 {
        self.max_megabytes.saturating_mul(1024 * 1024)
    }
}

impl ComponentConfig for PprofConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.directory.as_os_str().is_empty() {
            errors.push(FieldError::new("directory", "must not be empty"));
        }
        if self.rotation.max_files == 0 {
            errors.push(FieldError::new("rotation.max_files", "must be at least 1"));
        }
        if self.rotation.max_megabytes == 0 {
            errors.push(FieldError::new(
                "rotation.max_megabytes",
                "must be at least 1",
            ));
        }
        errors
    }
}
