//! From the plugin's [`Target`]s (pods and their containers' runtime ids) to this node's cgroups,
//! and from a cgroup back to the names its events are labelled with.

use std::collections::HashMap;
use std::path::PathBuf;

use podscope_core::session::Target;
use podscope_k8s::cgroup::{parse_container_cgroup, CgroupIndex};
use podscope_k8s::K8sMetadata;

/// The names an event of a cgroup carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupLabels {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// One container of a target found on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedContainer {
    pub labels: CgroupLabels,
    /// The container's cgroup and any below it (a process may make child cgroups).
    pub cgroups: Vec<u64>,
    /// The container's own cgroup directory.
    pub path: PathBuf,
    pub cgroup_id: u64,
}

/// `containerd://0123…` → `0123…` (lowercase), as cgroup paths spell it.
pub fn runtime_container_id(id: &str) -> String {
    id.rsplit_once("://")
        .map(|(_, bare)| bare)
        .unwrap_or(id)
        .to_ascii_lowercase()
}

/// Finds every target's containers in `index` (freshly walked). A target none of whose
/// containers has a cgroup here is an error naming it; a container not found while others of
/// its pod are is left out (it may be restarting).
pub fn resolve(
    index: &CgroupIndex,
    targets: &[Target],
    node: &str,
) -> Result<Vec<ResolvedContainer>, String> {
    // container id → its cgroups (own first, then descendants, by path length)
    let mut by_container: HashMap<String, Vec<(u64, &str)>> = HashMap::new();
    for (id, path) in index.iter() {
        if let Some(container) = parse_container_cgroup(path).and_then(|c| c.container_id) {
            by_container.entry(container).or_default().push((id, path));
        }
    }
    let mut resolved = Vec::new();
    for target in targets {
        if target.containers.is_empty() {
            return Err(format!(
                "pod {}/{} names no container to trace",
                target.namespace, target.pod
            ));
        }
        let mut found = 0;
        for container in &target.containers {
            let Some(cgroups) = by_container.get(&runtime_container_id(&container.id)) else {
                continue;
            };
            let mut cgroups = cgroups.clone();
            cgroups.sort_by_key(|(_, path)| path.len());
            let (own_id, own_path) = cgroups[0];
            found += 1;
            resolved.push(ResolvedContainer {
                labels: CgroupLabels {
                    namespace: target.namespace.clone(),
                    pod: target.pod.clone(),
                    container: container.name.clone(),
                },
                cgroups: cgroups.iter().map(|(id, _)| *id).collect(),
                path: index.root().join(own_path.trim_start_matches('/')),
                cgroup_id: own_id,
            });
        }
        if found == 0 {
            let ids: Vec<&str> = target.containers.iter().map(|c| c.id.as_str()).collect();
            return Err(format!(
                "pod {}/{}: none of its containers ({}) has a cgroup on node {node} (not running, or on another node)",
                target.namespace,
                target.pod,
                ids.join(", ")
            ));
        }
    }
    Ok(resolved)
}

/// The labels of any cgroup of the node (a whole-node trace, `top` without targets): the
/// namespace, pod and container names from `pod_names` (a `k8s_metadata` pod cache) when it
/// knows the pod UID of the path, else the pod UID and a short container id where the path
/// names them.
pub fn node_labels(path: &str, pod_names: Option<&K8sMetadata>) -> CgroupLabels {
    let parsed = parse_container_cgroup(path);
    let named = pod_names
        .zip(parsed.as_ref())
        .and_then(|(metadata, parsed)| {
            let uid = parsed.pod_uid.as_deref()?;
            let found = metadata
                .pods()
                .by_pod_uid(uid, parsed.container_id.as_deref())?;
            Some(CgroupLabels {
                namespace: found.pod.namespace.to_string(),
                pod: found.pod.name.to_string(),
                container: found
                    .container
                    .map(|i| found.pod.containers[i].name.to_string())
                    .unwrap_or_default(),
            })
        });
    if let Some(named) = named {
        // A container the pod's status does not list yet keeps its short id.
        if named.container.is_empty() {
            if let Some(id) = parsed.as_ref().and_then(|c| c.container_id.as_deref()) {
                return CgroupLabels {
                    container: id[..12.min(id.len())].to_string(),
                    ..named
                };
            }
        }
        return named;
    }
    CgroupLabels {
        namespace: String::new(),
        pod: parsed
            .as_ref()
            .and_then(|c| c.pod_uid.clone())
            .unwrap_or_default(),
        container: parsed
            .and_then(|c| c.container_id)
            .map(|id| id[..12.min(id.len())].to_string())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_prefix_is_dropped_and_case_folded() {
        assert_eq!(runtime_container_id("containerd://ABCdef"), "abcdef");
        assert_eq!(runtime_container_id("cri-o://0123"), "0123");
        assert_eq!(runtime_container_id("0123"), "0123");
    }

    #[test]
    fn node_labels_name_the_pod_uid_and_short_container_id() {
        let id = "a".repeat(64);
        let labels = node_labels(
            &format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/cri-containerd-{id}.scope"
        ), None);
        assert_eq!(labels.pod, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
        assert_eq!(labels.container, "aaaaaaaaaaaa");
        assert_eq!(
            node_labels("/system.slice/sshd.service", None),
            CgroupLabels::default()
        );
    }
}
