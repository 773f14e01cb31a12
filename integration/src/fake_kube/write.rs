//! The writes the fake serves, as the real server answers them: `create` (POST, for Events the
//! agent records), `delete` (of a `TraceSession`, whose TTL the agents keep, with a UID
//! precondition) and server-side apply (PATCH `application/apply-patch+yaml`) of podscope's
//! custom resources and their status subresource.
//!
//! Server-side apply is kept to what the agents rely on: each node applies its own entry of the
//! `status.nodes` list, which the CRD declares a map keyed by `node` (`x-kubernetes-list-type:
//! map`), under its own field manager. So the fake tracks, per object, which manager owns which
//! entry: an apply sets the manager's entries to exactly those it sends (its others are removed,
//! other managers' entries are left alone), an entry owned by another manager is a 409 conflict
//! unless `force=true` (which takes it over), and `metadata.managedFields` says who owns what in
//! the real server's FieldsV1 form. Other status fields are owned by the last applier; an apply
//! of the object itself replaces its spec, labels and annotations. A `metadata.resourceVersion`
//! in an apply is a precondition (409 Conflict when the object changed since).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use http::StatusCode;
use serde_json::{json, Value};

use super::{
    json_response, now, object_key, status_response, HttpResponse, Kind, ObjectKey, Shared, Write,
};

/// Per object: field manager → the `status.nodes` entries (by node name) it owns.
pub(super) type NodeOwners = BTreeMap<ObjectKey, BTreeMap<String, BTreeSet<String>>>;

fn bad_request(message: &str) -> HttpResponse {
    status_response(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}

fn invalid(kind: Kind, name: &str, message: &str) -> HttpResponse {
    status_response(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        &format!("{} \"{name}\" is invalid: {message}", kind.name()),
        None,
    )
}

/// The body as JSON, or the real server's answer to it (boxed: a response is large).
fn parse_body(kind: Kind, body: &Bytes) -> Result<Value, Box<HttpResponse>> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        Box::new(bad_request(&format!(
            "the body of the request was in an unknown format (the fake reads JSON): {e}"
        )))
    })?;
    if !value.is_object() {
        return Err(Box::new(bad_request(
            "the body of the request is not an object",
        )));
    }
    for (field, want) in [
        ("apiVersion", kind.api_version()),
        ("kind", kind.name().to_string()),
    ] {
        if let Some(given) = value[field].as_str() {
            if given != want {
                return Err(Box::new(bad_request(&format!(
                    "the API version or kind in the request ({given}) does not match the resource ({want})"
                ))));
            }
        }
    }
    Ok(value)
}

/// POST to a collection: the object created (201), or 409 if it exists.
pub(super) fn create(
    shared: &Shared,
    kind: Kind,
    namespace: Option<&str>,
    body: &Bytes,
) -> HttpResponse {
    let mut object = match parse_body(kind, body) {
        Ok(object) => object,
        Err(response) => return *response,
    };
    if let (Some(path), Some(given)) = (namespace, object["metadata"]["namespace"].as_str()) {
        if path != given {
            return bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            );
        }
    }
    let mut state = shared.state.lock().expect("fake API state poisoned");
    if object["metadata"]["name"].as_str().unwrap_or("").is_empty() {
        if let Some(prefix) = object["metadata"]["generateName"].as_str() {
            let name = format!("{prefix}{:05x}", state.next_uid);
            state.next_uid += 1;
            object["metadata"]["name"] = json!(name);
        }
    }
    let key = match object_key(kind, &object, namespace) {
        Ok(key) => key,
        Err(e) => return invalid(kind, "", &e),
    };
    if state.objects.contains_key(&key) {
        return status_response(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{} \"{}\" already exists", kind.plural(), key.2),
            None,
        );
    }
    let stored = state.store(key, object, Write::Object);
    json_response(StatusCode::CREATED, stored.as_ref())
}

/// DELETE of an object: 200 with the object as it was, 404 if there is none, 409 if the
/// request's `preconditions.uid` is not the object's.
pub(super) fn delete(shared: &Shared, key: ObjectKey, body: &Bytes) -> HttpResponse {
    let options: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(options) => options,
            Err(e) => return bad_request(&format!("the DeleteOptions are not JSON: {e}")),
        }
    };
    let mut state = shared.state.lock().expect("fake API state poisoned");
    let Some(existing) = state.objects.get(&key) else {
        let (kind, _, name) = &key;
        return status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{}.{} \"{name}\" not found", kind.plural(), kind.group()),
            None,
        );
    };
    if let Some(wanted) = options["preconditions"]["uid"].as_str() {
        let actual = existing["metadata"]["uid"].as_str().unwrap_or("");
        if wanted != actual {
            return status_response(
                StatusCode::CONFLICT,
                "Conflict",
                &format!("Precondition failed: UID in precondition: {wanted}, UID in object meta: {actual}"),
                None,
            );
        }
    }
    let before = state.remove(key).expect("checked above");
    json_response(StatusCode::OK, before.as_ref())
}

/// PATCH of an object or its status: server-side apply only.
pub(super) fn apply_patch(
    shared: &Shared,
    key: ObjectKey,
    status: bool,
    content_type: &str,
    params: &HashMap<String, String>,
    body: &Bytes,
) -> HttpResponse {
    let kind = key.0;
    if !content_type.starts_with("application/apply-patch") {
        return status_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!("the body of the request was in an unknown format - accepted media types include: application/apply-patch+yaml (the fake serves server-side apply only, not {content_type})"),
            None,
        );
    }
    if !kind.has_status_subresource() {
        return status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("the fake serves no writes to {}", kind.plural()),
            None,
        );
    }
    let Some(manager) = params.get("fieldManager").filter(|m| !m.is_empty()) else {
        return invalid(
            kind,
            &key.2,
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        );
    };
    let force = params.get("force").is_some_and(|f| f == "true");
    let patch = match parse_body(kind, body) {
        Ok(patch) => patch,
        Err(response) => return *response,
    };
    if patch["metadata"]["name"].as_str() != Some(key.2.as_str()) {
        return bad_request(
            "the name of the object (metadata.name) does not match the name on the URL",
        );
    }
    let mut state = shared.state.lock().expect("fake API state poisoned");
    let before = state.objects.get(&key).map(|o| o.as_ref().clone());
    // A resourceVersion in the applied object is a precondition, as the real server has it:
    // the write fails when the object changed since that version.
    if let (Some(wanted), Some(existing)) = (
        patch["metadata"]["resourceVersion"].as_str(),
        before.as_ref(),
    ) {
        if existing["metadata"]["resourceVersion"].as_str() != Some(wanted) {
            return status_response(
                StatusCode::CONFLICT,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {}.{} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                    kind.plural(),
                    kind.group(),
                    key.2
                ),
                None,
            );
        }
    }
    if status {
        let Some(mut object) = before else {
            return status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{}.{} \"{}\" not found", kind.plural(), kind.group(), key.2),
                None,
            );
        };
        let owners = state.node_owners.entry(key.clone()).or_default();
        if let Err(response) = merge_status(&mut object, &patch["status"], manager, force, owners) {
            return *response;
        }
        let owners = owners.clone();
        set_managed_fields(&mut object, kind, &owners);
        let stored = state.store(key, object, Write::Status);
        return json_response(StatusCode::OK, stored.as_ref());
    }
    let created = before.is_none();
    let mut object = before.unwrap_or_else(|| json!({"metadata": {}}));
    object["spec"] = patch["spec"].clone();
    for field in ["labels", "annotations"] {
        if patch["metadata"][field].is_object() {
            object["metadata"][field] = patch["metadata"][field].clone();
        }
    }
    let mut entries: Vec<Value> = object["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["manager"] != json!(manager) || e["subresource"].is_string())
        .collect();
    entries.push(json!({
        "manager": manager, "operation": "Apply", "apiVersion": kind.api_version(),
        "time": now().to_string(), "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}},
    }));
    object["metadata"]["managedFields"] = json!(entries);
    let stored = state.store(key, object, Write::Object);
    json_response(
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        stored.as_ref(),
    )
}

/// Applies `patch` (a status) of `manager` to `object`, as described in the module docs.
fn merge_status(
    object: &mut Value,
    patch: &Value,
    manager: &str,
    force: bool,
    owners: &mut BTreeMap<String, BTreeSet<String>>,
) -> Result<(), Box<HttpResponse>> {
    let entries: Vec<Value> = patch["nodes"].as_array().cloned().unwrap_or_default();
    let mut wanted = BTreeSet::new();
    for (i, entry) in entries.iter().enumerate() {
        let Some(node) = entry["node"].as_str() else {
            return Err(Box::new(status_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                &format!("status.nodes[{i}].node: Required value: the list's map key"),
                None,
            )));
        };
        wanted.insert(node.to_string());
    }
    let conflicts: Vec<(String, String)> = owners
        .iter()
        .filter(|(other, _)| other.as_str() != manager)
        .flat_map(|(other, nodes)| {
            nodes
                .intersection(&wanted)
                .map(|node| (other.clone(), node.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    if !conflicts.is_empty() && !force {
        let list: Vec<String> = conflicts
            .iter()
            .map(|(other, node)| {
                format!(
                    "conflict with \"{other}\" using {}: .status.nodes[node=\"{node}\"]",
                    object["apiVersion"].as_str().unwrap_or("")
                )
            })
            .collect();
        return Err(Box::new(status_response(
            StatusCode::CONFLICT,
            "Conflict",
            &format!(
                "Apply failed with {} conflict{}: {}",
                list.len(),
                if list.len() == 1 { "" } else { "s" },
                list.join("\n")
            ),
            None,
        )));
    }
    for (other, node) in &conflicts {
        if let Some(nodes) = owners.get_mut(other) {
            nodes.remove(node);
        }
    }
    let previous = owners.remove(manager).unwrap_or_default();
    let owned_by_others: BTreeSet<String> = owners.values().flatten().cloned().collect();
    let mut status = object["status"].as_object().cloned().unwrap_or_default();
    let mut nodes: Vec<Value> = status
        .get("nodes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            let node = e["node"].as_str().unwrap_or("");
            // An entry this manager no longer applies goes, unless someone else owns it.
            !previous.contains(node) || wanted.contains(node) || owned_by_others.contains(node)
        })
        .collect();
    for entry in entries {
        match nodes.iter_mut().find(|e| e["node"] == entry["node"]) {
            Some(existing) => *existing = entry,
            None => nodes.push(entry),
        }
    }
    if let Some(fields) = patch.as_object() {
        for (field, value) in fields.iter().filter(|(f, _)| f.as_str() != "nodes") {
            status.insert(field.clone(), value.clone());
        }
    }
    status.insert("nodes".into(), json!(nodes));
    object["status"] = Value::Object(status);
    owners.retain(|_, nodes| !nodes.is_empty());
    if !wanted.is_empty() {
        owners.insert(manager.to_string(), wanted);
    }
    Ok(())
}

/// `metadata.managedFields`: the object's own entries, then one per manager of status entries.
fn set_managed_fields(object: &mut Value, kind: Kind, owners: &BTreeMap<String, BTreeSet<String>>) {
    let nodes = object["status"]["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut entries: Vec<Value> = object["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["subresource"] != json!("status"))
        .collect();
    for (manager, owned) in owners {
        let mut fields = serde_json::Map::new();
        for node in owned {
            let entry = nodes.iter().find(|e| e["node"] == json!(node));
            let mut leaf = serde_json::Map::new();
            leaf.insert(".".into(), json!({}));
            for field in entry
                .and_then(Value::as_object)
                .into_iter()
                .flat_map(|e| e.keys())
            {
                leaf.insert(format!("f:{field}"), json!({}));
            }
            fields.insert(format!("k:{}", json!({"node": node})), Value::Object(leaf));
        }
        entries.push(json!({
            "manager": manager, "operation": "Apply", "apiVersion": kind.api_version(),
            "time": now().to_string(), "fieldsType": "FieldsV1",
            "fieldsV1": {"f:status": {"f:nodes": fields}}, "subresource": "status",
        }));
    }
    object["metadata"]["managedFields"] = json!(entries);
}
