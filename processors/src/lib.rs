//! podscope processors. Each folder is one component: its config, its runtime and its tests.
//!
//! - `batch`: groups data into batches sized in data points / spans, with a timeout.
//! - `k8sattributes`: adds pod, container and workload attributes (cgroup → container → pod).

pub mod batch;
pub mod k8sattributes;
