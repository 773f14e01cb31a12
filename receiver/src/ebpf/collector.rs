//! The collection task: owns the loaded probes, reads them into data points every interval (or on
//! request) and sends them, keeps every probe object's cgroup filter current, and frees the map
//! entries of removed cgroups.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use podscope_core::{Batch, Consumer};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::builder::MetricsBuilder;
use super::cgroups::CgroupIndex;
use super::filter::CgroupFilter;
use super::object::MapMemory;
use super::probes::{Collection, Probe};
use super::telemetry::EbpfTelemetry;

/// How long pod changes are gathered before the kernel filter is brought up to date.
const POD_CHANGE_SETTLE: Duration = Duration::from_millis(200);

pub struct Collector {
    pub probes: Vec<Box<dyn Probe>>,
    pub filter: CgroupFilter,
    pub index: CgroupIndex,
    /// The metrics pipelines; without one, data points are read (map entries of removed cgroups
    /// are still freed) but not sent.
    pub next: Option<Arc<dyn Consumer>>,
    pub host_name: String,
    pub receiver: String,
    pub start_ns: u64,
    /// Pod changes in the cache `cgroup_filter.pods` selects through.
    pub pod_changes: Option<tokio::sync::watch::Receiver<u64>>,
    /// New containers, when a probe watches them.
    pub new_containers: Option<Arc<Notify>>,
    pub telemetry: EbpfTelemetry,
    /// The maps' kernel memory at the last collection.
    pub map_memory: Arc<Mutex<Vec<MapMemory>>>,
}

impl Collector {
    pub async fn run(
        mut self,
        interval: Duration,
        mut requests: mpsc::Receiver<oneshot::Sender<()>>,
        cancel: CancellationToken,
    ) {
        self.refresh_cgroups();
        self.rescan();
        self.account_kernel_maps();
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.collect().await;
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

    fn refresh_cgroups(&mut self) {
        self.index.refresh();
        if self.filter.mode != 0 {
            let ids = self.filter.listed_ids(&self.index);
            for probe in &mut self.probes {
                for object in probe.objects_mut() {
                    if let Err(e) = self.filter.sync(object.cgroup_filter_mut(), &ids) {
                        tracing::warn!(receiver = %self.receiver, error = %e, "cannot update the kernel cgroup filter");
                    }
                }
            }
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
        let builder =
            MetricsBuilder::new(&self.host_name, &self.index, self.start_ns, unix_nanos());
        let mut collection = Collection::new(builder, &self.host_name, &self.receiver);
        for probe in &mut self.probes {
            probe.collect(&mut collection);
        }
        let (builder, cgroups) = collection.finish();
        let resource_metrics = builder.finish();
        self.account_kernel_maps();

        // Series of removed cgroups were reported one last time; free their map entries.
        let gone: HashSet<u64> = cgroups
            .into_iter()
            .filter(|id| self.index.path(*id).is_none())
            .collect();
        if !gone.is_empty() {
            for probe in &mut self.probes {
                probe.forget(&gone);
            }
        }

        let Some(next) = &self.next else {
            return;
        };
        if resource_metrics.is_empty() {
            return;
        }
        if let Err(e) = next.consume(Batch::metrics(resource_metrics)).await {
            tracing::warn!(receiver = %self.receiver, error = %e, "pipeline refused this interval's data points");
        }
    }
}

impl Collector {
    /// The maps' kernel memory and refused inserts into the receiver's telemetry.
    fn account_kernel_maps(&mut self) {
        let mut memory = Vec::new();
        for probe in &mut self.probes {
            for object in probe.objects_mut() {
                memory.extend(object.map_memory());
                let name = object.probe();
                for (map, failed) in object.failed_inserts() {
                    self.telemetry.add_map_full(name, map, failed);
                }
            }
        }
        self.telemetry.set_map_memory(&memory);
        *self.map_memory.lock().unwrap_or_else(|e| e.into_inner()) = memory;
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
