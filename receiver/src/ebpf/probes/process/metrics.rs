//! The process probe's metrics and how its map entries become data points.

use std::collections::HashMap;

use podscope_ebpf::abi::{Hist, ProcessKey, PROCESS_EXEC, PROCESS_EXIT, PROCESS_FORK};

use crate::ebpf::builder::{int_attr, MetricsBuilder, Owner};
use crate::ebpf::catalog::{MetricDoc, MetricKind};

pub const EXECS: MetricDoc = MetricDoc {
    name: "podscope.process.execs",
    kind: MetricKind::Counter,
    unit: "{exec}",
    description: "Programs executed (execve) in the cgroup",
    attributes: &[],
};
pub const FORKS: MetricDoc = MetricDoc {
    name: "podscope.process.forks",
    kind: MetricKind::Counter,
    unit: "{process}",
    description: "Processes created (fork/clone of a new process, not a thread)",
    attributes: &[],
};
pub const EXITS: MetricDoc = MetricDoc {
    name: "podscope.process.exits",
    kind: MetricKind::Counter,
    unit: "{process}",
    description: "Processes that exited (counted when the last thread is gone), by the exit code the parent sees (128 + signal when killed by a signal)",
    attributes: &["process.exit.code"],
};
pub const LIFETIME: MetricDoc = MetricDoc {
    name: "podscope.process.lifetime",
    kind: MetricKind::Distribution,
    unit: "ns",
    description: "Lifetime of processes that exited, from the start of the process to the exit of its last thread (with `lifetime: true`)",
    attributes: &[],
};

pub const METRICS: &[MetricDoc] = &[EXECS, FORKS, EXITS, LIFETIME];

pub fn add(
    b: &mut MetricsBuilder<'_>,
    counts: &HashMap<ProcessKey, u64>,
    lifetimes: &HashMap<u64, Hist>,
) {
    for (key, &count) in counts {
        let owner = Owner::Cgroup(key.cgroup_id);
        match key.kind {
            PROCESS_EXEC => b.count(owner, &EXECS, vec![], count),
            PROCESS_FORK => b.count(owner, &FORKS, vec![], count),
            PROCESS_EXIT => b.count(
                owner,
                &EXITS,
                vec![int_attr("process.exit.code", key.exit_code as i64)],
                count,
            ),
            _ => {}
        }
    }
    for (cgroup, hist) in lifetimes {
        b.distribution(Owner::Cgroup(*cgroup), &LIFETIME, vec![], hist);
    }
}
