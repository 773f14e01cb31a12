//! The `nop` exporter: accepts everything and discards it, like the Collector's. For benchmarks,
//! for measuring the pipeline alone, and for a pipeline whose data only matters to a processor.

use std::sync::Arc;

use async_trait::async_trait;
use podscope_core::component::create_exporter;
use podscope_core::telemetry::AgentTelemetry;
use podscope_core::{
    Batch, BuildContext, Component, ComponentConfig, ConsumeError, Consumer, Exporter,
    ExporterBuilder, ExporterFactory, Signal,
};
use serde::Deserialize;

pub const FACTORY: ExporterFactory = ExporterFactory {
    type_name: "nop",
    description: "Discards everything it receives (counted as sent)",
    signals: &[
        Signal::Metrics,
        Signal::Traces,
        Signal::Profiles,
        Signal::Logs,
    ],
    create: create_exporter::<NopConfig>,
};

/// `nop` has no settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NopConfig {}

impl ComponentConfig for NopConfig {}

impl ExporterBuilder for NopConfig {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Exporter>> {
        Ok(Arc::new(NopExporter {
            id: ctx.id.to_string(),
            telemetry: ctx.telemetry,
        }))
    }
}

pub struct NopExporter {
    id: String,
    telemetry: AgentTelemetry,
}

#[async_trait]
impl Consumer for NopExporter {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        self.telemetry
            .exporter_sent
            .get_or_create(&AgentTelemetry::items(&self.id, batch.signal()))
            .inc_by(batch.item_count() as u64);
        Ok(())
    }
}

#[async_trait]
impl Component for NopExporter {}

impl Exporter for NopExporter {}
