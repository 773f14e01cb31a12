use podscope_core::{ComponentConfig, ComponentId, FieldError};
use serde::Deserialize;

/// `receivers: trace_sessions:` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceSessionsReceiverConfig {
    /// The `session` extension whose `TraceSession`s it exports (listed in
    /// `service.extensions`). Default `session`.
    pub extension: String,
    /// Events (and, apart, summaries) waiting for the pipeline at most; what comes when it is
    /// full is dropped and counted as refused. Default 10000.
    pub queue_capacity: usize,
}

impl Default for TraceSessionsReceiverConfig {
    fn default() -> Self {
        TraceSessionsReceiverConfig {
            extension: "session".to_string(),
            queue_capacity: 10_000,
        }
    }
}

impl TraceSessionsReceiverConfig {
    pub fn extension_id(&self) -> Result<ComponentId, String> {
        ComponentId::parse(&self.extension)
    }
}

impl ComponentConfig for TraceSessionsReceiverConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Err(e) = self.extension_id() {
            errors.push(FieldError::new("extension", e));
        }
        if self.queue_capacity == 0 {
            errors.push(FieldError::new("queue_capacity", "must be at least 1"));
        }
        errors
    }
}
