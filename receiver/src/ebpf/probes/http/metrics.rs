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

pub const METRICS: &[MetricDoc] = &[HTTP_SERVER_DURATION, HTTP_CLIENT_DURATION];
