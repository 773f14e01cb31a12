//! Shared helpers for the end-to-end tests in `tests/`.

pub mod agent;
pub mod bpf;
pub mod certs;
pub mod fake_kube;
pub mod kubectl_plugin;
pub mod lines;
pub mod oteltest;
pub mod pprof_format;
pub mod prometheus;
pub mod status_server;
pub mod test_programs;
