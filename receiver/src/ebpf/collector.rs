//! The collection task: owns the loaded probes, reads them into data points every interval (or on
//! request) and sends them, keeps every probe object's cgroup filter current, decides whose data
//! is reported and with what identity (the rules are in `cgroups`), and frees the map entries of
//! removed and unselected cgroups.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::common::v1::KeyValue;
use podscope_core::{Batch, Consumer};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::builder::{Identity, MetricsBuilder, Owner};
use super::cgroups::{CgroupState, CgroupTable, RemovedCgroups};
use super::filter::CgroupFilter;
use super::object::MapMemory;
use super::probes::{Collection, Probe};
use super::telemetry::EbpfTelemetry;

/// How long pod changes are gathered before the kernel filter is brought up to date.
const POD_CHANGE_SETTLE: Duration = Duration::from_millis(200);

pub struct Collector {
    pub probes: Vec<Box<dyn Probe>>,
    pub filter: CgroupFilter,
    pub cgroups: CgroupTable,
    /// The kernel's record of removed cgroups, when it could be loaded.
    pub removed: Option<RemovedCgroups>,
    /// Cgroups whose data the last collection held back (created after its walk).
    pub held: HashSet<u64>,
    /// The metrics pipelines; without them the collection still frees removed cgroups' entries.
    pub next: Option<Arc<dyn Consumer>>,
    pub host_name: String,
    pub receiver: String,
    /// Pod changes in the cache `cgroup_filter.pods` selects through.
    pub pod_changes: Option<tokio::sync::watch::Receiver<u64>>,
    /// New containers, when a probe watches them.
    pub new_containers: Option<Arc<Notify>>,
    pub telemetry: EbpfTelemetry,
    /// The maps' kernel memory at the last collection, with the receiver's other collections'.
    pub kernel_maps: KernelMaps,
    /// A `Probe`'s `<namespace>/<name>` when this collection runs its instance: its maps are
    /// named `<namespace>/<name>/<map>` in the agent's telemetry.
    pub owner: Option<String>,
    /// Added to every resource this collection reports (a Probe's instance names its Probe, so
    /// its series never collide with the agent's own probes' for the same pod).
    pub resource_attributes: Vec<KeyValue>,
    /// The session extension `session:` names: handed each collection's per-cgroup figures
    /// (the kernel columns of `kubectl podscope top`).
    pub session: Option<Arc<crate::session::SessionExtension>>,
}

impl Collector {
    pub async fn run(
        mut self,
        interval: Duration,
        mut requests: mpsc::Receiver<oneshot::Sender<()>>,
        cancel: CancellationToken,
    ) {
        self.rescan();
        self.account_kernel_maps();
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.collect().await;
                    // A stopped receiver's figures are no row's any more.
                    if let Some(session) = &self.session {
                        session.forget_figures(&self.receiver);
                    }
                    return;
                }
                _ = ticker.tick() => self.collect().await,
                Some(ack) = requests.recv() => {
                    self.collect().await;
                    let _ = ack.send(());
                }
                _ = notified(&self.new_containers) => self.rescan(),
                Some(()) = pod_changed(&mut self.pod_changes) => {
                    // A list or a rollout changes many pods at once: let them settle, then walk
                    // the cgroups once.
                    tokio::time::sleep(POD_CHANGE_SETTLE).await;
                    if let Some(changes) = &mut self.pod_changes {
                        changes.mark_unchanged();
                    }
                    self.refresh_cgroups();
                }
            }
        }
    }

    /// Walks the cgroups and brings the kernel filter up to date (the receiver's start calls it
    /// once before the first collection).
    pub fn refresh_cgroups(&mut self) {
        self.cgroups.refresh(self.removed.as_mut());
        if self.filter.mode != 0 {
            let ids = self.filter.listed_ids(self.cgroups.live());
            let roots = self.filter.roots(self.cgroups.live());
            let walked = self.cgroups.walked_up_to();
            for probe in &mut self.probes {
                for object in probe.objects_mut() {
                    if let Err(e) = self.filter.sync(object, &ids, &roots, walked) {
                        tracing::warn!(receiver = %self.receiver, error = %e, "cannot update the kernel cgroup filter");
                    }
                }
            }
        }
    }

    /// Whether a cgroup's data is reported now, held for the next collection, or dropped.
    fn decide(&self, id: u64) -> Decision {
        match self.cgroups.state(id) {
            CgroupState::Live(path) if self.filter.observes(path) => Decision::Report {
                path: Some(path.to_string()),
                then_free: false,
            },
            CgroupState::Removed(path) if self.filter.observes(path) => Decision::Report {
                path: Some(path.to_string()),
                then_free: true,
            },
            CgroupState::Live(_) | CgroupState::Removed(_) => Decision::Drop,
            // Its path is known at the next walk (or its removal recorded by then: a cgroup held
            // once already is one whose record was lost).
            CgroupState::New if !self.held.contains(&id) => Decision::Hold,
            // Without a path the filter cannot tell whether it wanted it.
            CgroupState::New | CgroupState::Unknown if self.filter.mode == 0 => Decision::Report {
                path: None,
                then_free: true,
            },
            CgroupState::New | CgroupState::Unknown => Decision::Drop,
        }
    }

    fn rescan(&mut self) {
        for probe in &mut self.probes {
            probe.rescan();
        }
    }

    async fn collect(&mut self) {
        self.refresh_cgroups();
        self.rescan();
        let now = unix_nanos();
        let builder = MetricsBuilder::new(&self.host_name, now);
        let mut collection = Collection::new(builder, &self.host_name, &self.receiver);
        for probe in &mut self.probes {
            probe.collect(&mut collection);
        }
        let (builder, mut cgroups) = collection.finish();
        cgroups.extend(builder.owners().filter_map(|owner| match owner {
            Owner::Cgroup(id) => Some(id),
            Owner::Host => None,
        }));
        let decisions: HashMap<u64, Decision> =
            cgroups.iter().map(|&id| (id, self.decide(id))).collect();
        self.held = decisions
            .iter()
            .filter(|(_, d)| **d == Decision::Hold)
            .map(|(&id, _)| id)
            .collect();
        let resource_metrics = builder.finish(|owner| match owner {
            Owner::Host => Some(Identity {
                path: None,
                start_ns: self.cgroups.receiver_start_ns(),
            }),
            Owner::Cgroup(id) => match decisions.get(&id) {
                Some(Decision::Report { path, .. }) => Some(Identity {
                    path: path.clone(),
                    start_ns: self.cgroups.start_ns(id),
                }),
                _ => None,
            },
        });

        // Removed cgroups were reported a last time, unselected ones not at all: free their
        // entries (data counted for them later starts a new series).
        let free: HashSet<u64> = decisions
            .iter()
            .filter(|(_, d)| {
                matches!(
                    d,
                    Decision::Drop
                        | Decision::Report {
                            then_free: true,
                            ..
                        }
                )
            })
            .map(|(&id, _)| id)
            .collect();
        if !free.is_empty() {
            for probe in &mut self.probes {
                probe.forget(&free);
            }
            self.cgroups.freed(&free, now);
        }
        self.account_kernel_maps();
        if let Some(session) = &self.session {
            session.report_figures(
                &self.receiver,
                crate::session::KernelSnapshot::of(&resource_metrics, now),
            );
        }
        let mut resource_metrics = resource_metrics;
        if !self.resource_attributes.is_empty() {
            for rm in &mut resource_metrics {
                let resource = rm.resource.get_or_insert_with(Default::default);
                resource
                    .attributes
                    .extend(self.resource_attributes.iter().cloned());
            }
        }

        let Some(next) = self.next.as_ref().filter(|_| !resource_metrics.is_empty()) else {
            return;
        };
        if let Err(e) = next.consume(Batch::metrics(resource_metrics)).await {
            tracing::warn!(receiver = %self.receiver, error = %e, "pipeline refused this interval's data points");
        }
    }
}

/// What a collection does with a cgroup's data.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    /// Reported with this path (if known); its entries are freed afterwards when the cgroup is
    /// gone.
    Report {
        path: Option<String>,
        then_free: bool,
    },
    /// Kept in the maps and reported once the cgroup is known.
    Hold,
    /// Not wanted: its entries are freed, nothing is reported.
    Drop,
}

impl Collector {
    /// The maps' kernel memory and refused inserts into the receiver's telemetry.
    fn account_kernel_maps(&mut self) {
        let mut memory = Vec::new();
        for probe in &mut self.probes {
            memory.extend(probe.extra_map_memory());
        }
        let removed = self.removed.as_mut().map(RemovedCgroups::object_mut);
        let objects = self
            .probes
            .iter_mut()
            .flat_map(|p| p.objects_mut())
            .chain(removed);
        let owned = |map: &str| match &self.owner {
            Some(owner) => format!("{owner}/{map}"),
            None => map.to_string(),
        };
        for object in objects {
            memory.extend(object.map_memory().into_iter().map(|mut m| {
                m.map = owned(&m.map);
                m
            }));
            let name = object.probe();
            for (map, failed) in object.failed_inserts() {
                self.telemetry.add_map_full(name, &owned(map), failed);
            }
        }
        self.kernel_maps
            .set(self.owner.as_deref().unwrap_or(""), memory, &self.telemetry);
    }
}

/// The kernel memory of every map a receiver holds, by the collection that owns it: the
/// receiver's own probes (`""`) and each `Probe`'s instance (`<namespace>/<name>`). The agent's
/// `podscope_ebpf_map_memory_bytes` and its total are set from all of them together.
#[derive(Clone, Default)]
pub struct KernelMaps(Arc<Mutex<BTreeMap<String, Vec<MapMemory>>>>);

impl KernelMaps {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<MapMemory>>> {
        // Each update replaces one entry: a poisoned lock still holds a consistent table.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `owner`'s maps now; the telemetry then shows every owner's.
    pub fn set(&self, owner: &str, maps: Vec<MapMemory>, telemetry: &EbpfTelemetry) {
        let mut table = self.lock();
        table.insert(owner.to_string(), maps);
        let all: Vec<MapMemory> = table.values().flatten().cloned().collect();
        telemetry.set_map_memory(&all);
    }

    /// `owner`'s maps are gone (its instance stopped).
    pub fn remove(&self, owner: &str, telemetry: &EbpfTelemetry) {
        let mut table = self.lock();
        if table.remove(owner).is_some() {
            let all: Vec<MapMemory> = table.values().flatten().cloned().collect();
            telemetry.set_map_memory(&all);
        }
    }

    /// Every owner's maps.
    pub fn all(&self) -> Vec<MapMemory> {
        self.lock().values().flatten().cloned().collect()
    }

    /// The bytes of every owner's maps but `owner`'s, and of the receiver's own (`""`).
    pub fn bytes_of_others(&self, owner: &str) -> u64 {
        self.lock()
            .iter()
            .filter(|(o, _)| !o.is_empty() && o.as_str() != owner)
            .flat_map(|(_, maps)| maps.iter().map(|m| m.bytes))
            .sum()
    }
}

pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The next notification; never, without a notifier.
async fn notified(notify: &Option<Arc<Notify>>) {
    match notify {
        Some(notify) => notify.notified().await,
        None => std::future::pending().await,
    }
}

/// The next pod change; never, without a pod selection (or once its cache is gone).
async fn pod_changed(changes: &mut Option<tokio::sync::watch::Receiver<u64>>) -> Option<()> {
    match changes {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(()),
            Err(_) => {
                *changes = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}
