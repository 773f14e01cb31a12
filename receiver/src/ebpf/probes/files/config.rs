use serde::Deserialize;

use crate::ebpf::probes::MapSizes;

/// `probes.files:`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesProbeConfig {
    /// Default true.
    pub enabled: bool,
    /// Fail startup if the probe cannot attach (default false: log one line and go on).
    pub required: bool,
    /// Kernel map sizes by map name (see [`MapSizes`]).
    pub max_entries: MapSizes,
    /// Where the probe attaches: `tracepoints` (the open syscalls' own, `syscalls:sys_exit_openat`
    /// …: other syscalls run nothing of this probe; needs tracefs), `tp_btf` (sys_enter/sys_exit,
    /// which every syscall runs) or `auto` (tracepoints when tracefs is there or can be mounted,
    /// else tp_btf). Default `auto`.
    pub hooks: FilesHooks,
    /// Count opens per path (successful opens only). Default false: paths can be sensitive and
    /// numerous.
    pub capture_paths: bool,
    /// With `capture_paths`: the paths reported per cgroup and interval, most opened first; the
    /// rest are summed as `other`. Default 20.
    pub top_paths: usize,
    /// With `capture_paths`: distinct paths the kernel tracks per cgroup and interval; opens of
    /// further paths are counted in `other` in the kernel. At least `top_paths`. Default 64.
    pub tracked_paths: u32,
}

/// Where the files probe attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilesHooks {
    Auto,
    Tracepoints,
    TpBtf,
}

impl Default for FilesProbeConfig {
    fn default() -> Self {
        FilesProbeConfig {
            enabled: true,
            required: false,
            max_entries: MapSizes::default(),
            hooks: FilesHooks::Auto,
            capture_paths: false,
            top_paths: 20,
            tracked_paths: 64,
        }
    }
}

crate::ebpf::probes::probe_settings!(FilesProbeConfig);
