//! A fake Kubernetes API server for tests: the subset of the real API that kube-rs watchers and
//! kubectl use (discovery, get, list, watch of pods, namespaces and nodes), spoken as real
//! Kubernetes JSON over plain HTTP on 127.0.0.1.
//!
//! It keeps the semantics clients depend on: a global resourceVersion, list snapshots with
//! `limit`/`continue`, field and label selectors, watches that replay history after a
//! resourceVersion, `410 Expired` once that history is gone, bookmarks, `timeoutSeconds`, and
//! `Status` bodies on every error. Tests drive it from the outside (`apply_*`, `delete_*`,
//! `expire_history`, `fail_next`, `stop`/`restart`) and check what a client saw.
//!
//! [`FakeApiServer::start`] serves plain HTTP to a kubeconfig's token (or none, as kubectl sends
//! to a plain-HTTP server); [`FakeApiServer::start_for`] serves HTTPS to one service account and
//! enforces the cluster's RBAC, as a pod's agent meets it (see `fake_kube/access.rs`, and the
//! `podscope-fake-apiserver` binary that runs it for the Helm chart's tests).
//!
//! Beside the core kinds it serves podscope's custom resources (`EbpfProgram`, `Probe` of
//! `podscope.dev/v1alpha1`, as if their CRDs were installed), ConfigMaps, and Events; the only
//! writes are creating Events and server-side apply of the custom resources and their status
//! (`fake_kube/write.rs`), which is what agents do.
//!
//! It must not grow into an API server: no other writes, no admission, no validation of
//! objects beyond what keying them needs.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Query;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    APIGroup, APIGroupList, APIResource, APIResourceList, APIVersions, GroupVersionForDiscovery,
    ListMeta, ServerAddressByClientCIDR, Status, StatusDetails, Time,
};
use k8s_openapi::apimachinery::pkg::version::Info;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{broadcast, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

mod access;
pub mod pods;
mod portforward;
mod spdy;
mod write;

pub use access::{ApiRequest, Grant, Rbac, ServiceAccount};

/// Bearer token written into the kubeconfig; a request carrying any other token gets 401.
const TOKEN: &str = "podscope-fake-kube-token";
/// The first resourceVersion handed out: not 1, so clients that treat small numbers specially
/// (or "0" as "any") are not accidentally exercised.
const FIRST_RESOURCE_VERSION: u64 = 1000;
/// How often watches that asked for bookmarks get one. The real server sends them about once a
/// minute; tests want progress within a second.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// Events a watcher may fall behind by before it is closed, as the real server closes
/// unresponsive watchers rather than buffering without bound.
const EVENT_BUFFER: usize = 4096;

/// Handle to a running fake API server; cheap to clone, every clone drives the same server.
#[derive(Clone)]
pub struct FakeApiServer {
    shared: Arc<Shared>,
}

struct Shared {
    addr: SocketAddr,
    /// Set by `start_for`: HTTPS, one service account's token, RBAC.
    access: Option<access::Access>,
    state: Mutex<State>,
    /// The accept loop while serving; `None` between `stop` and `restart`.
    serving: Mutex<Option<Serving>>,
}

struct Serving {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

struct State {
    resource_version: u64,
    objects: BTreeMap<ObjectKey, Arc<Value>>,
    /// Every change since `oldest_watchable`, oldest first: replayed to watches that start from
    /// a resourceVersion, and undone to rebuild list snapshots for `continue` tokens.
    history: Vec<Arc<Change>>,
    /// Watches and snapshots from a resourceVersion below this answer 410 Expired.
    oldest_watchable: u64,
    /// Published under the state lock, so a watcher that subscribes under the lock sees every
    /// later change exactly once and none it already replayed.
    events: broadcast::Sender<Message>,
    next_uid: u64,
    fail_remaining: usize,
    fail_status: u16,
    requests: Vec<String>,
    /// Requests for a resource, with the decision and status.
    access_log: Vec<ApiRequest>,
    /// Who owns which `status.nodes` entry of each custom resource (server-side apply).
    node_owners: write::NodeOwners,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Pod,
    Namespace,
    Node,
    Service,
    ConfigMap,
    Event,
    /// `podscope.dev/v1alpha1`, cluster-scoped, with a status subresource (the chart's CRD).
    EbpfProgram,
    /// `podscope.dev/v1alpha1`, namespaced, with a status subresource.
    Probe,
    /// `podscope.dev/v1alpha1`, namespaced, with a status subresource; deleted by the agents
    /// once its TTL after finishing passed.
    TraceSession,
    /// `apps/v1` and `batch/v1`: the workloads `kubectl podscope` resolves to their pods (read
    /// only; their controllers are not simulated, tests apply the pods they would create).
    Deployment,
    ReplicaSet,
    StatefulSet,
    DaemonSet,
    Job,
}

/// The custom resources' API group and version (their CRDs are in `helm/podscope/crds/`).
const PODSCOPE_GROUP: &str = "podscope.dev";
const PODSCOPE_VERSION: &str = "v1alpha1";
/// The built-in API groups served beside the core group, each at `v1`.
const APPS_GROUP: &str = "apps";
const BATCH_GROUP: &str = "batch";
/// Every API group besides core, as `/apis` lists them.
const GROUPS: [&str; 3] = [APPS_GROUP, BATCH_GROUP, PODSCOPE_GROUP];

/// Kind, namespace ("" when cluster-scoped) and name: ordered like the real server's storage
/// keys, so lists come out sorted by namespace then name.
type ObjectKey = (Kind, String, String);

struct Change {
    resource_version: u64,
    key: ObjectKey,
    /// The object before the change, with its old resourceVersion.
    before: Option<Arc<Value>>,
    /// The object after the change; `None` when it was deleted.
    after: Option<Arc<Value>>,
}

#[derive(Clone)]
enum Message {
    Change(Arc<Change>),
    /// History before this resourceVersion was compacted: open watches end with 410 Expired.
    Expired {
        oldest: u64,
    },
}

impl Kind {
    const ALL: [Kind; 14] = [
        Kind::Pod,
        Kind::Namespace,
        Kind::Node,
        Kind::Service,
        Kind::ConfigMap,
        Kind::Event,
        Kind::EbpfProgram,
        Kind::Probe,
        Kind::TraceSession,
        Kind::Deployment,
        Kind::ReplicaSet,
        Kind::StatefulSet,
        Kind::DaemonSet,
        Kind::Job,
    ];

    /// The kind served at `plural` in API group `group` ("" for the core group).
    fn from_plural(group: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.group() == group && k.plural() == plural)
    }

    fn group(self) -> &'static str {
        match self {
            Kind::EbpfProgram | Kind::Probe | Kind::TraceSession => PODSCOPE_GROUP,
            Kind::Deployment | Kind::ReplicaSet | Kind::StatefulSet | Kind::DaemonSet => APPS_GROUP,
            Kind::Job => BATCH_GROUP,
            _ => "",
        }
    }

    /// `v1`, or `group/version`.
    fn api_version(self) -> String {
        match self.group() {
            "" => "v1".to_string(),
            group => format!("{group}/{}", group_version(group)),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Service => "Service",
            Kind::ConfigMap => "ConfigMap",
            Kind::Event => "Event",
            Kind::EbpfProgram => "EbpfProgram",
            Kind::Probe => "Probe",
            Kind::TraceSession => "TraceSession",
            Kind::Deployment => "Deployment",
            Kind::ReplicaSet => "ReplicaSet",
            Kind::StatefulSet => "StatefulSet",
            Kind::DaemonSet => "DaemonSet",
            Kind::Job => "Job",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Namespace => "namespaces",
            Kind::Node => "nodes",
            Kind::Service => "services",
            Kind::ConfigMap => "configmaps",
            Kind::Event => "events",
            Kind::EbpfProgram => "ebpfprograms",
            Kind::Probe => "probes",
            Kind::TraceSession => "tracesessions",
            Kind::Deployment => "deployments",
            Kind::ReplicaSet => "replicasets",
            Kind::StatefulSet => "statefulsets",
            Kind::DaemonSet => "daemonsets",
            Kind::Job => "jobs",
        }
    }

    fn singular(self) -> &'static str {
        match self {
            Kind::Pod => "pod",
            Kind::Namespace => "namespace",
            Kind::Node => "node",
            Kind::Service => "service",
            Kind::ConfigMap => "configmap",
            Kind::Event => "event",
            Kind::EbpfProgram => "ebpfprogram",
            Kind::Probe => "probe",
            Kind::TraceSession => "tracesession",
            Kind::Deployment => "deployment",
            Kind::ReplicaSet => "replicaset",
            Kind::StatefulSet => "statefulset",
            Kind::DaemonSet => "daemonset",
            Kind::Job => "job",
        }
    }

    /// "" for a kind without one (jobs).
    fn short_name(self) -> &'static str {
        match self {
            Kind::Pod => "po",
            Kind::Namespace => "ns",
            Kind::Node => "no",
            Kind::Service => "svc",
            Kind::ConfigMap => "cm",
            Kind::Event => "ev",
            Kind::EbpfProgram => "ebpf",
            Kind::Probe => "prb",
            Kind::TraceSession => "tsess",
            Kind::Deployment => "deploy",
            Kind::ReplicaSet => "rs",
            Kind::StatefulSet => "sts",
            Kind::DaemonSet => "ds",
            Kind::Job => "",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node | Kind::EbpfProgram)
    }

    /// Custom resources whose `status` is only written through the status subresource.
    fn has_status_subresource(self) -> bool {
        matches!(self, Kind::EbpfProgram | Kind::Probe | Kind::TraceSession)
    }

    /// The fields the real server lets each kind be selected on; anything else is a 400 there,
    /// so it is one here too, and a client relying on an unsupported field fails in tests.
    fn selectable_fields(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => &[
                "metadata.name",
                "metadata.namespace",
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "status.phase",
                "status.nominatedNodeName",
            ],
            Kind::Namespace => &["metadata.name", "metadata.namespace", "status.phase"],
            Kind::Service => &[
                "metadata.name",
                "metadata.namespace",
                "spec.clusterIP",
                "spec.type",
            ],
            Kind::Event => &[
                "metadata.name",
                "metadata.namespace",
                "involvedObject.kind",
                "involvedObject.name",
                "involvedObject.namespace",
                "involvedObject.uid",
                "reason",
                "type",
                "source",
            ],
            Kind::Node
            | Kind::ConfigMap
            | Kind::EbpfProgram
            | Kind::Probe
            | Kind::TraceSession
            | Kind::Deployment
            | Kind::ReplicaSet
            | Kind::StatefulSet
            | Kind::DaemonSet
            | Kind::Job => &["metadata.name", "metadata.namespace"],
        }
    }
}

impl FakeApiServer {
    /// Starts serving plain HTTP on a free loopback port.
    pub async fn start() -> FakeApiServer {
        Self::start_with(None).await
    }

    /// Starts serving HTTPS on a free loopback port to `account` only: its token (see
    /// [`FakeApiServer::write_service_account_files`]) or 401, and what the RBAC objects grant
    /// it or 403. An error for RBAC objects that are not valid.
    pub async fn start_for(account: &ServiceAccount) -> Result<FakeApiServer, String> {
        Ok(Self::start_with(Some(access::Access::new(account)?)).await)
    }

    async fn start_with(access: Option<access::Access>) -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port for the fake API server");
        let addr = listener.local_addr().expect("local address");
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let shared = Arc::new(Shared {
            addr,
            access,
            state: Mutex::new(State {
                resource_version: FIRST_RESOURCE_VERSION,
                objects: BTreeMap::new(),
                history: Vec::new(),
                oldest_watchable: FIRST_RESOURCE_VERSION,
                events,
                next_uid: 1,
                fail_remaining: 0,
                fail_status: 0,
                requests: Vec::new(),
                access_log: Vec::new(),
                node_owners: Default::default(),
            }),
            serving: Mutex::new(None),
        });
        let server = FakeApiServer { shared };
        server.serve(listener);
        server
    }

    /// `http://127.0.0.1:PORT` (`https` from `start_for`); stays the same across
    /// `stop`/`restart`.
    pub fn url(&self) -> String {
        let scheme = if self.shared.access.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.shared.addr)
    }

    /// The bearer token the kubeconfig (or the service account) carries; requests with another
    /// token get 401.
    pub fn token(&self) -> &str {
        match &self.shared.access {
            Some(access) => &access.token,
            None => TOKEN,
        }
    }

    /// For a server from `start_for`: writes what the kubelet mounts at
    /// `/var/run/secrets/kubernetes.io/serviceaccount` (token, `ca.crt`, namespace) into `dir`.
    pub fn write_service_account_files(&self, dir: &Path) -> std::io::Result<()> {
        match &self.shared.access {
            Some(access) => access.write_files(dir),
            None => Err(std::io::Error::other(
                "a plain-HTTP fake API server has no service account",
            )),
        }
    }

    /// For a server from `start_for`: what its RBAC grants the service account.
    pub fn grants(&self) -> Option<std::collections::BTreeSet<Grant>> {
        self.shared.access.as_ref().map(|a| a.rbac.grants())
    }

    /// Every request for a resource so far, with the status it got.
    pub fn access_log(&self) -> Vec<ApiRequest> {
        self.state().access_log.clone()
    }

    /// Writes a kubeconfig whose current context points at this server with a token user, as
    /// kubectl and kube-rs (`Config::from_kubeconfig`, `KUBECONFIG`) read it.
    /// For a server from `start_for`, the CA is written beside it (`<path>.ca.crt`) and the
    /// token is the service account's.
    pub fn write_kubeconfig(&self, path: &Path) {
        let mut cluster = format!("server: {}", self.url());
        if let Some(access) = &self.shared.access {
            let ca = path.with_extension("ca.crt");
            std::fs::write(&ca, &access.ca_pem).expect("write the CA");
            cluster.push_str(&format!("\n    certificate-authority: {}", ca.display()));
        }
        let kubeconfig = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    {cluster}\n\
             users:\n\
             - name: fake\n  user:\n    token: {token}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n\
             preferences: {{}}\n",
            token = self.token()
        );
        std::fs::write(path, kubeconfig).expect("write kubeconfig");
    }

    /// Creates or replaces a pod (by namespace, "default" if unset, and name).
    pub fn apply_pod(&self, pod: Pod) {
        self.apply(Kind::Pod, serde_json::to_value(pod).expect("pod to JSON"));
    }

    /// Creates or replaces a namespace (by name).
    pub fn apply_namespace(&self, namespace: Namespace) {
        self.apply(
            Kind::Namespace,
            serde_json::to_value(namespace).expect("namespace to JSON"),
        );
    }

    /// Creates or replaces a node (by name).
    pub fn apply_node(&self, node: Node) {
        self.apply(
            Kind::Node,
            serde_json::to_value(node).expect("node to JSON"),
        );
    }

    /// Creates or replaces a service (by namespace, "default" if unset, and name).
    pub fn apply_service(&self, service: Service) {
        self.apply(
            Kind::Service,
            serde_json::to_value(service).expect("service to JSON"),
        );
    }

    /// Creates or replaces a ConfigMap (by namespace, "default" if unset, and name).
    pub fn apply_config_map(&self, config_map: k8s_openapi::api::core::v1::ConfigMap) {
        self.apply(
            Kind::ConfigMap,
            serde_json::to_value(config_map).expect("config map to JSON"),
        );
    }

    /// Creates or replaces a podscope custom resource (`EbpfProgram`, `Probe`) from its
    /// manifest, as `kubectl apply` would: its status is kept, `metadata.generation` moves when
    /// the spec changes.
    pub fn apply_custom(&self, manifest: Value) {
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.group() == PODSCOPE_GROUP && manifest["kind"] == k.name())
            .unwrap_or_else(|| panic!("not a podscope custom resource: {}", manifest["kind"]));
        self.apply(kind, manifest);
    }

    /// Creates or replaces a workload (`Deployment`, `ReplicaSet`, `StatefulSet`, `DaemonSet` of
    /// `apps/v1`, `Job` of `batch/v1`) from its manifest, by namespace ("default" if unset) and
    /// name. Nothing creates its pods: apply them too, with their owner references.
    pub fn apply_workload(&self, manifest: Value) {
        let kind = Kind::ALL
            .into_iter()
            .find(|k| matches!(k.group(), APPS_GROUP | BATCH_GROUP) && manifest["kind"] == k.name())
            .unwrap_or_else(|| panic!("not an apps/v1 or batch/v1 workload: {}", manifest["kind"]));
        self.apply(kind, manifest);
    }

    /// A podscope custom resource (`kind` `EbpfProgram` or `Probe`; `namespace` "" for
    /// cluster-scoped ones) as the server holds it now.
    pub fn custom(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let kind = Kind::ALL.into_iter().find(|k| k.name() == kind)?;
        let key = (kind, namespace.to_string(), name.to_string());
        self.state().objects.get(&key).map(|o| o.as_ref().clone())
    }

    /// Deletes a podscope custom resource; false if there was none.
    pub fn delete_custom(&self, kind: &str, namespace: &str, name: &str) -> bool {
        match Kind::ALL.into_iter().find(|k| k.name() == kind) {
            Some(kind) => self.delete((kind, namespace.to_string(), name.to_string())),
            None => false,
        }
    }

    /// Every Event clients created, oldest first.
    pub fn events(&self) -> Vec<Value> {
        let state = self.state();
        let mut events: Vec<Value> = state
            .objects
            .iter()
            .filter(|(key, _)| key.0 == Kind::Event)
            .map(|(_, event)| event.as_ref().clone())
            .collect();
        events.sort_by_key(|e| {
            e["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
        });
        events
    }

    /// Deletes a service; false if there was none.
    pub fn delete_service(&self, namespace: &str, name: &str) -> bool {
        self.delete((Kind::Service, namespace.to_string(), name.to_string()))
    }

    /// Deletes a pod at once (as with a zero grace period); false if there was none.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        self.delete((Kind::Pod, namespace.to_string(), name.to_string()))
    }

    /// Deletes a namespace at once (its pods stay: there is no namespace controller here).
    pub fn delete_namespace(&self, name: &str) -> bool {
        self.delete((Kind::Namespace, String::new(), name.to_string()))
    }

    /// Deletes a node; false if there was none.
    pub fn delete_node(&self, name: &str) -> bool {
        self.delete((Kind::Node, String::new(), name.to_string()))
    }

    /// The resourceVersion of the latest change (what a list returns now).
    pub fn resource_version(&self) -> u64 {
        self.state().resource_version
    }

    /// Forgets all change history, as the real server does after etcd compaction: watches and
    /// `continue` tokens from an older resourceVersion get 410 Expired, and open watches are
    /// ended with an ERROR event carrying that Status.
    pub fn expire_history(&self) {
        let mut state = self.state();
        state.history.clear();
        state.oldest_watchable = state.resource_version;
        // No receivers is fine: there is no open watch to tell.
        let oldest = state.oldest_watchable;
        let _ = state.events.send(Message::Expired { oldest });
    }

    /// The next `count` requests (of any kind) answer with `status` and a `Status` body.
    pub fn fail_next(&self, count: usize, status: u16) {
        assert!(
            (400..600).contains(&status),
            "fail_next wants an error status, got {status}"
        );
        let mut state = self.state();
        state.fail_remaining = count;
        state.fail_status = status;
    }

    /// Watches open now (each has subscribed to the changes it will be sent).
    pub fn open_watches(&self) -> usize {
        self.state().events.receiver_count()
    }

    /// Every request received so far, as `METHOD path?query` with the query exactly as sent
    /// (still percent-encoded, e.g. `fieldSelector=spec.nodeName%3Dnode-a`).
    pub fn requests(&self) -> Vec<String> {
        self.state().requests.clone()
    }

    /// Stops listening and drops every open connection, so watches see their stream cut and
    /// new connections are refused. State is kept for `restart`.
    pub async fn stop(&self) {
        let serving = self
            .shared
            .serving
            .lock()
            .expect("serving lock poisoned")
            .take();
        if let Some(serving) = serving {
            serving.cancel.cancel();
            // The accept loop drops the listener and aborts connections before it returns.
            let _ = serving.task.await;
        }
    }

    /// Listens again on the same port with the same objects and history. A no-op if serving.
    pub async fn restart(&self) {
        if self
            .shared
            .serving
            .lock()
            .expect("serving lock poisoned")
            .is_some()
        {
            return;
        }
        let socket = TcpSocket::new_v4().expect("socket");
        // Connections cut by `stop` may linger in TIME_WAIT on this port.
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket
            .bind(self.shared.addr)
            .unwrap_or_else(|e| panic!("rebind {}: {e}", self.shared.addr));
        let listener = socket.listen(1024).expect("listen");
        self.serve(listener);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().expect("fake API state poisoned")
    }

    fn serve(&self, listener: TcpListener) {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(accept_loop(self.shared.clone(), listener, cancel.clone()));
        *self.shared.serving.lock().expect("serving lock poisoned") =
            Some(Serving { cancel, task });
    }

    fn apply(&self, kind: Kind, object: Value) {
        let key = object_key(kind, &object, None)
            .unwrap_or_else(|e| panic!("a {} needs metadata.name: {e}", kind.name()));
        self.state().store(key, object, Write::Object);
    }

    fn delete(&self, key: ObjectKey) -> bool {
        self.state().remove(key).is_some()
    }
}

/// The key of `object` of `kind`: its name, and its namespace ("default" when a namespaced
/// object names none, or `namespace` from the request's path).
fn object_key(kind: Kind, object: &Value, namespace: Option<&str>) -> Result<ObjectKey, String> {
    let metadata = &object["metadata"];
    let name = metadata["name"]
        .as_str()
        .filter(|name| !name.is_empty())
        .ok_or("metadata.name: Required value")?
        .to_string();
    let namespace = if kind.namespaced() {
        namespace
            .or(metadata["namespace"].as_str())
            .filter(|ns| !ns.is_empty())
            .unwrap_or("default")
            .to_string()
    } else {
        String::new()
    };
    Ok((kind, namespace, name))
}

/// What a write changes of an object.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Write {
    /// The object (for kinds with a status subresource, its status is kept as it was).
    Object,
    /// Its status subresource: only `status` and managed fields change.
    Status,
}

impl State {
    /// Creates or replaces the object at `key` as the server would: uid and creationTimestamp
    /// kept (or set), a new resourceVersion, and for custom resources with a status subresource
    /// a `metadata.generation` that moves when the spec changes, with status written only
    /// through the subresource.
    fn store(&mut self, key: ObjectKey, mut object: Value, write: Write) -> Arc<Value> {
        let before = self.objects.get(&key).cloned();
        let kind = key.0;
        if !object.is_object() {
            object = json!({});
        }
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.name());
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        if kind.has_status_subresource() {
            let before = before.as_deref();
            let generation = before
                .and_then(|b| b["metadata"]["generation"].as_i64())
                .unwrap_or(0);
            let spec_changed = before.is_none_or(|b| b["spec"] != object["spec"]);
            match write {
                Write::Object => {
                    object["status"] = before.map(|b| b["status"].clone()).unwrap_or(Value::Null);
                    object["metadata"]["generation"] = json!(generation + i64::from(spec_changed));
                }
                Write::Status => {
                    object["metadata"]["generation"] = json!(generation.max(1));
                }
            }
            if object["status"].is_null() {
                object.as_object_mut().map(|o| o.remove("status"));
            }
        }
        let metadata = object["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        metadata.insert("name".into(), json!(key.2));
        if kind.namespaced() {
            metadata.insert("namespace".into(), json!(key.1));
        } else {
            metadata.remove("namespace");
        }
        // The server owns uid and creationTimestamp: kept across replaces, set on create
        // unless the test chose a uid it wants to look up.
        let kept = |field: &str| {
            before
                .as_ref()
                .and_then(|b| b["metadata"].get(field).cloned())
        };
        if !metadata.contains_key("uid") {
            let uid = kept("uid").unwrap_or_else(|| {
                let uid = format!("00000000-0000-4000-8000-{:012x}", self.next_uid);
                self.next_uid += 1;
                json!(uid)
            });
            metadata.insert("uid".into(), uid);
        }
        if !metadata.contains_key("creationTimestamp") {
            let created = kept("creationTimestamp")
                .unwrap_or_else(|| serde_json::to_value(Time(now())).expect("time to JSON"));
            metadata.insert("creationTimestamp".into(), created);
        }
        self.resource_version += 1;
        let resource_version = self.resource_version;
        metadata.insert(
            "resourceVersion".into(),
            json!(resource_version.to_string()),
        );
        let after = Arc::new(object);
        self.objects.insert(key.clone(), after.clone());
        self.record(Change {
            resource_version,
            key,
            before,
            after: Some(after.clone()),
        });
        after
    }

    /// Deletes the object at `key` (its watchers see DELETED); what it was, if it was there.
    fn remove(&mut self, key: ObjectKey) -> Option<Arc<Value>> {
        self.node_owners.remove(&key);
        let before = self.objects.remove(&key)?;
        self.resource_version += 1;
        let resource_version = self.resource_version;
        self.record(Change {
            resource_version,
            key,
            before: Some(before.clone()),
            after: None,
        });
        Some(before)
    }

    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.history.push(change.clone());
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(Message::Change(change));
    }

    /// The objects as they were at `resource_version`, rebuilt by undoing later changes;
    /// `None` if that is older than the retained history.
    fn snapshot(&self, resource_version: u64) -> Option<BTreeMap<ObjectKey, Arc<Value>>> {
        if resource_version < self.oldest_watchable || resource_version > self.resource_version {
            return None;
        }
        let mut objects = self.objects.clone();
        for change in self.history.iter().rev() {
            if change.resource_version <= resource_version {
                break;
            }
            match &change.before {
                Some(before) => objects.insert(change.key.clone(), before.clone()),
                None => objects.remove(&change.key),
            };
        }
        Some(objects)
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, cancel: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                let cancel = cancel.clone();
                connections.spawn(async move {
                    let tls = shared.access.as_ref().map(|a| a.tls.clone());
                    let service = hyper::service::service_fn(move |request| {
                        let shared = shared.clone();
                        let cancel = cancel.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, &cancel, request).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    // A client going away mid-request (or mid-handshake) is not the server's
                    // problem.
                    match tls {
                        None => {
                            let _ = http
                                .serve_connection(TokioIo::new(stream), service)
                                .with_upgrades()
                                .await;
                        }
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = http
                                    .serve_connection(TokioIo::new(stream), service)
                                    .with_upgrades()
                                    .await;
                            }
                        }
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Closing the listener first makes new connections fail; aborting the connection tasks
    // drops their sockets, which is what a client sees when an API server goes away.
    drop(listener);
    connections.shutdown().await;
}

type HttpResponse = Response<Body>;

async fn handle(
    shared: &Shared,
    cancel: &CancellationToken,
    request: Request<Incoming>,
) -> HttpResponse {
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    {
        let mut state = shared.state.lock().expect("fake API state poisoned");
        state
            .requests
            .push(format!("{} {path_and_query}", request.method()));
        if state.fail_remaining > 0 {
            state.fail_remaining -= 1;
            return injected_failure(state.fail_status);
        }
    }
    let resource = resource_request(request.method(), request.uri());
    let response = authorized(shared, cancel, request, resource.as_ref()).await;
    if let Some(mut logged) = resource {
        logged.status = response.status().as_u16();
        let mut state = shared.state.lock().expect("fake API state poisoned");
        state.access_log.push(logged);
    }
    response
}

/// Authentication, authorization, then the request served.
async fn authorized(
    shared: &Shared,
    cancel: &CancellationToken,
    request: Request<Incoming>,
    resource: Option<&ApiRequest>,
) -> HttpResponse {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(|value| value.strip_prefix("Bearer ").unwrap_or(value));
    let authenticated = match &shared.access {
        Some(access) => token == Some(access.token.as_str()),
        // A credential, if sent, must be the kubeconfig's token (kube-rs always sends it). None
        // is fine: client-go drops user credentials for plain-HTTP servers, so kubectl talks to
        // this like to `kubectl proxy`, which needs none.
        None => token.is_none_or(|token| token == TOKEN),
    };
    if !authenticated {
        return status_response(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
            None,
        );
    }
    if let (Some(access), Some(resource)) = (&shared.access, resource) {
        let namespace = resource.namespace();
        if !access.rbac.allows(
            &resource.group,
            &resource.verb,
            &resource.resource,
            namespace,
        ) {
            return status_response(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &access.rbac.forbidden(resource),
                Some(StatusDetails {
                    kind: Some(resource.resource.clone()),
                    name: resource.name.clone(),
                    group: Some(resource.group.clone()).filter(|g| !g.is_empty()),
                    ..StatusDetails::default()
                }),
            );
        }
    }

    let params: HashMap<String, String> = match Query::try_from_uri(request.uri()) {
        Ok(Query(params)) => params,
        Err(error) => {
            return status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &error.body_text(),
                None,
            )
        }
    };
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if method == Method::GET {
        match segments.as_slice() {
            ["version"] => return json_response(StatusCode::OK, &version_info()),
            ["api"] => return json_response(StatusCode::OK, &api_versions(shared.addr)),
            ["apis"] => return json_response(StatusCode::OK, &api_groups()),
            ["apis", group] if GROUPS.contains(group) => {
                return json_response(StatusCode::OK, &api_group(group))
            }
            ["api", "v1"] => return json_response(StatusCode::OK, &resources_of("")),
            ["apis", group, version]
                if GROUPS.contains(group) && *version == group_version(group) =>
            {
                return json_response(StatusCode::OK, &resources_of(group))
            }
            _ => {}
        }
    }
    let Some(target) = parse_target(&segments) else {
        return not_found_path();
    };
    if let (Kind::Pod, Some(name), Some("portforward")) =
        (target.kind, &target.name, target.subresource.as_deref())
    {
        let namespace = target.namespace.clone().unwrap_or_default();
        return portforward::upgrade(shared, cancel, &namespace, name, request, &params);
    }
    let body = if method == Method::GET {
        Bytes::new()
    } else {
        match axum::body::to_bytes(Body::new(request.into_body()), 16 << 20).await {
            Ok(body) => body,
            Err(e) => {
                return status_response(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string(), None)
            }
        }
    };
    let key = |name: &str| {
        (
            target.kind,
            target.namespace.clone().unwrap_or_default(),
            name.to_string(),
        )
    };
    match (&method, target.name.as_deref(), target.subresource.as_deref()) {
        (&Method::GET, None, None) => collection(
            shared,
            cancel,
            target.kind,
            target.namespace.as_deref(),
            &params,
        ),
        (&Method::GET, Some(name), None | Some("status")) => get_object(shared, key(name)),
        (&Method::PATCH, Some(name), sub @ (None | Some("status"))) => {
            write::apply_patch(shared, key(name), sub.is_some(), &content_type, &params, &body)
        }
        (&Method::POST, None, None) => write::create(shared, target.kind, target.namespace.as_deref(), &body),
        (&Method::DELETE, Some(name), None) if target.kind == Kind::TraceSession => {
            write::delete(shared, key(name), &body)
        }
        _ => status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!(
                "the server does not allow this method on the requested resource ({method} {path} is not served by the fake)"
            ),
            None,
        ),
    }
}

/// A request's resource: kind, namespace (namespaced kinds), name and subresource.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

/// `/api/v1/…` and `/apis/<group>/<version>/…`: `<plural>[/<name>[/<sub>]]`, or for namespaced
/// kinds `namespaces/<ns>/<plural>[/<name>[/<sub>]]`; `None` for anything else.
fn parse_target(segments: &[&str]) -> Option<Target> {
    let (group, rest) = match segments {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, version, rest @ ..]
            if GROUPS.contains(group) && *version == group_version(group) =>
        {
            (*group, rest)
        }
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, plural, ..]
            if Kind::from_plural(group, plural).is_some_and(Kind::namespaced) =>
        {
            (Some(namespace.to_string()), &rest[2..])
        }
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return None,
    };
    let kind = Kind::from_plural(group, plural)?;
    // A namespaced kind is listed across namespaces at its plain path, but an object of it is
    // only found in its namespace.
    if (namespace.is_some() && !kind.namespaced())
        || (namespace.is_none() && name.is_some() && kind.namespaced())
    {
        return None;
    }
    Some(Target {
        kind,
        namespace,
        name: name.map(str::to_string),
        subresource: subresource.map(str::to_string),
    })
}

/// What a request for a resource asks, as RBAC sees it (status still to be filled in); `None`
/// for discovery and paths the fake does not serve.
fn resource_request(method: &Method, uri: &http::Uri) -> Option<ApiRequest> {
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let target = parse_target(&segments)?;
    let params: HashMap<String, String> = Query::try_from_uri(uri)
        .map(|Query(params)| params)
        .unwrap_or_default();
    let verb = match (
        method,
        &target.name,
        params.get("watch").map(String::as_str),
    ) {
        // A connect subresource is `create` whether asked by POST (SPDY) or by GET (a websocket
        // upgrade), as API servers that close the `get pods/portforward` loophole check it.
        _ if target.subresource.as_deref() == Some("portforward") => "create",
        (&Method::PATCH, _, _) => "patch",
        (&Method::POST, _, _) => "create",
        (&Method::PUT, _, _) => "update",
        (&Method::DELETE, _, _) => "delete",
        (_, Some(_), _) => "get",
        (_, None, Some("true" | "1")) => "watch",
        (_, None, _) => "list",
    };
    let resource = match &target.subresource {
        Some(sub) => format!("{}/{sub}", target.kind.plural()),
        None => target.kind.plural().to_string(),
    };
    Some(ApiRequest {
        verb: verb.to_string(),
        group: target.kind.group().to_string(),
        resource,
        scope: target.namespace.unwrap_or_else(|| "cluster".to_string()),
        name: target.name,
        field_selector: params.get("fieldSelector").cloned(),
        label_selector: params.get("labelSelector").cloned(),
        status: 0,
    })
}

fn get_object(shared: &Shared, key: ObjectKey) -> HttpResponse {
    let state = shared.state.lock().expect("fake API state poisoned");
    match state.objects.get(&key) {
        Some(object) => json_response(StatusCode::OK, object.as_ref()),
        None => {
            let (kind, _, name) = key;
            status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} \"{name}\" not found", kind.plural()),
                Some(StatusDetails {
                    name: Some(name),
                    kind: Some(kind.plural().to_string()),
                    ..StatusDetails::default()
                }),
            )
        }
    }
}

fn collection(
    shared: &Shared,
    cancel: &CancellationToken,
    kind: Kind,
    namespace: Option<&str>,
    params: &HashMap<String, String>,
) -> HttpResponse {
    let param = |name: &str| params.get(name).map(String::as_str).unwrap_or("");
    let selector = match Selector::parse(
        kind,
        namespace,
        param("fieldSelector"),
        param("labelSelector"),
    ) {
        Ok(selector) => selector,
        Err(message) => {
            return status_response(StatusCode::BAD_REQUEST, "BadRequest", &message, None)
        }
    };
    // "0" means "any version" to the real server, the same as unset for what the fake serves.
    let requested_version = match param("resourceVersion") {
        "" | "0" => None,
        text => match text.parse::<u64>() {
            Ok(version) => Some(version),
            Err(_) => {
                return status_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("invalid resource version: {text}"),
                    None,
                )
            }
        },
    };
    if matches!(param("watch"), "true" | "1") {
        let watch = WatchRequest {
            kind,
            selector,
            resource_version: requested_version,
            initial_events: param("sendInitialEvents") == "true",
            bookmarks: param("allowWatchBookmarks") == "true",
            timeout: param("timeoutSeconds")
                .parse::<u64>()
                .ok()
                .filter(|seconds| *seconds > 0)
                .map(Duration::from_secs),
        };
        return start_watch(shared, cancel, watch);
    }
    let limit = param("limit").parse::<usize>().unwrap_or(0);
    list(
        shared,
        kind,
        &selector,
        requested_version,
        param("resourceVersionMatch"),
        limit,
        param("continue"),
    )
}

fn list(
    shared: &Shared,
    kind: Kind,
    selector: &Selector,
    requested_version: Option<u64>,
    version_match: &str,
    limit: usize,
    continue_token: &str,
) -> HttpResponse {
    let state = shared.state.lock().expect("fake API state poisoned");
    let (resource_version, after) = if continue_token.is_empty() {
        // Only an exact match pins an older snapshot; "" and "0" and NotOlderThan all accept
        // the latest state, which is what the real server's cache serves.
        let version = match (version_match, requested_version) {
            ("Exact", Some(version)) => version,
            _ => state.resource_version,
        };
        if requested_version.is_some_and(|v| v > state.resource_version) {
            return too_large_resource_version(
                requested_version.unwrap_or(0),
                state.resource_version,
            );
        }
        (version, None)
    } else {
        match decode_continue(continue_token) {
            Some((version, key)) => (version, Some(key)),
            None => {
                return status_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "continue key is not valid: the continue token could not be decoded",
                    None,
                )
            }
        }
    };
    let Some(objects) = state.snapshot(resource_version) else {
        let message = if after.is_some() {
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter, or use the continue value \
             from the response."
                .to_string()
        } else {
            format!(
                "too old resource version: {resource_version} ({})",
                state.oldest_watchable
            )
        };
        return status_response(StatusCode::GONE, "Expired", &message, None);
    };
    drop(state);

    let matching: Vec<(&ObjectKey, &Arc<Value>)> = objects
        .iter()
        .filter(|(key, object)| key.0 == kind && selector.matches(object))
        .filter(|(key, _)| {
            after
                .as_ref()
                .is_none_or(|(ns, name)| (&key.1, &key.2) > (ns, name))
        })
        .collect();
    let page_len = if limit == 0 {
        matching.len()
    } else {
        limit.min(matching.len())
    };
    let remaining = matching.len() - page_len;
    let mut metadata = ListMeta {
        resource_version: Some(resource_version.to_string()),
        ..ListMeta::default()
    };
    if remaining > 0 {
        let (_, namespace, name) = matching[page_len - 1].0;
        metadata.continue_ = Some(encode_continue(resource_version, namespace, name));
        // The real server can count what is left only when nothing is filtered.
        if selector.is_empty() {
            metadata.remaining_item_count = Some(remaining as i64);
        }
    }
    let items: Vec<Value> = matching[..page_len]
        .iter()
        .map(|(_, object)| {
            // Items of a real list carry neither kind nor apiVersion: the list says it once.
            let mut item = object.as_ref().clone();
            if let Some(fields) = item.as_object_mut() {
                fields.remove("kind");
                fields.remove("apiVersion");
            }
            item
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": metadata,
            "items": items,
        }),
    )
}

/// Continue tokens are opaque to clients; this one carries the snapshot's resourceVersion and
/// the last key returned, hex-encoded so it survives any URL encoding.
fn encode_continue(resource_version: u64, namespace: &str, name: &str) -> String {
    format!("{resource_version}/{namespace}/{name}")
        .bytes()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Option<(u64, (String, String))> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let text = String::from_utf8(bytes).ok()?;
    let mut parts = text.splitn(3, '/');
    let version = parts.next()?.parse().ok()?;
    let namespace = parts.next()?.to_string();
    let name = parts.next()?.to_string();
    Some((version, (namespace, name)))
}

struct WatchRequest {
    kind: Kind,
    selector: Selector,
    resource_version: Option<u64>,
    initial_events: bool,
    bookmarks: bool,
    timeout: Option<Duration>,
}

fn start_watch(shared: &Shared, cancel: &CancellationToken, watch: WatchRequest) -> HttpResponse {
    let (lines, events, progress) = {
        let state = shared.state.lock().expect("fake API state poisoned");
        let mut lines = Vec::new();
        match watch.resource_version {
            Some(version) if version > state.resource_version => {
                return too_large_resource_version(version, state.resource_version);
            }
            // Too old: the real server answers 200 and ends the stream with this ERROR event,
            // which is what makes clients fall back to a fresh list.
            Some(version) if version < state.oldest_watchable && !watch.initial_events => {
                lines.push(expired_event(version, state.oldest_watchable));
                return watch_response(stream_of_lines(lines));
            }
            // From a version: replay what happened after it.
            Some(version) if !watch.initial_events => {
                for change in state
                    .history
                    .iter()
                    .filter(|c| c.resource_version > version)
                {
                    if let Some(line) = watch_line(&watch, change) {
                        lines.push(line);
                    }
                }
            }
            // "", "0" or sendInitialEvents: the current state as synthetic ADDED events.
            _ => {
                for (key, object) in &state.objects {
                    if key.0 == watch.kind && watch.selector.matches(object) {
                        lines.push(event_line("ADDED", object));
                    }
                }
                if watch.initial_events {
                    lines.push(bookmark_line(watch.kind, state.resource_version, true));
                }
            }
        }
        (lines, state.events.subscribe(), state.resource_version)
    };

    let (sender, receiver) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(run_watch(
        watch,
        lines,
        events,
        progress,
        sender,
        cancel.clone(),
    ));
    watch_response(Body::from_stream(ReceiverStream::new(receiver)))
}

async fn run_watch(
    watch: WatchRequest,
    initial: Vec<Bytes>,
    mut events: broadcast::Receiver<Message>,
    mut progress: u64,
    sender: mpsc::Sender<Result<Bytes, Infallible>>,
    cancel: CancellationToken,
) {
    for line in initial {
        if sender.send(Ok(line)).await.is_err() {
            return;
        }
    }
    let deadline = watch
        .timeout
        .map(|timeout| tokio::time::Instant::now() + timeout);
    let mut bookmarks = tokio::time::interval_at(
        tokio::time::Instant::now() + BOOKMARK_INTERVAL,
        BOOKMARK_INTERVAL,
    );
    loop {
        let line = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = sender.closed() => return,
            _ = sleep_until_deadline(deadline) => return,
            _ = bookmarks.tick(), if watch.bookmarks => {
                // `progress` only moves when this watcher has taken the change off its queue,
                // so a client resuming from the bookmark cannot skip an undelivered event.
                bookmark_line(watch.kind, progress, false)
            }
            message = events.recv() => match message {
                Ok(Message::Change(change)) => {
                    progress = change.resource_version;
                    match watch_line(&watch, &change) {
                        Some(line) => line,
                        None => continue,
                    }
                }
                Ok(Message::Expired { oldest }) => {
                    // Ends the watch, as an apiserver does when the revision it follows is
                    // compacted away: the client must relist.
                    let _ = sender.send(Ok(expired_event(progress, oldest))).await;
                    return;
                }
                // Lagged: the real server closes watchers that fall behind; Closed: gone.
                Err(_) => return,
            },
        };
        if sender.send(Ok(line)).await.is_err() {
            return;
        }
    }
}

async fn sleep_until_deadline(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// What one watcher sees of a change: the type depends on whether the object matched the
/// watcher's selector before and after, as in the real server's watch cache.
fn watch_line(watch: &WatchRequest, change: &Change) -> Option<Bytes> {
    if change.key.0 != watch.kind {
        return None;
    }
    let matched_before = change
        .before
        .as_ref()
        .is_some_and(|before| watch.selector.matches(before));
    let matches_now = change
        .after
        .as_ref()
        .is_some_and(|after| watch.selector.matches(after));
    match (matched_before, matches_now, &change.after) {
        (false, true, Some(after)) => Some(event_line("ADDED", after)),
        (true, true, Some(after)) => Some(event_line("MODIFIED", after)),
        (true, false, _) => {
            // Gone from this watcher's view (deleted, or no longer selected): the last state it
            // matched in, stamped with the change's resourceVersion so the client advances.
            let mut last = change.before.as_ref()?.as_ref().clone();
            last["metadata"]["resourceVersion"] = json!(change.resource_version.to_string());
            Some(event_line("DELETED", &last))
        }
        _ => None,
    }
}

fn event_line(event_type: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event_type, "object": object}))
        .expect("watch event to JSON");
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark_line(kind: Kind, resource_version: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": kind.name(), "apiVersion": kind.api_version(), "metadata": metadata}),
    )
}

fn expired_event(requested: u64, oldest: u64) -> Bytes {
    let status = failure_status(
        410,
        "Expired",
        &format!("too old resource version: {requested} ({oldest})"),
        None,
    );
    event_line(
        "ERROR",
        &serde_json::to_value(status).expect("status to JSON"),
    )
}

fn stream_of_lines(lines: Vec<Bytes>) -> Body {
    Body::from_stream(futures::stream::iter(
        lines.into_iter().map(Ok::<_, Infallible>),
    ))
}

fn watch_response(body: Body) -> HttpResponse {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("watch response")
}

fn too_large_resource_version(requested: u64, current: u64) -> HttpResponse {
    status_response(
        StatusCode::GATEWAY_TIMEOUT,
        "Timeout",
        &format!("Too large resource version: {requested}, current: {current}"),
        Some(StatusDetails {
            retry_after_seconds: Some(1),
            ..StatusDetails::default()
        }),
    )
}

/// Field and label requirements of one request, plus the namespace from its path.
struct Selector {
    namespace: Option<String>,
    fields: Vec<FieldRequirement>,
    labels: kube::core::Selector,
}

struct FieldRequirement {
    field: String,
    value: String,
    equal: bool,
}

impl Selector {
    fn parse(
        kind: Kind,
        namespace: Option<&str>,
        fields: &str,
        labels: &str,
    ) -> Result<Selector, String> {
        let fields = parse_field_selector(kind, fields).map_err(|error| {
            format!(
                "Unable to find \"/v1, Resource={}\" that match label selector \"{labels}\", field selector \"{fields}\": {error}",
                kind.plural()
            )
        })?;
        // The agent's own parser: the fake and the agent read selectors the same way.
        let labels = podscope_k8s::labels::parse_selector(labels)
            .map_err(|error| format!("unable to parse requirement: {error}"))?;
        Ok(Selector {
            namespace: namespace.map(str::to_string),
            fields,
            labels,
        })
    }

    fn is_empty(&self) -> bool {
        self.fields.is_empty() && self.labels.selects_all()
    }

    fn matches(&self, object: &Value) -> bool {
        let metadata = &object["metadata"];
        if let Some(namespace) = &self.namespace {
            if metadata["namespace"].as_str() != Some(namespace) {
                return false;
            }
        }
        let fields_match = self.fields.iter().all(|requirement| {
            let actual = requirement
                .field
                .split('.')
                .fold(object, |value, part| &value[part]);
            // An unset field selects as the empty string, as on the real server.
            (actual.as_str().unwrap_or("") == requirement.value) == requirement.equal
        });
        let labels: BTreeMap<String, String> = metadata["labels"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect();
        fields_match && kube::core::SelectorExt::matches(&self.labels, &labels)
    }
}

fn parse_field_selector(kind: Kind, selector: &str) -> Result<Vec<FieldRequirement>, String> {
    let mut requirements = Vec::new();
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (field, value, equal) = if let Some((field, value)) = term.split_once("!=") {
            (field, value, false)
        } else if let Some((field, value)) = term.split_once("==") {
            (field, value, true)
        } else if let Some((field, value)) = term.split_once('=') {
            (field, value, true)
        } else {
            return Err(format!(
                "invalid selector: '{selector}'; can't understand '{term}'"
            ));
        };
        let field = field.trim();
        if !kind.selectable_fields().contains(&field) {
            return Err(format!("field label not supported: {field}"));
        }
        requirements.push(FieldRequirement {
            field: field.to_string(),
            value: value.trim().to_string(),
            equal,
        });
    }
    Ok(requirements)
}

fn now() -> k8s_openapi::jiff::Timestamp {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    k8s_openapi::jiff::Timestamp::from_second(since_epoch.as_secs() as i64)
        .expect("a representable time")
}

fn version_info() -> Info {
    Info {
        major: "1".into(),
        minor: "33".into(),
        emulation_major: Some("1".into()),
        emulation_minor: Some("33".into()),
        min_compatibility_major: Some("1".into()),
        min_compatibility_minor: Some("32".into()),
        git_version: "v1.33.0".into(),
        git_commit: "60a317eadfcb839692a68eab88b2096f4d708f4f".into(),
        git_tree_state: "clean".into(),
        build_date: "2025-04-23T13:00:00Z".into(),
        go_version: "go1.24.2".into(),
        compiler: "gc".into(),
        platform: "linux/amd64".into(),
    }
}

fn api_versions(addr: SocketAddr) -> APIVersions {
    APIVersions {
        versions: vec!["v1".into()],
        server_address_by_client_cidrs: vec![ServerAddressByClientCIDR {
            client_cidr: "0.0.0.0/0".into(),
            server_address: addr.to_string(),
        }],
    }
}

/// The resources of API group `group` ("" for core/v1), as discovery lists them. Custom
/// resources have their status subresource listed, as the API server does for a CRD that
/// declares one.
fn resources_of(group: &str) -> APIResourceList {
    let mut resources = Vec::new();
    for kind in Kind::ALL.into_iter().filter(|k| k.group() == group) {
        let verbs: &[&str] = match kind {
            // Only what the fake serves: a client that would write gets told so by discovery.
            Kind::Pod | Kind::Namespace | Kind::Node | Kind::Service | Kind::ConfigMap => {
                &["get", "list", "watch"]
            }
            Kind::Event => &["create", "get", "list", "watch"],
            Kind::EbpfProgram | Kind::Probe => &["create", "get", "list", "patch", "watch"],
            Kind::TraceSession => &["create", "delete", "get", "list", "patch", "watch"],
            Kind::Deployment
            | Kind::ReplicaSet
            | Kind::StatefulSet
            | Kind::DaemonSet
            | Kind::Job => &["get", "list", "watch"],
        };
        resources.push(APIResource {
            name: kind.plural().into(),
            singular_name: kind.singular().into(),
            namespaced: kind.namespaced(),
            kind: kind.name().into(),
            verbs: verbs.iter().map(|v| v.to_string()).collect(),
            short_names: Some(kind.short_name())
                .filter(|name| !name.is_empty())
                .map(|name| vec![name.into()]),
            categories: matches!(kind, Kind::Pod | Kind::Service).then(|| vec!["all".into()]),
            ..APIResource::default()
        });
        if kind.has_status_subresource() {
            resources.push(APIResource {
                name: format!("{}/status", kind.plural()),
                singular_name: String::new(),
                namespaced: kind.namespaced(),
                kind: kind.name().into(),
                verbs: vec!["get".into(), "patch".into()],
                ..APIResource::default()
            });
        }
    }
    resources.sort_by(|a, b| a.name.cmp(&b.name));
    APIResourceList {
        group_version: match group {
            "" => "v1".to_string(),
            group => format!("{group}/{}", group_version(group)),
        },
        resources,
    }
}

/// The one version served of each API group besides core.
fn group_version(group: &str) -> &'static str {
    if group == PODSCOPE_GROUP {
        PODSCOPE_VERSION
    } else {
        "v1"
    }
}

fn api_group(group: &str) -> APIGroup {
    let version = GroupVersionForDiscovery {
        group_version: format!("{group}/{}", group_version(group)),
        version: group_version(group).into(),
    };
    APIGroup {
        name: group.into(),
        versions: vec![version.clone()],
        preferred_version: Some(version),
        server_address_by_client_cidrs: None,
    }
}

/// The API groups besides core: the workloads' (apps, batch) and podscope's custom resources
/// (their CRDs installed).
fn api_groups() -> APIGroupList {
    APIGroupList {
        groups: GROUPS.iter().map(|group| api_group(group)).collect(),
    }
}

fn failure_status(
    code: u16,
    reason: &str,
    message: &str,
    details: Option<StatusDetails>,
) -> Status {
    Status {
        status: Some("Failure".into()),
        code: Some(i32::from(code)),
        reason: Some(reason.into()),
        message: Some(message.into()),
        details,
        ..Status::default()
    }
}

fn status_response(
    code: StatusCode,
    reason: &str,
    message: &str,
    details: Option<StatusDetails>,
) -> HttpResponse {
    json_response(
        code,
        &failure_status(code.as_u16(), reason, message, details),
    )
}

fn not_found_path() -> HttpResponse {
    status_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
        Some(StatusDetails::default()),
    )
}

/// A failure injected by `fail_next`, shaped like the real server's for that status.
fn injected_failure(status: u16) -> HttpResponse {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (reason, message) = match code.as_u16() {
        400 => ("BadRequest", "the server rejected our request for an unknown reason"),
        401 => ("Unauthorized", "Unauthorized"),
        403 => ("Forbidden", "forbidden"),
        404 => ("NotFound", "the server could not find the requested resource"),
        409 => ("Conflict", "the object has been modified; please apply your changes to the latest version and try again"),
        410 => ("Expired", "too old resource version"),
        429 => ("TooManyRequests", "the server has received too many requests and has asked us to try again later"),
        503 => ("ServiceUnavailable", "the server is currently unable to handle the request"),
        504 => ("Timeout", "the server was unable to return a response in the time allotted, but may still be processing the request"),
        _ => ("InternalError", "an error on the server has prevented the request from succeeding"),
    };
    let retry = matches!(code.as_u16(), 429 | 503 | 504);
    let details = retry.then(|| StatusDetails {
        retry_after_seconds: Some(1),
        ..StatusDetails::default()
    });
    let mut response = json_response(
        code,
        &failure_status(code.as_u16(), reason, message, details),
    );
    if retry {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    }
    response
}

fn json_response(code: StatusCode, body: &impl serde::Serialize) -> HttpResponse {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            serde_json::to_vec(body).expect("response to JSON"),
        ))
        .expect("response")
}
