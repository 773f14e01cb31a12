//! podscope processors. Each folder is one component: its config, its runtime and its tests.
//!
//! - `batch`: groups data into batches sized in data points / spans, with a timeout.
//! - `k8sattributes`: adds pod, container and workload attributes (cgroup → container → pod).
//! - `memory_limiter`: refuses data above a soft memory limit, drops it above a hard one.

pub mod batch;
pub mod k8sattributes;
pub mod memory_limiter;
