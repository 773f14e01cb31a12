//! Exchanges into OTLP spans (semantic conventions for HTTP), and spans into `ResourceSpans`,
//! one resource per container as for metrics.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status};

use super::red::{is_error, is_grpc_error};
use super::tracker::{Exchange, SpanKind};
use crate::ebpf::builder::{int_attr, resource, scope, string_attr, Owner};
use crate::ebpf::CgroupIndex;

/// The methods of RFC 9110 and PATCH; others are `_OTHER`, as the conventions say.
pub fn known_method(method: &str) -> &str {
    match method {
        "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE" | "PATCH" => {
            method
        }
        _ => "_OTHER",
    }
}

/// `host:port` of a `Host` header (IPv6 in brackets), the port when given.
fn split_host(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[') {
        if let Some((address, after)) = rest.split_once(']') {
            return (address, after.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') => (name, port.parse().ok()),
        _ => (host, None),
    }
}

/// The span of one exchange. `path` is the redacted path, `route` the server's route (both moved
/// into the span: a span is built for every sampled request, and each copy is an allocation).
pub fn build_span(exchange: &Exchange, path: String, route: String, clock_offset_ns: u64) -> Span {
    if exchange.rpc.is_some() {
        return build_rpc_span(exchange, clock_offset_ns);
    }
    let request = &exchange.request;
    let method = known_method(&request.method);
    let socket = &exchange.socket;
    let error = is_error(exchange.kind, exchange.status);
    let mut attributes = Vec::with_capacity(12);
    attributes.extend([
        string_attr("http.request.method", method),
        string_attr("url.path", path),
        string_attr("url.scheme", if exchange.tls { "https" } else { "http" }),
        int_attr("http.response.status_code", i64::from(exchange.status)),
        string_attr("network.protocol.version", request.version),
    ]);
    let host = request.host.as_deref().map(split_host);
    let (name, kind) = match exchange.kind {
        SpanKind::Server => {
            let name = format!("{method} {route}");
            attributes.push(string_attr("http.route", route));
            let (address, port) = match host {
                Some((name, port)) => (name.to_string(), port.unwrap_or(socket.local.port)),
                None => (socket.local.address.to_string(), socket.local.port),
            };
            attributes.push(string_attr("server.address", address));
            attributes.push(int_attr("server.port", i64::from(port)));
            // The peer is the client here: network.peer.* would repeat client.*.
            attributes.push(string_attr("client.address", socket.remote.address.to_string()));
            (name, span::SpanKind::Server)
        }
        SpanKind::Client => {
            let address = match host {
                Some((name, _)) => name.to_string(),
                None => socket.remote.address.to_string(),
            };
            attributes.push(string_attr("server.address", address));
            attributes.push(int_attr("server.port", i64::from(socket.remote.port)));
            attributes.push(string_attr(
                "network.peer.address",
                socket.remote.address.to_string(),
            ));
            attributes.push(int_attr("network.peer.port", i64::from(socket.remote.port)));
            (method.to_string(), span::SpanKind::Client)
        }
    };
    attributes.push(int_attr("process.pid", i64::from(exchange.tgid)));
    if error {
        attributes.push(string_attr("error.type", exchange.status.to_string()));
    }
    span_of(exchange, name, kind, attributes, error, clock_offset_ns)
}

/// A gRPC call's span: `rpc.*` attributes, named `service/method`.
fn build_rpc_span(exchange: &Exchange, clock_offset_ns: u64) -> Span {
    let Some(rpc) = &exchange.rpc else {
        return Span::default();
    };
    let socket = &exchange.socket;
    let error = is_grpc_error(exchange.kind, rpc.status_code);
    let mut attributes = vec![
        string_attr("rpc.system", "grpc"),
        string_attr("rpc.service", &rpc.service),
        string_attr("rpc.method", &rpc.method),
        int_attr("rpc.grpc.status_code", rpc.status_code),
        string_attr("network.protocol.version", exchange.request.version),
    ];
    let kind = match exchange.kind {
        SpanKind::Server => {
            attributes.push(string_attr("server.address", socket.local.address.to_string()));
            attributes.push(int_attr("server.port", i64::from(socket.local.port)));
            attributes.push(string_attr("client.address", socket.remote.address.to_string()));
            span::SpanKind::Server
        }
        SpanKind::Client => {
            attributes.push(string_attr("server.address", socket.remote.address.to_string()));
            attributes.push(int_attr("server.port", i64::from(socket.remote.port)));
            attributes.push(string_attr(
                "network.peer.address",
                socket.remote.address.to_string(),
            ));
            attributes.push(int_attr("network.peer.port", i64::from(socket.remote.port)));
            span::SpanKind::Client
        }
    };
    attributes.push(int_attr("process.pid", i64::from(exchange.tgid)));
    if error {
        attributes.push(string_attr("error.type", rpc.status_code.to_string()));
    }
    let name = format!("{}/{}", rpc.service, rpc.method);
    span_of(exchange, name, kind, attributes, error, clock_offset_ns)
}

fn span_of(
    exchange: &Exchange,
    name: String,
    kind: span::SpanKind,
    attributes: Vec<opentelemetry_proto::tonic::common::v1::KeyValue>,
    error: bool,
    clock_offset_ns: u64,
) -> Span {
    let request = &exchange.request;
    Span {
        trace_id: exchange.ids.trace_id.to_vec(),
        span_id: exchange.ids.span_id.to_vec(),
        parent_span_id: exchange
            .ids
            .parent_span_id
            .map(|p| p.to_vec())
            .unwrap_or_default(),
        trace_state: match exchange.kind {
            SpanKind::Server => request.tracestate.clone().unwrap_or_default(),
            SpanKind::Client => String::new(),
        },
        name,
        kind: kind as i32,
        // Kernel timestamps are data: a wild one must not overflow (found by fuzzing).
        start_time_unix_nano: exchange.start_ns.saturating_add(clock_offset_ns),
        end_time_unix_nano: exchange
            .end_ns
            .max(exchange.start_ns)
            .saturating_add(clock_offset_ns),
        attributes,
        status: Some(Status {
            code: if error {
                status::StatusCode::Error
            } else {
                status::StatusCode::Unset
            } as i32,
            message: String::new(),
        }),
        ..Default::default()
    }
}

/// Spans grouped by container into `ResourceSpans`.
pub fn resource_spans(
    spans: Vec<(u64, Span)>,
    host_name: &str,
    index: &CgroupIndex,
) -> Vec<ResourceSpans> {
    let mut by_cgroup: BTreeMap<u64, Vec<Span>> = BTreeMap::new();
    for (cgroup, span) in spans {
        by_cgroup.entry(cgroup).or_default().push(span);
    }
    by_cgroup
        .into_iter()
        .map(|(cgroup, spans)| ResourceSpans {
            resource: Some(resource(host_name, Owner::Cgroup(cgroup), index.path(cgroup))),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope()),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_headers_split_into_name_and_port() {
        assert_eq!(split_host("shop:8080"), ("shop", Some(8080)));
        assert_eq!(split_host("shop"), ("shop", None));
        assert_eq!(split_host("[::1]:81"), ("::1", Some(81)));
        assert_eq!(split_host("::1"), ("::1", None));
        assert_eq!(known_method("BREW"), "_OTHER");
    }
}
