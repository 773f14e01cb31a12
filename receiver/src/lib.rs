//! podscope receivers. Each folder is one component: its config, its runtime and its tests.
//!
//! - `ebpf`: kernel probes aggregated in eBPF maps, as metrics per cgroup.
//! - `otlp`: OTLP over gRPC and HTTP (protobuf and JSON), metrics, traces, logs and profiles.
//! - `trace_sessions`: the `TraceSession`s with `export: true`, events as logs and summaries as
//!   metrics.
//! - `session` (an extension, here beside the eBPF loader it uses): the endpoint
//!   `kubectl podscope` talks to.

pub mod ebpf;
pub mod otlp;
pub mod session;
pub mod trace_sessions;
