//! Kubernetes identity for podscope: which container and pod a cgroup, a process or an IP
//! belongs to, and which pods a selector picks.
//!
//! - `cgroup`: the cgroup2 mount, the cgroup id → path index and the one parser from a cgroup
//!   path to container id, pod UID and QoS class;
//! - `labels`: the one parser of Kubernetes label selectors, into kube's own `Selector`;
//! - `pods`: pod selection by namespace and labels (the eBPF receiver's kernel-side filter);
//! - `k8s_metadata`: the extension that owns the Kubernetes client, the watches of the node's
//!   pods (and of namespaces, the node, the cluster's pods and Services when asked) and the
//!   trimmed caches they fill, which the `k8sattributes` processor and the eBPF receiver read.
//!
//! It must not know pipelines: it answers lookups and leaves what to do with data (enrich it,
//! filter it) to the components that use it.

pub mod cgroup;
pub mod k8s_metadata;
pub mod labels;
pub mod pods;

pub use k8s_metadata::{K8sMetadata, K8sMetadataConfig};
pub use pods::PodSelector;
