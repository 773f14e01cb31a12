//! Helpers every component config uses: parsing with key paths in errors, validation, durations
//! and queue settings.

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use humantime_serde as duration;

/// One problem in a component's config, at a key path relative to the component
/// (`protocols.grpc.endpoint`; empty for the component itself). The config loader turns it into a
/// message with file, line, column and the full path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A component's configuration: serde with `deny_unknown_fields` and defaults, plus semantic checks.
pub trait ComponentConfig: DeserializeOwned + Send + 'static {
    /// Checks beyond what the types say. Return every problem, not just the first.
    fn validate(&self) -> Vec<FieldError> {
        Vec::new()
    }
}

/// Deserializes a component config (`null`, as in `otlp:` with nothing after it, means all
/// defaults) and validates it.
pub fn parse_component_config<C: ComponentConfig>(
    raw: serde_json::Value,
) -> Result<C, Vec<FieldError>> {
    let raw = if raw.is_null() {
        serde_json::Value::Object(Default::default())
    } else {
        raw
    };
    let config: C = serde_path_to_error::deserialize(raw).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        vec![FieldError::new(path, e.into_inner().to_string())]
    })?;
    let errors = config.validate();
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

/// What a bounded buffer does when it is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Wait for room (back-pressure to the sender), up to `block_timeout`, then refuse with a
    /// retryable error.
    #[default]
    Block,
    /// Drop the incoming batch and count it in `podscope_queue_dropped_items_total`.
    DropNewest,
}

/// A bounded queue in front of a stage. Capacity is counted in items (data points or spans).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    /// A pipeline's entry queue only: with false, a receiver hands its batch to the pipeline's
    /// first stage itself and answers its client once that stage took it (a persistent sending
    /// queue's write, when the exporters follow directly). Default true.
    pub enabled: bool,
    /// Items the queue holds at most. Default 10000.
    pub capacity: usize,
    /// `block` (default) or `drop_newest`.
    pub when_full: WhenFull,
    /// With `block`: how long a sender waits for room before it is refused. Default 5s.
    #[serde(with = "humantime_serde")]
    pub block_timeout: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            enabled: true,
            capacity: 10_000,
            when_full: WhenFull::Block,
            block_timeout: Duration::from_secs(5),
        }
    }
}

impl QueueSettings {
    /// Problems with these settings, with paths under `prefix` (e.g. `sending_queue`).
    pub fn validate(&self, prefix: &str) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.capacity == 0 {
            errors.push(FieldError::new(
                join_path(prefix, "capacity"),
                "must be at least 1",
            ));
        }
        errors
    }
}

/// `a.b` from `a` and `b`, or just `b` when `a` is empty.
pub fn join_path(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Example {
        endpoint: String,
        queue: QueueSettings,
    }

    impl Default for Example {
        fn default() -> Self {
            Example {
                endpoint: "localhost:1".into(),
                queue: QueueSettings::default(),
            }
        }
    }

    impl ComponentConfig for Example {
        fn validate(&self) -> Vec<FieldError> {
            let mut errors = self.queue.validate("queue");
            if self.endpoint.is_empty() {
                errors.push(FieldError::new("endpoint", "must not be empty"));
            }
            errors
        }
    }

    #[test]
    fn null_means_defaults() {
        let c: Example = parse_component_config(serde_json::Value::Null).unwrap();
        assert_eq!(c.endpoint, "localhost:1");
        assert_eq!(c.queue.block_timeout, Duration::from_secs(5));
    }

    #[test]
    fn unknown_keys_are_reported_with_their_path() {
        let errors = parse_component_config::<Example>(serde_json::json!({
            "queue": {"capacity": 3, "when_ful": "block"}
        }))
        .unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "queue.when_ful");
        assert!(
            errors[0].message.contains("unknown field `when_ful`"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn validation_reports_every_problem() {
        let errors = parse_component_config::<Example>(serde_json::json!({
            "endpoint": "", "queue": {"capacity": 0, "block_timeout": "250ms"}
        }))
        .unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["queue.capacity", "endpoint"]);
    }
}
