//! The `ebpf` receiver: C eBPF probes (from `podscope-ebpf`) aggregate in the kernel — counts and
//! log2 distributions per cgroup in maps — and this receiver turns the maps into OTLP metrics
//! every `collection_interval`: cumulative sums and exponential histograms (scale 0), one
//! resource per cgroup (`host.name`, `podscope.cgroup.id`, `podscope.cgroup.path`,
//! `container.id` when the path names one).
//!
//! Probes: `process` (exec, fork, exit, lifetime; an exec/exit event stream feeding a pid table),
//! `syscalls` (count, errors, latency per syscall), `files` (opens, errors by errno, top paths),
//! `sched` (run-queue latency, context switches), `block_io` (latency and bytes per device and
//! operation). Each loads on its own: one this kernel refuses is logged in one line and skipped,
//! unless it is `required`. The agent's own threads are never observed.

mod catalog;
mod cgroups;
mod collect;
mod config;
pub mod histogram;
mod probes;
mod uprobes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aya::maps::{PerCpuArray, RingBuf};
use aya::Ebpf;
use podscope_core::component::create_receiver;
use podscope_core::{
    Batch, BuildContext, Component, Consumer, Receiver, ReceiverBuilder, ReceiverConsumers,
    ReceiverFactory, Signal,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use catalog::{markdown_table as metrics_markdown_table, MetricDoc, ALL as METRICS};
pub use cgroups::{cgroup2_mount, container_id, CgroupIndex};
pub use config::{
    BasicProbeConfig, CgroupFilterConfig, EbpfReceiverConfig, FilesProbeConfig, ProbesConfig,
    ProcessProbeConfig, SyscallsProbeConfig,
};
pub use probes::{Hook, ProbeError};

use probes::{CgroupFilter, Global, KernelFeatures, ProbeSpec};

pub const FACTORY: ReceiverFactory = ReceiverFactory {
    type_name: "ebpf",
    description: "Kernel probes (process, syscalls, files, sched, block_io) aggregated in eBPF maps, as metrics per cgroup",
    signals: &[Signal::Metrics],
    create: create_receiver::<EbpfReceiverConfig>,
};

impl ReceiverBuilder for EbpfReceiverConfig {
    fn build(
        self: Box<Self>,
        ctx: BuildContext,
        next: ReceiverConsumers,
    ) -> anyhow::Result<Box<dyn Receiver>> {
        Ok(Box::new(EbpfReceiver::new(*self, ctx, next)?))
    }

    /// `cgroup_filter.pods` names the k8s_metadata extension whose cache it uses, or the
    /// k8sattributes processor whose extension that is.
    fn references(&self) -> Vec<podscope_core::ComponentReference> {
        let source = self.cgroup_filter.pods.as_ref().map(|pods| pods.source());
        let (field, kind, id) = match source {
            Some(Ok(config::PodSource::Extension(id))) => {
                ("extension", podscope_core::ComponentKind::Extension, id)
            }
            Some(Ok(config::PodSource::Processor(id))) => {
                ("processor", podscope_core::ComponentKind::Processor, id)
            }
            _ => return Vec::new(),
        };
        vec![podscope_core::ComponentReference {
            field: format!("cgroup_filter.pods.{field}"),
            kind,
            id,
        }]
    }
}

/// What the process probe knows of a live process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub cgroup_id: u64,
    pub ppid: u32,
    pub comm: String,
}

/// pid → process, kept from the exec/exit event stream (later features resolve pids with it).
#[derive(Clone, Default)]
pub struct ProcessTable(Arc<Mutex<HashMap<u32, ProcessInfo>>>);

/// Entries at most: a bound against a fork bomb, not a limit real nodes reach.
const PROCESS_TABLE_LIMIT: usize = 1 << 20;

impl ProcessTable {
    pub fn get(&self, pid: u32) -> Option<ProcessInfo> {
        self.lock().get(&pid).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, ProcessInfo>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, event: &podscope_ebpf::abi::ProcessEvent) {
        let mut table = self.lock();
        match event.kind {
            podscope_ebpf::abi::PROCESS_EXEC
                if table.len() < PROCESS_TABLE_LIMIT || table.contains_key(&event.pid) =>
            {
                table.insert(
                    event.pid,
                    ProcessInfo {
                        cgroup_id: event.cgroup_id,
                        ppid: event.ppid,
                        comm: event.comm(),
                    },
                );
            }
            podscope_ebpf::abi::PROCESS_EXIT => {
                table.remove(&event.pid);
            }
            _ => {}
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RingLabels {
    ring: String,
}

/// The loaded probes, owned by the collection task.
#[derive(Default)]
struct Loaded {
    process: Option<Ebpf>,
    syscalls: Option<Ebpf>,
    files: Option<Ebpf>,
    sched: Option<Ebpf>,
    block_io: Option<Ebpf>,
    tcp: Option<Ebpf>,
    /// The tcp probe's iterator over open connections is loaded.
    tcp_open_rtt: bool,
    uprobes: Vec<uprobes::LoadedUprobe>,
}

impl Loaded {
    fn all_mut(&mut self) -> impl Iterator<Item = &mut Ebpf> {
        [
            &mut self.process,
            &mut self.syscalls,
            &mut self.files,
            &mut self.sched,
            &mut self.block_io,
            &mut self.tcp,
        ]
        .into_iter()
        .flatten()
        .chain(self.uprobes.iter_mut().map(uprobes::LoadedUprobe::ebpf_mut))
    }
}

struct Running {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    collect_now: mpsc::Sender<oneshot::Sender<()>>,
}

pub struct EbpfReceiver {
    config: EbpfReceiverConfig,
    ctx: BuildContext,
    next: Arc<dyn Consumer>,
    processes: ProcessTable,
    running: tokio::sync::Mutex<Option<Running>>,
    /// Probes that could not attach, with why (for tests and status).
    skipped: Mutex<Vec<ProbeError>>,
    ring_events: Family<RingLabels, Counter>,
    ring_lost: Family<RingLabels, Counter>,
    uprobe_overflow: Counter,
    container_attachments: Counter,
}

impl EbpfReceiver {
    pub fn new(
        config: EbpfReceiverConfig,
        ctx: BuildContext,
        next: ReceiverConsumers,
    ) -> anyhow::Result<Self> {
        let next = next.metrics.ok_or_else(|| {
            anyhow::anyhow!(
                "receiver {}: produces metrics but is in no metrics pipeline",
                ctx.id
            )
        })?;
        let ring_events = Family::<RingLabels, Counter>::default();
        let ring_lost = Family::<RingLabels, Counter>::default();
        ctx.telemetry.register(
            "ebpf_ringbuf_events",
            "Events read from eBPF ring buffers",
            ring_events.clone(),
        );
        ctx.telemetry.register(
            "ebpf_ringbuf_lost_events",
            "Events the kernel could not put on a full eBPF ring buffer",
            ring_lost.clone(),
        );
        let uprobe_overflow = Counter::default();
        ctx.telemetry.register(
            "ebpf_uprobe_overflow",
            "Uprobe hits counted in the `other` series because an entry reached max_series",
            uprobe_overflow.clone(),
        );
        let container_attachments = Counter::default();
        ctx.telemetry.register(
            "ebpf_uprobe_container_attachments",
            "Files inside containers that container:<path> uprobes attached to",
            container_attachments.clone(),
        );
        Ok(EbpfReceiver {
            config,
            ctx,
            next,
            processes: ProcessTable::default(),
            running: tokio::sync::Mutex::new(None),
            skipped: Mutex::new(Vec::new()),
            ring_events,
            ring_lost,
            uprobe_overflow,
            container_attachments,
        })
    }

    /// pid → process, from the process probe's event stream.
    pub fn processes(&self) -> ProcessTable {
        self.processes.clone()
    }

    /// The probes that were skipped at start, and why.
    pub fn skipped_probes(&self) -> Vec<ProbeError> {
        self.skipped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the maps and sends the data points now; returns once the pipeline took them.
    pub async fn collect_now(&self) -> anyhow::Result<()> {
        let sender = match self.running.lock().await.as_ref() {
            Some(running) => running.collect_now.clone(),
            None => anyhow::bail!("the ebpf receiver is not running"),
        };
        let (ack, done) = oneshot::channel();
        sender
            .send(ack)
            .await
            .map_err(|_| anyhow::anyhow!("collection task stopped"))?;
        done.await
            .map_err(|_| anyhow::anyhow!("collection task stopped"))?;
        Ok(())
    }

    /// `cgroup_filter.pods` resolved to the named extension's pod cache (or the extension of the
    /// named processor).
    fn pod_selection(&self) -> anyhow::Result<Option<probes::PodSelection>> {
        let Some(pods) = &self.config.cgroup_filter.pods else {
            return Ok(None);
        };
        let extensions = &self.ctx.extensions;
        let metadata = match pods.source().map_err(|e| anyhow::anyhow!("{e}"))? {
            config::PodSource::Extension(id) => extensions.get::<podscope_k8s::K8sMetadata>(&id),
            config::PodSource::Processor(id) => extensions
                .used_by::<podscope_k8s::K8sMetadata>(podscope_core::ComponentKind::Processor, &id),
        }
        .map_err(|e| anyhow::anyhow!("receiver {}: cgroup_filter.pods: {e}", self.ctx.id))?;
        let labels = match &pods.labels {
            Some(selector) => {
                podscope_k8s::labels::parse_selector(selector).map_err(anyhow::Error::msg)?
            }
            None => Default::default(),
        };
        Ok(Some(probes::PodSelection {
            metadata,
            selector: podscope_k8s::PodSelector {
                namespaces: pods.namespaces.clone(),
                labels,
            },
        }))
    }

    fn load_probes(&self) -> anyhow::Result<(Loaded, CgroupFilter)> {
        let features = KernelFeatures::detect(&self.config.btf_path);
        let filter = CgroupFilter::new(
            &self.config.cgroup_filter.include,
            &self.config.cgroup_filter.exclude,
            self.pod_selection()?,
        );
        let agent_tgid = std::process::id();
        let common = |extra: Vec<Global>| {
            let mut globals = vec![
                Global::U32("agent_tgid", agent_tgid),
                Global::U32("filter_mode", filter.mode),
            ];
            globals.extend(extra);
            globals
        };
        let probes = &self.config.probes;
        let mut loaded = Loaded::default();
        let mut skipped = Vec::new();
        let mut try_load = |spec: &ProbeSpec,
                            on: bool,
                            required: bool,
                            globals: Vec<Global>,
                            skip: &[&str]|
         -> anyhow::Result<Option<Ebpf>> {
            if !on {
                return Ok(None);
            }
            match probes::load(spec, &features, &globals, skip) {
                Ok(ebpf) => {
                    tracing::info!(receiver = %self.ctx.id, probe = spec.name, "probe attached");
                    Ok(Some(ebpf))
                }
                Err(error) if required => anyhow::bail!("{error} (the probe is required)"),
                Err(error) => {
                    tracing::warn!(receiver = %self.ctx.id, "{error}; skipped");
                    skipped.push(error);
                    Ok(None)
                }
            }
        };
        if let Some(p) = &probes.process {
            loaded.process = try_load(
                &probes::PROCESS,
                p.enabled,
                p.required,
                common(vec![Global::U64("wakeup_bytes", p.wakeup_bytes)]),
                &[],
            )?;
        }
        if let Some(p) = &probes.syscalls {
            // Counting only needs the entry hook; errors and latency need the exit one.
            let skip: &[&str] = match (p.latency, p.errors) {
                (false, false) => &["podscope_sys_enter", "podscope_sys_exit"],
                (false, true) => &["podscope_sys_enter", "podscope_sys_count"],
                (true, _) => &["podscope_sys_count"],
            };
            loaded.syscalls = try_load(
                &probes::SYSCALLS,
                p.enabled,
                p.required,
                common(vec![
                    Global::U32("measure_latency", p.latency as u32),
                    Global::U32("count_errors", p.errors as u32),
                ]),
                skip,
            )?;
        }
        if let Some(p) = &probes.files {
            let skip: &[&str] = if p.capture_paths {
                &[]
            } else {
                &["podscope_files_enter"]
            };
            let globals = common(vec![
                Global::U32("nr_openat", syscalls::Sysno::openat.id() as u32),
                Global::U32("nr_openat2", syscalls::Sysno::openat2.id() as u32),
                Global::U32("capture_paths", p.capture_paths as u32),
            ]);
            loaded.files = try_load(&probes::FILES, p.enabled, p.required, globals, skip)?;
        }
        if let Some(p) = &probes.sched {
            loaded.sched = try_load(&probes::SCHED, p.enabled, p.required, common(vec![]), &[])?;
        }
        if let Some(p) = &probes.block_io {
            loaded.block_io = try_load(
                &probes::BLOCK_IO,
                p.enabled,
                p.required,
                common(vec![]),
                &[],
            )?;
        }
        if let Some(p) = &probes.tcp {
            loaded.tcp = try_load(&probes::TCP, p.enabled, p.required, common(vec![]), &[])?;
            if let Some(tcp) = loaded.tcp.as_mut() {
                match probes::load_tcp_iterator(tcp, &features) {
                    Ok(()) => loaded.tcp_open_rtt = true,
                    Err(reason) => tracing::info!(
                        receiver = %self.ctx.id,
                        reason = %reason,
                        "tcp: the RTT of open connections is not sampled (iter/tcp cannot be loaded); RTT at close still is"
                    ),
                }
            }
        }
        for (i, entry) in probes.uprobes.iter().enumerate() {
            match uprobes::load(entry, &features, agent_tgid, filter.mode) {
                Ok(u) => {
                    tracing::info!(receiver = %self.ctx.id, uprobe = %entry.location(), "uprobe attached");
                    loaded.uprobes.push(u);
                }
                Err(reason) => {
                    let error = ProbeError {
                        probe: "uprobes",
                        hook: None,
                        reason: format!("uprobes[{i}] {}: {reason}", entry.location()),
                    };
                    if entry.required {
                        anyhow::bail!("{error} (the uprobe is required)");
                    }
                    tracing::warn!(receiver = %self.ctx.id, "{error}; skipped");
                    skipped.push(error);
                }
            }
        }
        *self.skipped.lock().unwrap_or_else(|e| e.into_inner()) = skipped;
        Ok((loaded, filter))
    }
}

#[async_trait]
impl Component for EbpfReceiver {
    async fn start(&self) -> anyhow::Result<()> {
        let mut running = self.running.lock().await;
        if running.is_some() {
            anyhow::bail!("receiver {} started twice", self.ctx.id);
        }
        let root = cgroup2_mount().ok_or_else(|| {
            anyhow::anyhow!(
                "receiver {}: no cgroup2 mount found in /proc/self/mountinfo",
                self.ctx.id
            )
        })?;
        let (mut loaded, filter) = self.load_probes()?;
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();

        // `container:` uprobes attach in new containers as their first process execs.
        let container_scan = loaded
            .uprobes
            .iter()
            .any(|u| matches!(u.config.target(), uprobes::Target::Container(_)))
            .then(|| Arc::new(tokio::sync::Notify::new()));
        if let Some(process) = loaded.process.as_mut() {
            let ring = process
                .take_map("process_events")
                .ok_or_else(|| anyhow::anyhow!("process probe has no process_events map"))?;
            let ring = RingBuf::try_from(ring)?;
            // SAFETY: the RingBuf owns its map fd, which stays open and unchanged for as long as
            // the AsyncFd (its only owner) lives.
            let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }?;
            let reader = EventReader {
                ring,
                table: self.processes.clone(),
                events: self
                    .ring_events
                    .get_or_create(&RingLabels {
                        ring: "process_events".into(),
                    })
                    .clone(),
                poll: self
                    .config
                    .probes
                    .process
                    .as_ref()
                    .map(|p| p.event_poll_interval)
                    .unwrap_or(Duration::from_millis(200)),
                new_cgroup: container_scan.clone(),
                seen_cgroups: HashSet::new(),
            };
            tasks.push(tokio::spawn(reader.run(cancel.clone())));
        }

        let (collect_now, requests) = mpsc::channel(4);
        let pod_changes = filter.pod_changes();
        let collector = Collector {
            pod_changes,
            container_scan,
            container_attachments: self.container_attachments.clone(),
            loaded,
            filter,
            index: CgroupIndex::new(root),
            next: self.next.clone(),
            host_name: self.ctx.host_name.clone(),
            receiver: self.ctx.id.to_string(),
            start_ns: unix_nanos(),
            syscall_latency: self
                .config
                .probes
                .syscalls
                .as_ref()
                .is_some_and(|s| s.latency),
            top_paths: self
                .config
                .probes
                .files
                .as_ref()
                .filter(|f| f.capture_paths)
                .map(|f| f.top_paths),
            ring_lost: self
                .ring_lost
                .get_or_create(&RingLabels {
                    ring: "process_events".into(),
                })
                .clone(),
            lost_seen: 0,
            uprobe_overflow: self.uprobe_overflow.clone(),
            tcp_peers: BTreeMap::new(),
            tcp_max_peers: self
                .config
                .probes
                .tcp
                .as_ref()
                .map(|t| t.max_peers)
                .unwrap_or(100),
        };
        tasks.push(tokio::spawn(collector.run(
            self.config.collection_interval,
            requests,
            cancel.clone(),
        )));
        *running = Some(Running {
            cancel,
            tasks,
            collect_now,
        });
        Ok(())
    }

    /// Sends a last collection, then detaches every probe.
    async fn shutdown(&self) -> anyhow::Result<()> {
        let Some(running) = self.running.lock().await.take() else {
            return Ok(());
        };
        running.cancel.cancel();
        for task in running.tasks {
            task.await?;
        }
        Ok(())
    }
}

impl Receiver for EbpfReceiver {}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Reads exec/exit events: woken by the kernel once enough bytes wait, and on a timer for the rest.
struct EventReader {
    ring: AsyncFd<RingBuf<aya::maps::MapData>>,
    table: ProcessTable,
    events: Counter,
    poll: Duration,
    /// Told when a process starts in a cgroup not seen before (a new container), for
    /// `container:` uprobes.
    new_cgroup: Option<Arc<tokio::sync::Notify>>,
    seen_cgroups: HashSet<u64>,
}

/// Cgroups the event reader remembers before it starts over (each new one costs a /proc scan).
const SEEN_CGROUPS_LIMIT: usize = 100_000;

impl EventReader {
    async fn run(mut self, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(self.poll);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.drain();
                    return;
                }
                readable = self.ring.readable_mut() => match readable {
                    Ok(mut guard) => {
                        let ring = guard.get_inner_mut();
                        let (n, execs) = drain_ring(ring, &self.table);
                        self.events.inc_by(n);
                        guard.clear_ready();
                        self.note_execs(execs);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "process event ring buffer cannot be polled; reading on the timer only");
                        ticker.tick().await;
                        self.drain();
                    }
                },
                _ = ticker.tick() => self.drain(),
            }
        }
    }

    fn drain(&mut self) {
        let (n, execs) = drain_ring(self.ring.get_mut(), &self.table);
        self.events.inc_by(n);
        self.note_execs(execs);
    }

    fn note_execs(&mut self, exec_cgroups: Vec<u64>) {
        let Some(notify) = &self.new_cgroup else {
            return;
        };
        if self.seen_cgroups.len() > SEEN_CGROUPS_LIMIT {
            self.seen_cgroups.clear();
        }
        let mut new = false;
        for cgroup in exec_cgroups {
            new |= self.seen_cgroups.insert(cgroup);
        }
        if new {
            notify.notify_one();
        }
    }
}

/// Applies every event in the ring to the table; returns how many, and the cgroups of execs.
fn drain_ring(ring: &mut RingBuf<aya::maps::MapData>, table: &ProcessTable) -> (u64, Vec<u64>) {
    let mut n = 0;
    let mut exec_cgroups = Vec::new();
    while let Some(item) = ring.next() {
        if let Some(event) = podscope_ebpf::abi::ProcessEvent::from_bytes(&item) {
            table.apply(&event);
            if event.kind == podscope_ebpf::abi::PROCESS_EXEC {
                exec_cgroups.push(event.cgroup_id);
            }
        }
        n += 1;
    }
    (n, exec_cgroups)
}

/// How long pod changes are gathered before the kernel filter is brought up to date.
const POD_CHANGE_SETTLE: Duration = Duration::from_millis(200);

/// The next notification; never, without a notifier.
async fn notified(notify: &Option<Arc<tokio::sync::Notify>>) {
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

/// Reads the maps every interval (or on request) and sends the data points.
struct Collector {
    loaded: Loaded,
    filter: CgroupFilter,
    index: CgroupIndex,
    next: Arc<dyn Consumer>,
    host_name: String,
    receiver: String,
    start_ns: u64,
    syscall_latency: bool,
    top_paths: Option<usize>,
    ring_lost: Counter,
    lost_seen: u64,
    /// Uprobe hits folded into `other` by the cardinality cap.
    uprobe_overflow: Counter,
    /// TCP peers kept per cgroup (the cap is sticky: the first `tcp_max_peers` seen).
    tcp_peers: BTreeMap<u64, HashSet<(String, u16, u8, bool)>>,
    tcp_max_peers: usize,
    /// Pod changes in the cache `cgroup_filter.pods` selects through.
    pod_changes: Option<tokio::sync::watch::Receiver<u64>>,
    /// New containers, for `container:` uprobes (with the process probe on).
    container_scan: Option<Arc<tokio::sync::Notify>>,
    container_attachments: Counter,
}

impl Collector {
    async fn run(
        mut self,
        interval: Duration,
        mut requests: mpsc::Receiver<oneshot::Sender<()>>,
        cancel: CancellationToken,
    ) {
        self.refresh_cgroups();
        self.scan_containers();
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
                _ = notified(&self.container_scan) => self.scan_containers(),
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
            let filter = self.filter.clone();
            for ebpf in self.loaded.all_mut() {
                if let Err(e) = filter.sync(ebpf, &ids) {
                    tracing::warn!(receiver = %self.receiver, error = %e, "cannot update the kernel cgroup filter");
                }
            }
        }
    }

    /// `container:` uprobes: attach in containers started since the last scan.
    fn scan_containers(&mut self) {
        for entry in &mut self.loaded.uprobes {
            let attached = entry.scan_containers(std::path::Path::new("/proc"));
            self.container_attachments.inc_by(attached as u64);
        }
    }

    async fn collect(&mut self) {
        self.refresh_cgroups();
        self.scan_containers();
        let now = unix_nanos();
        let mut builder =
            collect::MetricsBuilder::new(&self.host_name, &self.index, self.start_ns, now);
        let mut cgroups_seen: HashSet<u64> = HashSet::new();

        if let Some(ebpf) = &self.loaded.process {
            let counts = probes::read_hash(ebpf, "process_counts");
            let lifetimes = probes::read_hash(ebpf, "process_lifetime");
            cgroups_seen.extend(
                counts
                    .keys()
                    .map(|k: &podscope_ebpf::abi::ProcessKey| k.cgroup_id),
            );
            cgroups_seen.extend(lifetimes.keys().copied());
            collect::add_process(&mut builder, &counts, &lifetimes);
            let lost = read_lost(ebpf);
            if lost > self.lost_seen {
                self.ring_lost.inc_by(lost - self.lost_seen);
                self.lost_seen = lost;
            }
        }
        if let Some(ebpf) = &self.loaded.syscalls {
            use podscope_ebpf::abi::{Hist, SyscallCounts, SyscallKey};
            let counts: HashMap<u64, SyscallCounts> =
                probes::read_per_cpu_hash(ebpf, "syscall_counts", SyscallCounts::merge);
            let latency: HashMap<SyscallKey, Hist> = if self.syscall_latency {
                probes::read_per_cpu_hash(ebpf, "syscall_latency", Hist::merge)
            } else {
                HashMap::new()
            };
            cgroups_seen.extend(counts.keys().copied());
            collect::add_syscalls(&mut builder, &counts, &latency);
        }
        let mut paths_read = Vec::new();
        if let Some(ebpf) = &self.loaded.files {
            let opens = probes::read_hash(ebpf, "opens");
            cgroups_seen.extend(
                opens
                    .keys()
                    .map(|k: &podscope_ebpf::abi::OpenKey| k.cgroup_id),
            );
            collect::add_files(&mut builder, &opens);
            if let Some(top) = self.top_paths {
                let paths = probes::read_hash(ebpf, "open_paths");
                collect::add_top_paths(&mut builder, &paths, top);
                paths_read = paths.into_keys().collect();
            }
        }
        if let Some(ebpf) = &self.loaded.sched {
            let runq = probes::read_hash(ebpf, "runq_latency");
            let switches = probes::read_hash(ebpf, "context_switches");
            cgroups_seen.extend(runq.keys().copied());
            cgroups_seen.extend(
                switches
                    .keys()
                    .map(|k: &podscope_ebpf::abi::SwitchKey| k.cgroup_id),
            );
            collect::add_sched(&mut builder, &runq, &switches);
        }
        if let Some(ebpf) = &self.loaded.block_io {
            collect::add_block(&mut builder, &probes::read_hash(ebpf, "block_stats"));
        }
        if let Some(ebpf) = &self.loaded.tcp {
            let stats = probes::read_hash(ebpf, "tcp_conn_stats");
            cgroups_seen.extend(
                stats
                    .keys()
                    .map(|k: &podscope_ebpf::abi::TcpKey| k.cgroup_id),
            );
            let series = collect::tcp_series(&stats, &mut self.tcp_peers, self.tcp_max_peers);
            collect::add_tcp(&mut builder, &series);
        }
        if let (true, Some(ebpf)) = (self.loaded.tcp_open_rtt, self.loaded.tcp.as_mut()) {
            match probes::sample_open_tcp_rtt(ebpf) {
                Ok(samples) => {
                    let series =
                        collect::tcp_series(&samples, &mut self.tcp_peers, self.tcp_max_peers);
                    collect::add_tcp_open_rtt(&mut builder, &series);
                }
                Err(e) => {
                    tracing::warn!(receiver = %self.receiver, error = %e, "cannot sample the RTT of open TCP connections")
                }
            }
        }
        for entry in &mut self.loaded.uprobes {
            let overflowed = entry.collect(&mut builder, &self.host_name);
            if overflowed > 0 {
                self.uprobe_overflow.inc_by(overflowed);
            }
        }
        let resource_metrics = builder.finish();

        // Path counts are per interval: clear what was reported.
        if let Some(ebpf) = self.loaded.files.as_mut() {
            probes::remove_keys::<podscope_ebpf::abi::OpenPathKey, u64>(
                ebpf,
                "open_paths",
                paths_read,
            );
        }
        // Series of removed cgroups were reported one last time; free their map entries.
        let gone = collect::gone(cgroups_seen, &self.index);
        if !gone.is_empty() {
            self.forget(&gone);
        }

        if resource_metrics.is_empty() {
            return;
        }
        if let Err(e) = self.next.consume(Batch::metrics(resource_metrics)).await {
            tracing::warn!(receiver = %self.receiver, error = %e, "pipeline refused this interval's data points");
        }
    }

    fn forget(&mut self, gone: &HashSet<u64>) {
        if let Some(ebpf) = self.loaded.tcp.as_mut() {
            use podscope_ebpf::abi::{TcpKey, TcpStats};
            let keys: Vec<TcpKey> = probes::read_hash::<TcpKey, TcpStats>(ebpf, "tcp_conn_stats")
                .into_keys()
                .filter(|k| gone.contains(&k.cgroup_id))
                .collect();
            probes::remove_keys::<TcpKey, TcpStats>(ebpf, "tcp_conn_stats", keys);
            self.tcp_peers.retain(|id, _| !gone.contains(id));
        }
        use podscope_ebpf::abi::{OpenKey, ProcessKey, SwitchKey, SyscallKey};
        if let Some(ebpf) = self.loaded.process.as_mut() {
            let keys: Vec<ProcessKey> =
                probes::read_hash::<ProcessKey, u64>(ebpf, "process_counts")
                    .into_keys()
                    .filter(|k| gone.contains(&k.cgroup_id))
                    .collect();
            probes::remove_keys::<ProcessKey, u64>(ebpf, "process_counts", keys);
            probes::remove_keys::<u64, podscope_ebpf::abi::Hist>(
                ebpf,
                "process_lifetime",
                gone.iter().copied(),
            );
        }
        if let Some(ebpf) = self.loaded.syscalls.as_mut() {
            use podscope_ebpf::abi::{Hist, SyscallCounts};
            probes::remove_per_cpu_keys::<u64, SyscallCounts>(
                ebpf,
                "syscall_counts",
                gone.iter().copied(),
            );
            let keys: Vec<SyscallKey> =
                probes::read_per_cpu_hash::<SyscallKey, Hist>(ebpf, "syscall_latency", Hist::merge)
                    .into_keys()
                    .filter(|k| gone.contains(&k.cgroup_id))
                    .collect();
            probes::remove_per_cpu_keys::<SyscallKey, Hist>(ebpf, "syscall_latency", keys);
        }
        if let Some(ebpf) = self.loaded.files.as_mut() {
            let keys: Vec<OpenKey> = probes::read_hash::<OpenKey, u64>(ebpf, "opens")
                .into_keys()
                .filter(|k| gone.contains(&k.cgroup_id))
                .collect();
            probes::remove_keys::<OpenKey, u64>(ebpf, "opens", keys);
        }
        if let Some(ebpf) = self.loaded.sched.as_mut() {
            probes::remove_keys::<u64, podscope_ebpf::abi::Hist>(
                ebpf,
                "runq_latency",
                gone.iter().copied(),
            );
            let keys: Vec<SwitchKey> =
                probes::read_hash::<SwitchKey, u64>(ebpf, "context_switches")
                    .into_keys()
                    .filter(|k| gone.contains(&k.cgroup_id))
                    .collect();
            probes::remove_keys::<SwitchKey, u64>(ebpf, "context_switches", keys);
        }
    }
}

fn read_lost(ebpf: &Ebpf) -> u64 {
    let Some(map) = ebpf.map("process_events_lost") else {
        return 0;
    };
    let Ok(array) = PerCpuArray::<_, u64>::try_from(map) else {
        return 0;
    };
    array
        .get(&0, 0)
        .map(|values| values.iter().sum())
        .unwrap_or(0)
}
