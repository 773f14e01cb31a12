//! The cluster's `Probe` objects (`podscope.dev/v1alpha1`, namespaced): a namespace owner's
//! request to run built-in probes for the pods of that namespace. A watch fills a cache of
//! their specs; the agent writes back its own entry of each object's `status.nodes` by
//! server-side apply (one field manager per node) and an Event in the Probe's namespace when the
//! Probe fails on this node.
//!
//! Started by the first component that asks ([`super::K8sMetadata::namespace_probes`]). It must
//! not interpret a spec: the eBPF receiver does, and decides what a Probe may enable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::{Api, Client};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::programs::{rfc3339, warning_event, GROUP, VERSION};
use super::watch::{run_watch, WatchContext};

pub const PROBE_KIND: &str = "Probe";
pub const PROBE_PLURAL: &str = "probes";

/// A `Probe` as the agent keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct NamespaceProbe {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Moves when the spec changes: the Probe's instance is rebuilt when it does.
    pub generation: i64,
    pub spec: serde_json::Value,
}

impl NamespaceProbe {
    /// `<namespace>/<name>`, how logs and the agent's metrics name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A Probe's state on this node, for its `status.nodes` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeProbeStatus {
    /// `Active` or `Failed`.
    pub phase: String,
    /// The built-in probes running for it here.
    pub active: Vec<String>,
    /// Pods of this node it selects.
    pub pods_matched: usize,
    pub message: String,
    pub observed_generation: i64,
    pub time: std::time::SystemTime,
}

#[derive(Debug, Default)]
struct Cache {
    /// By (namespace, name).
    probes: BTreeMap<(String, String), NamespaceProbe>,
    /// Keys listed since the current relist began.
    relisting: Option<BTreeSet<(String, String)>>,
}

/// The extension's `Probe` watch, and the writes back for this node. Cheap to clone.
#[derive(Clone)]
pub struct NamespaceProbes {
    client: Client,
    node: String,
    cache: Arc<RwLock<Cache>>,
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, VERSION, PROBE_KIND),
        PROBE_PLURAL,
    )
}

impl NamespaceProbes {
    /// Starts the watch of every namespace's Probes until `cancel`.
    pub(super) fn start(
        client: Client,
        node: String,
        ctx: WatchContext,
        cancel: CancellationToken,
    ) -> (NamespaceProbes, tokio::task::JoinHandle<()>) {
        let probes = NamespaceProbes {
            client: client.clone(),
            node,
            cache: Arc::default(),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        let api: Api<DynamicObject> = Api::all_with(client, &resource());
        let watched = probes.clone();
        let task = tokio::spawn(async move {
            run_watch(
                api,
                watcher::Config::default(),
                &ctx,
                PROBE_PLURAL,
                &cancel,
                |_| {},
                |event| watched.apply(event),
            )
            .await;
        });
        (probes, task)
    }

    /// Applies one watch event; true when a (re)list is complete.
    fn apply(&self, event: WatchEvent<DynamicObject>) -> bool {
        // Each update is one insert or remove: a poisoned lock still holds a consistent cache.
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        let mut listed = false;
        match event {
            WatchEvent::Init => cache.relisting = Some(BTreeSet::new()),
            WatchEvent::InitApply(object) | WatchEvent::Apply(object) => {
                if let Some(probe) = trim(object) {
                    let key = (probe.namespace.clone(), probe.name.clone());
                    if let Some(seen) = &mut cache.relisting {
                        seen.insert(key.clone());
                    }
                    cache.probes.insert(key, probe);
                }
            }
            WatchEvent::Delete(object) => {
                if let (Some(namespace), Some(name)) =
                    (object.metadata.namespace, object.metadata.name)
                {
                    cache.probes.remove(&(namespace, name));
                }
            }
            WatchEvent::InitDone => {
                // Objects deleted while the watch was down are gone from the new list.
                if let Some(seen) = cache.relisting.take() {
                    cache.probes.retain(|key, _| seen.contains(key));
                }
                listed = true;
            }
        }
        drop(cache);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        listed
    }

    /// Every Probe of the cluster now, by namespace then name (the receiver decides which act
    /// on this node: those selecting pods here).
    pub fn probes(&self) -> Vec<NamespaceProbe> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        cache.probes.values().cloned().collect()
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Changes whenever Probes change (the value means nothing).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The field manager this node writes status with.
    pub fn field_manager(&self) -> String {
        format!("podscope/{}", self.node)
    }

    /// Writes this node's entry of the Probe's `status.nodes` (server-side apply, this node's
    /// field manager); `None` removes the entry (the Probe no longer acts here).
    pub async fn report(
        &self,
        probe: &NamespaceProbe,
        status: Option<&NodeProbeStatus>,
    ) -> Result<(), String> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &probe.namespace, &resource());
        let nodes = match status {
            Some(s) => vec![json!({
                "node": self.node,
                "phase": s.phase,
                "activeProbes": s.active,
                "podsMatched": s.pods_matched,
                "message": s.message,
                "observedGeneration": s.observed_generation,
                "lastTransitionTime": rfc3339(s.time),
            })],
            None => Vec::new(),
        };
        let patch = json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": PROBE_KIND,
            "metadata": {"name": probe.name, "namespace": probe.namespace},
            "status": {"nodes": nodes},
        });
        // Force: this node's entry is this node's alone (see the EbpfProgram status).
        let params = PatchParams::apply(&self.field_manager()).force();
        api.patch_status(&probe.name, &params, &Patch::Apply(&patch))
            .await
            .map(|_| ())
            .map_err(|e| format!("status of Probe {}: {e}", probe.key()))
    }

    /// Records a Warning Event on the Probe, in its namespace (where its owner looks).
    pub async fn warn(
        &self,
        probe: &NamespaceProbe,
        reason: &str,
        message: &str,
    ) -> Result<(), String> {
        let involved = ObjectReference {
            api_version: Some(format!("{GROUP}/{VERSION}")),
            kind: Some(PROBE_KIND.into()),
            namespace: Some(probe.namespace.clone()),
            name: Some(probe.name.clone()),
            uid: Some(probe.uid.clone()),
            ..ObjectReference::default()
        };
        warning_event(
            &self.client,
            &self.node,
            &probe.namespace,
            involved,
            reason,
            message,
        )
        .await
        .map_err(|e| format!("event on Probe {}: {e}", probe.key()))
    }
}

fn trim(object: DynamicObject) -> Option<NamespaceProbe> {
    Some(NamespaceProbe {
        namespace: object.metadata.namespace?,
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
