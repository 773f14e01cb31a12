//! `profiling`: continuous on-CPU (and, when asked, off-CPU) stack profiles per process and
//! container, symbolized on the node, sent as OTLP profiles every collection interval.
//!
//! The kernel side (`profiling.bpf.c`) records samples on a ring buffer: a perf event per CPU
//! for on-CPU, the scheduler's `sched_switch` and `sys_exit` for off-CPU. The profiler thread
//! ([`profiler`]) unwinds each user stack copy through `.eh_frame` ([`process`]), sums the
//! stacks per interval ([`stacks`]), names the frames ([`symbolize`], with the binaries of
//! [`modules`] read by [`elf`]) and builds the profiles ([`otlp`]). Nothing per sample leaves the
//! thread.
//!
//! [`LocalProfile`] runs the same without a receiver, for `podscope profile`.

mod config;
mod elf;
mod modules;
mod otlp;
mod process;
mod profiler;
mod stacks;
mod symbolize;
#[cfg(test)]
mod tests;
pub mod trace_link;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use aya::programs::PerfEvent;
use opentelemetry_proto::tonic::profiles::v1development::ProfilesData;
use podscope_core::{Batch, FieldError};
use podscope_ebpf::{abi, objects};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::ProfilingProbeConfig;
pub use profiler::{ProfilerCounters, ProfilerSettings};
// The parsers of symbolization inputs, public for the fuzz targets (fuzz/src/lib.rs).
pub use elf::{demangle, ElfModule, KernelSymbols, PerfMap};
pub use process::MapsLine;

use super::{Collection, LoadContext, Probe, SingleObjectProbe, StartContext};
use crate::ebpf::catalog::MetricDoc;
use crate::ebpf::object::{
    error_chain, tp_btf, Global, KernelFeatures, MapDef, ObjectSettings, PerCpuCounters,
    ProbeError, ProbeObject, ProbeSpec,
};
use profiler::{Profiler, StopSignal};

const SPEC: ProbeSpec = ProbeSpec {
    name: "profiling",
    object: objects::PROFILING,
    programs: &[
        tp_btf("podscope_profile_switch", "sched_switch"),
        tp_btf("podscope_profile_sys_exit", "sys_exit"),
    ],
    maps: &[SAMPLES, LOST, BLOCKED, PENDING, PENDING_SCRATCH],
};

/// The perf event program, attached by this module on every CPU.
const ON_CPU_PROGRAM: &str = "podscope_profile_cpu";
/// The off-CPU programs, attached only with `off_cpu`.
const OFF_CPU_PROGRAMS: &[&str] = &["podscope_profile_switch", "podscope_profile_sys_exit"];

const SAMPLES: MapDef = MapDef::ring("profile_samples");
/// Samples that did not fit in the ring buffer (index 0).
const LOST: MapDef = MapDef::fixed("profile_lost");
/// Per thread (task storage): when it blocked.
const BLOCKED: MapDef = MapDef::fixed("profile_blocked").counted(abi::PROFILING_MAP_BLOCKED);
const PENDING: MapDef = MapDef::entries("profile_pending").counted(abi::PROFILING_MAP_PENDING);
const PENDING_SCRATCH: MapDef = MapDef::fixed("profile_pending_scratch");

pub struct Profiling;

impl SingleObjectProbe for Profiling {
    type Config = ProfilingProbeConfig;
    const SPEC: ProbeSpec = SPEC;
    /// Profiles, not metrics: the receiver's profiles pipelines get them.
    const METRICS: &'static [MetricDoc] = &[];
    const MAKES_PROFILES: bool = true;

    fn validate(config: &ProfilingProbeConfig, prefix: &str, errors: &mut Vec<FieldError>) {
        config.validate(prefix, errors);
    }

    fn open(
        config: &ProfilingProbeConfig,
        ctx: &mut LoadContext<'_>,
    ) -> Result<Box<dyn Probe>, ProbeError> {
        let settings = object_settings(config, 0);
        let mut object = ctx.object(&SPEC, &settings)?;
        attach_on_cpu(&mut object, config.frequency)?;
        let (ring_events, ring_lost) = ctx.telemetry.ring(SAMPLES.name);
        let counters = ProfilerCounters {
            ring_events,
            ..ctx.telemetry.profiler.clone()
        };
        Ok(Box::new(Loaded {
            ring: Some(object.ring_buf(&SAMPLES)?),
            lost: object.per_cpu_counters(&LOST)?,
            object,
            config: config.clone(),
            counters,
            ring_lost,
            lost_seen: 0,
            stop: StopSignal::default(),
        }))
    }
}

fn object_settings(config: &ProfilingProbeConfig, target_pid: u32) -> ObjectSettings<'static> {
    ObjectSettings {
        globals: vec![
            Global::U64("wakeup_bytes", config.wakeup_bytes),
            Global::U32("target_tgid", target_pid),
            Global::U64(
                "off_cpu_min_ns",
                config.off_cpu_min_block.as_nanos().min(u64::MAX as u128) as u64,
            ),
        ],
        skip: if config.off_cpu { &[] } else { OFF_CPU_PROGRAMS },
    }
}

/// Attaches the sampling program to every online CPU's cpu-clock at `frequency` Hz.
fn attach_on_cpu(object: &mut ProbeObject, frequency: u64) -> Result<(), ProbeError> {
    let error = |reason: String| ProbeError {
        probe: SPEC.name,
        hook: None,
        reason: format!("perf_event cpu-clock: {reason}"),
    };
    let program: &mut PerfEvent = object
        .program_mut(ON_CPU_PROGRAM)
        .map_err(error)?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| error(error_chain(&e)))?;
    program.load().map_err(|e| error(error_chain(&e)))?;
    let cpus = aya::util::online_cpus().map_err(|(_, e)| error(e.to_string()))?;
    for cpu in cpus {
        program
            .attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Frequency(frequency),
                false,
            )
            .map_err(|e| error(format!("cpu {cpu}: {}", error_chain(&e))))?;
    }
    Ok(())
}

struct Loaded {
    object: ProbeObject,
    /// Until the profiler thread takes it.
    ring: Option<RingBuf<MapData>>,
    lost: PerCpuCounters,
    config: ProfilingProbeConfig,
    counters: ProfilerCounters,
    ring_lost: Counter,
    lost_seen: u64,
    stop: StopSignal,
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
        let Some(ring) = self.ring.take() else {
            return Ok(Vec::new());
        };
        let Some(next) = ctx.profiles.clone() else {
            // In no profiles pipeline: nothing would take the profiles.
            return Ok(Vec::new());
        };
        let (tx, mut rx) = mpsc::channel::<ProfilesData>(2);
        let settings = ProfilerSettings {
            frequency_hz: self.config.frequency,
            interval: ctx.collection_interval,
            poll_interval: self.config.event_poll_interval,
            symbol_cache_bytes: self.config.symbol_cache_bytes,
            host_name: ctx.host_name.clone(),
            proc_root: PathBuf::from("/proc"),
            cgroup_root: ctx.cgroup_root.clone(),
        };
        let mut profiler = Profiler::new(ring, settings, self.counters.clone(), tx);
        if let Some(links) = ctx.trace_links.as_ref().filter(|_| self.config.trace_link) {
            profiler.link_traces(links.clone(), self.config.trace_link_wait);
        }
        let thread = profiler.spawn(self.stop.clone())?;
        let stop = self.stop.clone();
        let cancel = cancel.clone();
        let forward = tokio::spawn(async move {
            loop {
                tokio::select! {
                    data = rx.recv() => match data {
                        Some(data) => send(&next, data).await,
                        None => break,
                    },
                    _ = cancel.cancelled() => {
                        stop.stop();
                        // The thread flushes what it summed, then closes the channel.
                        while let Some(data) = rx.recv().await {
                            send(&next, data).await;
                        }
                        break;
                    }
                }
            }
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        });
        Ok(vec![forward])
    }

    fn collect(&mut self, _out: &mut Collection<'_>) {
        let lost = self.lost.get(0);
        if lost > self.lost_seen {
            self.ring_lost.inc_by(lost - self.lost_seen);
            self.lost_seen = lost;
        }
    }
}

async fn send(next: &Arc<dyn podscope_core::Consumer>, data: ProfilesData) {
    if let Err(e) = next.consume(Batch::profiles(data)).await {
        tracing::warn!(error = %e, "pipeline refused this interval's profiles");
    }
}

/// What `podscope profile` profiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileTarget {
    Pid(u32),
    /// A cgroup directory (absolute, or relative to the cgroup2 mount) and those below it.
    Cgroup(PathBuf),
}

/// A profiler running without a receiver (`podscope profile`): the probe's object loaded with
/// a filter for one process or cgroup, and the profiler thread sending its profiles to
/// [`LocalProfile::profiles`].
pub struct LocalProfile {
    _object: ProbeObject,
    stop: StopSignal,
    thread: Option<std::thread::JoinHandle<()>>,
    handled: Arc<AtomicU64>,
    lost: PerCpuCounters,
    /// Each interval's profiles; closed once the profiler stopped.
    pub profiles: mpsc::Receiver<ProfilesData>,
}

impl LocalProfile {
    /// Loads and starts profiling `target`; profiles come every `interval`.
    pub fn start(
        target: &ProfileTarget,
        config: &ProfilingProbeConfig,
        interval: Duration,
    ) -> anyhow::Result<LocalProfile> {
        let cgroup_root = crate::ebpf::cgroup2_mount()
            .ok_or_else(|| anyhow::anyhow!("no cgroup2 mount found in /proc/self/mountinfo"))?;
        let (target_pid, cgroups) = match target {
            ProfileTarget::Pid(pid) => {
                if !Path::new("/proc").join(pid.to_string()).exists() {
                    anyhow::bail!("no process {pid}");
                }
                (*pid, Vec::new())
            }
            ProfileTarget::Cgroup(path) => (0, cgroup_ids(&cgroup_root, path)?),
        };
        let features = KernelFeatures::detect(Path::new("/sys/kernel/btf/vmlinux"));
        let common = [
            Global::U32("agent_tgid", std::process::id()),
            Global::U32("filter_mode", if cgroups.is_empty() { 0 } else { 1 }),
        ];
        let mut object = ProbeObject::load(
            &SPEC,
            &features,
            &common,
            &config.max_entries.0,
            &object_settings(config, target_pid),
        )
        .map_err(probe_error)?;
        for id in &cgroups {
            object
                .cgroup_filter_mut()
                .insert(id, 1, 0)
                .map_err(|e| anyhow::anyhow!("cannot fill the kernel cgroup filter: {e}"))?;
        }
        attach_on_cpu(&mut object, config.frequency).map_err(probe_error)?;
        let ring = object.ring_buf(&SAMPLES).map_err(probe_error)?;
        let lost = object.per_cpu_counters(&LOST).map_err(probe_error)?;
        let (tx, profiles) = mpsc::channel(4);
        let settings = ProfilerSettings {
            frequency_hz: config.frequency,
            interval,
            poll_interval: config.event_poll_interval,
            symbol_cache_bytes: config.symbol_cache_bytes,
            host_name: String::new(),
            proc_root: PathBuf::from("/proc"),
            cgroup_root,
        };
        let profiler = Profiler::new(ring, settings, ProfilerCounters::default(), tx);
        let handled = profiler.handled.clone();
        let stop = StopSignal::default();
        let thread = profiler.spawn(stop.clone())?;
        Ok(LocalProfile {
            _object: object,
            stop,
            thread: Some(thread),
            handled,
            lost,
            profiles,
        })
    }

    /// Samples read so far, and samples the kernel could not queue.
    pub fn progress(&self) -> (u64, u64) {
        (self.handled.load(Ordering::Relaxed), self.lost.get(0))
    }

    /// Stops sampling; the profiler sends what it summed, then closes [`Self::profiles`].
    pub fn stop(&mut self) {
        self.stop.stop();
    }
}

impl Drop for LocalProfile {
    fn drop(&mut self) {
        self.stop.stop();
        self.profiles.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn probe_error(e: ProbeError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// The ids of the cgroup at `path` (absolute, or relative to `root`) and of every cgroup below.
fn cgroup_ids(root: &Path, path: &Path) -> anyhow::Result<Vec<u64>> {
    use std::os::unix::fs::MetadataExt as _;
    let dir = if path.starts_with(root) {
        path.to_path_buf()
    } else {
        root.join(path.strip_prefix("/").unwrap_or(path))
    };
    let meta = std::fs::metadata(&dir)
        .map_err(|e| anyhow::anyhow!("cgroup {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        anyhow::bail!("cgroup {}: not a directory", dir.display());
    }
    let mut ids = Vec::new();
    let mut todo = vec![dir];
    while let Some(dir) = todo.pop() {
        if let Ok(meta) = std::fs::metadata(&dir) {
            ids.push(meta.ino());
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            todo.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    Ok(ids)
}
