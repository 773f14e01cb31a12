//! The eBPF receiver's own metrics (in the agent's telemetry, `docs/metrics.md` lists them),
//! registered once per receiver and handed to the probes that count into them.

use podscope_core::telemetry::AgentTelemetry;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RingLabels {
    pub ring: String,
}

#[derive(Clone)]
pub struct EbpfTelemetry {
    pub ring_events: Family<RingLabels, Counter>,
    pub ring_lost: Family<RingLabels, Counter>,
    pub uprobe_overflow: Counter,
    pub container_attachments: Counter,
}

impl EbpfTelemetry {
    pub fn register(telemetry: &AgentTelemetry) -> EbpfTelemetry {
        let t = EbpfTelemetry {
            ring_events: Family::default(),
            ring_lost: Family::default(),
            uprobe_overflow: Counter::default(),
            container_attachments: Counter::default(),
        };
        telemetry.register(
            "ebpf_ringbuf_events",
            "Events read from eBPF ring buffers",
            t.ring_events.clone(),
        );
        telemetry.register(
            "ebpf_ringbuf_lost_events",
            "Events the kernel could not put on a full eBPF ring buffer",
            t.ring_lost.clone(),
        );
        telemetry.register(
            "ebpf_uprobe_overflow",
            "Uprobe hits counted in the `other` series because an entry reached max_series",
            t.uprobe_overflow.clone(),
        );
        telemetry.register(
            "ebpf_uprobe_container_attachments",
            "Files inside containers that container:<path> uprobes attached to",
            t.container_attachments.clone(),
        );
        t
    }

    /// The events and losses counters of ring buffer `ring`.
    pub fn ring(&self, ring: &str) -> (Counter, Counter) {
        let labels = RingLabels {
            ring: ring.to_string(),
        };
        (
            self.ring_events.get_or_create(&labels).clone(),
            self.ring_lost.get_or_create(&labels).clone(),
        )
    }
}
