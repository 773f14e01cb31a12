//! podscope receivers. Each folder is one component: its config, its runtime and its tests.
//!
//! - `otlp`: OTLP over gRPC and HTTP (protobuf and JSON), metrics and traces.

pub mod otlp;
