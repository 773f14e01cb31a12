use std::time::Duration;

use podscope_core::FieldError;
use serde::Deserialize;

use crate::ebpf::probes::MapSizes;

/// `probes.profiling:` — off unless listed (it is not in the default config).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfilingProbeConfig {
    /// Default true (when listed).
    pub enabled: bool,
    /// Fail startup if the probe cannot attach (default false: log one line and go on).
    pub required: bool,
    /// Kernel map sizes by map name (see [`MapSizes`]): `profile_samples` (ring buffer bytes),
    /// `profile_pending` (off-CPU blocks waiting for their thread's syscall exit).
    pub max_entries: MapSizes,
    /// On-CPU samples per second and CPU. Default 19 (a prime, so sampling does not beat with
    /// periodic work; the OpenTelemetry eBPF profiler samples at 20).
    pub frequency: u64,
    /// Also record where threads block, and for how long (off-CPU). Default false.
    pub off_cpu: bool,
    /// Blocks shorter than this are not recorded (they cost only a timestamp). Default 1ms.
    #[serde(with = "humantime_serde")]
    pub off_cpu_min_block: Duration,
    /// Memory the binaries' symbol and unwind tables may hold, in bytes; the least recently used
    /// are dropped beyond it. Default 64 MiB.
    pub symbol_cache_bytes: usize,
    /// Bytes of samples that wake the agent early; below that it reads them every
    /// `event_poll_interval`. Default 524288.
    pub wakeup_bytes: u64,
    /// Default 200ms.
    #[serde(with = "humantime_serde")]
    pub event_poll_interval: Duration,
    /// Samples taken while their thread serves an HTTP/gRPC request that the http probe of the
    /// same receiver turns into a span carry that span's trace and span id. Default true (it
    /// acts only with the http probe on and a traces pipeline).
    pub trace_link: bool,
    /// How long a sample taken during a request waits for the request's answer (its span);
    /// then it goes out without ids, counted. Default 5s, at most 60s.
    #[serde(with = "humantime_serde")]
    pub trace_link_wait: Duration,
}

impl Default for ProfilingProbeConfig {
    fn default() -> Self {
        ProfilingProbeConfig {
            enabled: true,
            required: false,
            max_entries: MapSizes::default(),
            frequency: 19,
            off_cpu: false,
            off_cpu_min_block: Duration::from_millis(1),
            symbol_cache_bytes: 64 << 20,
            wakeup_bytes: 512 << 10,
            event_poll_interval: Duration::from_millis(200),
            trace_link: true,
            trace_link_wait: Duration::from_secs(5),
        }
    }
}

crate::ebpf::probes::probe_settings!(ProfilingProbeConfig);

/// Highest sampling frequency accepted: beyond it the agent's own unwinding dominates.
pub const MAX_FREQUENCY: u64 = 1000;
/// Longest `trace_link_wait`: samples are held in memory that long.
pub const MAX_TRACE_LINK_WAIT: Duration = Duration::from_secs(60);

impl ProfilingProbeConfig {
    pub fn validate(&self, prefix: &str, errors: &mut Vec<FieldError>) {
        if self.frequency == 0 || self.frequency > MAX_FREQUENCY {
            errors.push(FieldError::new(
                format!("{prefix}.frequency"),
                format!("samples per second and CPU: 1 to {MAX_FREQUENCY}"),
            ));
        }
        if self.symbol_cache_bytes < 1 << 20 {
            errors.push(FieldError::new(
                format!("{prefix}.symbol_cache_bytes"),
                "at least 1048576 (1 MiB)",
            ));
        }
        if self.trace_link_wait > MAX_TRACE_LINK_WAIT {
            errors.push(FieldError::new(
                format!("{prefix}.trace_link_wait"),
                "at most 60s (samples wait in memory that long)",
            ));
        }
        if self.event_poll_interval < Duration::from_millis(10) {
            errors.push(FieldError::new(
                format!("{prefix}.event_poll_interval"),
                "at least 10ms",
            ));
        }
    }
}
