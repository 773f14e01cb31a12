//! The eBPF receiver's own metrics (in the agent's telemetry, `docs/metrics.md` lists them),
//! registered once per receiver and handed to the probes that count into them.

use std::collections::BTreeMap;

use podscope_core::telemetry::AgentTelemetry;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::object::MapMemory;
use super::probes::profiling::ProfilerCounters;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RingLabels {
    pub ring: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub probe: String,
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub probe: String,
}

#[derive(Clone)]
pub struct EbpfTelemetry {
    pub ring_events: Family<RingLabels, Counter>,
    pub ring_lost: Family<RingLabels, Counter>,
    pub uprobe_overflow: Counter,
    pub container_attachments: Counter,
    /// Files in containers detached from because the containers that used them stopped.
    pub container_detachments: Counter,
    /// Kernel memory of each map (summed over a probe's objects: uprobe entries).
    pub map_memory: Family<MapLabels, Gauge>,
    pub map_memory_total: Gauge,
    /// Inserts the kernel refused (map full, or no memory for a new entry).
    pub map_full: Family<MapLabels, Counter>,
    /// Where a probe registers metrics of its own (`register_counter`).
    agent: AgentTelemetry,
    /// The profiling probe's.
    pub profiler: ProfilerCounters,
    /// Label sets of user programs' metrics refused by `maxSeries`.
    pub program_overflow: Family<super::programs::SeriesLabels, Counter>,
    /// 1 for each enabled probe the kernel refused (skipped), 0 for each that attached: alerts
    /// need a series that exists before anything goes wrong.
    pub probe_skipped: Family<ProbeLabels, Gauge>,
}

impl EbpfTelemetry {
    pub fn register(telemetry: &AgentTelemetry) -> EbpfTelemetry {
        let t = EbpfTelemetry {
            ring_events: Family::default(),
            ring_lost: Family::default(),
            uprobe_overflow: Counter::default(),
            container_attachments: Counter::default(),
            container_detachments: Counter::default(),
            map_memory: Family::default(),
            map_memory_total: Gauge::default(),
            map_full: Family::default(),
            agent: telemetry.clone(),
            profiler: ProfilerCounters::default(),
            program_overflow: Family::default(),
            probe_skipped: Family::default(),
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
            "Uprobe hits counted in an `other` series: beyond an entry's max_series, or refused by its full uprobe_hits map",
            t.uprobe_overflow.clone(),
        );
        telemetry.register(
            "ebpf_uprobe_container_attachments",
            "Files inside containers that container:<path> uprobes attached to",
            t.container_attachments.clone(),
        );
        telemetry.register(
            "ebpf_uprobe_container_detachments",
            "Files inside containers that container:<path> uprobes detached from because no live container uses them anymore",
            t.container_detachments.clone(),
        );
        telemetry.register(
            "ebpf_map_memory_bytes",
            "Kernel memory of each eBPF map of the agent (bytes_memlock, as bpftool shows it)",
            t.map_memory.clone(),
        );
        telemetry.register(
            "ebpf_map_memory_total_bytes",
            "Kernel memory of all eBPF maps of the receiver",
            t.map_memory_total.clone(),
        );
        telemetry.register(
            "ebpf_map_full",
            "Inserts into an eBPF map that the kernel refused (map full or out of memory): data lost in the kernel",
            t.map_full.clone(),
        );
        let p = &t.profiler;
        telemetry.register(
            "ebpf_profile_on_cpu_samples",
            "On-CPU stack samples the profiling probe summed",
            p.on_cpu_samples.clone(),
        );
        telemetry.register(
            "ebpf_profile_off_cpu_samples",
            "Off-CPU blocks the profiling probe summed",
            p.off_cpu_samples.clone(),
        );
        telemetry.register(
            "ebpf_profile_truncated_stacks",
            "Stacks whose unwinding stopped before their root (stack copy too short, code without unwind tables)",
            p.truncated_stacks.clone(),
        );
        telemetry.register(
            "ebpf_profile_unsymbolized_frames",
            "Distinct frames per interval that got no name (they keep their build id and file offset)",
            p.unsymbolized_frames.clone(),
        );
        telemetry.register(
            "ebpf_profile_symbol_evictions",
            "Binaries whose symbol and unwind tables were dropped to keep within symbol_cache_bytes",
            p.symbol_evictions.clone(),
        );
        telemetry.register(
            "ebpf_profile_symbol_cache_bytes",
            "Memory the profiling probe's symbol and unwind tables hold",
            p.symbol_cache_bytes.clone(),
        );
        telemetry.register(
            "ebpf_profile_trace_link_unresolved",
            "Samples that may have been taken while their thread served an HTTP/gRPC request and went out without its span's ids (the answer came after trace_link_wait, too many samples waited, or the thread interleaved requests)",
            p.trace_link_unresolved.clone(),
        );
        telemetry.register(
            "ebpf_profile_trace_link_windows_refused",
            "Answered requests the trace link could not keep for linking because it already kept its maximum",
            p.trace_link_windows_refused.clone(),
        );
        telemetry.register(
            "ebpf_program_series_overflow",
            "Label sets of a user program's metric not exported because the metric reached its maxSeries",
            t.program_overflow.clone(),
        );
        telemetry.register(
            "ebpf_probe_skipped",
            "1 when an enabled probe could not attach and was skipped (its log line says why), 0 when it attached",
            t.probe_skipped.clone(),
        );
        t
    }

    /// A counter of a probe's own, `podscope_<name>_total` in the agent's telemetry.
    pub fn register_counter(&self, name: &str, help: &str) -> Counter {
        let counter = Counter::default();
        self.agent.register(name, help, counter.clone());
        counter
    }

    /// Records whether enabled probe `probe` was skipped (true) or attached (false).
    pub fn set_probe_skipped(&self, probe: &str, skipped: bool) {
        self.probe_skipped
            .get_or_create(&ProbeLabels {
                probe: probe.to_string(),
            })
            .set(i64::from(skipped));
    }

    /// Sets the memory gauges to `maps` (this receiver's maps, now).
    pub fn set_map_memory(&self, maps: &[MapMemory]) {
        let mut by_map: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for m in maps {
            *by_map.entry((m.probe, &m.map)).or_default() += m.bytes;
        }
        // Maps of probes stopped since (a deleted Probe's) lose their series.
        self.map_memory.clear();
        for ((probe, map), bytes) in &by_map {
            self.map_memory
                .get_or_create(&MapLabels {
                    probe: probe.to_string(),
                    map: map.to_string(),
                })
                .set(*bytes as i64);
        }
        self.map_memory_total
            .set(by_map.values().sum::<u64>() as i64);
    }

    /// Adds `failed` refused inserts of `probe`'s `map` (0 makes the series appear).
    pub fn add_map_full(&self, probe: &str, map: &str, failed: u64) {
        self.map_full
            .get_or_create(&MapLabels {
                probe: probe.to_string(),
                map: map.to_string(),
            })
            .inc_by(failed);
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
