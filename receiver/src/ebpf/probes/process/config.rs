use std::time::Duration;

use serde::Deserialize;

use crate::ebpf::probes::MapSizes;

/// `probes.process:`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessProbeConfig {
    /// Default true.
    pub enabled: bool,
    /// Fail startup if the probe cannot attach (default false: log one line and go on).
    pub required: bool,
    /// Kernel map sizes by map name (see [`MapSizes`]).
    pub max_entries: MapSizes,
    /// Bytes of exec/exit events that wake the agent early; below that it reads them every
    /// `event_poll_interval`. Default 65536.
    pub wakeup_bytes: u64,
    /// Default 200ms.
    #[serde(with = "humantime_serde")]
    pub event_poll_interval: Duration,
    /// Report each cgroup's distribution of process lifetimes (`podscope.process.lifetime`).
    /// Default false: processes live from microseconds to months, so it spans many buckets.
    pub lifetime: bool,
}

impl Default for ProcessProbeConfig {
    fn default() -> Self {
        ProcessProbeConfig {
            enabled: true,
            required: false,
            max_entries: MapSizes::default(),
            wakeup_bytes: 65536,
            event_poll_interval: Duration::from_millis(200),
            lifetime: false,
        }
    }
}

crate::ebpf::probes::probe_settings!(ProcessProbeConfig);
