//! Shared helpers for the end-to-end tests in `tests/`.

pub mod agent;
pub mod fake_kube;
pub mod prometheus;
