//! The task that keeps a receiver's `Probe` instances in step with the cluster: a Probe that
//! selects pods on this node gets its own instance (its probes loaded with a kernel filter of
//! those pods' cgroups only, its own collection task), rebuilt when its spec changes (the new
//! one loaded before the old one stops), stopped when it is deleted or selects no pod here any
//! more; each outcome goes to the Probe's `status.nodes` entry of this node, a failure also to
//! an Event.
//!
//! It must not widen the agent's own probes: instances are separate kernel objects with filters
//! of their own, and the receiver's `cgroup_filter` is never touched.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use podscope_core::Consumer;
use podscope_k8s::cgroup::CgroupIndex;
use podscope_k8s::k8s_metadata::{NamespaceProbe, NamespaceProbes, NodeProbeStatus};
use podscope_k8s::{K8sMetadata, PodSelector};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::config::TenantProbesConfig;
use super::spec::{ProbeObjectSpec, Resolved};
use crate::ebpf::builder::string_attr;
use crate::ebpf::cgroups::CgroupTable;
use crate::ebpf::collector::{unix_nanos, Collector, KernelMaps};
use crate::ebpf::events::ProcessTable;
use crate::ebpf::filter::{CgroupFilter, PodSelection};
use crate::ebpf::object::{Global, KernelFeatures};
use crate::ebpf::probes::{LoadContext, StartContext};
use crate::ebpf::telemetry::EbpfTelemetry;

/// How long changes are gathered before acting on them (a rollout changes many pods at once).
const SETTLE: Duration = Duration::from_millis(200);

/// The resource attribute naming the `Probe` whose instance made a data point (its namespace
/// is the pod's): the agent's own probes may observe the same pod, and their series must not
/// collide.
pub const PROBE_ATTRIBUTE: &str = "podscope.probe.name";

/// A Probe acting on this node, as the receiver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeInstanceInfo {
    /// `<namespace>/<name>`.
    pub probe: String,
    /// The built-in probes its instance runs.
    pub active: Vec<String>,
    /// Pods of this node it selects.
    pub pods_matched: usize,
}

/// The receiver's running Probe instances, for tests and status. Cheap to clone.
#[derive(Clone, Default)]
pub struct ProbeInstances(Arc<std::sync::Mutex<BTreeMap<String, ProbeInstanceInfo>>>);

impl ProbeInstances {
    pub fn list(&self) -> Vec<ProbeInstanceInfo> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ProbeInstanceInfo>> {
        // Each update is one insert or remove: a poisoned lock still holds a consistent table.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the receiver gives the task.
pub struct TenantSync {
    pub receiver: String,
    pub config: TenantProbesConfig,
    /// The agent's `cgroup_filter.exclude`: never observed by a Probe either.
    pub exclude: Vec<String>,
    pub probes: NamespaceProbes,
    pub metadata: Arc<K8sMetadata>,
    pub kernel_btf: Result<aya::Btf, String>,
    pub telemetry: EbpfTelemetry,
    pub kernel_maps: KernelMaps,
    pub instances: ProbeInstances,
    pub metrics: Option<Arc<dyn Consumer>>,
    pub traces: Option<Arc<dyn Consumer>>,
    pub profiles: Option<Arc<dyn Consumer>>,
    pub collection_interval: Duration,
    pub host_name: String,
    pub cgroup_root: std::path::PathBuf,
    pub processes: ProcessTable,
}

/// A Probe's instance: its collection task and the probes' own tasks.
struct Instance {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Kept so the collection task's request channel stays open.
    _collect_now: mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
}

/// What this node last wrote of a Probe, to write again only when it changes.
#[derive(Debug, Clone, PartialEq)]
struct Reported {
    version: (String, i64),
    phase: &'static str,
    active: Vec<String>,
    pods_matched: usize,
    message: String,
    /// For a Probe refused by a limit: how many instances had stopped then. It is tried again
    /// once another instance stopped (room may have been made).
    limited_at: Option<u64>,
}

impl TenantSync {
    pub async fn run(self, cancel: CancellationToken) {
        let mut state = State {
            instances: BTreeMap::new(),
            reported: BTreeMap::new(),
            stopped: 0,
            index: CgroupIndex::new(self.cgroup_root.clone()),
        };
        let mut probe_changes = self.probes.changes();
        let mut pod_changes = self.metadata.changes();
        loop {
            // Again at once when an instance stopped while a Probe waits for room.
            while self.reconcile(&mut state).await {}
            tokio::select! {
                _ = cancel.cancelled() => break,
                Ok(()) = probe_changes.changed() => {}
                Ok(()) = pod_changes.changed() => {}
            }
            tokio::time::sleep(SETTLE).await;
            probe_changes.mark_unchanged();
            pod_changes.mark_unchanged();
        }
        // The receiver stops: each instance sends a last collection and detaches.
        for (key, instance) in std::mem::take(&mut state.instances) {
            self.stop(&key, instance).await;
        }
    }

    /// Brings the instances in step; true when one stopped while a Probe refused by a limit
    /// waits (it is then worth another pass).
    async fn reconcile(&self, state: &mut State) -> bool {
        let stopped_before = state.stopped;
        state.index.refresh();
        let mut acting = BTreeSet::new();
        for probe in self.probes.probes() {
            let key = probe.key();
            let version = (probe.uid.clone(), probe.generation);
            let parsed = ProbeObjectSpec::parse(&probe.spec)
                .and_then(|spec| spec.resolve(&self.config, self.profiles.is_some()));
            // A Probe acts where its namespace has pods it selects (a spec that cannot be read
            // selects by namespace alone, to say why where its pods are).
            let selector = PodSelector {
                namespaces: vec![probe.namespace.clone()],
                labels: parsed
                    .as_ref()
                    .map(|r| r.pod_selector.clone())
                    .unwrap_or_default(),
            };
            let pods_matched = self.pods_matched(&state.index, &selector);
            if pods_matched == 0 {
                continue;
            }
            acting.insert(key.clone());
            let current = state.reported.get(&key);
            let room_made = current
                .and_then(|r| r.limited_at)
                .is_some_and(|at| state.stopped > at);
            let same_version = current.is_some_and(|r| r.version == version) && !room_made;
            if same_version {
                let last = current.cloned().expect("checked above");
                if last.pods_matched != pods_matched {
                    let now = Reported {
                        pods_matched,
                        ..last
                    };
                    self.report(&probe, &now, false).await;
                    if let Some(info) = self.instances.lock().get_mut(&key) {
                        info.pods_matched = pods_matched;
                    }
                    state.reported.insert(key, now);
                }
                continue;
            }
            let others = state.instances.keys().filter(|k| **k != key).count();
            let mut limited = false;
            let outcome = match parsed {
                Err(message) => Err(message),
                Ok(_) if others >= self.config.max_probes => {
                    limited = true;
                    Err(format!(
                        "this node already runs {others} Probes' instances, the agent's limit (tenant_probes.max_probes)"
                    ))
                }
                Ok(resolved) => match self.start(&probe, resolved.clone(), selector) {
                    Ok(instance) => Ok((instance, resolved)),
                    Err(StartError::OverMemory(message)) => {
                        limited = true;
                        Err(message)
                    }
                    Err(StartError::Failed(message)) => Err(message),
                },
            };
            let limited_at = limited.then_some(state.stopped);
            // The new instance runs before the old one stops; a failed update stops the old.
            let old = state.instances.remove(&key);
            let reported = match outcome {
                Ok((instance, resolved)) => {
                    state.instances.insert(key.clone(), instance);
                    tracing::info!(receiver = %self.receiver, probe = %key, active = ?resolved.kinds, pods_matched, "Probe active");
                    Reported {
                        version,
                        phase: "Active",
                        active: resolved.kinds,
                        pods_matched,
                        message: String::new(),
                        limited_at: None,
                    }
                }
                Err(message) => {
                    tracing::warn!(receiver = %self.receiver, probe = %key, error = %message, "Probe failed; the others go on");
                    Reported {
                        version,
                        phase: "Failed",
                        active: Vec::new(),
                        pods_matched,
                        message,
                        limited_at,
                    }
                }
            };
            if let Some(old) = old {
                self.stop(&key, old).await;
                state.stopped += 1;
            }
            if reported.phase == "Active" {
                self.instances.lock().insert(
                    key.clone(),
                    ProbeInstanceInfo {
                        probe: key.clone(),
                        active: reported.active.clone(),
                        pods_matched,
                    },
                );
            }
            self.report(&probe, &reported, true).await;
            state.reported.insert(key, reported);
        }
        // Deleted, or no pod selected here any more: stopped, and this node's entry removed
        // from a Probe that is still there.
        let gone: Vec<String> = state
            .reported
            .keys()
            .filter(|k| !acting.contains(*k))
            .cloned()
            .collect();
        let existing: BTreeMap<String, NamespaceProbe> = self
            .probes
            .probes()
            .into_iter()
            .map(|p| (p.key(), p))
            .collect();
        for key in gone {
            state.reported.remove(&key);
            if let Some(instance) = state.instances.remove(&key) {
                self.stop(&key, instance).await;
                state.stopped += 1;
                tracing::info!(receiver = %self.receiver, probe = %key, "Probe stopped: deleted, or it selects no pod on this node");
            }
            if let Some(probe) = existing.get(&key) {
                if let Err(e) = self.probes.report(probe, None).await {
                    tracing::warn!(receiver = %self.receiver, probe = %key, error = %e, "cannot write the Probe's status");
                }
            }
        }
        state.stopped > stopped_before
            && state
                .reported
                .values()
                .any(|r| r.limited_at.is_some_and(|at| at < state.stopped))
    }

    /// Pods of this node (with a cgroup here) that `selector` selects.
    fn pods_matched(&self, index: &CgroupIndex, selector: &PodSelector) -> usize {
        let pods = self.metadata.pods();
        let uids: HashSet<String> = index
            .iter()
            .filter_map(|(_, path)| podscope_k8s::cgroup::parse_container_cgroup(path)?.pod_uid)
            .filter(|uid| pods.live_pod(uid).is_some_and(|pod| selector.selects(pod)))
            .collect();
        uids.len()
    }

    /// Loads the Probe's probes with a filter of its pods only, and starts its collection.
    fn start(
        &self,
        probe: &NamespaceProbe,
        resolved: Resolved,
        selector: PodSelector,
    ) -> Result<Instance, StartError> {
        let key = probe.key();
        let features = KernelFeatures {
            btf: self.kernel_btf.clone(),
        };
        let receiver = format!("{} (Probe {key})", self.receiver);
        let mut ctx = LoadContext {
            receiver: &receiver,
            features: &features,
            telemetry: &self.telemetry,
            common: vec![
                Global::U32("agent_tgid", std::process::id()),
                // Only the listed cgroups: the Probe's pods.
                Global::U32("filter_mode", 1),
            ],
            max_entries: Default::default(),
            skipped: Vec::new(),
        };
        let mut probes = resolved
            .probes
            .load(&mut ctx)
            .map_err(|e| StartError::Failed(e.to_string()))?;
        if let Some(refused) = ctx.skipped.first() {
            return Err(StartError::Failed(refused.to_string()));
        }
        let bytes: u64 = probes
            .iter_mut()
            .flat_map(|p| p.objects_mut())
            .flat_map(|o| o.map_memory())
            .map(|m| m.bytes)
            .sum();
        let others = self.kernel_maps.bytes_of_others(&key);
        if others + bytes > self.config.max_map_memory_bytes {
            return Err(StartError::OverMemory(format!(
                "its probes' maps take {bytes} bytes of kernel memory; with the other Probes' {others} that is over the agent's limit of {} (tenant_probes.max_map_memory_bytes)",
                self.config.max_map_memory_bytes
            )));
        }
        let cancel = CancellationToken::new();
        let start = StartContext {
            traces: self.traces.clone(),
            profiles: self.profiles.clone(),
            collection_interval: self.collection_interval,
            host_name: self.host_name.clone(),
            cgroup_root: self.cgroup_root.clone(),
            processes: self.processes.clone(),
            new_containers: None,
            // A Probe instance's spans and profiles are not linked (its own http and profiling
            // probes would need an index of their own; not done).
            trace_links: None,
            // A Probe instance reports to no session extension.
            http_exchanges: None,
        };
        let mut tasks = Vec::new();
        for p in &mut probes {
            match p.spawn(&start, &cancel) {
                Ok(spawned) => tasks.extend(spawned),
                Err(e) => {
                    cancel.cancel();
                    return Err(StartError::Failed(e.to_string()));
                }
            }
        }
        let filter = CgroupFilter::only_pods(
            &self.exclude,
            PodSelection {
                metadata: self.metadata.clone(),
                selector,
            },
        );
        let (collect_now, requests) = mpsc::channel(1);
        let mut collector = Collector {
            pod_changes: filter.pod_changes(),
            new_containers: None,
            probes,
            filter,
            cgroups: CgroupTable::new(CgroupIndex::new(self.cgroup_root.clone()), unix_nanos()),
            // Without the kernel's record of removed cgroups, the data of a container that
            // lived less than one interval is dropped (not reported without its pod).
            removed: None,
            held: Default::default(),
            next: self.metrics.clone(),
            host_name: self.host_name.clone(),
            receiver: receiver.clone(),
            telemetry: self.telemetry.clone(),
            kernel_maps: self.kernel_maps.clone(),
            owner: Some(key),
            resource_attributes: vec![string_attr(PROBE_ATTRIBUTE, probe.name.clone())],
            // Probes' instances are not in `top`: their pods' figures are the agent's probes'.
            session: None,
        };
        // The filter lists the pods before the status says the Probe is active.
        collector.refresh_cgroups();
        tasks.push(tokio::spawn(collector.run(
            self.collection_interval,
            requests,
            cancel.clone(),
        )));
        Ok(Instance {
            cancel,
            tasks,
            _collect_now: collect_now,
        })
    }

    /// Stops an instance: a last collection, then its programs are detached and maps freed.
    async fn stop(&self, key: &str, instance: Instance) {
        instance.cancel.cancel();
        for task in instance.tasks {
            if let Err(e) = task.await {
                tracing::warn!(receiver = %self.receiver, probe = %key, error = %e, "a task of the Probe's instance failed");
            }
        }
        self.kernel_maps.remove(key, &self.telemetry);
        self.instances.lock().remove(key);
    }

    async fn report(&self, probe: &NamespaceProbe, reported: &Reported, event: bool) {
        let status = NodeProbeStatus {
            phase: reported.phase.to_string(),
            active: reported.active.clone(),
            pods_matched: reported.pods_matched,
            message: reported.message.clone(),
            observed_generation: probe.generation,
            time: SystemTime::now(),
        };
        if let Err(e) = self.probes.report(probe, Some(&status)).await {
            tracing::warn!(receiver = %self.receiver, probe = %probe.key(), error = %e, "cannot write the Probe's status");
        }
        if event && reported.phase == "Failed" {
            let message = format!("node {}: {}", self.probes.node(), reported.message);
            if let Err(e) = self.probes.warn(probe, "ProbeFailed", &message).await {
                tracing::warn!(receiver = %self.receiver, probe = %probe.key(), error = %e, "cannot record the failure as an Event");
            }
        }
    }
}

/// Why an instance did not start.
enum StartError {
    /// Over `max_map_memory_bytes` with the other Probes': tried again once one stops.
    OverMemory(String),
    /// Anything else, for good (until the Probe changes).
    Failed(String),
}

struct State {
    instances: BTreeMap<String, Instance>,
    reported: BTreeMap<String, Reported>,
    /// Instances stopped so far (a Probe refused by a limit waits for this to move).
    stopped: u64,
    /// This node's cgroups, for the pods each Probe selects here.
    index: CgroupIndex,
}
