use std::time::Duration;

use podscope_core::{ComponentConfig, FieldError};
use serde::Deserialize;

/// `processors: batch:` settings, as in the OpenTelemetry Collector.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Items (data points or spans) that trigger sending a batch. Default 8192.
    pub send_batch_size: usize,
    /// Largest batch sent; bigger ones are split. 0 = no limit (default). When set, it must be at
    /// least `send_batch_size`.
    pub send_batch_max_size: usize,
    /// Time after a batch's first item after which it is sent regardless of size. Default 200ms.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            send_batch_size: 8192,
            send_batch_max_size: 0,
            timeout: Duration::from_millis(200),
        }
    }
}

impl ComponentConfig for BatchConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.send_batch_size == 0 {
            errors.push(FieldError::new("send_batch_size", "must be at least 1"));
        }
        if self.send_batch_max_size != 0 && self.send_batch_max_size < self.send_batch_size {
            errors.push(FieldError::new(
                "send_batch_max_size",
                format!(
                    "must be 0 (no limit) or at least send_batch_size ({})",
                    self.send_batch_size
                ),
            ));
        }
        if self.timeout.is_zero() {
            errors.push(FieldError::new("timeout", "must be greater than 0"));
        }
        errors
    }
}
