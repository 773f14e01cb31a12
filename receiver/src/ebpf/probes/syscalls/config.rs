use serde::Deserialize;

use crate::ebpf::probes::MapSizes;

/// `probes.syscalls:`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyscallsProbeConfig {
    /// Default true.
    pub enabled: bool,
    /// Fail startup if the probe cannot attach (default false: log one line and go on).
    pub required: bool,
    /// Kernel map sizes by map name (see [`MapSizes`]).
    pub max_entries: MapSizes,
    /// What counts, errors and latencies are kept by: `group` (`podscope.syscall.group`: io.read,
    /// io.write, fd, net.io, wait, … a dozen at most) or `syscall` (`syscall.name`, one series per
    /// syscall a container makes, often a hundred). Default `group`.
    pub by: SyscallsBy,
    /// Count failed syscalls (return value in -4095..-1): the probe counts on syscall exit, where
    /// the result is known. Default true; with `errors: false` (and no `latency`) it counts on
    /// entry.
    pub errors: bool,
    /// Measure the enter → exit latency of every syscall. Adds a program on every syscall's
    /// entry and a histogram update on exit, several times the cost of counting
    /// (BENCHMARKS.md). Default false.
    pub latency: bool,
    /// Measure the latency of these syscalls only (names as `syscall.name` shows them, e.g.
    /// `[read, write, fsync]`), on their own tracepoints: other syscalls pay nothing for it. Needs
    /// tracefs (mounted if missing and allowed); without it they are timed by a program on every
    /// syscall's entry, as `latency: true` does. Default empty.
    pub latency_syscalls: Vec<String>,
}

/// What syscalls are counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyscallsBy {
    Syscall,
    Group,
}

impl Default for SyscallsProbeConfig {
    fn default() -> Self {
        SyscallsProbeConfig {
            enabled: true,
            required: false,
            max_entries: MapSizes::default(),
            by: SyscallsBy::Group,
            errors: true,
            latency: false,
            latency_syscalls: Vec::new(),
        }
    }
}

crate::ebpf::probes::probe_settings!(SyscallsProbeConfig);
