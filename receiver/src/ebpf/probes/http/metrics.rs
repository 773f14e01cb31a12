//! The http probe's metrics: request durations (RED), with the semantic conventions' names.

use crate::ebpf::catalog::{MetricDoc, MetricKind};

pub const HTTP_SERVER_DURATION: MetricDoc = MetricDoc {
    name: "http.server.request.duration",
    kind: MetricKind::Duration,
    unit: "s",
    description: "Duration of HTTP requests served, from the request's first bytes read to the response's first bytes written; the count is every request (never sampled)",
    attributes: &[
        "http.request.method",
        "http.route",
        "http.response.status_code",
        "url.scheme",
        "network.protocol.version",
        "error.type",
    ],
};

pub const HTTP_CLIENT_DURATION: MetricDoc = MetricDoc {
    name: "http.client.request.duration",
    kind: MetricKind::Duration,
    unit: "s",
    description: "Duration of HTTP requests made, from the request's first bytes written to the response's first bytes read; the count is every request (never sampled)",
    attributes: &[
        "http.request.method",
        "server.address",
        "server.port",
        "http.response.status_code",
        "url.scheme",
        "network.protocol.version",
        "error.type",
    ],
};

pub const RPC_SERVER_DURATION: MetricDoc = MetricDoc {
    name: "rpc.server.call.duration",
    kind: MetricKind::Duration,
    unit: "s",
    description: "Duration of gRPC calls served, from the request's headers read to its status (trailers) written; the count is every call (never sampled)",
    attributes: &[
        "rpc.system",
        "rpc.service",
        "rpc.method",
        "rpc.grpc.status_code",
        "error.type",
    ],
};

pub const RPC_CLIENT_DURATION: MetricDoc = MetricDoc {
    name: "rpc.client.call.duration",
    kind: MetricKind::Duration,
    unit: "s",
    description: "Duration of gRPC calls made, from the request's headers written to its status (trailers) read; the count is every call (never sampled)",
    attributes: &[
        "rpc.system",
        "rpc.service",
        "rpc.method",
        "server.address",
        "server.port",
        "rpc.grpc.status_code",
        "error.type",
    ],
};

/// Indexes of these in [`METRICS`] (RED series name their metric by index).
pub const HTTP_SERVER: usize = 0;
pub const HTTP_CLIENT: usize = 1;
pub const RPC_SERVER: usize = 2;
pub const RPC_CLIENT: usize = 3;

pub const METRICS: &[MetricDoc] = &[
    HTTP_SERVER_DURATION,
    HTTP_CLIENT_DURATION,
    RPC_SERVER_DURATION,
    RPC_CLIENT_DURATION,
];
