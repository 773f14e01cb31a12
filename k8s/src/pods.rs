//! Selecting pods by namespace and labels, for components that act on pods rather than on data
//! (the eBPF receiver's kernel-side cgroup filter). The pods come from a `k8s_metadata`
//! extension's cache: see [`crate::K8sMetadata::pod_selected`].

use std::collections::BTreeMap;

use kube::core::{Selector, SelectorExt as _};

use crate::k8s_metadata::PodMeta;

/// Pods in any of `namespaces` (any namespace when empty) whose labels match `labels`.
#[derive(Debug, Clone, Default)]
pub struct PodSelector {
    pub namespaces: Vec<String>,
    pub labels: Selector,
}

impl PodSelector {
    pub fn selects(&self, pod: &PodMeta) -> bool {
        if !self.namespaces.is_empty() && !self.namespaces.iter().any(|ns| **ns == *pod.namespace) {
            return false;
        }
        if self.labels.selects_all() {
            return true;
        }
        let labels: BTreeMap<String, String> = pod
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.labels.matches(&labels)
    }
}
