use std::time::Duration;

use podscope_core::config::{join_path, WhenFull};
use podscope_core::{ComponentId, ComponentReference, FieldError};
use serde::Deserialize;

/// `sending_queue:` — the bounded queue in front of an exporter's sender.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SendingQueueSettings {
    /// Queue batches and send them from `num_consumers` tasks. Default true. When false, the
    /// caller waits for each send (with retries) and gets its error.
    pub enabled: bool,
    /// Items (data points or spans) the queue holds at most. Default 10000.
    pub queue_size: usize,
    /// Concurrent senders taking from the queue. Default 2.
    pub num_consumers: usize,
    /// `block` (default): wait up to `block_timeout` for room, then refuse with a retryable
    /// error; `drop_newest`: drop the incoming batch and count it.
    pub when_full: WhenFull,
    /// Default 5s.
    #[serde(with = "humantime_serde")]
    pub block_timeout: Duration,
    /// A `file_storage` extension (`file_storage` or `file_storage/<name>`, listed in
    /// `service.extensions`) to keep the queue in: every request is written there before the
    /// batch is acknowledged and deleted once the backend took it, so a crash, a SIGKILL or a
    /// reboot loses nothing that was queued; the next start sends it first. Default: none (the
    /// queue is in memory only). `otlp`, `otlphttp` and `jaeger` only.
    pub storage: Option<String>,
}

impl Default for SendingQueueSettings {
    fn default() -> Self {
        SendingQueueSettings {
            enabled: true,
            queue_size: 10_000,
            num_consumers: 2,
            when_full: WhenFull::Block,
            block_timeout: Duration::from_secs(5),
            storage: None,
        }
    }
}

impl SendingQueueSettings {
    /// `storage` as a reference the config loader checks (defined, of type `file_storage`,
    /// running).
    pub fn storage_reference(&self) -> Option<ComponentReference> {
        ComponentReference::extension_setting("sending_queue.storage", self.storage.as_deref())
    }
}

/// `retry_on_failure:` — exponential backoff for retryable errors.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Default true.
    pub enabled: bool,
    /// Wait before the first retry. Default 5s.
    #[serde(with = "humantime_serde")]
    pub initial_interval: Duration,
    /// Longest wait between retries. Default 30s.
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    /// Give up on a batch after this long (0 = never). Default 300s.
    #[serde(with = "humantime_serde")]
    pub max_elapsed_time: Duration,
    /// Growth of the wait per retry. Default 1.5.
    pub multiplier: f64,
    /// Each wait is randomized by ± this fraction. Default 0.5.
    pub randomization_factor: f64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            enabled: true,
            initial_interval: Duration::from_secs(5),
            max_interval: Duration::from_secs(30),
            max_elapsed_time: Duration::from_secs(300),
            multiplier: 1.5,
            randomization_factor: 0.5,
        }
    }
}

/// The helper's settings, as embedded (field by field) in an exporter's config.
#[derive(Debug, Clone, PartialEq)]
pub struct HelperSettings {
    pub sending_queue: SendingQueueSettings,
    pub retry_on_failure: RetrySettings,
    /// Time one send attempt may take. Default 5s.
    pub timeout: Duration,
}

impl Default for HelperSettings {
    fn default() -> Self {
        HelperSettings {
            sending_queue: SendingQueueSettings::default(),
            retry_on_failure: RetrySettings::default(),
            timeout: Duration::from_secs(5),
        }
    }
}

impl HelperSettings {
    /// Problems, with paths relative to the exporter (`sending_queue.queue_size`, …).
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let q = &self.sending_queue;
        if q.enabled {
            if q.queue_size == 0 {
                errors.push(FieldError::new(
                    "sending_queue.queue_size",
                    "must be at least 1",
                ));
            }
            if let Some(storage) = &q.storage {
                match ComponentId::parse(storage) {
                    Ok(id) if id.type_name() == "file_storage" => {}
                    Ok(_) => errors.push(FieldError::new(
                        "sending_queue.storage",
                        format!("{storage:?} is not a file_storage extension (expected file_storage or file_storage/<name>)"),
                    )),
                    Err(message) => {
                        errors.push(FieldError::new("sending_queue.storage", message))
                    }
                }
            }
            if q.num_consumers == 0 {
                errors.push(FieldError::new(
                    "sending_queue.num_consumers",
                    "must be at least 1",
                ));
            }
        } else if q.storage.is_some() {
            errors.push(FieldError::new(
                "sending_queue.storage",
                "needs the sending queue (sending_queue.enabled: true)",
            ));
        }
        let r = &self.retry_on_failure;
        let p = |k| join_path("retry_on_failure", k);
        if r.enabled {
            if r.initial_interval.is_zero() {
                errors.push(FieldError::new(
                    p("initial_interval"),
                    "must be greater than 0",
                ));
            }
            if r.max_interval < r.initial_interval {
                errors.push(FieldError::new(
                    p("max_interval"),
                    "must be at least initial_interval",
                ));
            }
            if r.multiplier < 1.0 {
                errors.push(FieldError::new(p("multiplier"), "must be at least 1"));
            }
            if !(0.0..1.0).contains(&r.randomization_factor) {
                errors.push(FieldError::new(
                    p("randomization_factor"),
                    "must be in [0, 1)",
                ));
            }
        }
        if self.timeout.is_zero() {
            errors.push(FieldError::new("timeout", "must be greater than 0"));
        }
        errors
    }
}

/// `helper_settings()` for the exporter configs that carry the helper's settings
/// (`sending_queue`, `retry_on_failure`, `timeout`) as fields of their own. They are not one
/// flattened struct because serde loses the key path of an error inside a flattened field, and
/// the config loader points at the exact key.
macro_rules! helper_settings_of {
    ($($config:ty),+ $(,)?) => {$(
        impl $config {
            pub fn helper_settings(&self) -> HelperSettings {
                HelperSettings {
                    sending_queue: self.sending_queue.clone(),
                    retry_on_failure: self.retry_on_failure.clone(),
                    timeout: self.timeout,
                }
            }
        }
    )+};
}

helper_settings_of!(
    crate::otlp::OtlpGrpcConfig,
    crate::otlp::OtlpHttpConfig,
    crate::prometheusremotewrite::RemoteWriteConfig,
);
