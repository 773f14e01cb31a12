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
}

impl Default for TcpProbeConfig {
    fn default() -> Self {
        TcpProbeConfig {
            enabled: true,
            required: false,
            max_entries: MapSizes::default(),
            max_peers: 100,
        }
    }
}

crate::ebpf::probes::probe_settings!(TcpProbeConfig);
