//! Namespaced `Probe` objects (`podscope.dev/v1alpha1`): a namespace owner turns on built-in
//! probes for the pods of their own namespace, with no code of theirs in the kernel. Each Probe
//! that selects pods on this node gets its own instance of the probes it asks for — its own
//! kernel objects whose cgroup filter lists only its pods, and its own collection — within what
//! the agent's `tenant_probes` allows (which probes, which settings, how many Probes, how much
//! kernel memory). See `docs/programs.md`, "Probes for namespace owners".
//!
//! Modules: `config` (`tenant_probes:`), `spec` (a Probe's spec resolved against it), `sync`
//! (the task following Probes and pods, and each instance's lifecycle).
//!
//! It must never change what the agent's own probes observe: it touches no map of theirs.

mod config;
mod spec;
mod sync;

pub use config::{TenantProbesConfig, TENANT_KINDS};
pub use spec::{ProbeObjectSpec, Resolved, TenantProbeSettings};
pub use sync::{ProbeInstanceInfo, ProbeInstances, TenantSync, PROBE_ATTRIBUTE};
