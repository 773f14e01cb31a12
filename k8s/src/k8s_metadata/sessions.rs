//! The cluster's `TraceSession` objects (`podscope.dev/v1alpha1`, namespaced): a namespace
//! owner's request to trace pods of that namespace for a while, with the results kept in the
//! object's status. A watch fills a cache of them (spec and status, since every node's agent
//! merges the nodes' entries); the agent writes its own entry of `status.nodes` by server-side
//! apply (one field manager per node), the merged part of the status under one shared manager,
//! and deletes a session once its TTL after finishing has passed.
//!
//! Started by the first component that asks ([`super::K8sMetadata::trace_sessions`]). It must
//! not interpret a spec: the session extension does (`receiver/src/session/trace_sessions.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::programs::{GROUP, VERSION};
use super::watch::{run_watch, WatchContext};

pub const TRACE_SESSION_KIND: &str = "TraceSession";
pub const TRACE_SESSION_PLURAL: &str = "tracesessions";
/// The field manager of the merged part of a session's status: every node's agent writes the
/// same merge of the nodes' entries, so they share it.
pub const MERGED_STATUS_MANAGER: &str = "podscope/merged";
/// The field manager of `status.attachToken`: written once, by the first agent to run the
/// session, and never again.
pub const ATTACH_TOKEN_MANAGER: &str = "podscope/attach-token";

/// A `TraceSession` as the agent keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSessionObject {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: i64,
    /// `metadata.resourceVersion` as last seen: the precondition of a write that must not
    /// overwrite what another agent wrote meanwhile.
    pub resource_version: String,
    /// `metadata.creationTimestamp`: a `duration` counts from here, on every node alike.
    pub created: Option<std::time::SystemTime>,
    pub spec: Value,
    /// The status as the server holds it (`Null` when none was written yet).
    pub status: Value,
}

impl TraceSessionObject {
    /// `<namespace>/<name>`, how logs name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Default)]
struct Cache {
    /// By (namespace, name).
    sessions: BTreeMap<(String, String), TraceSessionObject>,
    /// Keys listed since the current relist began.
    relisting: Option<BTreeSet<(String, String)>>,
}

/// The extension's `TraceSession` watch, and the writes back for this node. Cheap to clone.
#[derive(Clone)]
pub struct TraceSessions {
    client: Client,
    node: String,
    cache: Arc<RwLock<Cache>>,
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, VERSION, TRACE_SESSION_KIND),
        TRACE_SESSION_PLURAL,
    )
}

impl TraceSessions {
    /// Starts the watch of every namespace's TraceSessions until `cancel`.
    pub(super) fn start(
        client: Client,
        node: String,
        ctx: WatchContext,
        cancel: CancellationToken,
    ) -> (TraceSessions, tokio::task::JoinHandle<()>) {
        let sessions = TraceSessions {
            client: client.clone(),
            node,
            cache: Arc::default(),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        let api: Api<DynamicObject> = Api::all_with(client, &resource());
        let watched = sessions.clone();
        let task = tokio::spawn(async move {
            run_watch(
                api,
                watcher::Config::default(),
                &ctx,
                TRACE_SESSION_PLURAL,
                &cancel,
                |_| {},
                |event| watched.apply(event),
            )
            .await;
        });
        (sessions, task)
    }

    /// Applies one watch event; true when a (re)list is complete.
    fn apply(&self, event: WatchEvent<DynamicObject>) -> bool {
        // Each update is one insert or remove: a poisoned lock still holds a consistent cache.
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        let mut listed = false;
        match event {
            WatchEvent::Init => cache.relisting = Some(BTreeSet::new()),
            WatchEvent::InitApply(object) | WatchEvent::Apply(object) => {
                if let Some(session) = trim(object) {
                    let key = (session.namespace.clone(), session.name.clone());
                    if let Some(seen) = &mut cache.relisting {
                        seen.insert(key.clone());
                    }
                    cache.sessions.insert(key, session);
                }
            }
            WatchEvent::Delete(object) => {
                if let (Some(namespace), Some(name)) =
                    (object.metadata.namespace, object.metadata.name)
                {
                    cache.sessions.remove(&(namespace, name));
                }
            }
            WatchEvent::InitDone => {
                if let Some(seen) = cache.relisting.take() {
                    cache.sessions.retain(|key, _| seen.contains(key));
                }
                listed = true;
            }
        }
        drop(cache);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        listed
    }

    /// Every TraceSession of the cluster now, by namespace then name.
    pub fn sessions(&self) -> Vec<TraceSessionObject> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        cache.sessions.values().cloned().collect()
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Changes whenever TraceSessions change (the value means nothing).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Writes this node's entry of the session's `status.nodes` (server-side apply under this
    /// node's field manager, `podscope/<node>`). `entry` is the entry without its `node` key.
    pub async fn report_node(
        &self,
        session: &TraceSessionObject,
        mut entry: serde_json::Map<String, Value>,
    ) -> Result<(), String> {
        entry.insert("node".into(), json!(self.node));
        let status = json!({"nodes": [Value::Object(entry)]});
        self.apply_status(session, &format!("podscope/{}", self.node), status)
            .await
    }

    /// Writes the merged part of the session's status (`phase`, `reason`, `message`, `summary`,
    /// times): every field but `nodes`, under [`MERGED_STATUS_MANAGER`].
    pub async fn report_merged(
        &self,
        session: &TraceSessionObject,
        merged: serde_json::Map<String, Value>,
    ) -> Result<(), String> {
        self.apply_status(session, MERGED_STATUS_MANAGER, Value::Object(merged))
            .await
    }

    /// Puts `token` in the session's `status.attachToken` unless the object changed since
    /// `session` was read (the resource version is the apply's precondition): of two agents
    /// racing to give a session its token, one wins and the other gets `Ok(false)` and reads
    /// the winner's from the watch. Nothing overwrites a token once written.
    pub async fn claim_attach_token(
        &self,
        session: &TraceSessionObject,
        token: &str,
    ) -> Result<bool, String> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &session.namespace, &resource());
        let patch = json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": TRACE_SESSION_KIND,
            "metadata": {
                "name": session.name,
                "namespace": session.namespace,
                "resourceVersion": session.resource_version,
            },
            "status": {"attachToken": token},
        });
        let params = PatchParams::apply(ATTACH_TOKEN_MANAGER);
        match api
            .patch_status(&session.name, &params, &Patch::Apply(&patch))
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(format!(
                "attach token of TraceSession {}: {e}",
                session.key()
            )),
        }
    }

    async fn apply_status(
        &self,
        session: &TraceSessionObject,
        manager: &str,
        status: Value,
    ) -> Result<(), String> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &session.namespace, &resource());
        let patch = json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": TRACE_SESSION_KIND,
            "metadata": {"name": session.name, "namespace": session.namespace},
            "status": status,
        });
        // Force: this node's entry is this node's alone, and the merged fields are the same
        // merge whoever writes them.
        let params = PatchParams::apply(manager).force();
        api.patch_status(&session.name, &params, &Patch::Apply(&patch))
            .await
            .map(|_| ())
            .map_err(|e| format!("status of TraceSession {}: {e}", session.key()))
    }

    /// Deletes the session (its TTL after finishing passed); one already gone is fine (another
    /// node's agent may have deleted it first).
    pub async fn delete(&self, session: &TraceSessionObject) -> Result<(), String> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &session.namespace, &resource());
        // Only the object this agent saw: a new session of the same name is not deleted.
        let params = DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                uid: Some(session.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&session.name, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(format!("deleting TraceSession {}: {e}", session.key())),
        }
    }
}

fn trim(object: DynamicObject) -> Option<TraceSessionObject> {
    Some(TraceSessionObject {
        created: object
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| std::time::SystemTime::from(t.0)),
        namespace: object.metadata.namespace?,
        name: object.metadata.name?,
        uid: object.metadata.uid.unwrap_or_default(),
        generation: object.metadata.generation.unwrap_or(0),
        resource_version: object.metadata.resource_version.unwrap_or_default(),
        spec: object.data.get("spec").cloned().unwrap_or(Value::Null),
        status: object.data.get("status").cloned().unwrap_or(Value::Null),
    })
}
