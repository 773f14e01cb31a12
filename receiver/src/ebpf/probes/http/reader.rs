//! The http probe's task: reads the event ring buffer (woken by the kernel once enough bytes
//! wait, and on a timer for the rest), turns events into exchanges, records every exchange in
//! the RED histograms and sends the sampled ones as spans to the traces pipelines, at every
//! poll and whenever enough spans are waiting. With the profiling probe's trace link on, it
//! also tells the profiler which thread served which request when ([`TraceLinks`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use opentelemetry_proto::tonic::trace::v1::Span;
use podscope_core::{Batch, Consumer};
use podscope_ebpf::abi::HttpEventHead;
use prometheus_client::metrics::counter::Counter;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio_util::sync::CancellationToken;

use crate::ebpf::clock::{clock_offset_ns, monotonic_now_ns};
use super::config::HttpProbeConfig;
use super::metrics;
use super::red::{is_error, is_grpc_error, AttrRef, RedTable};
use super::spans::{build_span, known_method, resource_spans};
use super::trace_context::Sampler;
use super::tracker::{Exchange, SpanKind, Tracker};
use super::Shared;
use crate::ebpf::probes::profiling::trace_link::{
    ReaderAttachment, RequestChange, SpanLink, TraceLinks,
};
use crate::ebpf::probes::StartContext;
use crate::ebpf::CgroupIndex;
use crate::session::{ExchangeRole, ExchangeTap, GrpcCall, HttpExchange, PublisherGuard};

/// Spans that make the task send a batch before the next poll.
const FLUSH_SPANS: usize = 4096;
/// The cgroup index is walked again for an unknown cgroup at most this often.
const INDEX_REFRESH: Duration = Duration::from_secs(1);
/// Events stamped this long before a drain began are in the ring buffer when it begins (a
/// program stamps its event a few microseconds before it commits it).
const COMMIT_MARGIN_NS: u64 = 1_000_000;

pub struct ReaderCounters {
    pub events: Counter,
    pub not_parsed: Counter,
    pub incomplete: Counter,
}

/// From events to spans and RED metrics: everything but the ring buffer, so that benchmarks
/// and tests can feed it recorded events.
pub struct ExchangePipeline {
    pub tracker: Tracker,
    shared: Arc<Mutex<Shared>>,
    sampler: Sampler,
    /// Kernel monotonic time + this = Unix time.
    clock_offset_ns: u64,
    exchanges: Vec<Exchange>,
    pub spans: Vec<(u64, Span)>,
    /// The profiling probe's trace link, when on: what this drain changed in who serves what.
    links: Option<(TraceLinks, Vec<RequestChange>)>,
    /// The session extension's live `trace … http` sessions, when the receiver names one.
    tap: Option<Arc<ExchangeTap>>,
}

impl ExchangePipeline {
    pub fn new(config: &HttpProbeConfig, shared: Arc<Mutex<Shared>>) -> ExchangePipeline {
        ExchangePipeline {
            tracker: Tracker::new(config.capture_bytes),
            shared,
            sampler: Sampler::new(config.spans.sampling_ratio),
            clock_offset_ns: clock_offset_ns(),
            exchanges: Vec::new(),
            spans: Vec::new(),
            links: None,
            tap: None,
        }
    }

    /// Hands every exchange, from now on, to the `trace … http` sessions of `tap` that want it.
    pub fn tap_exchanges(&mut self, tap: Arc<ExchangeTap>) {
        self.tap = Some(tap);
    }

    /// Publishes to `links`, from now on, which thread serves which request when.
    pub fn link_traces(&mut self, links: TraceLinks) {
        self.tracker.log_serving();
        self.links = Some((links, Vec::new()));
    }

    /// Hands the trace link what this drain learned; every event stamped before `read_up_to_ns`
    /// has been applied.
    fn publish_links(&mut self, read_up_to_ns: u64) {
        let Some((links, answered)) = &mut self.links else {
            return;
        };
        // Opened and dropped before the answers: a request opened in this drain is answered
        // after it was opened.
        let mut changes = self.tracker.take_serving_log();
        changes.append(answered);
        links.publish(read_up_to_ns, changes);
    }

    /// Applies one ring-buffer record; returns whether it decoded.
    pub fn on_record(&mut self, bytes: &[u8]) -> bool {
        match HttpEventHead::from_bytes(bytes) {
            Some((head, data)) => {
                self.tracker.on_event(&head, data, &mut self.exchanges);
                true
            }
            None => false,
        }
    }

    /// Records the exchanges completed since the last call: RED for all, spans for the sampled.
    pub fn finish_exchanges(&mut self) {
        if self.exchanges.is_empty() {
            return;
        }
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        // One atomic load when no session listens.
        let live = self.tap.as_deref().and_then(ExchangeTap::publishing);
        for exchange in self.exchanges.drain(..) {
            let path = shared.router.redact(&exchange.request.path);
            let route = match (exchange.kind, &exchange.rpc) {
                (SpanKind::Server, None) => {
                    shared.router.route(exchange.cgroup, &exchange.request.path)
                }
                _ => String::new(),
            };
            let seconds = exchange.end_ns.saturating_sub(exchange.start_ns) as f64 / 1e9;
            record_red(&mut shared.red, &exchange, &route, seconds);
            let sent = self.sampler.keeps(&exchange.ids.trace_id);
            if let Some(live) = live.as_ref().filter(|l| l.wants(exchange.cgroup)) {
                live.publish(&live_exchange(&exchange, &path, &route));
            }
            if let (Some((_, answered)), SpanKind::Server) = (&mut self.links, exchange.kind) {
                answered.push(RequestChange::Answered {
                    tgid: exchange.tgid,
                    tid: exchange.tid,
                    response_tid: exchange.response_tid,
                    start_ns: exchange.start_ns,
                    end_ns: exchange.end_ns,
                    link: SpanLink {
                        trace_id: exchange.ids.trace_id,
                        span_id: exchange.ids.span_id,
                    },
                    sent,
                });
            }
            if sent {
                let span = build_span(&exchange, path, route, self.clock_offset_ns);
                self.spans.push((exchange.cgroup, span));
            }
        }
    }
}

/// What a `trace … http` session shows of an exchange.
fn live_exchange(exchange: &Exchange, path: &str, route: &str) -> HttpExchange {
    let peer = exchange.socket.remote;
    HttpExchange {
        cgroup: exchange.cgroup,
        start_ns: exchange.start_ns,
        duration_ns: exchange.end_ns.saturating_sub(exchange.start_ns),
        tgid: exchange.tgid,
        tid: exchange.tid,
        role: match exchange.kind {
            SpanKind::Server => ExchangeRole::Server,
            SpanKind::Client => ExchangeRole::Client,
        },
        method: exchange.request.method.clone(),
        path: path.to_string(),
        route: route.to_string(),
        version: exchange.request.version,
        tls: exchange.tls,
        http_status: exchange.status,
        grpc: exchange.rpc.as_ref().map(|rpc| GrpcCall {
            service: rpc.service.clone(),
            method: rpc.method.clone(),
            status_code: rpc.status_code,
        }),
        peer: std::net::SocketAddr::new(peer.address, peer.port),
        trace_id: exchange.ids.trace_id,
        span_id: exchange.ids.span_id,
    }
}

/// Records an exchange in its RED series: the conventions' attributes of its metric.
fn record_red(red: &mut RedTable, exchange: &Exchange, route: &str, seconds: f64) {
    let server = exchange.socket.remote;
    // Text made only where a series needs it: this runs for every request.
    let address = match exchange.kind {
        SpanKind::Client => server.address.to_string(),
        SpanKind::Server => String::new(),
    };
    let status = if is_error(exchange.kind, exchange.status) {
        exchange.status.to_string()
    } else {
        String::new()
    };
    let mut attributes: Vec<(&'static str, AttrRef<'_>)> = Vec::with_capacity(8);
    let metric = match (&exchange.rpc, exchange.kind) {
        (Some(rpc), kind) => {
            attributes.push(("rpc.system", AttrRef::Text("grpc")));
            attributes.push(("rpc.service", AttrRef::Text(&rpc.service)));
            attributes.push(("rpc.method", AttrRef::Text(&rpc.method)));
            if kind == SpanKind::Client {
                attributes.push(("server.address", AttrRef::Text(&address)));
                attributes.push(("server.port", AttrRef::Int(i64::from(server.port))));
            }
            attributes.push(("rpc.grpc.status_code", AttrRef::Int(rpc.status_code)));
            let code = if is_grpc_error(kind, rpc.status_code) {
                rpc.status_code.to_string()
            } else {
                String::new()
            };
            if !code.is_empty() {
                attributes.push(("error.type", AttrRef::Text(&code)));
            }
            let metric = match kind {
                SpanKind::Server => metrics::RPC_SERVER,
                SpanKind::Client => metrics::RPC_CLIENT,
            };
            red.record(exchange.cgroup, metric, &attributes, seconds);
            return;
        }
        (None, SpanKind::Server) => {
            attributes.push((
                "http.request.method",
                AttrRef::Text(known_method(&exchange.request.method)),
            ));
            attributes.push(("http.route", AttrRef::Text(route)));
            metrics::HTTP_SERVER
        }
        (None, SpanKind::Client) => {
            attributes.push((
                "http.request.method",
                AttrRef::Text(known_method(&exchange.request.method)),
            ));
            attributes.push(("server.address", AttrRef::Text(&address)));
            attributes.push(("server.port", AttrRef::Int(i64::from(server.port))));
            metrics::HTTP_CLIENT
        }
    };
    attributes.push((
        "http.response.status_code",
        AttrRef::Int(i64::from(exchange.status)),
    ));
    attributes.push((
        "url.scheme",
        AttrRef::Text(if exchange.tls { "https" } else { "http" }),
    ));
    attributes.push(("network.protocol.version", AttrRef::Text(exchange.request.version)));
    if is_error(exchange.kind, exchange.status) {
        attributes.push(("error.type", AttrRef::Text(&status)));
    }
    red.record(exchange.cgroup, metric, &attributes, seconds);
}

pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    pipeline: ExchangePipeline,
    traces: Option<Arc<dyn Consumer>>,
    host_name: String,
    index: CgroupIndex,
    index_refreshed: Option<Instant>,
    poll: Duration,
    counters: ReaderCounters,
    /// Says the trace link's publisher is gone when the reader ends.
    _link_attachment: Option<ReaderAttachment>,
    /// Says the `trace … http` sessions' publisher is gone when the reader ends.
    _tap_attachment: Option<PublisherGuard>,
}

impl EventReader {
    pub fn new(
        ring: RingBuf<MapData>,
        config: &HttpProbeConfig,
        ctx: &StartContext,
        shared: Arc<Mutex<Shared>>,
        counters: ReaderCounters,
    ) -> std::io::Result<EventReader> {
        // SAFETY: the RingBuf owns its map fd, which stays open and unchanged for as long as the
        // AsyncFd (its only owner) lives.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }?;
        let mut pipeline = ExchangePipeline::new(config, shared);
        let attachment = ctx.trace_links.as_ref().map(|links| {
            pipeline.link_traces(links.clone());
            links.attach_reader()
        });
        let tap_attachment = ctx.http_exchanges.as_ref().map(|tap| {
            pipeline.tap_exchanges(tap.clone());
            tap.attach_publisher()
        });
        Ok(EventReader {
            ring,
            pipeline,
            traces: ctx.traces.clone(),
            host_name: ctx.host_name.clone(),
            index: CgroupIndex::new(ctx.cgroup_root.clone()),
            index_refreshed: None,
            poll: config.event_poll_interval,
            counters,
            _link_attachment: attachment,
            _tap_attachment: tap_attachment,
        })
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(self.poll);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    drain(self.ring.get_mut(), &mut self.pipeline, &self.counters);
                    self.flush().await;
                    return;
                }
                readable = self.ring.readable_mut() => match readable {
                    Ok(mut guard) => {
                        drain(guard.get_inner_mut(), &mut self.pipeline, &self.counters);
                        guard.clear_ready();
                        // The kernel wakes the agent once per crossing of wakeup_bytes: what
                        // came between the drain and clear_ready would otherwise wait for the
                        // timer.
                        drain(self.ring.get_mut(), &mut self.pipeline, &self.counters);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "http event ring buffer cannot be polled; reading on the timer only");
                        ticker.tick().await;
                        drain(self.ring.get_mut(), &mut self.pipeline, &self.counters);
                    }
                },
                _ = ticker.tick() => {
                    drain(self.ring.get_mut(), &mut self.pipeline, &self.counters);
                    self.pipeline.tracker.expire(monotonic_now_ns());
                    self.flush().await;
                }
            }
            if self.pipeline.spans.len() >= FLUSH_SPANS {
                self.flush().await;
            }
        }
    }

    async fn flush(&mut self) {
        let counts = self.pipeline.tracker.take_counts();
        self.counters.not_parsed.inc_by(counts.not_parsed);
        self.counters.incomplete.inc_by(counts.incomplete);
        if self.pipeline.spans.is_empty() {
            return;
        }
        let spans = std::mem::take(&mut self.pipeline.spans);
        let Some(traces) = &self.traces else {
            return;
        };
        if spans
            .iter()
            .any(|(cgroup, _)| self.index.path(*cgroup).is_none())
            && self
                .index_refreshed
                .is_none_or(|at| at.elapsed() >= INDEX_REFRESH)
        {
            self.index.refresh();
            self.index_refreshed = Some(Instant::now());
        }
        let batch = resource_spans(spans, &self.host_name, &self.index);
        if let Err(e) = traces.consume(Batch::traces(batch)).await {
            tracing::warn!(error = %e, "the traces pipeline refused the http probe's spans");
        }
    }
}

/// Reads every waiting event into the pipeline.
fn drain(ring: &mut RingBuf<MapData>, pipeline: &mut ExchangePipeline, counters: &ReaderCounters) {
    let began_ns = monotonic_now_ns();
    let mut n = 0;
    while let Some(record) = ring.next() {
        pipeline.on_record(&record);
        n += 1;
    }
    counters.events.inc_by(n);
    pipeline.finish_exchanges();
    pipeline.publish_links(began_ns.saturating_sub(COMMIT_MARGIN_NS));
}
