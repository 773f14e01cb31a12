//! From the probe's events to exchanges (a request and its response): the state of every
//! HTTP connection of every process, in event order. Request heads are put together from the
//! reads they were split over, responses are paired with requests in order (keep-alive and
//! pipelining), and each request gets its span ids when its head is complete:
//! - an incoming `traceparent` makes the SERVER span its child;
//! - a request a process makes on a thread that is serving a request is a CLIENT child of that
//!   SERVER span, unless the request carries a `traceparent` of its own (an instrumented
//!   application), which wins;
//! - when both ends of a connection are on this node, the callee's SERVER span is the child of
//!   the caller's CLIENT span (the same connection seen from both ends, the n-th request on it).
//!
//! It must not touch the kernel or build OTLP: events in, exchanges out.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use podscope_ebpf::abi::{
    HttpEventHead, HTTP_DIR_IN, HTTP_EVENT_BIND, HTTP_EVENT_CLOSE, HTTP_EVENT_DATA,
    HTTP_FLAG_CONTINUATION, HTTP_FLAG_TLS, HTTP_NO_FD, HTTP_PROTO_HTTP1, HTTP_PROTO_HTTP2,
};

use super::http1::{self, HeadParse, RequestHead};
use super::http2::{self, FrameEvent};
use super::trace_context::{IdGenerator, SpanIds, TraceParent};
use crate::ebpf::probes::profiling::trace_link::RequestChange;

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Which end of the exchange the process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SpanKind {
    /// It read the request and wrote the response.
    Server,
    /// It wrote the request and read the response.
    Client,
}

/// One end of a TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub address: IpAddr,
    pub port: u16,
}

/// The connection as the process sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Socket {
    pub local: Endpoint,
    pub remote: Endpoint,
}

/// A request and its response, as one end saw them.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    pub kind: SpanKind,
    pub cgroup: u64,
    pub tgid: u32,
    /// The thread that read (server) or wrote (client) the request, and the one that wrote or
    /// read the response's head.
    pub tid: u32,
    pub response_tid: u32,
    /// Kernel monotonic times: the request's first bytes read (server) or written (client), and
    /// the response's.
    pub start_ns: u64,
    pub end_ns: u64,
    pub socket: Socket,
    pub tls: bool,
    pub request: RequestHead,
    /// The HTTP status code (200 for a gRPC call whose response had none).
    pub status: u16,
    /// A gRPC call's service, method and status.
    pub rpc: Option<Rpc>,
    pub ids: SpanIds,
}

/// What a gRPC call was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rpc {
    pub service: String,
    pub method: String,
    pub status_code: i64,
}

impl Rpc {
    /// A gRPC `:path` (`/package.Service/Method`) into service and method.
    fn from_path(path: &str, status_code: i64) -> Rpc {
        let trimmed = path.trim_start_matches('/');
        let (service, method) = trimmed.split_once('/').unwrap_or((trimmed, ""));
        Rpc {
            service: service.to_string(),
            method: method.to_string(),
            status_code,
        }
    }
}

/// What the tracker could not use, since the last `take_counts`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TrackerCounts {
    /// Message starts that did not parse as HTTP.
    pub not_parsed: u64,
    /// Requests whose head never completed before the response or the close (half-written).
    pub incomplete: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnKey {
    tgid: u32,
    fd: u32,
}

/// A request whose head is being put together.
struct PartialHead {
    direction: u8,
    bytes: Vec<u8>,
    start_ns: u64,
    tid: u32,
}

/// A request waiting for its response.
struct Pending {
    kind: SpanKind,
    start_ns: u64,
    tid: u32,
    head: RequestHead,
    ids: SpanIds,
}

struct Connection {
    socket: Socket,
    cgroup: u64,
    tls: bool,
    partial: Option<PartialHead>,
    pending: VecDeque<Pending>,
    /// Requests whose head completed on this connection: the next one's index.
    requests: u64,
    /// Switched protocols (101): no longer HTTP/1.
    upgraded: bool,
    last_seen_ns: u64,
    /// HTTP/2: both directions' frames and the streams in flight.
    h2: Option<H2Connection>,
}

struct H2Connection {
    /// Received and sent bytes, from the first event of each direction.
    received: Option<http2::Direction>,
    sent: Option<http2::Direction>,
    /// The direction requests travel in (the one that starts with the preface), once seen.
    request_direction: u8,
    streams: HashMap<u32, H2Stream>,
}

struct H2Stream {
    pending: Pending,
    grpc: bool,
    status: Option<u16>,
}

/// Streams in flight per HTTP/2 connection at most.
const STREAM_LIMIT: usize = 1024;

/// Both ends of a connection, the client's first: the same key from either end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct JoinKey {
    client: Endpoint,
    server: Endpoint,
    index: u64,
}

/// How long a CLIENT request waits for the server end to show up on this node.
const JOIN_WINDOW_NS: u64 = 30_000_000_000;
/// CLIENT requests remembered for joining at most (the callee may be on another node).
const JOIN_LIMIT: usize = 65_536;
/// Connections not seen for this long are forgotten (their close event was lost).
const IDLE_CONNECTION_NS: u64 = 600_000_000_000;
/// Pending requests per connection at most (pipelining depth).
const PENDING_LIMIT: usize = 64;
/// An event kept for later, with its bytes.
type KeptEvent = (HttpEventHead, Vec<u8>);

/// TLS plaintext kept per SSL object until its socket is known, and SSL objects waiting.
const UNBOUND_EVENTS: usize = 64;
const UNBOUND_OBJECTS: usize = 1024;

pub struct Tracker {
    capture_bytes: usize,
    connections: HashMap<ConnKey, Connection>,
    /// The SERVER span each thread is serving: (tgid, tid) → its ids.
    serving: HashMap<(u32, u32), SpanIds>,
    joins: HashMap<JoinKey, SpanIds>,
    join_order: VecDeque<(JoinKey, u64)>,
    /// (tgid, SSL object) → plaintext it encrypted or decrypted before its socket was known
    /// (a library doing its own socket I/O), replayed when the kernel ties them.
    unbound: HashMap<(u32, u64), Vec<KeptEvent>>,
    ids: IdGenerator,
    counts: TrackerCounts,
    /// Which SERVER requests each thread serves (read, not answered yet), for the profiling
    /// probe's trace link: opened and dropped (answers are the exchanges). Kept only when
    /// someone reads it ([`Tracker::log_serving`]).
    serving_log: Option<Vec<RequestChange>>,
}

fn address(family: u8, raw: &[u8; 16]) -> IpAddr {
    if family == 2 {
        return IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]));
    }
    let v6 = Ipv6Addr::from(*raw);
    // A dual-stack socket talking IPv4 shows the peer as ::ffff:a.b.c.d.
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn socket_of(head: &HttpEventHead) -> Socket {
    Socket {
        local: Endpoint {
            address: address(head.family, &head.local_addr),
            port: head.local_port,
        },
        remote: Endpoint {
            address: address(head.family, &head.remote_addr),
            port: head.remote_port,
        },
    }
}

/// Whether `data` starts an HTTP/1 request (the methods the kernel looks for).
fn starts_request(data: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ", b"POST ", b"PUT ", b"PATCH ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"CONNECT ",
        b"TRACE ",
    ];
    METHODS.iter().any(|m| data.starts_with(m))
}

impl Tracker {
    pub fn new(capture_bytes: u32) -> Tracker {
        Tracker {
            capture_bytes: capture_bytes as usize,
            connections: HashMap::default(),
            serving: HashMap::default(),
            joins: HashMap::default(),
            join_order: VecDeque::new(),
            unbound: HashMap::default(),
            ids: IdGenerator::new(),
            counts: TrackerCounts::default(),
            serving_log: None,
        }
    }

    /// From now on, keeps the requests opened and dropped for [`Tracker::take_serving_log`].
    pub fn log_serving(&mut self) {
        self.serving_log.get_or_insert_with(Vec::new);
    }

    /// The serving changes since the last call, in the order they happened.
    pub fn take_serving_log(&mut self) -> Vec<RequestChange> {
        self.serving_log.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn log(&mut self, change: RequestChange) {
        if let Some(log) = &mut self.serving_log {
            log.push(change);
        }
    }

    fn log_opened(&mut self, tgid: u32, tid: u32, start_ns: u64, ids: &SpanIds) {
        self.log(RequestChange::Opened {
            tgid,
            tid,
            start_ns,
            span_id: ids.span_id,
        });
    }

    pub fn take_counts(&mut self) -> TrackerCounts {
        std::mem::take(&mut self.counts)
    }

    /// Applies one event; a completed exchange goes to `out`.
    pub fn on_event(&mut self, head: &HttpEventHead, data: &[u8], out: &mut Vec<Exchange>) {
        let key = ConnKey {
            tgid: head.tgid,
            fd: head.fd,
        };
        if head.fd == HTTP_NO_FD {
            self.keep_unbound(head, data);
            return;
        }
        match u32::from(head.kind) {
            HTTP_EVENT_CLOSE => self.close(key),
            HTTP_EVENT_BIND => self.bind(head, out),
            HTTP_EVENT_DATA if u32::from(head.protocol) == HTTP_PROTO_HTTP1 => {
                self.http1(key, head, data, out)
            }
            HTTP_EVENT_DATA if u32::from(head.protocol) == HTTP_PROTO_HTTP2 => {
                self.http2(key, head, data, out)
            }
            _ => {}
        }
    }

    fn keep_unbound(&mut self, head: &HttpEventHead, data: &[u8]) {
        if !self.unbound.contains_key(&(head.tgid, head.ssl))
            && self.unbound.len() >= UNBOUND_OBJECTS
        {
            return;
        }
        let kept = self.unbound.entry((head.tgid, head.ssl)).or_default();
        if kept.len() < UNBOUND_EVENTS {
            kept.push((*head, data.to_vec()));
        }
    }

    /// The kernel tied an SSL object to a connection: its plaintext so far is that
    /// connection's, in order.
    fn bind(&mut self, bind: &HttpEventHead, out: &mut Vec<Exchange>) {
        let Some(kept) = self.unbound.remove(&(bind.tgid, bind.ssl)) else {
            return;
        };
        for (mut head, data) in kept {
            head.fd = bind.fd;
            head.protocol = bind.protocol;
            head.role = bind.role;
            head.family = bind.family;
            head.local_port = bind.local_port;
            head.remote_port = bind.remote_port;
            head.local_addr = bind.local_addr;
            head.remote_addr = bind.remote_addr;
            head.cgroup_id = bind.cgroup_id;
            self.on_event(&head, &data, out);
        }
    }

    fn close(&mut self, key: ConnKey) {
        let Some(conn) = self.connections.remove(&key) else {
            return;
        };
        if conn.partial.is_some() {
            self.counts.incomplete += 1;
        }
        for pending in conn.pending {
            self.stop_serving(key.tgid, &pending);
        }
        for (_, stream) in conn.h2.map(|h2| h2.streams).unwrap_or_default() {
            self.stop_serving(key.tgid, &stream.pending);
        }
    }

    fn stop_serving(&mut self, tgid: u32, pending: &Pending) {
        if pending.kind == SpanKind::Server {
            self.log(RequestChange::Dropped {
                tgid,
                tid: pending.tid,
                span_id: pending.ids.span_id,
            });
        }
        if pending.kind == SpanKind::Server
            && self
                .serving
                .get(&(tgid, pending.tid))
                .is_some_and(|ids| ids.span_id == pending.ids.span_id)
        {
            self.serving.remove(&(tgid, pending.tid));
        }
    }

    fn connection<'a>(
        connections: &'a mut HashMap<ConnKey, Connection>,
        key: ConnKey,
        head: &HttpEventHead,
    ) -> &'a mut Connection {
        let conn = connections.entry(key).or_insert_with(|| Connection {
            socket: socket_of(head),
            cgroup: head.cgroup_id,
            tls: u32::from(head.flags) & HTTP_FLAG_TLS != 0,
            partial: None,
            pending: VecDeque::new(),
            requests: 0,
            upgraded: false,
            last_seen_ns: head.timestamp_ns,
            h2: None,
        });
        conn.last_seen_ns = head.timestamp_ns;
        conn
    }

    fn http1(&mut self, key: ConnKey, head: &HttpEventHead, data: &[u8], out: &mut Vec<Exchange>) {
        let conn = Self::connection(&mut self.connections, key, head);
        if conn.upgraded {
            return;
        }
        let direction = head.direction;
        if u32::from(head.flags) & HTTP_FLAG_CONTINUATION != 0 {
            match &mut conn.partial {
                Some(partial) if partial.direction == direction => {
                    let room = self.capture_bytes.saturating_sub(partial.bytes.len());
                    partial.bytes.extend_from_slice(&data[..data.len().min(room)]);
                }
                _ => return,
            }
        } else if starts_request(data) {
            if conn.partial.take().is_some() {
                self.counts.incomplete += 1;
            }
            conn.partial = Some(PartialHead {
                direction,
                bytes: data[..data.len().min(self.capture_bytes)].to_vec(),
                start_ns: head.timestamp_ns,
                tid: head.tid,
            });
        } else if data.starts_with(b"HTTP/1.") {
            self.response(key, head, data, out);
            return;
        } else {
            return;
        }
        self.try_complete_head(key, head.tgid);
    }

    /// Parses the head being put together; once complete, the request gets its ids and waits
    /// for its response.
    fn try_complete_head(&mut self, key: ConnKey, tgid: u32) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        let Some(partial) = &conn.partial else {
            return;
        };
        let truncated = partial.bytes.len() >= self.capture_bytes;
        let head = match http1::parse_request(&partial.bytes, truncated) {
            HeadParse::Partial => return,
            HeadParse::Invalid => {
                conn.partial = None;
                self.counts.not_parsed += 1;
                return;
            }
            HeadParse::Complete(head) => head,
        };
        let Some(partial) = conn.partial.take() else {
            return;
        };
        let kind = if u32::from(partial.direction) == HTTP_DIR_IN {
            SpanKind::Server
        } else {
            SpanKind::Client
        };
        let index = conn.requests;
        conn.requests += 1;
        let socket = conn.socket;
        let ids = self.assign_ids(kind, tgid, partial.tid, &head, socket, index, partial.start_ns);
        if kind == SpanKind::Server {
            self.serving.insert((tgid, partial.tid), ids);
            self.log_opened(tgid, partial.tid, partial.start_ns, &ids);
        }
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        let pushed_out = if conn.pending.len() >= PENDING_LIMIT {
            conn.pending.pop_front()
        } else {
            None
        };
        conn.pending.push_back(Pending {
            kind,
            start_ns: partial.start_ns,
            tid: partial.tid,
            head,
            ids,
        });
        if let Some(pending) = pushed_out {
            self.stop_serving(tgid, &pending);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn assign_ids(
        &mut self,
        kind: SpanKind,
        tgid: u32,
        tid: u32,
        head: &RequestHead,
        socket: Socket,
        index: u64,
        now_ns: u64,
    ) -> SpanIds {
        let span_id = self.ids.span_id();
        let propagated = head.traceparent.as_deref().and_then(TraceParent::parse);
        match kind {
            SpanKind::Server => {
                let join = JoinKey {
                    client: socket.remote,
                    server: socket.local,
                    index,
                };
                let joined = self.joins.remove(&join);
                let (trace_id, parent) = match (propagated, joined) {
                    (Some(p), _) => (p.trace_id, Some(p.parent_id)),
                    (None, Some(caller)) => (caller.trace_id, Some(caller.span_id)),
                    (None, None) => (self.ids.trace_id(), None),
                };
                SpanIds {
                    trace_id,
                    span_id,
                    parent_span_id: parent,
                }
            }
            SpanKind::Client => {
                let serving = self.serving.get(&(tgid, tid)).copied();
                let (trace_id, parent) = match (propagated, serving) {
                    (Some(p), _) => (p.trace_id, Some(p.parent_id)),
                    (None, Some(server)) => (server.trace_id, Some(server.span_id)),
                    (None, None) => (self.ids.trace_id(), None),
                };
                let ids = SpanIds {
                    trace_id,
                    span_id,
                    parent_span_id: parent,
                };
                self.remember_for_join(
                    JoinKey {
                        client: socket.local,
                        server: socket.remote,
                        index,
                    },
                    ids,
                    now_ns,
                );
                ids
            }
        }
    }

    fn remember_for_join(&mut self, key: JoinKey, ids: SpanIds, now_ns: u64) {
        while let Some((old, at)) = self.join_order.front().copied() {
            if self.join_order.len() < JOIN_LIMIT && now_ns.saturating_sub(at) < JOIN_WINDOW_NS {
                break;
            }
            self.join_order.pop_front();
            self.joins.remove(&old);
        }
        self.joins.insert(key, ids);
        self.join_order.push_back((key, now_ns));
    }

    fn response(&mut self, key: ConnKey, head: &HttpEventHead, data: &[u8], out: &mut Vec<Exchange>) {
        let Some(status) = http1::parse_status(data) else {
            self.counts.not_parsed += 1;
            return;
        };
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if (100..200).contains(&status) {
            // Interim (100 Continue, 103 Early Hints): the final response follows. After 101
            // the connection speaks another protocol.
            if status == 101 {
                conn.upgraded = true;
            }
            return;
        }
        // A request still being put together when its answer comes was never whole.
        if conn
            .partial
            .as_ref()
            .is_some_and(|p| p.direction != head.direction)
        {
            conn.partial = None;
            self.counts.incomplete += 1;
            return;
        }
        let Some(pending) = conn.pending.pop_front() else {
            return;
        };
        let exchange = Exchange {
            kind: pending.kind,
            cgroup: conn.cgroup,
            tgid: key.tgid,
            tid: pending.tid,
            response_tid: head.tid,
            start_ns: pending.start_ns,
            end_ns: head.timestamp_ns,
            socket: conn.socket,
            tls: conn.tls,
            request: pending.head,
            status,
            rpc: None,
            ids: pending.ids,
        };
        if exchange.kind == SpanKind::Server
            && self
                .serving
                .get(&(key.tgid, exchange.tid))
                .is_some_and(|ids| ids.span_id == exchange.ids.span_id)
        {
            self.serving.remove(&(key.tgid, exchange.tid));
        }
        out.push(exchange);
    }

    fn http2(&mut self, key: ConnKey, head: &HttpEventHead, data: &[u8], out: &mut Vec<Exchange>) {
        let conn = Self::connection(&mut self.connections, key, head);
        let h2 = conn.h2.get_or_insert_with(|| H2Connection {
            received: None,
            sent: None,
            request_direction: 0,
            streams: HashMap::default(),
        });
        let slot = if u32::from(head.direction) == HTTP_DIR_IN {
            &mut h2.received
        } else {
            &mut h2.sent
        };
        // The client's bytes start with the preface; a gRPC server's SETTINGS may come first.
        let direction = slot.get_or_insert_with(|| {
            let preface = data.starts_with(http2::PREFACE);
            if preface {
                h2.request_direction = head.direction;
            }
            http2::Direction::new(preface)
        });
        let was_broken = direction.is_broken();
        let Ok(events) = direction.feed(data, head.total_len as usize) else {
            if !was_broken {
                self.counts.not_parsed += 1;
            }
            return;
        };
        if h2.request_direction == 0 {
            return;
        }
        let is_request = head.direction == h2.request_direction;
        let socket = conn.socket;
        for event in events {
            match event {
                FrameEvent::Reset { stream } => {
                    let removed = self
                        .connections
                        .get_mut(&key)
                        .and_then(|c| c.h2.as_mut())
                        .and_then(|h2| h2.streams.remove(&stream));
                    if let Some(stream) = removed {
                        self.stop_serving(key.tgid, &stream.pending);
                    }
                }
                FrameEvent::Headers {
                    stream, headers, ..
                } if is_request => self.h2_request(key, head, socket, stream, &headers),
                FrameEvent::Headers {
                    stream, headers, ..
                } => self.h2_response(key, head, stream, &headers, out),
            }
        }
    }

    fn h2_request(
        &mut self,
        key: ConnKey,
        head: &HttpEventHead,
        socket: Socket,
        stream: u32,
        headers: &[(String, String)],
    ) {
        let find = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        // Trailers of a request (no :method) say nothing new.
        let Some(method) = find(":method") else {
            return;
        };
        let request = RequestHead {
            method,
            path: http1::path_of(&find(":path").unwrap_or_default()),
            version: "2",
            host: find(":authority"),
            traceparent: find("traceparent"),
            tracestate: find("tracestate"),
        };
        let grpc = find("content-type").is_some_and(|t| t.starts_with("application/grpc"));
        let kind = if u32::from(head.direction) == HTTP_DIR_IN {
            SpanKind::Server
        } else {
            SpanKind::Client
        };
        let ids = self.assign_ids(
            kind,
            key.tgid,
            head.tid,
            &request,
            socket,
            u64::from(stream),
            head.timestamp_ns,
        );
        if kind == SpanKind::Server {
            self.serving.insert((key.tgid, head.tid), ids);
            self.log_opened(key.tgid, head.tid, head.timestamp_ns, &ids);
        }
        let Some(h2) = self.connections.get_mut(&key).and_then(|c| c.h2.as_mut()) else {
            return;
        };
        if h2.streams.len() >= STREAM_LIMIT {
            if kind == SpanKind::Server {
                self.log(RequestChange::Dropped {
                    tgid: key.tgid,
                    tid: head.tid,
                    span_id: ids.span_id,
                });
            }
            return;
        }
        h2.streams.insert(
            stream,
            H2Stream {
                pending: Pending {
                    kind,
                    start_ns: head.timestamp_ns,
                    tid: head.tid,
                    head: request,
                    ids,
                },
                grpc,
                status: None,
            },
        );
    }

    fn h2_response(
        &mut self,
        key: ConnKey,
        head: &HttpEventHead,
        stream: u32,
        headers: &[(String, String)],
        out: &mut Vec<Exchange>,
    ) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        let (socket, cgroup, tls) = (conn.socket, conn.cgroup, conn.tls);
        let Some(h2) = conn.h2.as_mut() else {
            return;
        };
        let Some(entry) = h2.streams.get_mut(&stream) else {
            return;
        };
        let find = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        if let Some(status) = find(":status").and_then(|s| s.parse::<u16>().ok()) {
            if (100..200).contains(&status) {
                return;
            }
            entry.status = Some(status);
        }
        let rpc = match (entry.grpc, find("grpc-status")) {
            (true, Some(code)) => Some(Rpc::from_path(
                &entry.pending.head.path,
                code.trim().parse().unwrap_or(2),
            )),
            // A gRPC call ends with its status, in the trailers (or trailers-only headers).
            (true, None) => return,
            (false, _) if entry.status.is_some() => None,
            (false, _) => return,
        };
        let Some(H2Stream {
            pending, status, ..
        }) = h2.streams.remove(&stream)
        else {
            return;
        };
        let exchange = Exchange {
            kind: pending.kind,
            cgroup,
            tgid: key.tgid,
            tid: pending.tid,
            response_tid: head.tid,
            start_ns: pending.start_ns,
            end_ns: head.timestamp_ns,
            socket,
            tls,
            request: pending.head.clone(),
            status: status.unwrap_or(200),
            rpc,
            ids: pending.ids,
        };
        self.stop_serving(key.tgid, &pending);
        out.push(exchange);
    }

    /// Forgets connections idle for long (their close was never seen), and plaintext of SSL
    /// objects never tied to a socket.
    pub fn expire(&mut self, now_ns: u64) {
        self.unbound.retain(|_, kept| {
            kept.first().is_some_and(|(head, _)| {
                now_ns.saturating_sub(head.timestamp_ns) <= IDLE_CONNECTION_NS
            })
        });
        let stale: Vec<ConnKey> = self
            .connections
            .iter()
            .filter(|(_, c)| now_ns.saturating_sub(c.last_seen_ns) > IDLE_CONNECTION_NS)
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            self.close(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podscope_ebpf::abi::{HTTP_DIR_OUT, HTTP_ROLE_SERVER};

    /// An event of connection (tgid 1, fd 5), 127.0.0.1:8080 ← 127.0.0.1:40000.
    fn event(direction: u32, t: u64, flags: u32) -> HttpEventHead {
        let mut head = HttpEventHead {
            timestamp_ns: t,
            cgroup_id: 9,
            tgid: 1,
            tid: 2,
            fd: 5,
            kind: HTTP_EVENT_DATA as u8,
            direction: direction as u8,
            protocol: HTTP_PROTO_HTTP1 as u8,
            role: HTTP_ROLE_SERVER as u8,
            family: 2,
            flags: flags as u8,
            local_port: 8080,
            remote_port: 40000,
            ..Default::default()
        };
        head.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        head.remote_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        head
    }

    fn feed(tracker: &mut Tracker, events: &[(HttpEventHead, &[u8])]) -> Vec<Exchange> {
        let mut out = Vec::new();
        for (head, data) in events {
            let mut head = *head;
            head.total_len = data.len() as u32;
            tracker.on_event(&head, data, &mut out);
        }
        out
    }

    fn summary(exchanges: &[Exchange]) -> Vec<(String, u16, u64, u64)> {
        exchanges
            .iter()
            .map(|e| (e.request.path.clone(), e.status, e.start_ns, e.end_ns))
            .collect()
    }

    #[test]
    fn keep_alive_and_pipelined_requests_pair_with_their_responses_in_order() {
        let mut t = Tracker::new(512);
        let out = feed(
            &mut t,
            &[
                (event(HTTP_DIR_IN, 10, 0), b"GET /a HTTP/1.1\r\n\r\n"),
                (event(HTTP_DIR_IN, 11, 0), b"GET /b HTTP/1.1\r\n\r\n"),
                (event(HTTP_DIR_OUT, 20, 0), b"HTTP/1.1 200 OK\r\n"),
                (event(HTTP_DIR_OUT, 21, 0), b"HTTP/1.1 404 Not Found\r\n"),
                (event(HTTP_DIR_IN, 30, 0), b"GET /c HTTP/1.1\r\n\r\n"),
                (event(HTTP_DIR_OUT, 40, 0), b"HTTP/1.1 500 Oops\r\n"),
            ],
        );
        assert_eq!(
            summary(&out),
            [
                ("/a".into(), 200, 10, 20),
                ("/b".into(), 404, 11, 21),
                ("/c".into(), 500, 30, 40)
            ]
        );
        assert!(out.iter().all(|e| e.kind == SpanKind::Server));
    }

    #[test]
    fn a_head_split_over_reads_and_an_interim_100_continue_give_one_exchange() {
        let mut t = Tracker::new(512);
        let out = feed(
            &mut t,
            &[
                (event(HTTP_DIR_IN, 10, 0), b"POST /upload HT"),
                (
                    event(HTTP_DIR_IN, 11, HTTP_FLAG_CONTINUATION),
                    b"TP/1.1\r\nExpect: 100-continue\r\n\r\n",
                ),
                (event(HTTP_DIR_OUT, 12, 0), b"HTTP/1.1 100 Continue\r\n\r\n"),
                (event(HTTP_DIR_OUT, 30, 0), b"HTTP/1.1 201 Created\r\n"),
            ],
        );
        assert_eq!(summary(&out), [("/upload".into(), 201, 10, 30)]);
        assert_eq!(out[0].request.method, "POST");
    }

    #[test]
    fn half_written_heads_garbage_and_a_close_give_no_exchange() {
        let mut t = Tracker::new(512);
        let out = feed(
            &mut t,
            &[
                (event(HTTP_DIR_IN, 10, 0), b"GET /half HTTP/1.1\r\nHost: x\r\n"),
                (event(HTTP_DIR_OUT, 11, 0), b"HTTP/1.1 400 Bad Request\r\n"),
                (event(HTTP_DIR_IN, 12, 0), b"GET \x00\x01 HTTP/1.1\r\n\r\n"),
                (event(HTTP_DIR_OUT, 13, 0), b"HTTP/1.1 2000\r\n"),
                (event(HTTP_DIR_IN, 14, 0), b"GET /never HTTP/1.1\r\n\r\n"),
            ],
        );
        assert!(out.is_empty(), "{out:?}");
        let mut close = event(HTTP_DIR_IN, 15, 0);
        close.kind = HTTP_EVENT_CLOSE as u8;
        assert!(feed(&mut t, &[(close, b"")]).is_empty());
        assert_eq!(
            t.take_counts(),
            TrackerCounts {
                not_parsed: 2,
                incomplete: 1
            }
        );
        assert!(t.connections.is_empty());
        assert!(t.serving.is_empty(), "the unanswered request no longer serves");
    }

    #[test]
    fn the_serving_log_says_which_thread_read_each_request_and_which_were_dropped() {
        let mut t = Tracker::new(512);
        t.log_serving();
        let mut answer = event(HTTP_DIR_OUT, 20, 0);
        answer.tid = 3;
        let out = feed(
            &mut t,
            &[
                (event(HTTP_DIR_IN, 10, 0), b"GET /a HTTP/1.1

"),
                (answer, b"HTTP/1.1 200 OK
"),
                (event(HTTP_DIR_IN, 30, 0), b"GET /b HTTP/1.1

"),
            ],
        );
        assert_eq!((out[0].tid, out[0].response_tid), (2, 3));
        let mut close = event(HTTP_DIR_IN, 40, 0);
        close.kind = HTTP_EVENT_CLOSE as u8;
        feed(&mut t, &[(close, b"")]);
        let log = t.take_serving_log();
        let opened: Vec<(u32, u64)> = log
            .iter()
            .filter_map(|c| match c {
                RequestChange::Opened { tid, start_ns, .. } => Some((*tid, *start_ns)),
                _ => None,
            })
            .collect();
        assert_eq!(opened, [(2, 10), (2, 30)]);
        let dropped: Vec<[u8; 8]> = log
            .iter()
            .filter_map(|c| match c {
                RequestChange::Dropped { span_id, .. } => Some(*span_id),
                _ => None,
            })
            .collect();
        let second = match log[1] {
            RequestChange::Opened { span_id, .. } => span_id,
            other => panic!("{other:?}"),
        };
        assert_eq!(dropped, [second], "only /b, closed unanswered, is dropped");
        assert!(t.take_serving_log().is_empty());
    }

    #[test]
    fn a_client_request_on_a_serving_thread_is_the_child_of_its_server_span() {
        let mut t = Tracker::new(512);
        let mut outgoing = event(HTTP_DIR_OUT, 20, 0);
        outgoing.fd = 6;
        outgoing.remote_port = 9090;
        let mut answer = event(HTTP_DIR_IN, 30, 0);
        answer.fd = 6;
        answer.remote_port = 9090;
        let out = feed(
            &mut t,
            &[
                (event(HTTP_DIR_IN, 10, 0), b"GET /front HTTP/1.1\r\n\r\n"),
                (outgoing, b"GET /back HTTP/1.1\r\n\r\n"),
                (answer, b"HTTP/1.1 200 OK\r\n"),
                (event(HTTP_DIR_OUT, 40, 0), b"HTTP/1.1 200 OK\r\n"),
            ],
        );
        let (client, server) = (&out[0], &out[1]);
        assert_eq!((client.kind, server.kind), (SpanKind::Client, SpanKind::Server));
        assert_eq!(client.ids.trace_id, server.ids.trace_id);
        assert_eq!(client.ids.parent_span_id, Some(server.ids.span_id));
        assert_eq!(server.ids.parent_span_id, None);
    }
}
