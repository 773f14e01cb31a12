//! The syscalls probe's metrics and how its map entries become data points.

use std::collections::HashMap;

use podscope_ebpf::abi::{Hist, SyscallCounts, SyscallKey};

use crate::ebpf::builder::{string_attr, MetricsBuilder, Owner};
use crate::ebpf::catalog::{MetricDoc, MetricKind};

pub const SYSCALLS: MetricDoc = MetricDoc {
    name: "podscope.syscalls",
    kind: MetricKind::Counter,
    unit: "{syscall}",
    description: "System calls completed, by syscall",
    attributes: &["syscall.name"],
};
pub const SYSCALL_ERRORS: MetricDoc = MetricDoc {
    name: "podscope.syscalls.errors",
    kind: MetricKind::Counter,
    unit: "{syscall}",
    description: "System calls that returned an error (-4095..-1), by syscall",
    attributes: &["syscall.name"],
};
pub const SYSCALL_LATENCY: MetricDoc = MetricDoc {
    name: "podscope.syscalls.latency",
    kind: MetricKind::Distribution,
    unit: "ns",
    description: "Time from syscall entry to exit, by syscall (with `latency: true`)",
    attributes: &["syscall.name"],
};

pub const METRICS: &[MetricDoc] = &[SYSCALLS, SYSCALL_ERRORS, SYSCALL_LATENCY];

pub fn syscall_name(nr: u32) -> String {
    syscalls::Sysno::new(nr as usize)
        .map(|s| s.name().to_string())
        .unwrap_or_else(|| format!("syscall_{nr}"))
}

pub fn add(
    b: &mut MetricsBuilder<'_>,
    counts: &HashMap<u64, SyscallCounts>,
    latency: &HashMap<SyscallKey, Hist>,
) {
    for (&cgroup, c) in counts {
        let owner = Owner::Cgroup(cgroup);
        for (nr, (&count, &errors)) in c.count.iter().zip(c.errors.iter()).enumerate() {
            if count == 0 {
                continue;
            }
            let name = syscall_name(nr as u32);
            b.count(
                owner,
                &SYSCALLS,
                vec![string_attr("syscall.name", &name)],
                count,
            );
            if errors > 0 {
                b.count(
                    owner,
                    &SYSCALL_ERRORS,
                    vec![string_attr("syscall.name", &name)],
                    errors,
                );
            }
        }
    }
    for (key, hist) in latency {
        if hist.count() > 0 {
            let name = syscall_name(key.nr);
            b.distribution(
                Owner::Cgroup(key.cgroup_id),
                &SYSCALL_LATENCY,
                vec![string_attr("syscall.name", name)],
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
