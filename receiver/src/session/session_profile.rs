//! `profile` as a `TraceSession` probe: the profiling probe run on the session's pods for the
//! run (one [`LocalProfile`] per pod cgroup, as `kubectl podscope profile` runs it; a pod that
//! joins gets its own from then on). What it samples is folded as it comes (`frame;…;leaf`
//! stacks with their sample counts, per pod, at most [`MAX_STACKS`] stacks per pod, the rest
//! under [`OTHER_STACK`]); the status's `top.profile` is the functions most often on CPU (the
//! leaf frame of each sample: the summary's bounded table), `events.profile` the samples. When
//! the run ends each pod's folded stacks go to the session's log, one event each (`stack`,
//! `samples`), which `kubectl podscope logs NAME --folded` prints as a folded file.
//!
//! It needs the agent binary's profile encoder (which folds); without one it does not start.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::profiles::v1development::ProfilesData;
use podscope_core::session::{Event, ProfileFormat, TraceProbe};
use podscope_k8s::cgroup::CgroupIndex;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::profile::{EncodeProfiles, ProfileEncoder};
use super::session_probes::RunSink;
use super::targets::CgroupLabels;
use crate::ebpf::profiling::{LocalProfile, ProfileTarget, ProfilingProbeConfig};

/// How often the profilers hand over what they summed.
const PROFILE_INTERVAL: Duration = Duration::from_secs(1);
/// Distinct stacks kept per pod and run.
pub const MAX_STACKS: usize = 5000;
/// The stack that samples of stacks past [`MAX_STACKS`] are counted under.
pub const OTHER_STACK: &str = "(other stacks)";

/// The leaf frame (the function on CPU) of a folded stack, `thread;root;…;leaf`.
pub fn leaf(stack: &str) -> &str {
    stack.rsplit(';').next().unwrap_or(stack)
}

/// `(stack, samples)` of folded text, `stack count` a line.
pub fn parse_folded(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|line| {
            let (stack, count) = line.rsplit_once(' ')?;
            Some((stack.to_string(), count.parse().ok()?))
        })
        .collect()
}

/// One pod's folded stacks.
#[derive(Debug, Default)]
struct PodStacks {
    namespace: String,
    stacks: HashMap<String, u64>,
}

impl PodStacks {
    fn add(&mut self, stack: String, samples: u64) {
        let key = if self.stacks.len() >= MAX_STACKS && !self.stacks.contains_key(&stack) {
            OTHER_STACK.to_string()
        } else {
            stack
        };
        *self.stacks.entry(key).or_default() += samples;
    }
}

/// A pod cgroup's profiler, as the folding task holds it.
struct Profiler {
    labels: CgroupLabels,
    profile: LocalProfile,
}

/// A session's profile probe running.
pub struct ProfileRun {
    config: ProfilingProbeConfig,
    /// The cgroup directories profiled (each pod's highest ones).
    profiled: Vec<PathBuf>,
    add: mpsc::UnboundedSender<Profiler>,
    samples: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
    lost_reported: u64,
    stop: CancellationToken,
    task: JoinHandle<u64>,
    sink: RunSink,
}

impl ProfileRun {
    /// Starts profiling the pods of `cgroups`; refused when this agent cannot (no encoder, or
    /// the profiling probe does not load here).
    pub fn start(
        encoder: ProfileEncoder,
        cgroups: &[u64],
        index: &CgroupIndex,
        sink: RunSink,
    ) -> Result<Self, String> {
        let Some(encode) = encoder.0 else {
            return Err(
                "probe profile: this agent build cannot fold profiles (no profile encoder)".into(),
            );
        };
        let (add, added) = mpsc::unbounded_channel();
        let samples = Arc::new(AtomicU64::new(0));
        let lost = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn(fold_until_stopped(
            encode,
            added,
            samples.clone(),
            lost.clone(),
            stop.clone(),
            sink.clone(),
        ));
        let mut run = ProfileRun {
            config: ProfilingProbeConfig::default(),
            profiled: Vec::new(),
            add,
            samples,
            lost,
            lost_reported: 0,
            stop,
            task,
            sink,
        };
        run.profile_new(cgroups, index)?;
        Ok(run)
    }

    /// Starts a profiler for each highest cgroup directory of `cgroups` not profiled yet.
    fn profile_new(&mut self, cgroups: &[u64], index: &CgroupIndex) -> Result<(), String> {
        let paths: Vec<(u64, &str)> = cgroups
            .iter()
            .filter_map(|id| Some((*id, index.path(*id)?)))
            .collect();
        for (id, path) in &paths {
            let nested = paths.iter().any(|(_, other)| {
                path.len() > other.len() && std::path::Path::new(path).starts_with(other)
            });
            let dir = index.root().join(path.trim_start_matches('/'));
            if nested || self.profiled.contains(&dir) {
                continue;
            }
            let profile = LocalProfile::start(
                &ProfileTarget::Cgroup(dir.clone()),
                &self.config,
                PROFILE_INTERVAL,
            )
            .map_err(|e| format!("probe profile: the profiling probe cannot run: {e:#}"))?;
            self.profiled.push(dir);
            let _ = self.add.send(Profiler {
                labels: self.sink.labels(*id),
                profile,
            });
        }
        Ok(())
    }

    /// Samples counted so far.
    pub fn count(&self) -> u64 {
        self.samples.load(Ordering::Relaxed)
    }

    /// Samples the kernel could not queue, since the last call.
    pub fn lost_since(&mut self) -> u64 {
        let total = self.lost.load(Ordering::Relaxed);
        let new = total.saturating_sub(self.lost_reported);
        self.lost_reported = total.max(self.lost_reported);
        new
    }

    /// Pods that joined are profiled from now on (those that left keep what they had).
    pub fn retarget(&mut self, cgroups: &[u64], index: &CgroupIndex) {
        if let Err(e) = self.profile_new(cgroups, index) {
            tracing::warn!(session = %self.sink.session, error = %e, "TraceSession: cannot profile a pod that joined");
        }
    }

    /// Stops the profilers, folds what they still had and keeps every pod's stacks in the
    /// session's log; (samples, samples lost since the last call).
    pub async fn finish(mut self) -> (u64, u64) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
        let lost = self.lost_since();
        (self.samples.load(Ordering::Relaxed), lost)
    }
}

async fn fold_until_stopped(
    encode: EncodeProfiles,
    mut added: mpsc::UnboundedReceiver<Profiler>,
    samples: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
    stop: CancellationToken,
    sink: RunSink,
) -> u64 {
    let mut profilers: Vec<Profiler> = Vec::new();
    let mut pods: BTreeMap<String, PodStacks> = BTreeMap::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(profiler) = added.recv() => profilers.push(profiler),
            _ = ticker.tick() => {
                for profiler in &mut profilers {
                    while let Ok(data) = profiler.profile.profiles.try_recv() {
                        fold(encode, &profiler.labels, &data, &mut pods, &samples, &sink);
                    }
                }
            }
        }
    }
    while let Ok(profiler) = added.try_recv() {
        profilers.push(profiler);
    }
    let mut kernel_lost = 0;
    for profiler in &mut profilers {
        profiler.profile.stop();
        while let Some(data) = profiler.profile.profiles.recv().await {
            fold(encode, &profiler.labels, &data, &mut pods, &samples, &sink);
        }
        kernel_lost += profiler.profile.progress().1;
    }
    lost.store(kernel_lost, Ordering::Relaxed);
    drop(profilers);
    keep_stacks(&pods, &sink);
    samples.load(Ordering::Relaxed)
}

/// Folds one interval's profile of `pod` into its stacks and the run's summary.
fn fold(
    encode: EncodeProfiles,
    labels: &CgroupLabels,
    data: &ProfilesData,
    pods: &mut BTreeMap<String, PodStacks>,
    samples: &AtomicU64,
    sink: &RunSink,
) {
    let text = encode(std::slice::from_ref(data), ProfileFormat::Folded);
    let folded = parse_folded(&String::from_utf8_lossy(&text));
    let stacks = pods.entry(labels.pod.clone()).or_insert_with(|| PodStacks {
        namespace: labels.namespace.clone(),
        stacks: HashMap::new(),
    });
    let mut summary = sink.summary();
    for (stack, count) in folded {
        samples.fetch_add(count, Ordering::Relaxed);
        summary.add_counted(TraceProbe::Profile, leaf(&stack).to_string(), count, None);
        stacks.add(stack, count);
    }
}

/// Each pod's stacks as events of the session's log, the most sampled first.
fn keep_stacks(pods: &BTreeMap<String, PodStacks>, sink: &RunSink) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    for (pod, stacks) in pods {
        let mut rows: Vec<(&String, &u64)> = stacks.stacks.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        for (stack, count) in rows {
            sink.keep(&Event {
                time_unix_nano: now,
                node: sink.node.clone(),
                namespace: stacks.namespace.clone(),
                pod: pod.clone(),
                container: String::new(),
                probe: TraceProbe::Profile,
                pid: 0,
                tid: 0,
                comm: String::new(),
                fields: BTreeMap::from([
                    ("samples".to_string(), count.to_string()),
                    ("stack".to_string(), stack.clone()),
                ]),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_lines_are_read_and_their_leaf_is_the_function_on_cpu() {
        let folded = parse_folded("burn;main;spin 12\nsh 3\nnot a line\n");
        assert_eq!(
            folded,
            vec![("burn;main;spin".to_string(), 12), ("sh".to_string(), 3)]
        );
        assert_eq!(leaf("burn;main;spin"), "spin");
        assert_eq!(leaf("sh"), "sh");
    }

    #[test]
    fn stacks_past_the_bound_are_counted_together() {
        let mut pod = PodStacks::default();
        for i in 0..MAX_STACKS + 3 {
            pod.add(format!("t;f{i}"), 1);
        }
        pod.add("t;f0".into(), 1);
        assert_eq!(pod.stacks.len(), MAX_STACKS + 1);
        assert_eq!(pod.stacks[OTHER_STACK], 3);
        assert_eq!(pod.stacks["t;f0"], 2);
    }
}
