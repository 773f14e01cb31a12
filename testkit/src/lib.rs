//! What podscope's tests and benchmarks share, like the Collector's `consumertest` and
//! `componenttest`: synthetic OTLP data ([`fake_otlp`]), consumers that record or discard what
//! they are given ([`Recorder`], [`Discard`]), a [`BuildContext`](podscope_core::BuildContext)
//! for a component built outside the service ([`BuildContextForTests`]) and its metrics
//! ([`agent_metric`]), and kubelet-style pod
//! cgroups ([`PodCgroup`], and [`wait_listening`] for the servers tests start in them), and YAML
//! documents read as the API server stores them ([`yaml::document_as_json`]).
//!
//! This crate is a dev-dependency only: no production crate may depend on it, so nothing here
//! ships in the agent. It must not hold a test's assertions, only what several tests need to
//! arrange their input and read their output.

mod build_context;
mod consumer;
pub mod fake_otlp;
pub mod pod_cgroup;
pub mod yaml;

pub use build_context::{agent_metric, BuildContextForTests};
pub use consumer::{Discard, Recorder};
pub use pod_cgroup::{wait_listening, PodCgroup};
