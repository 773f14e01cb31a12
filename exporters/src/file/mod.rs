//! The `file` exporter: one OTLP-JSON export request per line (`ExportMetricsServiceRequest` or
//! `ExportTraceServiceRequest`, the Collector file exporter's format), appended to `path`, each
//! line flushed as it is written so `tail -f` follows along. With `rotation`, a file that would
//! grow past `max_megabytes` is renamed `path.1` (older backups shift to `path.2` …) and the
//! oldest beyond `max_backups` is removed.

mod config;
mod encode;
mod writer;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use podscope_core::component::create_exporter;
use podscope_core::{
    Batch, BuildContext, ConsumeError, Exporter, ExporterBuilder, ExporterFactory, Signal,
};

pub use config::{FileConfig, RotationConfig};
pub use encode::encode_json_line;
use writer::RotatingWriter;

use crate::helper::{HelperSettings, QueuedExporter, Request, Sender, SendingQueueSettings, Sent};

pub const FACTORY: ExporterFactory = ExporterFactory {
    type_name: "file",
    description:
        "Appends OTLP-JSON export requests, one per line, to a file with optional rotation",
    signals: &[
        Signal::Metrics,
        Signal::Traces,
        Signal::Profiles,
        Signal::Logs,
    ],
    create: create_exporter::<FileConfig>,
};

impl ExporterBuilder for FileConfig {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Exporter>> {
        // Writing a line either works or fails for a reason a quick retry will not fix, and the
        // stage before this exporter keeps and retries what it could not hand over: no queue.
        let settings = HelperSettings {
            sending_queue: SendingQueueSettings {
                enabled: false,
                ..Default::default()
            },
            ..Default::default()
        };
        QueuedExporter::new(
            &ctx,
            settings,
            FileSender {
                config: *self,
                writer: Arc::new(Mutex::new(None)),
            },
        )
        .map(|e| e as _)
    }
}

struct FileSender {
    config: FileConfig,
    /// Opened by `start`.
    writer: Arc<Mutex<Option<RotatingWriter>>>,
}

#[async_trait]
impl Sender for FileSender {
    /// One OTLP-JSON line.
    type Payload = Bytes;

    async fn start(&self) -> anyhow::Result<()> {
        let writer = RotatingWriter::open(&self.config.path, self.config.rotation.clone())?;
        *self.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(writer);
        Ok(())
    }

    fn requests(&self, batch: Batch) -> Result<Vec<Request<Bytes>>, ConsumeError> {
        Ok(vec![Request::unordered(
            Bytes::from(encode_json_line(&batch)),
            batch.item_count(),
        )])
    }

    async fn send(&self, line: &Bytes) -> Result<Sent, ConsumeError> {
        let line = line.clone();
        let writer = self.writer.clone();
        let path = self.config.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = writer.lock().unwrap_or_else(|e| e.into_inner());
            let Some(w) = guard.as_mut() else {
                return Err(ConsumeError::retryable(
                    "not_started",
                    "the file exporter is not started",
                ));
            };
            w.write_line(&line).map(|()| Sent::default()).map_err(|e| {
                ConsumeError::retryable("io_error", format!("writing {}: {e}", path.display()))
            })
        })
        .await
        .map_err(|e| ConsumeError::retryable("io_error", format!("writer task failed: {e}")))?
    }

    async fn flush(&self) -> anyhow::Result<()> {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(w) = writer.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                w.sync()?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await??;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
