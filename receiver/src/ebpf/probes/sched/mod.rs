//! `sched`: run-queue latency (runnable → running) and context switches (voluntary,
//! involuntary) per cgroup.

mod metrics;

use std::collections::HashSet;

use podscope_ebpf::abi::{Hist, SwitchKey};
use podscope_ebpf::{abi, objects};

use super::{BasicProbeConfig, Collection, LoadContext, Probe, SingleObjectProbe};
use crate::ebpf::catalog::MetricDoc;
use crate::ebpf::kernel_memory::Typical;
use crate::ebpf::object::{
    tp_btf, HashTable, MapDef, ObjectSettings, ProbeError, ProbeObject, ProbeSpec,
};

const SPEC: ProbeSpec = ProbeSpec {
    name: "sched",
    object: objects::SCHED,
    programs: &[
        tp_btf("podscope_sched_wakeup", "sched_wakeup"),
        tp_btf("podscope_sched_wakeup_new", "sched_wakeup_new"),
        tp_btf("podscope_sched_switch", "sched_switch"),
    ],
    maps: &[RUNQ_LATENCY, SWITCHES, RUNNABLE_SINCE],
};

const RUNQ_LATENCY: MapDef = MapDef::entries("runq_latency").counted(abi::SCHED_MAP_RUNQ_LATENCY);
const SWITCHES: MapDef = MapDef::entries("context_switches")
    .counted(abi::SCHED_MAP_SWITCHES)
    .typically(Typical::PerCgroup(2));
/// Per thread (task storage): when it became runnable; a thread the kernel could not give an entry
/// is counted as a refused insert.
const RUNNABLE_SINCE: MapDef =
    MapDef::fixed("runnable_since").counted(abi::SCHED_MAP_RUNNABLE_SINCE);

pub struct Sched;

impl SingleObjectProbe for Sched {
    type Config = BasicProbeConfig;
    const SPEC: ProbeSpec = SPEC;
    const METRICS: &'static [MetricDoc] = metrics::METRICS;

    fn open(
        _config: &BasicProbeConfig,
        ctx: &mut LoadContext<'_>,
    ) -> Result<Box<dyn Probe>, ProbeError> {
        let mut object = ctx.object(&SPEC, &ObjectSettings::default())?;
        Ok(Box::new(Loaded {
            runq: object.hash(&RUNQ_LATENCY)?,
            switches: object.hash(&SWITCHES)?,
            object,
        }))
    }
}

struct Loaded {
    object: ProbeObject,
    runq: HashTable<u64, Hist>,
    switches: HashTable<SwitchKey, u64>,
}

impl Probe for Loaded {
    fn objects_mut(&mut self) -> Vec<&mut ProbeObject> {
        vec![&mut self.object]
    }

    fn collect(&mut self, out: &mut Collection<'_>) {
        let runq = self.runq.entries();
        let switches = self.switches.entries();
        out.saw(runq.keys().copied());
        out.saw(switches.keys().map(|k| k.cgroup_id));
        metrics::add(&mut out.metrics, &runq, &switches);
    }

    fn forget(&mut self, gone: &HashSet<u64>) {
        self.runq.remove(gone.iter().copied());
        self.switches.forget(gone, |k| k.cgroup_id);
    }
}
