//! The `debug` exporter: writes what it receives to the agent's log (stderr), like the
//! Collector's. `basic` is one line per batch with counts, `normal` one line per metric or span,
//! `detailed` everything: resources, scopes, attributes, every data point.
//!
//! It sends synchronously (no sending queue): a log line cannot fail in a way a retry would fix.

mod render;

use std::sync::Arc;

use async_trait::async_trait;
use podscope_core::component::create_exporter;
use podscope_core::{
    Batch, BuildContext, ComponentConfig, ConsumeError, Exporter, ExporterBuilder, ExporterFactory,
    Signal,
};
use serde::Deserialize;

use crate::helper::{HelperSettings, QueuedExporter, Request, Sender, SendingQueueSettings, Sent};
pub use render::render;

pub const FACTORY: ExporterFactory = ExporterFactory {
    type_name: "debug",
    description:
        "Writes a summary (basic), one line per item (normal) or everything (detailed) to the log",
    signals: &[
        Signal::Metrics,
        Signal::Traces,
        Signal::Profiles,
        Signal::Logs,
    ],
    create: create_exporter::<DebugConfig>,
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verbosity {
    /// One line per batch with counts.
    #[default]
    Basic,
    /// One line per metric (name, type, points) or span (name, ids, duration).
    Normal,
    /// Every resource, scope, attribute and data point.
    Detailed,
}

/// `exporters: debug:` settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DebugConfig {
    /// `basic` (default), `normal` or `detailed`.
    pub verbosity: Verbosity,
}

impl ComponentConfig for DebugConfig {}

impl ExporterBuilder for DebugConfig {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Exporter>> {
        let settings = HelperSettings {
            sending_queue: SendingQueueSettings {
                enabled: false,
                ..Default::default()
            },
            ..Default::default()
        };
        let sender = DebugSender {
            id: ctx.id.to_string(),
            verbosity: self.verbosity,
        };
        QueuedExporter::new(&ctx, settings, sender).map(|e| e as _)
    }
}

struct DebugSender {
    id: String,
    verbosity: Verbosity,
}

#[async_trait]
impl Sender for DebugSender {
    /// The batch itself: it is rendered when written.
    type Payload = Batch;

    fn requests(&self, batch: Batch) -> Result<Vec<Request<Batch>>, ConsumeError> {
        let items = batch.item_count();
        Ok(vec![Request::unordered(batch, items)])
    }

    async fn send(&self, batch: &Batch) -> Result<Sent, ConsumeError> {
        for line in render(batch, self.verbosity) {
            tracing::info!(target: "podscope::exporter::debug", exporter = %self.id, "{line}");
        }
        Ok(Sent::default())
    }
}
