//! `partial_success` in OTLP responses: the backend kept the request but rejected some items.
//! They are counted as dropped (reason `rejected`) and logged once per response.

use podscope_core::telemetry::{AgentTelemetry, ItemReasonLabels};
use podscope_core::Signal;

#[derive(Clone)]
pub struct PartialSuccess {
    pub exporter: String,
    pub telemetry: AgentTelemetry,
}

impl PartialSuccess {
    pub fn report(&self, signal: Signal, rejected: i64, message: &str) {
        if rejected <= 0 && message.is_empty() {
            return;
        }
        if rejected > 0 {
            self.telemetry
                .exporter_dropped
                .get_or_create(&ItemReasonLabels {
                    component: self.exporter.clone(),
                    signal: signal.into(),
                    reason: "rejected".into(),
                })
                .inc_by(rejected as u64);
        }
        tracing::warn!(exporter = %self.exporter, %signal, rejected, message, "backend rejected part of a request");
    }
}
