//! `http`: HTTP/1.x requests served and made by every container, as SERVER and CLIENT spans (the
//! receiver's traces signal) and RED metrics, with no change to the applications. The kernel
//! side (`http.bpf.c`) follows TCP connections from accept/connect to close on the socket
//! syscalls and sends the start of every message through a ring buffer; here a task reads it
//! ([`reader`]), puts heads together and pairs requests with responses ([`tracker`]), gives
//! each request its trace context, and makes spans ([`spans`]), routes ([`route`]) and duration
//! histograms ([`red`]). The collection reads the histograms like any probe's maps.
//!
//! Which syscall hooks are used (per-syscall tracepoints, or raw sys_enter/sys_exit where
//! tracefs cannot be had) is said in the probe's start-up line.

mod config;
mod http1;
mod http2;
mod metrics;
mod reader;
mod red;
mod route;
mod spans;
mod tls;
mod trace_context;
mod tracker;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use aya::maps::{MapData, RingBuf};
use podscope_core::FieldError;
use podscope_ebpf::abi::{HTTP_COUNTER_EVENTS_LOST, HTTP_COUNTER_NOT_HTTP};
use podscope_ebpf::{abi, objects};
use prometheus_client::metrics::counter::Counter;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{HttpProbeConfig, SyscallHooks};

use super::{Collection, LoadContext, Probe, SingleObjectProbe, StartContext};
use crate::ebpf::catalog::MetricDoc;
use crate::ebpf::kernel_memory::Typical;
use crate::ebpf::object::{
    tp_btf, tracepoint, Global, MapDef, ObjectSettings, PerCpuCounters, ProbeError, ProbeObject,
    ProbeSpec,
};
use red::RedTable;
use route::{RoutePattern, Router};
use tls::TlsProbes;

/// The per-syscall tracepoint programs.
const TRACEPOINT_PROGRAMS: [&str; 12] = [
    "podscope_http_exit_read",
    "podscope_http_exit_readv",
    "podscope_http_exit_recvfrom",
    "podscope_http_exit_recvmsg",
    "podscope_http_exit_accept",
    "podscope_http_exit_accept4",
    "podscope_http_exit_connect",
    "podscope_http_enter_write",
    "podscope_http_enter_writev",
    "podscope_http_enter_sendto",
    "podscope_http_enter_sendmsg",
    "podscope_http_enter_close",
];
/// The raw-syscall fallback.
const RAW_PROGRAMS: [&str; 2] = ["podscope_http_sys_enter", "podscope_http_sys_exit"];

const SPEC: ProbeSpec = ProbeSpec {
    name: "http",
    object: objects::HTTP,
    programs: &[
        tracepoint("podscope_http_exit_read", "syscalls", "sys_exit_read"),
        tracepoint("podscope_http_exit_readv", "syscalls", "sys_exit_readv"),
        tracepoint("podscope_http_exit_recvfrom", "syscalls", "sys_exit_recvfrom"),
        tracepoint("podscope_http_exit_recvmsg", "syscalls", "sys_exit_recvmsg"),
        tracepoint("podscope_http_exit_accept", "syscalls", "sys_exit_accept"),
        tracepoint("podscope_http_exit_accept4", "syscalls", "sys_exit_accept4"),
        tracepoint("podscope_http_exit_connect", "syscalls", "sys_exit_connect"),
        tracepoint("podscope_http_enter_write", "syscalls", "sys_enter_write"),
        tracepoint("podscope_http_enter_writev", "syscalls", "sys_enter_writev"),
        tracepoint("podscope_http_enter_sendto", "syscalls", "sys_enter_sendto"),
        tracepoint("podscope_http_enter_sendmsg", "syscalls", "sys_enter_sendmsg"),
        tracepoint("podscope_http_enter_close", "syscalls", "sys_enter_close"),
        tp_btf("podscope_http_sys_enter", "sys_enter"),
        tp_btf("podscope_http_sys_exit", "sys_exit"),
    ],
    maps: &[CONNS, EVENTS, SCRATCH, COUNTERS, SSL_CALLS, SSL_FDS, TLS_THREADS],
};

/// (process, descriptor) → the connection: its addresses, role and protocol.
/// Typically the node's TCP connections open (as `tcp_live`).
const CONNS: MapDef = MapDef::entries("http_conns")
    .counted(abi::HTTP_MAP_CONNS)
    .typically(Typical::PerNode(10_000));
const EVENTS: MapDef = MapDef::ring("http_events");
const SCRATCH: MapDef = MapDef::fixed("http_scratch");
/// `enum http_counter`: connections that were not HTTP, events lost.
const COUNTERS: MapDef = MapDef::fixed("http_counters");
/// Thread → the OpenSSL call it is in.
/// Typically the threads inside an OpenSSL call at one time.
const SSL_CALLS: MapDef = MapDef::entries("http_ssl_calls")
    .counted(abi::HTTP_MAP_SSL_CALLS)
    .typically(Typical::PerNode(100));
/// (process, SSL object) → its socket's descriptor, and its protocol.
/// Typically the node's TLS connections open through libssl.
const SSL_FDS: MapDef = MapDef::entries("http_ssl_fds")
    .counted(abi::HTTP_MAP_SSL_FDS)
    .typically(Typical::PerNode(1_000));
/// Thread → the TLS socket it last read and the SSL object it last encrypted for no known
/// socket (LRU: evicts, never refuses).
const TLS_THREADS: MapDef = MapDef::entries("http_tls_threads").typically(Typical::Full);

pub struct Http;

impl SingleObjectProbe for Http {
    type Config = HttpProbeConfig;
    const SPEC: ProbeSpec = SPEC;
    const METRICS: &'static [MetricDoc] = metrics::METRICS;
    const MAKES_SPANS: bool = true;

    fn validate(config: &HttpProbeConfig, prefix: &str, errors: &mut Vec<FieldError>) {
        config.validate(prefix, errors);
    }

    fn open(
        config: &HttpProbeConfig,
        ctx: &mut LoadContext<'_>,
    ) -> Result<Box<dyn Probe>, ProbeError> {
        let (skip, hooks) = choose_hooks(config.syscall_hooks)?;
        let settings = ObjectSettings {
            globals: vec![
                Global::U32("capture_bytes", config.capture_bytes),
                Global::U64("wakeup_bytes", config.wakeup_bytes),
            ],
            skip,
        };
        let mut object = ctx.object(&SPEC, &settings)?;
        let tls = if config.tls.enabled {
            match TlsProbes::load(&mut object, ctx.features, &config.tls.libraries) {
                Ok(tls) => Some(tls),
                Err(reason) => {
                    tracing::warn!(receiver = %ctx.receiver, reason = %reason, "http: HTTPS is not traced (the libssl uprobes cannot load)");
                    None
                }
            }
        } else {
            None
        };
        let tls_line = match &tls {
            None => "off".to_string(),
            Some(tls) if tls.attached().is_empty() => "no libssl on the host".to_string(),
            Some(tls) => tls
                .attached()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        };
        tracing::info!(receiver = %ctx.receiver, probe = SPEC.name, hooks = %hooks, tls = %tls_line, "http: socket syscalls hooked");
        let (ring_events, ring_lost) = ctx.telemetry.ring(EVENTS.name);
        let counters = Counters {
            ring_events,
            ring_lost,
            not_parsed: ctx.telemetry.register_counter(
                "ebpf_http_not_parsed",
                "HTTP probe: connections whose first bytes were not HTTP, and message heads that did not parse",
            ),
            incomplete: ctx.telemetry.register_counter(
                "ebpf_http_incomplete_requests",
                "HTTP probe: requests whose head never completed (half-written), so no span",
            ),
            route_overflow: ctx.telemetry.register_counter(
                "ebpf_http_route_overflow",
                "HTTP probe: requests reported under route {other} because their container reached routes.max_per_container",
            ),
        };
        let router = router_of(config);
        Ok(Box::new(Loaded {
            tls,
            container_attachments: ctx.telemetry.container_attachments.clone(),
            container_detachments: ctx.telemetry.container_detachments.clone(),
            events: Some(object.ring_buf(&EVENTS)?),
            kernel_counters: object.per_cpu_counters(&COUNTERS)?,
            object,
            config: config.clone(),
            shared: Arc::new(Mutex::new(Shared {
                red: RedTable::default(),
                router,
            })),
            counters,
            kernel_seen: [0; 2],
        }))
    }
}

/// The routes and redaction of the settings (validated before, so nothing is dropped here).
fn router_of(config: &HttpProbeConfig) -> Router {
    Router::new(
        config
            .routes
            .rules
            .iter()
            .filter_map(|r| RoutePattern::new(r).ok())
            .collect(),
        config
            .redact
            .iter()
            .filter_map(|r| regex::Regex::new(r).ok())
            .collect(),
        config.routes.max_per_container,
    )
}

/// The probe's userspace side without the kernel: ring-buffer records in, exchanges paired,
/// routed, recorded in the RED histograms and made into spans. For benchmarks (recorded events)
/// and tests.
pub struct RecordedEvents {
    pipeline: reader::ExchangePipeline,
}

impl RecordedEvents {
    pub fn new(config: &HttpProbeConfig) -> RecordedEvents {
        let shared = Arc::new(Mutex::new(Shared {
            red: RedTable::default(),
            router: router_of(config),
        }));
        RecordedEvents {
            pipeline: reader::ExchangePipeline::new(config, shared),
        }
    }

    /// Applies one record as the reader task does; whether it decoded.
    pub fn apply(&mut self, record: &[u8]) -> bool {
        self.pipeline.on_record(record)
    }

    /// Finishes the exchanges completed so far (RED, routes, spans) and returns the spans.
    pub fn finish(&mut self) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
        self.pipeline.finish_exchanges();
        std::mem::take(&mut self.pipeline.spans)
            .into_iter()
            .map(|(_, span)| span)
            .collect()
    }
}

/// The programs not to attach, and the hooks in use for the start-up line.
fn choose_hooks(wanted: SyscallHooks) -> Result<(&'static [&'static str], String), ProbeError> {
    let raw = |why: String| {
        (
            &TRACEPOINT_PROGRAMS[..],
            format!("raw sys_enter/sys_exit (every syscall runs the probe's number check; {why})"),
        )
    };
    let tracepoints = |how: &str| {
        (
            &RAW_PROGRAMS[..],
            format!("per-syscall tracepoints ({how})"),
        )
    };
    match wanted {
        SyscallHooks::Raw => Ok(raw("syscall_hooks: raw".to_string())),
        SyscallHooks::Tracepoints => crate::ebpf::tracefs::available()
            .map(tracepoints)
            .map_err(|reason| ProbeError {
                probe: SPEC.name,
                hook: SPEC.programs.first().map(|p| p.hook),
                reason: format!("{reason} (syscall_hooks: tracepoints needs it; auto falls back to raw hooks)"),
            }),
        SyscallHooks::Auto => Ok(match crate::ebpf::tracefs::available() {
            Ok(how) => tracepoints(how),
            Err(reason) => raw(reason.to_string()),
        }),
    }
}

/// What the reader task and the collection share.
pub struct Shared {
    pub red: RedTable,
    pub router: Router,
}

struct Counters {
    ring_events: Counter,
    ring_lost: Counter,
    not_parsed: Counter,
    incomplete: Counter,
    route_overflow: Counter,
}

struct Loaded {
    object: ProbeObject,
    tls: Option<TlsProbes>,
    container_attachments: Counter,
    container_detachments: Counter,
    config: HttpProbeConfig,
    /// Until the reader task takes it.
    events: Option<RingBuf<MapData>>,
    kernel_counters: PerCpuCounters,
    shared: Arc<Mutex<Shared>>,
    counters: Counters,
    /// The kernel counters (not HTTP, lost) already reported.
    kernel_seen: [u64; 2],
}

impl Probe for Loaded {
    fn objects_mut(&mut self) -> Vec<&mut ProbeObject> {
        vec![&mut self.object]
    }

    fn spawn(
        &mut self,
        ctx: &StartContext,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let Some(ring) = self.events.take() else {
            return Ok(Vec::new());
        };
        let reader = reader::EventReader::new(
            ring,
            &self.config,
            ctx,
            self.shared.clone(),
            reader::ReaderCounters {
                events: self.counters.ring_events.clone(),
                not_parsed: self.counters.not_parsed.clone(),
                incomplete: self.counters.incomplete.clone(),
            },
        )?;
        Ok(vec![tokio::spawn(reader.run(cancel.clone()))])
    }

    fn collect(&mut self, out: &mut Collection<'_>) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        out.saw(shared.red.cgroups().collect::<Vec<_>>());
        shared.red.add_to(&mut out.metrics);
        self.counters
            .route_overflow
            .inc_by(shared.router.take_overflowed());
        drop(shared);
        for (i, (counter, index)) in [
            (&self.counters.not_parsed, HTTP_COUNTER_NOT_HTTP),
            (&self.counters.ring_lost, HTTP_COUNTER_EVENTS_LOST),
        ]
        .into_iter()
        .enumerate()
        {
            let total = self.kernel_counters.get(index);
            counter.inc_by(total.saturating_sub(self.kernel_seen[i]));
            self.kernel_seen[i] = total.max(self.kernel_seen[i]);
        }
    }

    fn watches_containers(&self) -> bool {
        self.tls.as_ref().is_some_and(TlsProbes::watches_containers)
    }

    fn rescan(&mut self) {
        if let Some(tls) = &mut self.tls {
            let outcome = tls.rescan(&mut self.object, std::path::Path::new("/proc"));
            self.container_attachments.inc_by(outcome.attached as u64);
            self.container_detachments.inc_by(outcome.detached as u64);
        }
    }

    fn forget(&mut self, gone: &HashSet<u64>) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.red.forget(gone);
        for cgroup in gone {
            shared.router.forget(*cgroup);
        }
    }
}
