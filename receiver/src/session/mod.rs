//! The `session` extension: the endpoint `kubectl podscope` talks to on each node (the agent
//! side of `podscope_core::session`). It listens on the agent pod's loopback (reached through a
//! port-forward), reads one `Hello`, answers `Welcome`, serves the request and ends with
//! `Message::End`:
//!
//! - trace: the trace object (`trace`), loaded and attached only while a session needs it,
//!   events filtered in the kernel to the targets' cgroups;
//! - top: CPU from each cgroup's `cpu.stat`, per interval, and the kernel columns from what eBPF
//!   receivers naming this extension collected (`top`, `figures`);
//! - bpftrace: the real bpftrace, when the agent's config enables it (`bpftrace`);
//! - profile: the profiling probe for the targets, the result sent as one file (`profile`);
//! - status: version, protocol, readiness, the trace probes this kernel has;
//! - session_log: what a `TraceSession` recorded on this node (`session_log`), for `attach`
//!   and `logs`, given the session's attach token;
//! - export: what `TraceSession`s with `export: true` record, handed to the `trace_sessions`
//!   receivers that name this extension (`export`).
//!
//! It must not crash on what a client sends: every bad request is answered with a
//! `SessionError` and the connection closed; a client that goes away ends its session and frees
//! what it held in the kernel.

mod bpftrace;
mod bpftrace_run;
mod caps;
mod config;
mod events;
mod exchanges;
mod export;
mod figures;
mod filters;
mod log_reader;
mod profile;
mod schedule;
mod server;
mod session_http;
mod session_log;
mod session_probes;
mod session_profile;
mod session_top;
mod summary;
mod targets;
mod top;
mod trace;
mod trace_session_runs;
mod trace_session_status;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use async_trait::async_trait;
use podscope_core::component::create_extension;
use podscope_core::{BuildContext, Component, Extension, ExtensionBuilder, ExtensionFactory};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{BpftraceConfig, SessionConfig, TraceSessionsConfig};
pub use events::signal_name;
pub use exchanges::{ExchangeRole, ExchangeTap, GrpcCall, HttpExchange, PublisherGuard};
pub use export::{ExportedEvent, ExportedSummary, SessionExportSink, SessionExports};
pub use figures::{Distribution, Snapshot as KernelSnapshot};
pub use filters::EventFilter;
pub use profile::{file_name as profile_file_name, EncodeProfiles, ProfileEncoder};
pub use server::probe_name;
pub use trace::TraceKernel;
pub use trace_session_runs::{
    Refusal, ResolvedSession, SessionTargets, TraceSessionSpec, AGENT_STOPPED,
};

pub const FACTORY: ExtensionFactory = ExtensionFactory {
    type_name: "session",
    description: "The endpoint kubectl podscope talks to (trace, top, bpftrace, status), on the agent pod's loopback",
    signals: &[],
    create: create_extension::<SessionConfig>,
};

impl ExtensionBuilder for SessionConfig {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Extension>> {
        let trace_sessions = match self.trace_sessions.extension.as_deref() {
            Some(id) => {
                let id = podscope_core::ComponentId::parse(id).map_err(anyhow::Error::msg)?;
                Some(ctx.extensions.get::<podscope_k8s::K8sMetadata>(&id).with_context(|| {
                    format!(
                        "extension {}: trace_sessions.extension {id} must be a k8s_metadata extension listed before it in service.extensions",
                        ctx.id
                    )
                })?)
            }
            None => None,
        };
        let pod_names = match &self.k8s_metadata {
            None => None,
            Some(extension) => {
                let id =
                    podscope_core::ComponentId::parse(extension).map_err(anyhow::Error::msg)?;
                Some(
                    ctx.extensions
                        .get::<podscope_k8s::K8sMetadata>(&id)
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "extension {}: k8s_metadata: {e} (list it before {} in service.extensions)",
                                ctx.id,
                                ctx.id
                            )
                        })?,
                )
            }
        };
        let mut extension = SessionExtension::with_pod_names(*self, &ctx, pod_names);
        extension.trace_sessions = trace_sessions;
        Ok(Arc::new(extension))
    }

    /// `trace_sessions.extension` and `k8s_metadata` name `k8s_metadata` extensions.
    fn references(&self) -> Vec<podscope_core::ComponentReference> {
        [
            (
                "trace_sessions.extension",
                self.trace_sessions.extension.as_deref(),
            ),
            ("k8s_metadata", self.k8s_metadata.as_deref()),
        ]
        .into_iter()
        .filter_map(|(field, id)| podscope_core::ComponentReference::extension_setting(field, id))
        .collect()
    }
}

/// What every session of the agent shares.
pub(crate) struct Shared {
    pub config: SessionConfig,
    pub node: String,
    pub readiness: podscope_core::health::Readiness,
    pub kernel: Arc<TraceKernel>,
    pub permits: Arc<tokio::sync::Semaphore>,
    /// Cancelled when the agent stops: sessions end with `AgentStopping`.
    pub stopping: CancellationToken,
    /// What eBPF receivers naming this extension reported: `<receiver>/<probe>` → `attached`
    /// or why it was skipped.
    pub reported_probes: Mutex<std::collections::BTreeMap<String, String>>,
    /// The pod cache that names what no target named (`k8s_metadata`), if configured.
    pub pod_names: Option<Arc<podscope_k8s::K8sMetadata>>,
    /// Those receivers' per-cgroup figures of their last two collections, for `top`.
    pub kernel_figures: figures::KernelFigures,
    /// The http probes' exchanges, for `trace … http`.
    pub http_exchanges: Arc<ExchangeTap>,
    /// What this node's `TraceSession`s recorded, for `attach` and `logs`.
    pub session_logs: Arc<session_log::SessionLogs>,
    /// Where exported `TraceSession`s hand what they record.
    pub session_exports: Arc<SessionExports>,
}

struct Running {
    address: SocketAddr,
    tasks: TaskTracker,
}

/// The running extension.
pub struct SessionExtension {
    id: String,
    shared: Arc<Shared>,
    running: Mutex<Option<Running>>,
    /// The `k8s_metadata` extension whose `TraceSession` objects it runs
    /// (`trace_sessions.extension`).
    trace_sessions: Option<Arc<podscope_k8s::K8sMetadata>>,
}

impl SessionExtension {
    pub fn new(config: SessionConfig, ctx: &BuildContext) -> SessionExtension {
        SessionExtension::with_pod_names(config, ctx, None)
    }

    /// With a `k8s_metadata` extension's pod cache to name the pods and containers of a
    /// whole-node trace or `top` without targets.
    pub fn with_pod_names(
        config: SessionConfig,
        ctx: &BuildContext,
        pod_names: Option<Arc<podscope_k8s::K8sMetadata>>,
    ) -> SessionExtension {
        let node = config.resolved_node_name(&ctx.host_name);
        let kernel = Arc::new(TraceKernel::new(&config.btf_path));
        let permits = Arc::new(tokio::sync::Semaphore::new(config.max_sessions as usize));
        let session_logs = Arc::new(session_log::SessionLogs::new(
            mib(config.trace_sessions.log_per_session_mib),
            mib(config.trace_sessions.log_total_mib),
        ));
        SessionExtension {
            id: ctx.id.to_string(),
            shared: Arc::new(Shared {
                config,
                node,
                readiness: ctx.readiness.clone(),
                kernel,
                permits,
                stopping: CancellationToken::new(),
                reported_probes: Mutex::default(),
                pod_names,
                kernel_figures: figures::KernelFigures::default(),
                http_exchanges: Arc::default(),
                session_logs,
                session_exports: Arc::default(),
            }),
            running: Mutex::new(None),
            trace_sessions: None,
        }
    }

    /// The address it listens on (with `endpoint` port 0, the port the kernel chose); `None`
    /// before start.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.lock().as_ref().map(|r| r.address)
    }

    /// The node name it labels events with.
    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// The trace object's state (sessions, attached programs), for tests and status.
    pub fn trace_kernel(&self) -> Arc<TraceKernel> {
        self.shared.kernel.clone()
    }

    /// Where an eBPF receiver's http probe hands its exchanges to `trace … http` sessions.
    pub fn http_exchanges(&self) -> Arc<ExchangeTap> {
        self.shared.http_exchanges.clone()
    }

    /// Where a `trace_sessions` receiver takes what exported `TraceSession`s record.
    pub fn register_export(&self, sink: Arc<SessionExportSink>) {
        self.shared.session_exports.register(sink);
    }

    /// Where exported `TraceSession`s hand what they record, for a `trace_sessions` receiver's
    /// stop ([`SessionExports::end_runs`]).
    pub fn session_exports(&self) -> Arc<SessionExports> {
        self.shared.session_exports.clone()
    }

    /// An eBPF receiver's probes (probe → `attached` or `skipped: why`), for status.
    pub fn report_probes(
        &self,
        receiver: &str,
        probes: std::collections::BTreeMap<String, String>,
    ) {
        let mut reported = self
            .shared
            .reported_probes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        reported.retain(|key, _| !key.starts_with(&format!("{receiver}/")));
        let attached = |probe: &str| probes.get(probe).is_some_and(|s| s == "attached");
        self.shared.kernel_figures.set_probes(
            receiver,
            figures::ProbesOn {
                sched: attached("sched"),
                syscalls: attached("syscalls"),
                files: attached("files"),
                tcp: attached("tcp"),
                http: attached("http"),
            },
        );
        for (probe, state) in probes {
            reported.insert(format!("{receiver}/{probe}"), state);
        }
    }

    /// An eBPF receiver's figures of the collection it just made (the kernel columns of `top`).
    pub fn report_figures(&self, receiver: &str, snapshot: figures::Snapshot) {
        self.shared.kernel_figures.push(receiver, snapshot);
    }

    /// Leaves out a stopped receiver's figures.
    pub fn forget_figures(&self, receiver: &str) {
        self.shared.kernel_figures.forget(receiver);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Component for SessionExtension {
    async fn start(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.lock().is_none(), "extension {} started twice", self.id);
        let endpoint = &self.shared.config.endpoint;
        let listener = tokio::net::TcpListener::bind(endpoint)
            .await
            .with_context(|| format!("extension {}: cannot listen on {endpoint}", self.id))?;
        let address = listener.local_addr()?;
        let tasks = TaskTracker::new();
        tasks.spawn(server::accept(listener, self.shared.clone(), tasks.clone()));
        tracing::info!(extension = %self.id, %address, node = %self.shared.node, "session endpoint listening");
        if let Some(metadata) = &self.trace_sessions {
            // Host mode (no API server) has no TraceSessions to run.
            match metadata.trace_sessions().await {
                Some(sessions) => {
                    let runner = trace_session_runs::TraceSessionRunner {
                        sessions,
                        metadata: metadata.clone(),
                        kernel: self.shared.kernel.clone(),
                        logs: self.shared.session_logs.clone(),
                        node: self.shared.node.clone(),
                        cgroup_root: podscope_k8s::cgroup::cgroup2_mount()
                            .unwrap_or_else(|| "/sys/fs/cgroup".into()),
                        config: self.shared.config.trace_sessions.clone(),
                        bpftrace_path: self.shared.config.bpftrace.path.clone(),
                        shared: self.shared.clone(),
                        export: self.shared.session_exports.clone(),
                    };
                    // Ended by the extension's stop, or earlier by the first `trace_sessions`
                    // receiver to stop, so that the runs' last summaries reach the pipelines.
                    let (stop, ended) = self
                        .shared
                        .session_exports
                        .runner_started(&self.shared.stopping);
                    tasks.spawn(async move {
                        runner.run(stop).await;
                        drop(ended);
                    });
                    tracing::info!(extension = %self.id, "running this node's TraceSessions");
                }
                None => {
                    tracing::info!(extension = %self.id, "no Kubernetes API server: no TraceSessions to run")
                }
            }
        }
        *self.lock() = Some(Running { address, tasks });
        Ok(())
    }

    /// Ends every session (`AgentStopping`) and waits for them, a few seconds at most.
    async fn shutdown(&self) -> anyhow::Result<()> {
        let Some(running) = self.lock().take() else {
            return Ok(());
        };
        self.shared.stopping.cancel();
        running.tasks.close();
        if tokio::time::timeout(std::time::Duration::from_secs(5), running.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(extension = %self.id, "sessions still ending after 5s; leaving them");
        }
        Ok(())
    }
}

impl Extension for SessionExtension {}

/// `mib` MiB in bytes (saturating: the setting is validated, not trusted).
fn mib(mib: u64) -> usize {
    usize::try_from(mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
}
