//! Reaching the API server and keeping the store current: a kube-rs watcher on the node's Pods
//! (and on Namespaces / the Node when `extract` rules read their labels), each event trimmed
//! on arrival and applied to the store. The watcher relists after `410 Gone` and retries with
//! backoff; meanwhile the store keeps serving what it has.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use kube::core::{Expression, Selector};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use podscope_core::backoff::{Backoff, BackoffPolicy};
use podscope_core::health::Readiness;
use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

use super::config::{AuthType, FieldSource, K8sMetadataConfig, LabelOp};
use super::metadata::Extractor;
use super::peers::PeerIndex;
use super::store::PodStore;

/// Where the extension gets pod metadata from.
pub enum Source {
    /// An API server, watching this node's pods.
    Cluster { client: Client, node: String },
    /// No API server: container identity and host name only.
    Host { why: String },
}

/// Decides between cluster and host mode. An explicit `auth_type` that cannot be satisfied is
/// an error (the user asked for a cluster); with `auth_type` unset, a missing cluster means host
/// mode.
pub async fn connect(config: &K8sMetadataConfig) -> anyhow::Result<Source> {
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

/// The label selector `filter.labels` asks for, in kube's model (printed for the API).
pub fn label_selector(config: &K8sMetadataConfig) -> Option<Selector> {
    let expressions: Vec<Expression> = config
        .filter
        .labels
        .iter()
        .map(|l| {
            let (key, value) = (l.key.clone(), l.value.clone().unwrap_or_default());
            match l.op {
                LabelOp::Equals => Expression::Equal(key, value),
                LabelOp::NotEquals => Expression::NotEqual(key, value),
                LabelOp::Exists => Expression::Exists(key),
                LabelOp::DoesNotExist => Expression::DoesNotExist(key),
            }
        })
        .collect();
    (!expressions.is_empty()).then(|| Selector::from_iter(expressions))
}

/// What the watch tasks share with the extension.
#[derive(Clone)]
pub struct WatchContext {
    pub store: Arc<RwLock<PodStore>>,
    pub extractor: Arc<Extractor>,
    pub readiness: Readiness,
    /// The component as `/readyz` names it.
    pub component: String,
    pub watch_errors: prometheus_client::metrics::family::Family<WatchLabels, Counter>,
    /// Pods in the store: live, and deleted but kept for the delay.
    pub pods: [prometheus_client::metrics::gauge::Gauge; 2],
    /// Set at the first complete listing of pods.
    pub synced: Arc<std::sync::atomic::AtomicBool>,
    /// Bumped when pods change (the receiver's kernel-side filter follows it).
    pub changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// Cluster-wide pod and Service IPs, when `peers.enabled`.
    pub peers: Arc<RwLock<PeerIndex>>,
}

impl WatchContext {
    fn count_pods(&self, store: &PodStore) {
        let (live, deleted) = store.counts();
        self.pods[0].set(live as i64);
        self.pods[1].set(deleted as i64);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct WatchLabels {
    pub extension: String,
    pub resource: String,
}

/// Watches until cancelled. Spawns one task per watched resource.
pub fn spawn_watches(
    client: Client,
    node: String,
    config: &K8sMetadataConfig,
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
        pod_config = pod_config.labels(&labels.to_string());
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
    if config.peers.enabled {
        tasks.push(tokio::spawn(watch_peers(
            Api::all(client.clone()),
            Api::all(client.clone()),
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
                extension: ctx.component.clone(),
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
                extension = %ctx.component,
                resource = self.resource,
                error = %error,
                "Kubernetes watch failing; retrying with backoff, data keeps flowing with the metadata already known"
            );
        }
    }

    fn recovered(&mut self, ctx: &WatchContext) {
        if let Some(since) = self.failing_since.take() {
            tracing::info!(
                extension = %ctx.component,
                resource = self.resource,
                after = ?since.elapsed(),
                "Kubernetes watch recovered"
            );
        }
        self.last_logged = None;
    }
}

/// Waits between watch restarts after a failure: 500 ms doubling to 30 s, randomized by ± 25 % so
/// a fleet of agents does not return to the API server in step; never given up. Reset by a
/// complete list.
const WATCH_RESTART: BackoffPolicy = BackoffPolicy {
    initial: Duration::from_millis(500),
    max: Duration::from_secs(30),
    multiplier: 2.0,
    randomization_factor: 0.25,
    max_elapsed: None,
};

/// Runs a watch until cancelled. On an error the watch is dropped and, after a backoff, started
/// again from a fresh list: the cache then reflects a complete list taken after the failure, which
/// is what "synced" means (resuming from a resourceVersion would give no sign that it is
/// current again). `handle` returns true at the end of a complete list.
pub(super) async fn run_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    ctx: &WatchContext,
    resource: &'static str,
    cancel: &CancellationToken,
    mut on_error: impl FnMut(&watcher::Error),
    mut handle: impl FnMut(Event<K>) -> bool,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut failures = FailureLog::new(resource);
    let mut backoff = Backoff::new(WATCH_RESTART);
    loop {
        let stream = watcher::watcher(api.clone(), config.clone());
        futures::pin_mut!(stream);
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return,
                event = stream.next() => event,
            };
            match event {
                None => break,
                Some(Err(error)) => {
                    failures.failed(ctx, &error);
                    on_error(&error);
                    break;
                }
                Some(Ok(event)) => {
                    if handle(event) {
                        failures.recovered(ctx);
                        backoff.reset();
                    }
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_wait(None).unwrap_or(WATCH_RESTART.max)) => {}
        }
    }
}

async fn watch_pods(
    api: Api<Pod>,
    config: watcher::Config,
    ctx: WatchContext,
    delete_delay: Duration,
    cancel: CancellationToken,
) {
    // Deleted pods are forgotten by a purge on a timer, beside the watch.
    let purge_ctx = ctx.clone();
    let purge_cancel = cancel.clone();
    let purge = tokio::spawn(async move {
        let mut tick = tokio::time::interval(
            (delete_delay / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)),
        );
        loop {
            tokio::select! {
                _ = purge_cancel.cancelled() => return,
                _ = tick.tick() => {
                    let mut store = write(&purge_ctx.store);
                    store.purge(Instant::now());
                    purge_ctx.count_pods(&store);
                }
            }
        }
    });
    let mut synced_once = false;
    run_watch(
        api,
        config,
        &ctx,
        "pods",
        &cancel,
        |error| {
            ctx.readiness.set_not_ready(
                &ctx.component,
                format!("pod metadata not synced: watch failing: {error}"),
            )
        },
        |event| {
            let mut store = write(&ctx.store);
            let listed = apply_pod_event(&mut store, &ctx.extractor, event, Instant::now());
            if listed {
                ctx.readiness.set_ready(&ctx.component);
                if !synced_once {
                    synced_once = true;
                    ctx.synced.store(true, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(extension = %ctx.component, pods = store.len(), "pod metadata synced");
                }
            }
            ctx.count_pods(&store);
            drop(store);
            ctx.changes.send_modify(|n| *n = n.wrapping_add(1));
            listed
        },
    )
    .await;
    let _ = purge.await;
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
            if let Some(meta) = extractor.pod(&pod, &mut store.interner) {
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
    let config = watcher::Config::default();
    run_watch(
        api,
        config,
        &ctx,
        "namespaces",
        &cancel,
        |_| {},
        |event| apply_namespace_event(&mut write(&ctx.store), &ctx.extractor, event),
    )
    .await;
}

/// Applies one namespace watch event to the store. Returns true when a (re)list is complete.
pub fn apply_namespace_event(
    store: &mut PodStore,
    extractor: &Extractor,
    event: Event<Namespace>,
) -> bool {
    match event {
        Event::InitApply(ns) | Event::Apply(ns) => {
            if let Some(name) = ns.metadata.name.clone() {
                let attributes = extractor.namespace(&ns, &mut store.interner);
                store.set_namespace(name, attributes);
            }
        }
        Event::Delete(ns) => {
            if let Some(name) = &ns.metadata.name {
                store.remove_namespace(name);
            }
        }
        Event::InitDone => return true,
        Event::Init => {}
    }
    false
}

async fn watch_node(
    api: Api<Node>,
    config: watcher::Config,
    ctx: WatchContext,
    cancel: CancellationToken,
) {
    run_watch(
        api,
        config,
        &ctx,
        "nodes",
        &cancel,
        |_| {},
        |event| {
            let mut store = write(&ctx.store);
            match event {
                Event::InitApply(node) | Event::Apply(node) => {
                    let attributes = ctx.extractor.node(&node, &mut store.interner);
                    store.set_node(Some(attributes));
                }
                Event::Delete(_) => store.set_node(None),
                Event::InitDone => return true,
                Event::Init => {}
            }
            false
        },
    )
    .await;
}

/// The `/readyz` key of the peer index of `component`.
pub fn peers_readiness_key(component: &str) -> String {
    format!("{component}/peers")
}

/// The peer index: every pod and Service in the cluster, trimmed to what names a peer.
async fn watch_peers(
    pods: Api<Pod>,
    services: Api<Service>,
    ctx: WatchContext,
    cancel: CancellationToken,
) {
    let readiness_key = peers_readiness_key(&ctx.component);
    ctx.readiness
        .set_not_ready(&readiness_key, "peer index not synced yet");
    let listed = [
        std::sync::atomic::AtomicBool::new(false),
        std::sync::atomic::AtomicBool::new(false),
    ];
    let mark_listed = |which: usize| {
        listed[which].store(true, std::sync::atomic::Ordering::Relaxed);
        if listed
            .iter()
            .all(|l| l.load(std::sync::atomic::Ordering::Relaxed))
        {
            ctx.readiness.set_ready(&readiness_key);
        }
    };
    let not_ready = |error: &watcher::Error| {
        ctx.readiness.set_not_ready(
            &readiness_key,
            format!("peer index not synced: watch failing: {error}"),
        )
    };
    let peers = &ctx.peers;
    let pod_watch = run_watch(
        pods,
        watcher::Config::default(),
        &ctx,
        "peer pods",
        &cancel,
        not_ready,
        |event| {
            let done = peers
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .apply_pod_event(event);
            if done {
                mark_listed(0);
            }
            done
        },
    );
    let service_watch = run_watch(
        services,
        watcher::Config::default(),
        &ctx,
        "services",
        &cancel,
        not_ready,
        |event| {
            let done = peers
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .apply_service_event(event);
            if done {
                mark_listed(1);
            }
            done
        },
    );
    futures::join!(pod_watch, service_watch);
}

fn write(store: &RwLock<PodStore>) -> std::sync::RwLockWriteGuard<'_, PodStore> {
    // A panic while holding the lock leaves the maps consistent (each update is one insert or
    // remove), so a poisoned lock is still usable.
    store.write().unwrap_or_else(|e| e.into_inner())
}
