//! The `file_storage` extension: a directory where exporters keep their sending queues, so what
//! the agent accepted survives a SIGKILL, a crash or a node reboot (`sending_queue.storage:
//! file_storage[/name]`). Settings as the Collector's `file_storage` (`directory`,
//! `create_directory`, `fsync`) plus a size limit for the whole directory (`max_size_mib`).
//!
//! Each exporter gets a folder of its own ([`DiskQueue`]), one file per request: written (and
//! with `fsync`, flushed to the device) before the batch is acknowledged upstream, deleted once
//! the backend took it or the exporter gave it up. Why one file per request and not an embedded
//! store: see ARCHITECTURE.md ("The persistent sending queue").
//!
//! What each queue holds (bytes, requests, items) and the corrupt files it set aside are in the
//! agent's telemetry ([`metrics`]).

mod config;
mod disk_queue;
pub mod metrics;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use async_trait::async_trait;
use podscope_core::component::create_extension;
use podscope_core::{BuildContext, Component, Extension, ExtensionBuilder, ExtensionFactory};

pub use config::FileStorageConfig;
pub use disk_queue::{CorruptRecord, DiskQueue, StoreError, StoredRequest};
pub use metrics::StorageMetrics;

pub const FACTORY: ExtensionFactory = ExtensionFactory {
    type_name: "file_storage",
    description: "A directory where exporters keep their sending queues across restarts (sending_queue.storage)",
    signals: &[],
    create: create_extension::<FileStorageConfig>,
};

impl ExtensionBuilder for FileStorageConfig {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Extension>> {
        let metrics = StorageMetrics::shared(&ctx.shared, &ctx.telemetry)?;
        Ok(Arc::new(FileStorage::open(
            *self,
            &ctx.id.to_string(),
            metrics,
        )?))
    }
}

/// The running extension: the directory, its size limit and who holds a queue in it.
pub struct FileStorage {
    id: String,
    config: FileStorageConfig,
    /// Bytes of every queue file in the directory, against `max_size_mib`.
    used_bytes: Arc<AtomicU64>,
    /// Components holding a queue here: one owner per folder.
    owners: Mutex<BTreeSet<String>>,
    metrics: StorageMetrics,
}

impl FileStorage {
    pub fn open(
        config: FileStorageConfig,
        id: &str,
        metrics: StorageMetrics,
    ) -> anyhow::Result<FileStorage> {
        let dir = &config.directory;
        if config.create_directory {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("extension {id}: cannot create directory {}", dir.display())
            })?;
        }
        let meta = std::fs::metadata(dir)
            .with_context(|| format!("extension {id}: directory {}", dir.display()))?;
        anyhow::ensure!(
            meta.is_dir(),
            "extension {id}: {} is not a directory",
            dir.display()
        );
        Ok(FileStorage {
            id: id.to_string(),
            config,
            used_bytes: Arc::new(AtomicU64::new(0)),
            owners: Mutex::new(BTreeSet::new()),
            metrics,
        })
    }

    /// The queue of component `owner` (an exporter id), with what an earlier run left in it.
    /// Only one component may hold a given queue.
    pub fn open_queue(&self, owner: &str) -> anyhow::Result<DiskQueue> {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        anyhow::ensure!(
            owners.insert(owner.to_string()),
            "extension {}: {owner} already has a queue here",
            self.id
        );
        let folder = self.config.directory.join(folder_name(owner));
        DiskQueue::open(
            folder,
            self.config.fsync,
            self.config.max_size_mib.saturating_mul(1024 * 1024),
            self.used_bytes.clone(),
            self.metrics.for_queue(&self.id, owner),
        )
        .with_context(|| format!("extension {}: opening the queue of {owner}", self.id))
    }

    pub fn directory(&self) -> &PathBuf {
        &self.config.directory
    }
}

/// `exporter_otlp_2fbackup` for `otlp/backup`: every byte other than letters, digits, `-` and
/// `.` as `_` and two hex digits, so two ids never share a folder.
fn folder_name(owner: &str) -> String {
    let mut name = String::from("exporter_");
    for byte in owner.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.' {
            name.push(byte as char);
        } else {
            name.push_str(&format!("_{byte:02x}"));
        }
    }
    name
}

#[async_trait]
impl Component for FileStorage {}

impl Extension for FileStorage {}
