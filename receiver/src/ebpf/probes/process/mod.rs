//! `process`: exec, fork, exit (by exit code, once the process's last thread is gone) and lifetime
//! per cgroup, counted in the kernel; exec
//! and exit also go out as events on a ring buffer, read by [`EventReader`] into the pid table.

mod config;
mod metrics;

use std::collections::HashSet;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use podscope_ebpf::abi::{Hist, ProcessKey};
use podscope_ebpf::{abi, objects};
use prometheus_client::metrics::counter::Counter;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::ProcessProbeConfig;

use super::{Collection, LoadContext, Probe, SingleObjectProbe, StartContext};
use crate::ebpf::catalog::MetricDoc;
use crate::ebpf::events::EventReader;
use crate::ebpf::kernel_memory::Typical;
use crate::ebpf::object::{
    tp_btf, Global, HashTable, MapDef, ObjectSettings, PerCpuCounters, ProbeError, ProbeObject,
    ProbeSpec,
};

const SPEC: ProbeSpec = ProbeSpec {
    name: "process",
    object: objects::PROCESS,
    programs: &[
        tp_btf("podscope_process_exec", "sched_process_exec"),
        tp_btf("podscope_process_fork", "sched_process_fork"),
        tp_btf("podscope_process_exit", "sched_process_exit").or("podscope_process_exit_last_live"),
    ],
    maps: &[COUNTS, LIFETIME, EVENTS, EXITED_GROUPS, EVENTS_LOST],
};

const COUNTS: MapDef = MapDef::entries("process_counts")
    .counted(abi::PROCESS_MAP_COUNTS)
    .typically(Typical::PerCgroup(4));
const LIFETIME: MapDef = MapDef::entries("process_lifetime").counted(abi::PROCESS_MAP_LIFETIME);
const EVENTS: MapDef = MapDef::ring("process_events");
/// Processes whose exit was counted, on kernels whose exit tracepoint does not say which thread
/// is a process's last (a few hundred entries only need to outlive threads exiting together).
const EXITED_GROUPS: MapDef = MapDef::entries("exited_groups").typically(Typical::Full);
/// Events that did not fit in the ring buffer (index 0).
const EVENTS_LOST: MapDef = MapDef::fixed("process_events_lost");

pub struct Process;

impl SingleObjectProbe for Process {
    type Config = ProcessProbeConfig;
    const SPEC: ProbeSpec = SPEC;
    const METRICS: &'static [MetricDoc] = metrics::METRICS;

    fn open(
        config: &ProcessProbeConfig,
        ctx: &mut LoadContext<'_>,
    ) -> Result<Box<dyn Probe>, ProbeError> {
        if !config.lifetime {
            ctx.size_unless_set(LIFETIME.name, 1);
        }
        let settings = ObjectSettings {
            globals: vec![
                Global::U64("wakeup_bytes", config.wakeup_bytes),
                Global::U32("measure_lifetime", config.lifetime as u32),
            ],
            skip: &[],
        };
        let mut object = ctx.object(&SPEC, &settings)?;
        let (ring_events, ring_lost) = ctx.telemetry.ring(EVENTS.name);
        Ok(Box::new(Loaded {
            counts: object.hash(&COUNTS)?,
            lifetime: object.hash(&LIFETIME)?,
            events: Some(object.ring_buf(&EVENTS)?),
            events_lost: object.per_cpu_counters(&EVENTS_LOST)?,
            object,
            poll: config.event_poll_interval,
            ring_events,
            ring_lost,
            lost_seen: 0,
        }))
    }
}

struct Loaded {
    object: ProbeObject,
    counts: HashTable<ProcessKey, u64>,
    lifetime: HashTable<u64, Hist>,
    /// Until the event reader takes it.
    events: Option<RingBuf<MapData>>,
    events_lost: PerCpuCounters,
    poll: Duration,
    ring_events: Counter,
    ring_lost: Counter,
    lost_seen: u64,
}

impl Probe for Loaded {
    fn objects_mut(&mut self) -> Vec<&mut ProbeObject> {
        vec![&mut self.object]
    }

    fn spawn(
        &mut self,
        ctx: &StartContext,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let Some(ring) = self.events.take() else {
            return Ok(Vec::new());
        };
        let reader = EventReader::new(
            ring,
            ctx.processes.clone(),
            self.ring_events.clone(),
            self.poll,
            ctx.new_containers.clone(),
        )?;
        Ok(vec![tokio::spawn(reader.run(cancel.clone()))])
    }

    fn collect(&mut self, out: &mut Collection<'_>) {
        let counts = self.counts.entries();
        let lifetimes = self.lifetime.entries();
        out.saw(counts.keys().map(|k| k.cgroup_id));
        out.saw(lifetimes.keys().copied());
        metrics::add(&mut out.metrics, &counts, &lifetimes);
        let lost = self.events_lost.get(0);
        if lost > self.lost_seen {
            self.ring_lost.inc_by(lost - self.lost_seen);
            self.lost_seen = lost;
        }
    }

    fn forget(&mut self, gone: &HashSet<u64>) {
        self.counts.forget(gone, |k| k.cgroup_id);
        self.lifetime.remove(gone.iter().copied());
    }
}
