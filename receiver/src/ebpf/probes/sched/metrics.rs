//! The sched probe's metrics and how its map entries become data points.

use std::collections::HashMap;

use podscope_ebpf::abi::{Hist, SwitchKey, SWITCH_VOLUNTARY};

use crate::ebpf::builder::{string_attr, MetricsBuilder, Owner};
use crate::ebpf::catalog::{MetricDoc, MetricKind};

pub const RUNQ_LATENCY: MetricDoc = MetricDoc {
    name: "podscope.sched.runqueue.latency",
    kind: MetricKind::Distribution,
    unit: "ns",
    description: "Time threads waited runnable for a CPU (wakeup or preemption → switched in)",
    attributes: &[],
};
pub const CONTEXT_SWITCHES: MetricDoc = MetricDoc {
    name: "podscope.sched.context_switches",
    kind: MetricKind::Counter,
    unit: "{switch}",
    description: "Context switches away from the cgroup's threads, voluntary (blocked) or involuntary (preempted)",
    attributes: &["podscope.sched.switch"],
};

pub const METRICS: &[MetricDoc] = &[RUNQ_LATENCY, CONTEXT_SWITCHES];

pub fn add(
    b: &mut MetricsBuilder<'_>,
    runq: &HashMap<u64, Hist>,
    switches: &HashMap<SwitchKey, u64>,
) {
    for (cgroup, hist) in runq {
        b.distribution(Owner::Cgroup(*cgroup), &RUNQ_LATENCY, vec![], hist);
    }
    for (key, &count) in switches {
        let kind = if key.kind == SWITCH_VOLUNTARY {
            "voluntary"
        } else {
            "involuntary"
        };
        b.count(
            Owner::Cgroup(key.cgroup_id),
            &CONTEXT_SWITCHES,
            vec![string_attr("podscope.sched.switch", kind)],
            count,
        );
    }
}
