//! The syscalls probe's metrics and how its map entries become data points.

use std::collections::HashMap;

use podscope_ebpf::abi::{Hist, SyscallCounts, SyscallKey};
use opentelemetry_proto::tonic::common::v1::KeyValue;

use super::config::SyscallsBy;
use super::groups::group_name;
use crate::ebpf::builder::{string_attr, MetricsBuilder, Owner};
use crate::ebpf::catalog::{MetricDoc, MetricKind};

pub const SYSCALLS: MetricDoc = MetricDoc {
    name: "podscope.syscalls",
    kind: MetricKind::Counter,
    unit: "{syscall}",
    description: "System calls completed, by syscall (`by: syscall`) or syscall group (`by: group`)",
    attributes: &["syscall.name", "podscope.syscall.group"],
};
pub const SYSCALL_ERRORS: MetricDoc = MetricDoc {
    name: "podscope.syscalls.errors",
    kind: MetricKind::Counter,
    unit: "{syscall}",
    description: "System calls that returned an error (-4095..-1), by syscall or syscall group",
    attributes: &["syscall.name", "podscope.syscall.group"],
};
pub const SYSCALL_LATENCY: MetricDoc = MetricDoc {
    name: "podscope.syscalls.latency",
    kind: MetricKind::Distribution,
    unit: "ns",
    description: "Time from syscall entry to exit, by syscall or syscall group (with `latency: true` or `latency_syscalls`)",
    attributes: &["syscall.name", "podscope.syscall.group"],
};

pub const METRICS: &[MetricDoc] = &[SYSCALLS, SYSCALL_ERRORS, SYSCALL_LATENCY];

pub fn syscall_name(nr: u32) -> String {
    syscalls::Sysno::new(nr as usize)
        .map(|s| s.name().to_string())
        .unwrap_or_else(|| format!("syscall_{nr}"))
}

/// The data point attribute naming slot `slot`.
fn slot_attr(by: SyscallsBy, slot: u32) -> KeyValue {
    match by {
        SyscallsBy::Syscall => string_attr("syscall.name", syscall_name(slot)),
        SyscallsBy::Group => string_attr("podscope.syscall.group", group_name(slot)),
    }
}

pub fn add(
    b: &mut MetricsBuilder<'_>,
    by: SyscallsBy,
    counts: &HashMap<SyscallKey, SyscallCounts>,
    latency: &HashMap<SyscallKey, Hist>,
) {
    for (key, c) in counts {
        let owner = Owner::Cgroup(key.cgroup_id);
        if c.count > 0 {
            b.count(owner, &SYSCALLS, vec![slot_attr(by, key.slot)], c.count);
        }
        if c.errors > 0 {
            b.count(owner, &SYSCALL_ERRORS, vec![slot_attr(by, key.slot)], c.errors);
        }
    }
    for (key, hist) in latency {
        if hist.count() > 0 {
            b.distribution(
                Owner::Cgroup(key.cgroup_id),
                &SYSCALL_LATENCY,
                vec![slot_attr(by, key.slot)],
                hist,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_come_from_the_syscall_table() {
        assert_eq!(
            super::syscall_name(syscalls::Sysno::openat.id() as u32),
            "openat"
        );
        assert_eq!(super::syscall_name(100_000), "syscall_100000");
    }
}
