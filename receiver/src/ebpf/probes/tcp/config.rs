use serde::Deserialize;

use crate::ebpf::probes::MapSizes;

/// `probes.tcp:`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpProbeConfig {
    /// Default true.
    pub enabled: bool,
    /// Fail startup if the probe cannot attach (default false: log one line and go on).
    pub required: bool,
    /// Kernel map sizes by map name (see [`MapSizes`]).
    pub max_entries: MapSizes,
    /// Distinct peers (address, server port, role) kept per cgroup, in the kernel: the first
    /// seen; the cgroup's connections with further peers are counted as peer `other`, so neither
    /// a port scan nor a server's many clients can blow up the series or the kernel map. Default
    /// 100.
    pub max_peers: u32,
    /// One connection in this many (a power of two) is timed from established to closed for
    /// `podscope.tcp.connection.duration`, which states it as `podscope.sampling.one_in`; every
    /// connection is still counted, with its bytes and its RTT at close. Timing a connection
    /// keeps a record of it from open to close, written on the CPU that opens it and read on the
    /// one that closes it, and reads the clock: the most of what the probe costs a short
    /// connection (BENCHMARKS.md, issue 11). Default 16; 1 times every connection.
    pub duration_sample_one_in: u32,
}

impl Default for TcpProbeConfig {
    fn default() -> Self {
        TcpProbeConfig {
            enabled: true,
            required: false,
            max_entries: MapSizes::default(),
            max_peers: 100,
            duration_sample_one_in: 16,
        }
    }
}

crate::ebpf::probes::probe_settings!(TcpProbeConfig);
