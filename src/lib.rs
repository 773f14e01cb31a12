//! The podscope agent: configuration, the registry of components, the service that builds and
//! runs pipelines, the agent's own telemetry endpoint, and `podscope profile`. `main.rs` is only the CLI on top.

pub mod config;
pub mod profile;
pub mod registry;
pub mod service;
pub mod session_profiles;
pub mod telemetry_server;
