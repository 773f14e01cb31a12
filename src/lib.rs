//! The podscope agent: configuration, the registry of components, the service that builds and
//! runs pipelines, and the agent's own telemetry endpoint. `main.rs` is only the CLI on top.

pub mod config;
pub mod registry;
pub mod service;
pub mod telemetry_server;
