//! The `ebpf` receiver: C eBPF probes (from `podscope-ebpf`) aggregate in the kernel — counts and
//! log2 distributions per cgroup in maps — and this receiver turns the maps into OTLP metrics
//! every `collection_interval`: cumulative sums and exponential histograms (scale 0), one
//! resource per cgroup (`host.name`, `podscope.cgroup.id`, `podscope.cgroup.path`,
//! `container.id` when the path names one).
//!
//! The probes are listed in [`probes`] (one folder each); this module is the receiver's
//! lifecycle: load the probes, start the collection task and the probes' own tasks, stop them.
//! The agent's own threads are never observed.
//!
//! Modules: `object` (loading one probe object, typed maps), `events` (the exec/exit ring buffer
//! and the pid table), `cgroups` (cgroup identity over time), `filter` (cgroup and pod
//! selection), `collector` (the collection task), `builder` (data points into OTLP), `catalog`
//! (the metric docs), `telemetry` (the receiver's own metrics), `tracefs` (what classic
//! tracepoints need).

mod builder;
mod catalog;
mod cgroups;
pub mod clock;
mod collector;
mod config;
mod events;
mod filter;
pub mod histogram;
pub mod kernel_memory;
pub mod object;
mod probes;
pub mod programs;
mod telemetry;
pub mod tenant;
mod tracefs;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use podscope_core::component::create_receiver;
use podscope_core::{
    BuildContext, Component, Consumer, Receiver, ReceiverBuilder, ReceiverConsumers,
    ReceiverFactory, Signal,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use catalog::{markdown_table as metrics_markdown_table, sync_docs_section, MetricDoc};
pub use cgroups::{cgroup2_mount, container_id, CgroupIndex};
use cgroups::{CgroupTable, RemovedCgroups};
pub use config::{CgroupFilterConfig, EbpfReceiverConfig, PodFilterConfig, ProbesConfig};
pub use events::{ProcessInfo, ProcessTable};
pub use object::{Hook, MapMemory, ProbeError};
pub use probes::{
    files::FilesProbeConfig, http::HttpProbeConfig, http::RecordedEvents as HttpRecordedEvents,
    process::ProcessProbeConfig, profiling, syscalls::SyscallsProbeConfig, tcp::TcpProbeConfig,
    uprobes::UprobeConfig, BasicProbeConfig,
};

use collector::{unix_nanos, Collector, KernelMaps};
use filter::{CgroupFilter, PodSelection};
use object::{Global, KernelFeatures};
use probes::{LoadContext, Probe, StartContext};
use telemetry::EbpfTelemetry;

pub const FACTORY: ReceiverFactory = ReceiverFactory {
    type_name: "ebpf",
    description: "Kernel probes (process, syscalls, files, sched, block_io, tcp, uprobes, http) on tracepoints, tp_btf and uprobes, aggregated in eBPF maps, as metrics per cgroup; HTTP and gRPC requests as spans; stack profiles per cgroup (profiling)",
    signals: &[Signal::Metrics, Signal::Traces, Signal::Profiles],
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

    /// `cgroup_filter.pods` names the `k8s_metadata` extension whose pod cache it selects from
    /// (`extension`), or the `k8sattributes` processor whose extension that is (`processor`).
    fn references(&self) -> Vec<podscope_core::ComponentReference> {
        use podscope_core::ComponentReference;
        let source = self.cgroup_filter.pods.as_ref().map(|pods| pods.source());
        let pods = match source {
            Some(Ok(config::PodSource::Extension(id))) => Some(ComponentReference::extension(
                "cgroup_filter.pods.extension",
                id,
            )),
            Some(Ok(config::PodSource::Processor(id))) => Some(ComponentReference::processor(
                "cgroup_filter.pods.processor",
                id,
            )),
            _ => None,
        };
        [
            pods,
            // User programs: their EbpfProgram objects and pod selections.
            ComponentReference::extension_setting(
                "user_programs.extension",
                self.user_programs.extension.as_deref(),
            ),
            // The session extension it reports its probes to.
            ComponentReference::extension_setting("session", self.session.as_deref()),
            // Namespaced Probe objects and the pods they select.
            ComponentReference::extension_setting(
                "tenant_probes.extension",
                self.tenant_probes.extension.as_deref(),
            ),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// Every map the receiver's objects define, by probe (`cgroups` is the receiver's own record of
/// removed cgroups): what [`kernel_memory`] sizes a node with.
pub fn map_defs() -> impl Iterator<Item = (&'static str, &'static object::MapDef)> {
    probes::SPECS
        .iter()
        .map(|(probe, spec)| (*probe, spec.maps))
        .chain([(
            cgroups::REMOVED_CGROUPS_SPEC.name,
            cgroups::REMOVED_CGROUPS_SPEC.maps,
        )])
        .flat_map(|(probe, maps)| maps.iter().map(move |map| (probe, map)))
}

struct LoadedProbes {
    probes: Vec<Box<dyn Probe>>,
    removed: Option<RemovedCgroups>,
}

struct Running {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    collect_now: mpsc::Sender<oneshot::Sender<()>>,
}

pub struct EbpfReceiver {
    config: EbpfReceiverConfig,
    ctx: BuildContext,
    /// The metrics pipelines, if any list this receiver.
    next: Option<Arc<dyn Consumer>>,
    /// The traces pipelines, if any list this receiver (spans come from the http probe).
    traces: Option<Arc<dyn Consumer>>,
    /// The profiles pipelines, if any list this receiver (profiles come from the profiling probe).
    profiles: Option<Arc<dyn Consumer>>,
    processes: ProcessTable,
    running: tokio::sync::Mutex<Option<Running>>,
    /// Probes that could not attach, with why (for tests and status).
    skipped: Mutex<Vec<ProbeError>>,
    telemetry: EbpfTelemetry,
    /// The kernel memory of the maps of the receiver's probes and of its Probes' instances.
    kernel_maps: KernelMaps,
    /// Users' programs running in this receiver.
    programs: programs::ProgramSet,
    /// Namespaced `Probe` objects acting on this node.
    probe_instances: tenant::ProbeInstances,
}

impl EbpfReceiver {
    pub fn new(
        config: EbpfReceiverConfig,
        ctx: BuildContext,
        next: ReceiverConsumers,
    ) -> anyhow::Result<Self> {
        if next.metrics.is_none() && next.traces.is_none() && next.profiles.is_none() {
            anyhow::bail!(
                "receiver {}: produces metrics (spans, profiles) but is in no metrics, traces or profiles pipeline",
                ctx.id
            );
        }
        // Probes' instances may make spans and profiles too, when the agent lets them.
        let tenant = config
            .tenant_probes
            .extension
            .as_ref()
            .map(|_| &config.tenant_probes.probes);
        if next.traces.is_some()
            && !config.probes.makes_spans()
            && !tenant.is_some_and(ProbesConfig::makes_spans)
        {
            anyhow::bail!(
                "receiver {}: is in a traces pipeline, but only the http probe makes spans and it is not on (probes: http:, or tenant_probes.probes: http:)",
                ctx.id
            );
        }
        if next.profiles.is_some()
            && !config.probes.makes_profiles()
            && !tenant.is_some_and(ProbesConfig::makes_profiles)
        {
            anyhow::bail!(
                "receiver {}: is in a profiles pipeline, but only the profiling probe makes profiles and it is not on (probes: profiling:, or tenant_probes.probes: profiling:)",
                ctx.id
            );
        }
        let telemetry = EbpfTelemetry::register(&ctx.telemetry);
        Ok(EbpfReceiver {
            config,
            ctx,
            next: next.metrics,
            traces: next.traces,
            profiles: next.profiles,
            processes: ProcessTable::default(),
            running: tokio::sync::Mutex::new(None),
            skipped: Mutex::new(Vec::new()),
            telemetry,
            kernel_maps: KernelMaps::default(),
            programs: programs::ProgramSet::default(),
            probe_instances: tenant::ProbeInstances::default(),
        })
    }

    /// The kernel memory of every map of the loaded probes, as read at start and at the last
    /// collection (what `podscope_ebpf_map_memory_bytes` shows, with each map's kernel id); a
    /// Probe's instance's maps are named `<namespace>/<name>/<map>`.
    pub fn map_memory(&self) -> Vec<MapMemory> {
        self.kernel_maps.all()
    }

    /// The namespaced `Probe` objects acting on this node now.
    pub fn probe_instances(&self) -> Vec<tenant::ProbeInstanceInfo> {
        self.probe_instances.list()
    }

    /// The task following `Probe` objects, when `tenant_probes.extension` names a
    /// `k8s_metadata` extension that watches a cluster.
    async fn tenant_sync(
        &self,
        features: &KernelFeatures,
        cgroup_root: &std::path::Path,
    ) -> anyhow::Result<Option<tenant::TenantSync>> {
        let Some((id, metadata)) =
            self.metadata_extension("tenant_probes", &self.config.tenant_probes.extension)?
        else {
            return Ok(None);
        };
        let Some(probes) = metadata.namespace_probes().await else {
            tracing::info!(receiver = %self.ctx.id, extension = %id, "no Kubernetes API server: Probe objects are not acted on");
            return Ok(None);
        };
        Ok(Some(tenant::TenantSync {
            receiver: self.ctx.id.to_string(),
            config: self.config.tenant_probes.clone(),
            exclude: self.config.cgroup_filter.exclude.clone(),
            probes,
            metadata,
            kernel_btf: features.btf.clone(),
            telemetry: self.telemetry.clone(),
            kernel_maps: self.kernel_maps.clone(),
            instances: self.probe_instances.clone(),
            metrics: self.next.clone(),
            traces: self.traces.clone(),
            profiles: self.profiles.clone(),
            collection_interval: self.config.collection_interval,
            host_name: self.ctx.host_name.clone(),
            cgroup_root: cgroup_root.to_path_buf(),
            processes: self.processes.clone(),
        }))
    }

    /// The index the http probe fills and the profiling probe's trace link reads, when both
    /// are on, their spans and profiles go somewhere, and the link is wanted.
    fn trace_links(&self) -> Option<profiling::trace_link::TraceLinks> {
        let probes = &self.config.probes;
        let wanted = probes
            .profiling
            .as_ref()
            .is_some_and(|p| p.enabled && p.trace_link);
        (wanted
            && probes.makes_spans()
            && probes.makes_profiles()
            && self.traces.is_some()
            && self.profiles.is_some())
        .then(profiling::trace_link::TraceLinks::default)
    }

    /// Users' programs and their status.
    pub fn programs(&self) -> programs::ProgramSet {
        self.programs.clone()
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

    /// The `k8s_metadata` extension `<section>.extension` names, if it names one.
    fn metadata_extension(
        &self,
        section: &str,
        extension: &Option<String>,
    ) -> anyhow::Result<Option<(podscope_core::ComponentId, Arc<podscope_k8s::K8sMetadata>)>> {
        let Some(extension) = extension else {
            return Ok(None);
        };
        let id = podscope_core::ComponentId::parse(extension).map_err(anyhow::Error::msg)?;
        let metadata = self
            .ctx
            .extensions
            .get::<podscope_k8s::K8sMetadata>(&id)
            .map_err(|e| anyhow::anyhow!("receiver {}: {section}.extension: {e}", self.ctx.id))?;
        Ok(Some((id, metadata)))
    }

    /// The task keeping users' programs in step with the cluster and their pod filters with
    /// the pods, when `user_programs.extension` names a `k8s_metadata` extension.
    async fn program_sync(
        &self,
        features: &KernelFeatures,
        cgroup_root: &std::path::Path,
    ) -> anyhow::Result<Option<programs::ProgramSync>> {
        let Some((id, metadata)) =
            self.metadata_extension("user_programs", &self.config.user_programs.extension)?
        else {
            return Ok(None);
        };
        let cluster = metadata.cluster_programs().await;
        if cluster.is_none() {
            tracing::info!(receiver = %self.ctx.id, extension = %id, "no Kubernetes API server: local programs only");
        }
        Ok(Some(programs::ProgramSync {
            receiver: self.ctx.id.to_string(),
            set: self.programs.clone(),
            limits: self.config.user_programs.limits.clone(),
            kernel_btf: features.btf.clone(),
            cluster,
            metadata,
            index: CgroupIndex::new(cgroup_root.to_path_buf()),
            local: self.config.programs.clone(),
            applied: Default::default(),
        }))
    }

    /// Tells the `session` extension `session` names which probes attached and why the others
    /// were skipped; returns it, to be handed each collection's figures.
    fn report_probes(
        &self,
        probes: &mut [Box<dyn Probe>],
    ) -> anyhow::Result<Option<Arc<crate::session::SessionExtension>>> {
        let Some(extension) = &self.config.session else {
            return Ok(None);
        };
        let id = podscope_core::ComponentId::parse(extension).map_err(anyhow::Error::msg)?;
        let session = self
            .ctx
            .extensions
            .get::<crate::session::SessionExtension>(&id)
            .map_err(|e| anyhow::anyhow!("receiver {}: session: {e}", self.ctx.id))?;
        let mut states = std::collections::BTreeMap::new();
        for probe in probes.iter_mut() {
            for object in probe.objects_mut() {
                states.insert(object.probe().to_string(), "attached".to_string());
            }
        }
        for skipped in self.skipped_probes() {
            states.insert(skipped.probe.to_string(), format!("skipped: {skipped}"));
        }
        session.report_probes(&self.ctx.id.to_string(), states);
        Ok(Some(session))
    }

    /// The probes, and the kernel's record of removed cgroups beside them (without it, data of a
    /// container removed within one interval is reported without its identity).
    fn load_probes(
        &self,
        filter: &CgroupFilter,
        features: &KernelFeatures,
    ) -> anyhow::Result<LoadedProbes> {
        let receiver = self.ctx.id.to_string();
        let mut ctx = LoadContext {
            receiver: &receiver,
            features,
            telemetry: &self.telemetry,
            common: vec![
                Global::U32("agent_tgid", std::process::id()),
                Global::U32("filter_mode", filter.mode),
            ],
            max_entries: Default::default(),
            skipped: Vec::new(),
        };
        let probes = self.config.probes.load(&mut ctx)?;
        *self.skipped.lock().unwrap_or_else(|e| e.into_inner()) = ctx.skipped;
        let removed = if probes.is_empty() {
            None
        } else {
            match RemovedCgroups::load(features, &ctx.common) {
                Ok(removed) => Some(removed),
                Err(e) => {
                    tracing::warn!(receiver = %receiver, "{e}; data of a container removed within one collection interval is reported without its path and container id");
                    None
                }
            }
        };
        Ok(LoadedProbes { probes, removed })
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
        let filter = CgroupFilter::new(
            &self.config.cgroup_filter,
            PodSelection::resolve(&self.config.cgroup_filter, &self.ctx)?,
        );
        let features = KernelFeatures::detect(&self.config.btf_path);
        let LoadedProbes {
            mut probes,
            removed,
        } = self.load_probes(&filter, &features)?;
        let session = self.report_probes(&mut probes)?;
        if !self.config.programs.is_empty() || self.config.user_programs.extension.is_some() {
            programs::load_local(
                &self.ctx.id.to_string(),
                &self.config.programs,
                &self.programs,
                &self.config.user_programs.limits,
                features.btf.as_ref(),
            );
            probes.push(Box::new(programs::ProgramsProbe {
                set: self.programs.clone(),
                overflow: self.telemetry.program_overflow.clone(),
            }));
        }
        let cancel = CancellationToken::new();
        let start = StartContext {
            traces: self.traces.clone(),
            profiles: self.profiles.clone(),
            collection_interval: self.config.collection_interval,
            host_name: self.ctx.host_name.clone(),
            cgroup_root: root.clone(),
            processes: self.processes.clone(),
            trace_links: self.trace_links(),
            http_exchanges: session.as_ref().map(|s| s.http_exchanges()),
            // `container:` uprobes attach in new containers as their first process execs.
            new_containers: probes
                .iter()
                .any(|p| p.watches_containers())
                .then(|| Arc::new(tokio::sync::Notify::new())),
        };
        let mut tasks = Vec::new();
        for probe in &mut probes {
            tasks.extend(probe.spawn(&start, &cancel)?);
        }

        if let Some(sync) = self.program_sync(&features, &root).await? {
            tasks.push(tokio::spawn(sync.run(cancel.clone())));
        }
        if let Some(sync) = self.tenant_sync(&features, &root).await? {
            tasks.push(tokio::spawn(sync.run(cancel.clone())));
        }

        let (collect_now, requests) = mpsc::channel(4);
        let mut collector = Collector {
            pod_changes: filter.pod_changes(),
            new_containers: start.new_containers,
            probes,
            filter,
            cgroups: CgroupTable::new(CgroupIndex::new(root), unix_nanos()),
            removed,
            held: Default::default(),
            next: self.next.clone(),
            host_name: self.ctx.host_name.clone(),
            receiver: self.ctx.id.to_string(),
            telemetry: self.telemetry.clone(),
            kernel_maps: self.kernel_maps.clone(),
            owner: None,
            resource_attributes: Vec::new(),
            session,
        };
        // Before the receiver reports itself started: the kernel filter lists the selected
        // cgroups, and admits the ones created from now on until the collector decides.
        collector.refresh_cgroups();
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
