//! The cluster's `EbpfProgram` objects (`podscope.dev/v1alpha1`, cluster-scoped), for the eBPF
//! receiver's users' programs: a watch filling a cache of their specs, this node's labels (for
//! their `nodeSelector`), and what the agent writes back — its own entry of each object's
//! `status.nodes` by server-side apply, under one field manager per node, and an Event when a
//! program fails on this node.
//!
//! Started by the first component that asks ([`super::K8sMetadata::cluster_programs`]), so an
//! agent without users' programs never reads them. It must not interpret a spec: the receiver
//! does (the extension knows no eBPF).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::{Api, Client};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::watch::{run_watch, WatchContext};

pub const GROUP: &str = "podscope.dev";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "EbpfProgram";
pub const PLURAL: &str = "ebpfprograms";

/// An `EbpfProgram` as the agent keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterProgram {
    pub name: String,
    pub uid: String,
    /// Moves when the spec changes: a program is reloaded when it does.
    pub generation: i64,
    pub spec: serde_json::Value,
}

/// A program's state on this node, for its `status.nodes` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeProgramStatus {
    /// `Loaded` or `Failed`.
    pub phase: String,
    pub attached: Vec<String>,
    pub message: String,
    pub observed_generation: i64,
    pub time: std::time::SystemTime,
}

#[derive(Debug, Default)]
struct Cache {
    programs: BTreeMap<String, ClusterProgram>,
    /// Names listed since the current relist began.
    relisting: Option<BTreeSet<String>>,
    node_labels: BTreeMap<String, String>,
}

/// The extension's `EbpfProgram` watch, and the writes back for this node. Cheap to clone.
#[derive(Clone)]
pub struct ClusterPrograms {
    client: Client,
    node: String,
    cache: Arc<RwLock<Cache>>,
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
}

impl ClusterPrograms {
    /// Starts the watches (programs, this node's labels) until `cancel`.
    pub(super) fn start(
        client: Client,
        node: String,
        ctx: WatchContext,
        cancel: CancellationToken,
    ) -> (ClusterPrograms, Vec<tokio::task::JoinHandle<()>>) {
        let programs = ClusterPrograms {
            client: client.clone(),
            node: node.clone(),
            cache: Arc::default(),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource());
        let watched = programs.clone();
        let program_ctx = ctx.clone();
        let program_cancel = cancel.clone();
        let program_task = tokio::spawn(async move {
            run_watch(
                api,
                watcher::Config::default(),
                &program_ctx,
                PLURAL,
                &program_cancel,
                |_| {},
                |event| watched.apply(event),
            )
            .await;
        });
        let nodes: Api<Node> = Api::all(client);
        let labelled = programs.clone();
        let node_task = tokio::spawn(async move {
            run_watch(
                nodes,
                watcher::Config::default().fields(&format!("metadata.name={node}")),
                &ctx,
                "nodes",
                &cancel,
                |_| {},
                |event| {
                    let mut cache = labelled.write();
                    match event {
                        WatchEvent::InitApply(n) | WatchEvent::Apply(n) => {
                            cache.node_labels = n.metadata.labels.unwrap_or_default();
                        }
                        WatchEvent::Delete(_) => cache.node_labels.clear(),
                        WatchEvent::Init => {}
                        WatchEvent::InitDone => {
                            drop(cache);
                            labelled.changed();
                            return true;
                        }
                    }
                    drop(cache);
                    labelled.changed();
                    false
                },
            )
            .await;
        });
        (programs, vec![program_task, node_task])
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Cache> {
        // Each update is one insert or remove: a poisoned lock still holds a consistent cache.
        self.cache.write().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Applies one watch event; true when a (re)list is complete.
    fn apply(&self, event: WatchEvent<DynamicObject>) -> bool {
        let mut cache = self.write();
        let mut listed = false;
        match event {
            WatchEvent::Init => cache.relisting = Some(BTreeSet::new()),
            WatchEvent::InitApply(object) | WatchEvent::Apply(object) => {
                if let Some(program) = trim(object) {
                    if let Some(seen) = &mut cache.relisting {
                        seen.insert(program.name.clone());
                    }
                    cache.programs.insert(program.name.clone(), program);
                }
            }
            WatchEvent::Delete(object) => {
                if let Some(name) = object.metadata.name {
                    cache.programs.remove(&name);
                }
            }
            WatchEvent::InitDone => {
                // Objects deleted while the watch was down are gone from the new list.
                if let Some(seen) = cache.relisting.take() {
                    cache.programs.retain(|name, _| seen.contains(name));
                }
                listed = true;
            }
        }
        drop(cache);
        self.changed();
        listed
    }

    /// Every `EbpfProgram` of the cluster now (the receiver decides which run on this node).
    pub fn programs(&self) -> Vec<ClusterProgram> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        cache.programs.values().cloned().collect()
    }

    /// This node's labels, for `nodeSelector`s.
    pub fn node_labels(&self) -> BTreeMap<String, String> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        cache.node_labels.clone()
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Changes whenever programs or the node's labels change (the value means nothing).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The field manager this node writes status with.
    pub fn field_manager(&self) -> String {
        format!("podscope/{}", self.node)
    }

    /// A key of a ConfigMap's `binaryData` (a program's object).
    pub async fn config_map_bytes(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Vec<u8>, String> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let config_map = api
            .get(name)
            .await
            .map_err(|e| format!("ConfigMap {namespace}/{name}: {e}"))?;
        config_map
            .binary_data
            .and_then(|mut data| data.remove(key))
            .map(|bytes| bytes.0)
            .ok_or_else(|| format!("ConfigMap {namespace}/{name} has no binaryData key {key:?}"))
    }

    /// Writes this node's entry of `program`'s `status.nodes` (server-side apply, this node's
    /// field manager); `None` removes the entry (the program no longer runs here).
    pub async fn report(
        &self,
        program: &str,
        status: Option<&NodeProgramStatus>,
    ) -> Result<(), String> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource());
        let nodes = match status {
            Some(s) => vec![json!({
                "node": self.node,
                "phase": s.phase,
                "attachedPrograms": s.attached,
                "message": s.message,
                "observedGeneration": s.observed_generation,
                "lastTransitionTime": rfc3339(s.time),
            })],
            None => Vec::new(),
        };
        let patch = json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": KIND,
            "metadata": {"name": program},
            "status": {"nodes": nodes},
        });
        // Force: this node's entry is this node's alone; a stale owner (an agent that was
        // replaced under another manager name) must not block it.
        let params = PatchParams::apply(&self.field_manager()).force();
        api.patch_status(program, &params, &Patch::Apply(&patch))
            .await
            .map(|_| ())
            .map_err(|e| format!("status of EbpfProgram {program}: {e}"))
    }

    /// Records a Warning Event on `program` (in namespace `default`, where events of
    /// cluster-scoped objects go).
    pub async fn warn(
        &self,
        program: &ClusterProgram,
        reason: &str,
        message: &str,
    ) -> Result<(), String> {
        let involved = ObjectReference {
            api_version: Some(format!("{GROUP}/{VERSION}")),
            kind: Some(KIND.into()),
            name: Some(program.name.clone()),
            uid: Some(program.uid.clone()),
            ..ObjectReference::default()
        };
        warning_event(
            &self.client,
            &self.node,
            "default",
            involved,
            reason,
            message,
        )
        .await
        .map_err(|e| format!("event on EbpfProgram {}: {e}", program.name))
    }
}

/// Creates a Warning Event about `involved` in `namespace`, reported by this node's agent
/// (`podscope/<node>`), for a load that failed.
pub(super) async fn warning_event(
    client: &Client,
    node: &str,
    namespace: &str,
    involved: ObjectReference,
    reason: &str,
    message: &str,
) -> Result<(), kube::Error> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let now = k8s_openapi::jiff::Timestamp::now();
    let event = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!(
                "{}.",
                involved.name.as_deref().unwrap_or("podscope")
            )),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        involved_object: involved,
        reason: Some(reason.into()),
        message: Some(message.into()),
        type_: Some("Warning".into()),
        count: Some(1),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        reporting_component: Some("podscope".into()),
        reporting_instance: Some(format!("podscope/{node}")),
        action: Some("Load".into()),
        source: Some(k8s_openapi::api::core::v1::EventSource {
            component: Some("podscope".into()),
            host: Some(node.into()),
        }),
        ..Event::default()
    };
    api.create(&PostParams::default(), &event).await.map(|_| ())
}

fn trim(object: DynamicObject) -> Option<ClusterProgram> {
    Some(ClusterProgram {
        name: object.metadata.name?,
        uid: object.metadata.uid.unwrap_or_default(),
        generation: object.metadata.generation.unwrap_or(0),
        spec: object
            .data
            .get("spec")
            .cloned()
            .unwrap_or(serde_json::Value::Null),
    })
}

pub(super) fn rfc3339(time: std::time::SystemTime) -> String {
    let seconds = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    k8s_openapi::jiff::Timestamp::from_second(seconds)
        .map(|t| t.to_string())
        .unwrap_or_default()
}
