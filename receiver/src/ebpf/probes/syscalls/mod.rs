//! `syscalls`: per cgroup and syscall, the count, the errors and (optionally) the latency.
//! Counting only (`errors: false`, `latency: false`) runs one program on syscall entry; errors
//! and latency need the exit hook.

mod config;
mod metrics;

use std::collections::HashSet;

use podscope_ebpf::abi::{Hist, SyscallCounts, SyscallKey};
use podscope_ebpf::{abi, objects};

pub use config::SyscallsProbeConfig;

use super::{Collection, LoadContext, Probe, SingleObjectProbe};
use crate::ebpf::catalog::MetricDoc;
use crate::ebpf::object::{
    tp_btf, Global, MapDef, ObjectSettings, PerCpuHashTable, ProbeError, ProbeObject, ProbeSpec,
};

const SPEC: ProbeSpec = ProbeSpec {
    name: "syscalls",
    object: objects::SYSCALLS,
    programs: &[
        tp_btf(ENTER, "sys_enter"),
        tp_btf(EXIT, "sys_exit"),
        tp_btf(COUNT, "sys_enter"),
    ],
    maps: &[COUNTS, LATENCY, START],
};

/// Times the entry (latency).
const ENTER: &str = "podscope_sys_enter";
/// Counts, errors and latency, on exit.
const EXIT: &str = "podscope_sys_exit";
/// Counts only, on entry.
const COUNT: &str = "podscope_sys_count";

const COUNTS: MapDef = MapDef::entries("syscall_counts").counted(abi::SYSCALLS_MAP_COUNTS);
const LATENCY: MapDef = MapDef::entries("syscall_latency").counted(abi::SYSCALLS_MAP_LATENCY);
/// Entry times, in task storage (sized by the kernel: one per task).
const START: MapDef = MapDef::fixed("syscall_start");

pub struct Syscalls;

impl SingleObjectProbe for Syscalls {
    type Config = SyscallsProbeConfig;
    const SPEC: ProbeSpec = SPEC;
    const METRICS: &'static [MetricDoc] = metrics::METRICS;

    fn open(
        config: &SyscallsProbeConfig,
        ctx: &mut LoadContext<'_>,
    ) -> Result<Box<dyn Probe>, ProbeError> {
        // Counting only needs the entry hook; errors and latency need the exit one.
        let skip: &[&str] = match (config.latency, config.errors) {
            (false, false) => &[ENTER, EXIT],
            (false, true) => &[ENTER, COUNT],
            (true, _) => &[COUNT],
        };
        let settings = ObjectSettings {
            globals: vec![
                Global::U32("measure_latency", config.latency as u32),
                Global::U32("count_errors", config.errors as u32),
            ],
            skip,
        };
        let mut object = ctx.object(&SPEC, &settings)?;
        Ok(Box::new(Loaded {
            counts: object.per_cpu_hash(&COUNTS, SyscallCounts::merge)?,
            latency: object.per_cpu_hash(&LATENCY, Hist::merge)?,
            object,
            measure_latency: config.latency,
        }))
    }
}

struct Loaded {
    object: ProbeObject,
    counts: PerCpuHashTable<u64, SyscallCounts>,
    latency: PerCpuHashTable<SyscallKey, Hist>,
    measure_latency: bool,
}

impl Probe for Loaded {
    fn objects_mut(&mut self) -> Vec<&mut ProbeObject> {
        vec![&mut self.object]
    }

    fn collect(&mut self, out: &mut Collection<'_>) {
        let counts = self.counts.entries();
        let latency = if self.measure_latency {
            self.latency.entries()
        } else {
            Default::default()
        };
        out.saw(counts.keys().copied());
        metrics::add(&mut out.metrics, &counts, &latency);
    }

    fn forget(&mut self, gone: &HashSet<u64>) {
        self.counts.forget(gone, |cgroup| *cgroup);
        self.latency.forget(gone, |k| k.cgroup_id);
    }
}
