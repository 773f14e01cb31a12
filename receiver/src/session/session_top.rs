//! `top` as a `TraceSession` probe: every [`TOP_INTERVAL`] one event per pod of the session on
//! this node with what it used in that interval — CPU seconds (its cgroup's `cpu.stat`) and the
//! syscalls, opens, TCP retransmits and requests the eBPF receivers naming the session
//! extension counted for its cgroups — and, in the status, each pod's totals since it joined
//! the run (`podCounters`, at most [`MAX_PODS`] pods, the busiest first).
//!
//! The kernel counters come from the receivers' collections: a pod's totals start at the first
//! collection after it joined (what it did before that collection is not its session's), and a
//! counter is left out while no receiver runs its probe (`syscalls`, `files`, `tcp`, `http`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use podscope_core::session::{Event, TraceProbe};
use podscope_k8s::cgroup::CgroupIndex;
use serde_json::{json, Map, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::figures::{CgroupFigures, ProbesOn};
use super::session_probes::RunSink;
use super::top::cgroup_cpu_usec;
use super::Shared;

/// How often a session's pods are sampled.
pub const TOP_INTERVAL: Duration = Duration::from_secs(5);
/// Pods in a status's `podCounters`.
pub const MAX_PODS: usize = 20;

/// One pod's counters since it joined the run.
#[derive(Debug)]
struct PodTotals {
    namespace: String,
    /// Its cgroup directories highest in the tree (absolute): what is summed for it.
    dirs: Vec<PathBuf>,
    joined: Instant,
    /// When it joined, Unix ns: its kernel totals start at the first collection after.
    joined_unix_ns: u64,
    samples: u64,
    cpu_start_usec: Option<u64>,
    cpu_last_usec: Option<u64>,
    /// The cumulative kernel figures at its first collection, and at the last sample.
    kernel_base: Option<CgroupFigures>,
    kernel_last: Option<CgroupFigures>,
    probes: ProbesOn,
}

impl PodTotals {
    fn new(namespace: String, dirs: Vec<PathBuf>) -> PodTotals {
        let cpu = cpu_usec(&dirs);
        PodTotals {
            namespace,
            dirs,
            joined: Instant::now(),
            joined_unix_ns: unix_ns(SystemTime::now()),
            samples: 0,
            cpu_start_usec: cpu,
            cpu_last_usec: cpu,
            kernel_base: None,
            kernel_last: None,
            probes: ProbesOn::default(),
        }
    }

    /// A pod's status row: totals and the mean CPU since it joined.
    fn status(&self, pod: &str) -> Value {
        let seconds = self.joined.elapsed().as_secs_f64();
        let cpu_seconds = match (self.cpu_start_usec, self.cpu_last_usec) {
            (Some(start), Some(last)) => Some(last.saturating_sub(start) as f64 / 1e6),
            _ => None,
        };
        let mut row = Map::new();
        row.insert("pod".into(), json!(pod));
        row.insert("samples".into(), json!(self.samples));
        row.insert("seconds".into(), json!(round3(seconds)));
        if let Some(cpu) = cpu_seconds {
            row.insert("cpuSeconds".into(), json!(round3(cpu)));
            if seconds > 0.0 {
                row.insert("cpuCoresMean".into(), json!(round3(cpu / seconds)));
            }
        }
        if let (Some(base), Some(last)) = (&self.kernel_base, &self.kernel_last) {
            let total = last.since(base);
            for (name, on, value) in kernel_counters(self.probes, &total) {
                if on {
                    row.insert(name.into(), json!(value));
                }
            }
        }
        Value::Object(row)
    }
}

/// The kernel counters a row has (status name, whether its probe runs, value).
fn kernel_counters(probes: ProbesOn, figures: &CgroupFigures) -> [(&'static str, bool, u64); 4] {
    [
        ("syscalls", probes.syscalls, figures.syscalls),
        ("opens", probes.files, figures.opens),
        ("tcpRetransmits", probes.tcp, figures.tcp_retransmits),
        ("requests", probes.http, figures.request_duration_s.count()),
    ]
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

fn unix_ns(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn cpu_usec(dirs: &[PathBuf]) -> Option<u64> {
    dirs.iter().map(|dir| cgroup_cpu_usec(dir.as_path())).sum()
}

/// The session's pods by name: their namespace and highest cgroup directories.
fn pods_of(
    cgroups: &[u64],
    index: &CgroupIndex,
    sink: &RunSink,
) -> BTreeMap<String, (String, Vec<PathBuf>)> {
    let paths: Vec<(u64, &str)> = cgroups
        .iter()
        .filter_map(|id| Some((*id, index.path(*id)?)))
        .collect();
    let mut pods: BTreeMap<String, (String, Vec<PathBuf>)> = BTreeMap::new();
    for (id, path) in &paths {
        // A directory below another of the run's is summed with it already.
        let nested = paths
            .iter()
            .any(|(_, other)| path.len() > other.len() && Path::new(path).starts_with(other));
        if nested {
            continue;
        }
        let labels = sink.labels(*id);
        let entry = pods
            .entry(labels.pod.clone())
            .or_insert_with(|| (labels.namespace.clone(), Vec::new()));
        entry
            .1
            .push(index.root().join(path.trim_start_matches('/')));
    }
    pods
}

/// A session's `top` probe running.
pub struct TopRun {
    pods: Arc<Mutex<BTreeMap<String, PodTotals>>>,
    count: Arc<AtomicU64>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    sink: RunSink,
}

impl TopRun {
    pub fn start(shared: Arc<Shared>, cgroups: &[u64], index: &CgroupIndex, sink: RunSink) -> Self {
        let pods: BTreeMap<String, PodTotals> = pods_of(cgroups, index, &sink)
            .into_iter()
            .map(|(pod, (namespace, dirs))| (pod, PodTotals::new(namespace, dirs)))
            .collect();
        let pods = Arc::new(Mutex::new(pods));
        let count = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let root = index.root().to_path_buf();
        let task = tokio::spawn(sample_every_interval(
            shared,
            root,
            pods.clone(),
            count.clone(),
            stop.clone(),
            sink.clone(),
        ));
        let run = TopRun {
            pods,
            count,
            stop,
            task,
            sink,
        };
        run.write_summary();
        run
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Pods that joined start their totals now; pods that left keep theirs.
    pub fn retarget(&mut self, cgroups: &[u64], index: &CgroupIndex) {
        let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        for (pod, (namespace, dirs)) in pods_of(cgroups, index, &self.sink) {
            match pods.get_mut(&pod) {
                Some(totals) => totals.dirs = dirs,
                None => {
                    pods.insert(pod, PodTotals::new(namespace, dirs));
                }
            }
        }
    }

    fn write_summary(&self) {
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        write_pod_counters(&pods, &self.sink);
    }

    /// Stops sampling; (rows counted, 0: nothing is queued to lose).
    pub async fn finish(self) -> (u64, u64) {
        self.stop.cancel();
        let _ = self.task.await;
        (self.count.load(Ordering::Relaxed), 0)
    }
}

fn write_pod_counters(pods: &BTreeMap<String, PodTotals>, sink: &RunSink) {
    let rows = pods
        .iter()
        .map(|(pod, totals)| totals.status(pod))
        .collect();
    sink.summary().set_pod_counters(bounded(rows));
}

/// The busiest [`MAX_PODS`] rows (by CPU seconds, then name).
fn bounded(mut rows: Vec<Value>) -> Value {
    rows.sort_by(|a, b| {
        let cpu = |row: &Value| row["cpuSeconds"].as_f64().unwrap_or(0.0);
        cpu(b)
            .total_cmp(&cpu(a))
            .then_with(|| a["pod"].as_str().cmp(&b["pod"].as_str()))
    });
    rows.truncate(MAX_PODS);
    Value::Array(rows)
}

/// The merged `podCounters` of nodes' entries (a pod runs on one node: their rows side by
/// side), bounded again; `None` when no entry has them.
pub fn merge_pod_counters<'a>(entries: impl IntoIterator<Item = &'a Value>) -> Option<Value> {
    let mut any = false;
    let mut rows = Vec::new();
    for entry in entries {
        if let Some(pods) = entry["podCounters"].as_array() {
            any = true;
            rows.extend(pods.iter().cloned());
        }
    }
    any.then(|| bounded(rows))
}

async fn sample_every_interval(
    shared: Arc<Shared>,
    root: PathBuf,
    pods: Arc<Mutex<BTreeMap<String, PodTotals>>>,
    count: Arc<AtomicU64>,
    stop: CancellationToken,
    sink: RunSink,
) {
    let mut ticker = tokio::time::interval(TOP_INTERVAL);
    // The first tick is at once: the baseline is taken at the start.
    ticker.tick().await;
    let mut last = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let interval = last.elapsed().as_secs_f64();
        last = Instant::now();
        let now_unix_ns = unix_ns(SystemTime::now());
        let mut events = Vec::new();
        {
            let mut pods = pods.lock().unwrap_or_else(|e| e.into_inner());
            for (pod, totals) in pods.iter_mut() {
                events.push(sample(
                    &shared,
                    &root,
                    pod,
                    totals,
                    interval,
                    now_unix_ns,
                    &sink,
                ));
            }
            write_pod_counters(&pods, &sink);
        }
        for event in events {
            if !sink.rate.admit(crate::ebpf::clock::monotonic_now_ns()) {
                continue;
            }
            count.fetch_add(1, Ordering::Relaxed);
            sink.keep(&event);
        }
    }
}

/// Samples one pod: its totals move on; the event of what it used in the interval.
fn sample(
    shared: &Shared,
    root: &Path,
    pod: &str,
    totals: &mut PodTotals,
    interval: f64,
    now_unix_ns: u64,
    sink: &RunSink,
) -> Event {
    let mut fields = BTreeMap::new();
    fields.insert("interval_s".to_string(), format!("{interval:.3}"));
    let cpu = cpu_usec(&totals.dirs);
    if let (Some(before), Some(now)) = (totals.cpu_last_usec, cpu) {
        let used = now.saturating_sub(before) as f64 / 1e6;
        fields.insert("cpu_seconds".to_string(), format!("{used:.3}"));
    }
    if cpu.is_some() {
        totals.cpu_last_usec = cpu;
        totals.cpu_start_usec = totals.cpu_start_usec.or(cpu);
    }
    if let Some((collected, probes, figures)) = shared.kernel_figures.cumulative(root, &totals.dirs)
    {
        totals.probes = probes;
        match &totals.kernel_last {
            // The first collection after it joined is where its totals start.
            None if collected > totals.joined_unix_ns => {
                totals.kernel_base = Some(figures.clone());
                totals.kernel_last = Some(figures);
            }
            None => {}
            Some(last) => {
                let used = figures.since(last);
                for (name, on, value) in kernel_counters(probes, &used) {
                    if on {
                        fields.insert(snake_case(name), value.to_string());
                    }
                }
                totals.kernel_last = Some(figures);
            }
        }
    }
    totals.samples += 1;
    Event {
        time_unix_nano: now_unix_ns,
        node: sink.node.clone(),
        namespace: totals.namespace.clone(),
        pod: pod.to_string(),
        container: String::new(),
        probe: TraceProbe::Top,
        pid: 0,
        tid: 0,
        comm: String::new(),
        fields,
    }
}

/// `tcpRetransmits` (a status key) as an event field: `tcp_retransmits`.
fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_keys_become_event_fields() {
        assert_eq!(snake_case("tcpRetransmits"), "tcp_retransmits");
        assert_eq!(snake_case("opens"), "opens");
    }

    #[test]
    fn pod_counters_keep_the_busiest_pods_across_nodes() {
        let node = |pods: std::ops::Range<usize>| json!({"podCounters": pods.map(|i| json!({"pod": format!("web-{i:02}"), "cpuSeconds": i as f64})).collect::<Vec<_>>()});
        let merged = merge_pod_counters([&node(0..15), &node(15..30), &json!({})]).unwrap();
        let rows = merged.as_array().unwrap();
        assert_eq!(rows.len(), MAX_PODS);
        assert_eq!(rows[0], json!({"pod": "web-29", "cpuSeconds": 29.0}));
        assert_eq!(rows[MAX_PODS - 1]["pod"], "web-10");
        assert_eq!(merge_pod_counters([&json!({"top": {}})]), None);
    }
}
