//! One connection: `Hello` (bounded in time and size), the protocol check, the session limit,
//! `Welcome`, the request served, `End`. Also the accept loop.

use std::sync::Arc;
use std::time::Duration;

use podscope_core::session::{
    read_line, write_line, AgentStatus, EndReason, ErrorCode, Event, Hello, Message, ReadError,
    Request, SessionError, Target, TraceProbe, Welcome, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::events::{clock_offset_ns, exchange_event, to_event};
use super::exchanges::{ExchangeSubscription, HttpExchange};
use super::filters::EventFilter;
use super::targets::{node_labels, resolve, CgroupLabels};
use super::trace::{TraceRefusal, ALL_KERNEL_PROBES};
use super::Shared;

/// The agent's version, as the plugin shows it.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// What to do when no http probe publishes its exchanges here.
pub(super) const HTTP_FIX: &str = "no ebpf receiver with the http probe reports to this session extension; enable the ebpf receiver's `http` probe (receivers.ebpf.probes.http) and name this extension in its `session:` setting";
/// How often a trace says what it lost, when it lost something.
const LOST_REPORT: Duration = Duration::from_secs(1);

pub async fn accept(listener: TcpListener, shared: Arc<Shared>, tasks: TaskTracker) {
    loop {
        tokio::select! {
            _ = shared.stopping.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        if let Err(e) = serve(stream, &shared).await {
                            tracing::debug!(%peer, error = %e, "session connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "session endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

pub fn error(code: ErrorCode, message: impl Into<String>) -> SessionError {
    SessionError {
        code,
        message: message.into(),
        protocol: PROTOCOL_VERSION,
        agent_version: AGENT_VERSION.to_string(),
    }
}

/// The end of a stream the client sees.
pub struct Ending {
    pub reason: EndReason,
    pub error: Option<SessionError>,
}

impl Ending {
    pub fn of(reason: EndReason) -> Ending {
        Ending {
            reason,
            error: None,
        }
    }
}

/// What a request handler returns: refused before `Welcome`, or the stream's end (`None` when
/// the client went away and nobody is left to tell).
pub enum Outcome {
    Refused(SessionError),
    Ended(Option<Ending>),
}

async fn serve(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut buffer = Vec::new();
    let hello: Result<Option<Hello>, ReadError> = match tokio::time::timeout(
        shared.config.hello_timeout,
        read_line(&mut reader, &mut buffer),
    )
    .await
    {
        Ok(read) => read,
        Err(_) => {
            let refusal = error(
                ErrorCode::BadRequest,
                format!("no Hello line within {:?}", shared.config.hello_timeout),
            );
            return write_line(&mut write, &Welcome::Refused(refusal)).await;
        }
    };
    let hello = match hello {
        Ok(Some(hello)) => hello,
        Ok(None) => return Ok(()),
        Err(ReadError::Io(e)) => return Err(e),
        Err(e) => {
            let refusal = refusal_of_bad_hello(&buffer, &e);
            return write_line(&mut write, &Welcome::Refused(refusal)).await;
        }
    };
    if hello.protocol != PROTOCOL_VERSION {
        let refusal = error(
            ErrorCode::ProtocolMismatch,
            format!(
                "this agent ({AGENT_VERSION}) speaks session protocol {PROTOCOL_VERSION}, the plugin ({}) speaks {}: {}",
                hello.client_version,
                hello.protocol,
                if hello.protocol > PROTOCOL_VERSION {
                    "upgrade the agent"
                } else {
                    "upgrade the plugin"
                }
            ),
        );
        return write_line(&mut write, &Welcome::Refused(refusal)).await;
    }
    let Ok(_permit) = shared.permits.clone().try_acquire_owned() else {
        let refusal = error(
            ErrorCode::Busy,
            format!(
                "this agent already serves {} sessions (extensions.session.max_sessions); try again when one ends",
                shared.config.max_sessions
            ),
        );
        return write_line(&mut write, &Welcome::Refused(refusal)).await;
    };
    tracing::info!(client = %hello.client_version, request = request_kind(&hello.request), "session started");
    // The client closing its side ends the session: nothing else is read after the Hello.
    let gone = CancellationToken::new();
    // Also stops the watcher once the session is over, whatever the client does.
    let _stop_watching = gone.clone().drop_guard();
    tokio::spawn(watch_client(reader.into_inner(), gone.clone()));
    let outcome = match hello.request {
        Request::Status => {
            write_welcome(&mut write, shared).await?;
            write_line(&mut write, &Message::Status(status(shared))).await?;
            Outcome::Ended(Some(Ending::of(EndReason::Exited)))
        }
        Request::Trace {
            probe,
            targets,
            filters,
            duration,
        } => {
            trace(
                &mut write, shared, probe, &targets, &filters, duration, &gone,
            )
            .await?
        }
        Request::Top {
            scope,
            targets,
            interval,
            once,
        } => super::top::serve(&mut write, shared, scope, &targets, interval, once, &gone).await?,
        Request::Bpftrace {
            program,
            target,
            duration,
        } => {
            super::bpftrace::serve(
                &mut write,
                shared,
                &program,
                target.as_ref(),
                duration,
                &gone,
            )
            .await?
        }
        Request::SessionLog {
            namespace,
            name,
            token,
            from,
            follow,
        } => {
            let request = super::log_reader::LogRequest {
                namespace: &namespace,
                name: &name,
                token: &token,
                from,
                follow,
            };
            super::log_reader::serve(&mut write, shared, request, &gone).await?
        }
        Request::Profile {
            targets,
            duration,
            format,
            frequency_hz,
        } => {
            super::profile::serve(
                &mut write,
                shared,
                &targets,
                duration,
                format,
                frequency_hz,
                &gone,
            )
            .await?
        }
    };
    match outcome {
        Outcome::Refused(refusal) => write_line(&mut write, &Welcome::Refused(refusal)).await,
        Outcome::Ended(Some(ending)) => {
            write_line(
                &mut write,
                &Message::End {
                    reason: ending.reason,
                    error: ending.error,
                },
            )
            .await
        }
        Outcome::Ended(None) => Ok(()),
    }
}

fn request_kind(request: &Request) -> &'static str {
    match request {
        Request::Trace { .. } => "trace",
        Request::Top { .. } => "top",
        Request::Bpftrace { .. } => "bpftrace",
        Request::Profile { .. } => "profile",
        Request::Status => "status",
        Request::SessionLog { .. } => "session_log",
    }
}

/// A first line that is not a `Hello`: a protocol mismatch when it carries another protocol
/// version (a future plugin's request this agent cannot read), else a bad request.
fn refusal_of_bad_hello(line: &[u8], e: &ReadError) -> SessionError {
    let protocol = serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("protocol").and_then(serde_json::Value::as_u64));
    match protocol {
        Some(theirs) if theirs != u64::from(PROTOCOL_VERSION) => error(
            ErrorCode::ProtocolMismatch,
            format!(
                "this agent ({AGENT_VERSION}) speaks session protocol {PROTOCOL_VERSION}, the plugin speaks {theirs}: {}",
                if theirs > u64::from(PROTOCOL_VERSION) {
                    "upgrade the agent"
                } else {
                    "upgrade the plugin"
                }
            ),
        ),
        _ => error(ErrorCode::BadRequest, format!("the first line is not a Hello: {e}")),
    }
}

/// Reads (and discards) until the client closes its side or the connection fails.
async fn watch_client<R: AsyncRead + Unpin>(mut read: R, gone: CancellationToken) {
    let mut scratch = [0u8; 512];
    loop {
        tokio::select! {
            _ = gone.cancelled() => return,
            read = read.read(&mut scratch) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            },
        }
    }
    gone.cancel();
}

pub async fn write_welcome(write: &mut OwnedWriteHalf, shared: &Shared) -> std::io::Result<()> {
    write_line(
        write,
        &Welcome::Accepted {
            protocol: PROTOCOL_VERSION,
            agent_version: AGENT_VERSION.to_string(),
            node: shared.node.clone(),
        },
    )
    .await
}

fn status(shared: &Shared) -> AgentStatus {
    let mut probes = shared
        .reported_probes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut trace_probes = Vec::new();
    for probe in ALL_KERNEL_PROBES {
        let name = format!("trace/{}", probe_name(probe));
        match shared.kernel.availability(probe) {
            Ok(()) => {
                trace_probes.push(probe);
                probes.insert(
                    name,
                    "available (attached while a session traces it)".to_string(),
                );
            }
            Err(why) => {
                probes.insert(name, format!("skipped: {why}"));
            }
        }
    }
    if shared.http_exchanges.has_publisher() {
        trace_probes.push(TraceProbe::Http);
        probes.insert(
            "trace/http".to_string(),
            "available (the exchanges of the ebpf receiver's http probe)".to_string(),
        );
    } else {
        probes.insert("trace/http".to_string(), format!("skipped: {HTTP_FIX}"));
    }
    for function in shared.kernel.attached() {
        probes.insert(format!("trace program {function}"), "attached".to_string());
    }
    AgentStatus {
        node: shared.node.clone(),
        agent_version: AGENT_VERSION.to_string(),
        protocol: PROTOCOL_VERSION,
        ready: shared.readiness.check().is_ok(),
        probes,
        bpftrace_enabled: shared.config.bpftrace.enabled,
        trace_probes,
    }
}

/// `tcp_connect` for `TcpConnect`: the protocol's spelling.
pub fn probe_name(probe: TraceProbe) -> String {
    serde_json::to_value(probe)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{probe:?}"))
}

/// Where a trace's events come from: the trace object's ring buffer, or the http probes'
/// exchanges.
enum Feed {
    Kernel(super::trace::Subscription),
    Http(ExchangeSubscription),
}

// Moved once from the channel to its event: boxing the larger kernel event would cost an
// allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
enum FeedItem {
    Kernel(podscope_ebpf::abi::TraceEvent),
    Http(HttpExchange),
}

impl FeedItem {
    fn cgroup(&self) -> u64 {
        match self {
            FeedItem::Kernel(raw) => raw.cgroup_id,
            FeedItem::Http(exchange) => exchange.cgroup,
        }
    }
}

impl Feed {
    async fn recv(&mut self) -> Option<FeedItem> {
        match self {
            Feed::Kernel(s) => s.events.recv().await.map(FeedItem::Kernel),
            Feed::Http(s) => s.exchanges.recv().await.map(FeedItem::Http),
        }
    }

    fn lost_since(&mut self) -> u64 {
        match self {
            Feed::Kernel(s) => s.lost_since(),
            Feed::Http(s) => s.lost_since(),
        }
    }

    fn lost_reason(&self) -> &'static str {
        match self {
            Feed::Kernel(_) => "the kernel's ring buffer or this session's queue was full (events came faster than the client read them)",
            Feed::Http(_) => "this session's queue was full (exchanges came faster than the client read them; the http probe's own losses are its receiver's ebpf_ring_lost)",
        }
    }

    fn source_gone(&self) -> &'static str {
        match self {
            Feed::Kernel(_) => "the trace object was unloaded",
            Feed::Http(_) => {
                "the http probe's exchanges are no longer published (its receiver stopped)"
            }
        }
    }
}

/// The `comm` of processes, read from `/proc` once per process (http exchanges carry only the
/// pid).
#[derive(Default)]
pub(super) struct ProcessNames(std::collections::HashMap<u32, String>);

impl ProcessNames {
    /// Enough for a node's processes; past it the cache starts over rather than grow.
    const MAX: usize = 8192;

    pub(super) fn comm(&mut self, tgid: u32) -> String {
        if self.0.len() >= Self::MAX {
            self.0.clear();
        }
        self.0
            .entry(tgid)
            .or_insert_with(|| {
                std::fs::read_to_string(format!("/proc/{tgid}/comm"))
                    .map(|c| c.trim_end().to_string())
                    .unwrap_or_default()
            })
            .clone()
    }
}

#[allow(clippy::too_many_arguments)]
async fn trace(
    write: &mut OwnedWriteHalf,
    shared: &Shared,
    probe: TraceProbe,
    targets: &[Target],
    filters: &[String],
    duration: Option<Duration>,
    gone: &CancellationToken,
) -> std::io::Result<Outcome> {
    if !probe.is_streamed() {
        let name = probe_name(probe);
        return Ok(Outcome::Refused(error(
            ErrorCode::BadRequest,
            format!("probe {name} runs in TraceSessions only (`kubectl podscope run NAME TARGET {name}`); `kubectl podscope {name}` shows it live"),
        )));
    }
    if probe == TraceProbe::Http && !shared.http_exchanges.has_publisher() {
        return Ok(Outcome::Refused(error(
            ErrorCode::ProbeUnavailable,
            format!(
                "probe http is not available on node {}: {HTTP_FIX}",
                shared.node
            ),
        )));
    }
    let filter = match EventFilter::parse(filters) {
        Ok(filter) => filter,
        Err(e) => return Ok(Outcome::Refused(error(ErrorCode::BadRequest, e))),
    };
    let mut index = podscope_k8s::cgroup::CgroupIndex::new(
        podscope_k8s::cgroup::cgroup2_mount().unwrap_or_else(|| "/sys/fs/cgroup".into()),
    );
    index.refresh();
    let whole_node = targets.is_empty();
    let mut labels: std::collections::HashMap<u64, CgroupLabels> = Default::default();
    if !whole_node {
        let containers = match resolve(&index, targets, &shared.node) {
            Ok(containers) => containers,
            Err(e) => return Ok(Outcome::Refused(error(ErrorCode::TargetNotFound, e))),
        };
        for container in containers {
            for cgroup in container.cgroups {
                labels.insert(cgroup, container.labels.clone());
            }
        }
    }
    let cgroups: Vec<u64> = labels.keys().copied().collect();
    let mut feed = if probe == TraceProbe::Http {
        Feed::Http(
            shared
                .http_exchanges
                .subscribe((!whole_node).then(|| cgroups.into_iter().collect())),
        )
    } else {
        match shared.kernel.subscribe(probe, cgroups, whole_node) {
            Ok(subscription) => Feed::Kernel(subscription),
            Err(TraceRefusal::Unavailable(why)) => {
                return Ok(Outcome::Refused(error(
                    ErrorCode::ProbeUnavailable,
                    format!(
                        "probe {} is not available on node {}: {why}",
                        probe_name(probe),
                        shared.node
                    ),
                )))
            }
            Err(TraceRefusal::Internal(why)) => {
                return Ok(Outcome::Refused(error(ErrorCode::Internal, why)))
            }
        }
    };
    write_welcome(write, shared).await?;
    let clock_offset = clock_offset_ns();
    let deadline = duration.map(|d| tokio::time::Instant::now() + d);
    let mut lost_ticker = tokio::time::interval(LOST_REPORT);
    let mut index_refreshed = tokio::time::Instant::now();
    let mut process_names = ProcessNames::default();
    loop {
        let item = tokio::select! {
            _ = gone.cancelled() => return Ok(Outcome::Ended(None)),
            _ = shared.stopping.cancelled() => return Ok(Outcome::Ended(Some(Ending::of(EndReason::AgentStopping)))),
            _ = sleep_until(deadline) => {
                report_lost(write, &mut feed).await?;
                return Ok(Outcome::Ended(Some(Ending::of(EndReason::Duration))));
            }
            _ = lost_ticker.tick() => {
                report_lost(write, &mut feed).await?;
                continue;
            }
            item = feed.recv() => item,
        };
        let Some(item) = item else {
            return Ok(Outcome::Ended(Some(Ending {
                reason: EndReason::Error,
                error: Some(error(ErrorCode::Internal, feed.source_gone())),
            })));
        };
        let cgroup = item.cgroup();
        let cgroup_labels = match labels.get(&cgroup) {
            Some(labels) => labels.clone(),
            None if whole_node => {
                // A cgroup made since the last walk: walk again, at most once a second.
                if index.path(cgroup).is_none()
                    && index_refreshed.elapsed() > Duration::from_secs(1)
                {
                    index.refresh();
                    index_refreshed = tokio::time::Instant::now();
                }
                let found = index
                    .path(cgroup)
                    .map(|path| node_labels(path, shared.pod_names.as_deref()))
                    .unwrap_or_default();
                labels.insert(cgroup, found.clone());
                found
            }
            None => CgroupLabels::default(),
        };
        let event = match item {
            FeedItem::Kernel(raw) => {
                let Some(event) = to_event(&raw, &cgroup_labels, &shared.node, clock_offset) else {
                    continue;
                };
                event
            }
            FeedItem::Http(exchange) => {
                let comm = process_names.comm(exchange.tgid);
                exchange_event(&exchange, &cgroup_labels, &shared.node, clock_offset, comm)
            }
        };
        if filter.matches(&event) {
            send_event(write, event).await?;
        }
    }
}

async fn send_event(write: &mut OwnedWriteHalf, event: Event) -> std::io::Result<()> {
    write_line(write, &Message::Event(event)).await
}

async fn report_lost(write: &mut OwnedWriteHalf, feed: &mut Feed) -> std::io::Result<()> {
    let lost = feed.lost_since();
    if lost == 0 {
        return Ok(());
    }
    write_line(
        write,
        &Message::Lost {
            count: lost,
            reason: feed.lost_reason().to_string(),
        },
    )
    .await
}

/// Never, without a deadline.
pub async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad_hello(line: &str) -> SessionError {
        let parsed: Result<Hello, _> = serde_json::from_str(line);
        let e = ReadError::Json(parsed.expect_err("not a Hello"));
        refusal_of_bad_hello(line.as_bytes(), &e)
    }

    #[test]
    fn a_request_this_agent_cannot_read_is_named_by_its_protocol() {
        let refusal =
            bad_hello(r#"{"protocol":7,"client_version":"3.0","request":{"kind":"flamegraph"}}"#);
        assert_eq!(refusal.code, ErrorCode::ProtocolMismatch);
        assert_eq!(
            refusal.message,
            format!("this agent ({AGENT_VERSION}) speaks session protocol 1, the plugin speaks 7: upgrade the agent")
        );
        let refusal =
            bad_hello(r#"{"protocol":1,"client_version":"0.1","request":{"kind":"flamegraph"}}"#);
        assert_eq!(refusal.code, ErrorCode::BadRequest);
        assert!(
            refusal
                .message
                .starts_with("the first line is not a Hello: "),
            "{}",
            refusal.message
        );
        assert_eq!(bad_hello("GET / HTTP/1.1").code, ErrorCode::BadRequest);
    }

    #[test]
    fn every_request_kind_parses_from_the_plugins_json() {
        let kinds = [
            (r#"{"kind":"status"}"#, "status"),
            (
                r#"{"kind":"session_log","namespace":"team-a","name":"s","token":"ab","from":1,"follow":true}"#,
                "session_log",
            ),
            (
                r#"{"kind":"trace","probe":"tcp_connect","targets":[],"duration":"30s"}"#,
                "trace",
            ),
            (
                r#"{"kind":"top","scope":"pods","interval":"1s","once":true}"#,
                "top",
            ),
            (
                r#"{"kind":"bpftrace","program":"BEGIN { exit(); }"}"#,
                "bpftrace",
            ),
            (
                r#"{"kind":"profile","targets":[],"duration":"10s","format":"folded"}"#,
                "profile",
            ),
        ];
        for (json, kind) in kinds {
            let request: Request =
                serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(request_kind(&request), kind);
        }
        let Request::Trace { probe, duration, filters, .. } = serde_json::from_str(
            r#"{"kind":"trace","probe":"oom_kill","targets":[],"filters":["comm=java"],"duration":"1m"}"#,
        )
        .unwrap() else {
            panic!("a trace");
        };
        assert_eq!(probe, TraceProbe::OomKill);
        assert_eq!(duration, Some(Duration::from_secs(60)));
        assert_eq!(filters, ["comm=java"]);
        assert_eq!(probe_name(TraceProbe::TcpRetransmit), "tcp_retransmit");
    }
}
