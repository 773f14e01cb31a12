//! Reaching the API server and keeping the store current: a kube-rs watcher on the node's Pods
//! (and on Namespaces / the Node when `extract` rules read their labels), each event trimmed
//! on arrival and applied to the store. The watcher relists after `410 Gone` and retries with
//! backoff; meanwhile the store keeps serving what it has.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client};
use podscope_core::health::Readiness;
use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

use super::config::{AuthType, FieldSource, K8sAttributesConfig, LabelOp};
use super::metadata::Extractor;
use super::store::PodStore;

/// Where the processor gets pod metadata from.
pub enum Source {
    /// An API server, watching this node's pods.
    Cluster { client: Client, node: String },
    /// No API server: container identity and host name only.
    Host { why: String },
}

/// Decides between cluster and host mode. An explicit `auth_type` that cannot be satisfied is
/// an error (the user asked for a cluster); with `auth_type` unset, a missing cluster means host
/// mode.
pub async fn connect(config: &K8sAttributesConfig) -> anyhow::Result<Source> {
    let explicit = config.auth_type.is_some();
    let kube_config = match config.auth_type {
        Some(AuthType::None) => {
            return Ok(Source::Host {
                why: "auth_type is none".to_string(),
            })
        }
        Some(AuthType::ServiceAccount) => kube::Config::incluster().map_err(|e| {
            anyhow::anyhow!("auth_type serviceAccount: no in-cluster configuration: {e}")
        })?,
        Some(AuthType::KubeConfig) => {
            kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| anyhow::anyhow!("auth_type kubeConfig: {e}"))?
        }
        None => {
            if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
                kube::Config::incluster()
                    .map_err(|e| anyhow::anyhow!("in-cluster configuration: {e}"))?
            } else if kubeconfig_exists() {
                kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions::default())
                    .await
                    .map_err(|e| anyhow::anyhow!("kubeconfig: {e}"))?
            } else {
                return Ok(Source::Host {
                    why: "no in-cluster configuration and no kubeconfig".to_string(),
                });
            }
        }
    };
    let node = match &config.filter.node {
        Some(node) => node.clone(),
        None => match std::env::var(&config.filter.node_from_env_var) {
            Ok(node) if !node.is_empty() => node,
            _ => {
                let why = format!(
                    "no node name: filter.node is unset and the environment variable {} (filter.node_from_env_var) is empty",
                    config.filter.node_from_env_var
                );
                if explicit {
                    anyhow::bail!("{why}; a node agent watches only its node's pods");
                }
                return Ok(Source::Host { why });
            }
        },
    };
    let client = Client::try_from(kube_config)
        .map_err(|e| anyhow::anyhow!("cannot build the Kubernetes client: {e}"))?;
    Ok(Source::Cluster { client, node })
}

fn kubeconfig_exists() -> bool {
    if let Some(paths) = std::env::var_os("KUBECONFIG") {
        return std::env::split_paths(&paths).any(|p| p.is_file());
    }
    std::env::var_os("HOME")
        .map(|home| std::path::Path::new(&home).join(".kube/config").is_file())
        .unwrap_or(false)
}

/// The label selector `filter.labels` asks for, in Kubernetes syntax.
pub fn label_selector(config: &K8sAttributesConfig) -> Option<String> {
    let parts: Vec<String> = config
        .filter
        .labels
        .iter()
        .map(|l| match (l.op, l.value.as_deref()) {
            (LabelOp::Equals, Some(v)) => format!("{}={v}", l.key),
            (LabelOp::NotEquals, Some(v)) => format!("{}!={v}", l.key),
            (LabelOp::DoesNotExist, _) => format!("!{}", l.key),
            _ => l.key.clone(),
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

/// What the watch tasks share with the processor.
#[derive(Clone)]
pub struct WatchContext {
    pub store: Arc<RwLock<PodStore>>,
    pub extractor: Arc<Extractor>,
    pub readiness: Readiness,
    /// The component as `/readyz` names it.
    pub component: String,
    pub watch_errors: prometheus_client::metrics::family::Family<WatchLabels, Counter>,
    pub pods: prometheus_client::metrics::gauge::Gauge,
    /// Set at the first complete listing of pods.
    pub synced: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct WatchLabels {
    pub processor: String,
    pub resource: String,
}

/// Watches until cancelled. Spawns one task per watched resource.
pub fn spawn_watches(
    client: Client,
    node: String,
    config: &K8sAttributesConfig,
    ctx: WatchContext,
    cancel: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let mut fields = format!("spec.nodeName={node}");
    let pods: Api<Pod> = match &config.filter.namespace {
        Some(ns) => {
            fields.push_str(&format!(",metadata.namespace={ns}"));
            Api::namespaced(client.clone(), ns)
        }
        None => Api::all(client.clone()),
    };
    let mut pod_config = watcher::Config::default().fields(&fields);
    if let Some(labels) = label_selector(config) {
        pod_config = pod_config.labels(&labels);
    }
    ctx.readiness
        .set_not_ready(&ctx.component, "pod metadata not synced yet");
    let delay = config.pod_delete_delay;
    tasks.push(tokio::spawn(watch_pods(
        pods,
        pod_config,
        ctx.clone(),
        delay,
        cancel.clone(),
    )));
    if config.needs_source(FieldSource::Namespace) {
        let api: Api<Namespace> = Api::all(client.clone());
        tasks.push(tokio::spawn(watch_namespaces(
            api,
            ctx.clone(),
            cancel.clone(),
        )));
    }
    if config.needs_source(FieldSource::Node) {
        let api: Api<Node> = Api::all(client);
        let node_config = watcher::Config::default().fields(&format!("metadata.name={node}"));
        tasks.push(tokio::spawn(watch_node(api, node_config, ctx, cancel)));
    }
    tasks
}

/// Logs the first failure of a run of failures, and the recovery; not every retry.
struct FailureLog {
    resource: &'static str,
    failing_since: Option<Instant>,
    last_logged: Option<Instant>,
}

impl FailureLog {
    fn new(resource: &'static str) -> Self {
        FailureLog {
            resource,
            failing_since: None,
            last_logged: None,
        }
    }

    fn failed(&mut self, ctx: &WatchContext, error: &watcher::Error) {
        ctx.watch_errors
            .get_or_create(&WatchLabels {
                processor: ctx.component.clone(),
                resource: self.resource.to_string(),
            })
            .inc();
        let now = Instant::now();
        self.failing_since.get_or_insert(now);
        if self
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60))
        {
            self.last_logged = Some(now);
            tracing::warn!(
                processor = %ctx.component,
                resource = self.resource,
                error = %error,
                "Kubernetes watch failing; retrying with backoff, data keeps flowing with the metadata already known"
            );
        }
    }

    fn recovered(&mut self, ctx: &WatchContext) {
        if let Some(since) = self.failing_since.take() {
            tracing::info!(
                processor = %ctx.component,
                resource = self.resource,
                after = ?since.elapsed(),
                "Kubernetes watch recovered"
            );
        }
        self.last_logged = None;
    }
}

async fn watch_pods(
    api: Api<Pod>,
    config: watcher::Config,
    ctx: WatchContext,
    delete_delay: Duration,
    cancel: CancellationToken,
) {
    let stream = watcher::watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut purge = tokio::time::interval(
        (delete_delay / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)),
    );
    let mut failures = FailureLog::new("pods");
    let mut synced_once = false;
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = purge.tick() => {
                let mut store = write(&ctx.store);
                store.purge(Instant::now());
                ctx.pods.set(store.len() as i64);
                continue;
            }
            event = stream.next() => event,
        };
        match event {
            None => return,
            Some(Err(error)) => {
                failures.failed(&ctx, &error);
                ctx.readiness.set_not_ready(
                    &ctx.component,
                    format!("pod metadata not synced: watch failing: {error}"),
                );
            }
            Some(Ok(event)) => {
                let mut store = write(&ctx.store);
                if apply_pod_event(&mut store, &ctx.extractor, event, Instant::now()) {
                    failures.recovered(&ctx);
                    ctx.readiness.set_ready(&ctx.component);
                    if !synced_once {
                        synced_once = true;
                        ctx.synced.store(true, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(processor = %ctx.component, pods = store.len(), "pod metadata synced");
                    }
                }
                ctx.pods.set(store.len() as i64);
            }
        }
    }
}

/// Applies one pod watch event to the store. Returns true when a (re)list is complete.
pub fn apply_pod_event(
    store: &mut PodStore,
    extractor: &Extractor,
    event: Event<Pod>,
    now: Instant,
) -> bool {
    match event {
        Event::Init => store.relist_started(),
        Event::InitApply(pod) | Event::Apply(pod) => {
            if let Some(meta) = extractor.pod(&pod) {
                store.apply(meta);
            }
        }
        Event::Delete(pod) => {
            if let Some(uid) = &pod.metadata.uid {
                store.delete(uid, now);
            }
        }
        Event::InitDone => {
            store.relist_done(now);
            return true;
        }
    }
    false
}

async fn watch_namespaces(api: Api<Namespace>, ctx: WatchContext, cancel: CancellationToken) {
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut failures = FailureLog::new("namespaces");
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            event = stream.next() => event,
        };
        match event {
            None => return,
            Some(Err(error)) => failures.failed(&ctx, &error),
            Some(Ok(Event::InitApply(ns) | Event::Apply(ns))) => {
                if let Some(name) = ns.metadata.name.clone() {
                    let attributes = ctx.extractor.namespace(&ns);
                    write(&ctx.store).set_namespace(name, attributes);
                }
            }
            Some(Ok(Event::Delete(ns))) => {
                if let Some(name) = &ns.metadata.name {
                    write(&ctx.store).remove_namespace(name);
                }
            }
            Some(Ok(Event::InitDone)) => failures.recovered(&ctx),
            Some(Ok(Event::Init)) => {}
        }
    }
}

async fn watch_node(
    api: Api<Node>,
    config: watcher::Config,
    ctx: WatchContext,
    cancel: CancellationToken,
) {
    let stream = watcher::watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut failures = FailureLog::new("nodes");
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            event = stream.next() => event,
        };
        match event {
            None => return,
            Some(Err(error)) => failures.failed(&ctx, &error),
            Some(Ok(Event::InitApply(node) | Event::Apply(node))) => {
                let attributes = ctx.extractor.node(&node);
                write(&ctx.store).set_node(Some(attributes));
            }
            Some(Ok(Event::Delete(_))) => write(&ctx.store).set_node(None),
            Some(Ok(Event::InitDone)) => failures.recovered(&ctx),
            Some(Ok(Event::Init)) => {}
        }
    }
}

fn write(store: &RwLock<PodStore>) -> std::sync::RwLockWriteGuard<'_, PodStore> {
    // A panic while holding the lock leaves the maps consistent (each update is one insert or
    // remove), so a poisoned lock is still usable.
    store.write().unwrap_or_else(|e| e.into_inner())
}
