//! The agent's own metrics (Prometheus client instruments, rendered by the `prometheus-client`
//! crate), served by the service at `service.telemetry.metrics.address`.
//!
//! Tags stay low-cardinality: component ids, signals, queue names and short reason labels.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

use crate::batch::Signal;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SignalLabel {
    metrics,
    traces,
    profiles,
    logs,
}

impl From<Signal> for SignalLabel {
    fn from(s: Signal) -> Self {
        match s {
            Signal::Metrics => SignalLabel::metrics,
            Signal::Traces => SignalLabel::traces,
            Signal::Profiles => SignalLabel::profiles,
            Signal::Logs => SignalLabel::logs,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ItemLabels {
    pub component: String,
    pub signal: SignalLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ItemReasonLabels {
    pub component: String,
    pub signal: SignalLabel,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentLabels {
    pub component: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub component: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueItemLabels {
    pub queue: String,
    pub signal: SignalLabel,
}

/// A server endpoint, by its settings' key path (`receivers.otlp.protocols.grpc`,
/// `exporters.prometheus`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Handles to every agent metric. Cloning shares the same instruments.
#[derive(Clone)]
pub struct AgentTelemetry {
    registry: Arc<Mutex<Registry>>,
    /// Items a receiver handed to its pipelines and they accepted.
    pub receiver_accepted: Family<ItemLabels, Counter>,
    /// Items a receiver's pipelines refused (the sender was told to retry or that they are bad).
    pub receiver_refused: Family<ItemLabels, Counter>,
    /// Items a processor dropped on purpose or lost to a permanent error downstream.
    pub processor_dropped: Family<ItemReasonLabels, Counter>,
    /// Items a full `drop_newest` queue dropped.
    pub queue_dropped: Family<QueueItemLabels, Counter>,
    pub queue_size: Family<QueueLabels, Gauge>,
    pub queue_capacity: Family<QueueLabels, Gauge>,
    /// Items an exporter's backend accepted.
    pub exporter_sent: Family<ItemLabels, Counter>,
    /// Items an exporter gave up on (permanent error, retries exhausted, shutdown deadline).
    pub exporter_dropped: Family<ItemReasonLabels, Counter>,
    /// Failed export attempts, by reason (each retry counts).
    pub exporter_send_failures: Family<ReasonLabels, Counter>,
    pub exporter_send_duration: HistogramFamily<ComponentLabels>,
    /// TLS configurations a server endpoint reloaded from changed files (`reload_interval`).
    pub server_tls_reloads: Family<EndpointLabels, Counter>,
    /// Changed TLS files a server endpoint could not use (it kept its previous certificate).
    pub server_tls_reload_failures: Family<EndpointLabels, Counter>,
}

impl Default for AgentTelemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentTelemetry {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("podscope");
        let t = AgentTelemetry {
            receiver_accepted: Family::default(),
            receiver_refused: Family::default(),
            processor_dropped: Family::default(),
            queue_dropped: Family::default(),
            queue_size: Family::default(),
            queue_capacity: Family::default(),
            exporter_sent: Family::default(),
            exporter_dropped: Family::default(),
            exporter_send_failures: Family::default(),
            exporter_send_duration: Family::new_with_constructor(|| {
                // 1 ms … ~16 s
                Histogram::new(exponential_buckets(0.001, 2.0, 15))
            }),
            server_tls_reloads: Family::default(),
            server_tls_reload_failures: Family::default(),
            registry: Arc::new(Mutex::new(Registry::default())),
        };
        registry.register(
            "receiver_accepted_items",
            "Items (data points or spans) a receiver pushed into its pipelines",
            t.receiver_accepted.clone(),
        );
        registry.register(
            "receiver_refused_items",
            "Items a receiver's pipelines refused",
            t.receiver_refused.clone(),
        );
        registry.register(
            "processor_dropped_items",
            "Items a processor or pipeline stage dropped, by reason",
            t.processor_dropped.clone(),
        );
        registry.register(
            "queue_dropped_items",
            "Items a full drop_newest queue dropped",
            t.queue_dropped.clone(),
        );
        registry.register(
            "queue_size",
            "Items waiting in a queue",
            t.queue_size.clone(),
        );
        registry.register(
            "queue_capacity",
            "Items a queue holds at most",
            t.queue_capacity.clone(),
        );
        registry.register(
            "exporter_sent_items",
            "Items an exporter's backend accepted",
            t.exporter_sent.clone(),
        );
        registry.register(
            "exporter_dropped_items",
            "Items an exporter gave up on",
            t.exporter_dropped.clone(),
        );
        registry.register(
            "exporter_send_failures",
            "Failed export attempts by reason",
            t.exporter_send_failures.clone(),
        );
        registry.register(
            "exporter_send_duration_seconds",
            "Duration of export attempts",
            t.exporter_send_duration.clone(),
        );
        registry.register(
            "server_tls_reloads",
            "TLS certificates a server endpoint reloaded from changed files (reload_interval)",
            t.server_tls_reloads.clone(),
        );
        registry.register(
            "server_tls_reload_failures",
            "Changed TLS files a server endpoint could not use; it kept its previous certificate",
            t.server_tls_reload_failures.clone(),
        );
        *t.registry.lock().expect("new registry") = registry;
        t
    }

    /// Registers a component's own metric (e.g. ring-buffer losses). The name gets the
    /// `podscope_` prefix.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.lock().register(name, help, metric);
    }

    /// The Prometheus text exposition of every agent metric.
    pub fn encode_text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.lock())
            .expect("writing to a String cannot fail");
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn items(component: &str, signal: Signal) -> ItemLabels {
        ItemLabels {
            component: component.to_string(),
            signal: signal.into(),
        }
    }
}
