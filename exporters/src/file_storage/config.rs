use std::path::PathBuf;

use podscope_core::{ComponentConfig, FieldError};
use serde::Deserialize;

/// `extensions: file_storage[/name]:` — where exporters with `sending_queue.storage` keep their
/// queues.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileStorageConfig {
    /// The directory. Default `/var/lib/podscope/file_storage` (the chart mounts a hostPath
    /// there, so the queue outlives the pod).
    pub directory: PathBuf,
    /// Create the directory (and its parents) when missing. Default true.
    pub create_directory: bool,
    /// Flush every queued request to the device before acknowledging it (survives a node
    /// reboot or power loss, not only a crash of the agent). Default true. With false, a
    /// SIGKILL or crash of the agent still loses nothing (the kernel holds the written pages),
    /// a reboot may.
    pub fsync: bool,
    /// Largest size of all queue files in the directory, in MiB. A request that would pass it
    /// is dropped and counted (reason `storage_full`). Default 1024.
    pub max_size_mib: u64,
}

impl Default for FileStorageConfig {
    fn default() -> Self {
        FileStorageConfig {
            directory: PathBuf::from("/var/lib/podscope/file_storage"),
            create_directory: true,
            fsync: true,
            max_size_mib: 1024,
        }
    }
}

impl ComponentConfig for FileStorageConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.directory.as_os_str().is_empty() {
            errors.push(FieldError::new("directory", "must not be empty"));
        }
        if self.max_size_mib == 0 {
            errors.push(FieldError::new("max_size_mib", "must be at least 1"));
        }
        errors
    }
}
