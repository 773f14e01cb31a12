//! The session protocol: what `kubectl podscope` and an agent say to each other.
//!
//! One request per connection. The plugin reaches an agent through a port-forward into the agent
//! pod (the agent's session endpoint listens on the pod's loopback only) or directly
//! (`--agent-address`), opens a byte stream and writes one [`Hello`] line; the agent answers with
//! one [`Welcome`] line, then streams [`Message`] lines until the request ends (its duration, the
//! program's end, or the client closing the stream). Every line is one JSON document followed by
//! `\n`, at most [`MAX_LINE_BYTES`] long.
//!
//! Why JSON lines and not gRPC: the stream crosses a port-forward, where a plain byte stream is
//! what both ends get; a line is readable in a capture and in a test with `nc`; the volume (events
//! a person reads live, a top table per second) does not need a binary encoding.
//!
//! Versioning: [`PROTOCOL_VERSION`] grows when a change would be misread by the other side. An
//! agent that does not speak the plugin's version answers with an [`ErrorCode::ProtocolMismatch`]
//! naming both versions, so each side can say which one to upgrade. Fields added in a compatible
//! way are optional (`#[serde(default)]`) and unknown fields are ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// The version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest line either side writes or accepts (a bpftrace map printout can be long).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// The port of the agent's session endpoint unless configured otherwise.
pub const DEFAULT_PORT: u16 = 7070;

/// The first line of a connection, from the plugin.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    pub protocol: u32,
    /// The plugin's version (`CARGO_PKG_VERSION`), for the agent's log and errors.
    pub client_version: String,
    pub request: Request,
}

/// What the plugin asks for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Request {
    /// Stream the events of one built-in event probe, filtered in the kernel to the targets'
    /// cgroups.
    Trace {
        probe: TraceProbe,
        /// Empty: the whole node (`kubectl podscope trace node/N`), host processes included.
        targets: Vec<Target>,
        /// `field=value` conditions (all must hold) on the event's fields, e.g. `comm=curl`.
        #[serde(default)]
        filters: Vec<String>,
        /// Ends the stream after this long; none: until the client closes it.
        #[serde(default, with = "humantime_serde")]
        duration: Option<std::time::Duration>,
    },
    /// A refreshing table: one [`Message::Top`] per interval.
    Top {
        scope: TopScope,
        /// Empty: every container the agent sees on its node.
        #[serde(default)]
        targets: Vec<Target>,
        #[serde(with = "humantime_serde")]
        interval: std::time::Duration,
        /// Stop after one table (`--once`).
        #[serde(default)]
        once: bool,
    },
    /// Run bpftrace on the node with `$container_pid` and the container's cgroup id defined.
    Bpftrace {
        program: String,
        /// One target container (its pid and cgroup id are given to the program), or none.
        #[serde(default)]
        target: Option<Target>,
        #[serde(default, with = "humantime_serde")]
        duration: Option<std::time::Duration>,
    },
    /// Profile the targets for `duration` and send the result as one file.
    Profile {
        targets: Vec<Target>,
        #[serde(with = "humantime_serde")]
        duration: std::time::Duration,
        format: ProfileFormat,
        /// Samples per second; none: the agent's default.
        #[serde(default)]
        frequency_hz: Option<u32>,
    },
    /// The agent's state: version, probes attached or skipped and why, health.
    Status,
    /// Read what a `TraceSession` recorded on this node: its [`Message::Record`]s from
    /// sequence `from` on (none: only those recorded from now), then, with `follow`, each new
    /// one until the session ends. Allowed with the session's `status.attachToken`.
    SessionLog {
        namespace: String,
        name: String,
        token: String,
        #[serde(default)]
        from: Option<u64>,
        #[serde(default)]
        follow: bool,
    },
}

/// The built-in event probes: those a trace can stream, and those only a `TraceSession` runs
/// ([`TraceProbe::is_streamed`]).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum TraceProbe {
    Exec,
    Exit,
    Open,
    TcpConnect,
    TcpAccept,
    TcpClose,
    TcpRetransmit,
    Http,
    OomKill,
    Signal,
    /// A `TraceSession` probe only (never a `trace` stream): its pods' `top` counters each
    /// interval, one event per pod.
    Top,
    /// A `TraceSession` probe only (never a `trace` stream): an on-CPU profile of its pods,
    /// one event per folded stack when the run ends.
    Profile,
}

impl TraceProbe {
    /// Whether `kubectl podscope trace` can stream it (else only a `TraceSession` runs it).
    pub fn is_streamed(self) -> bool {
        !matches!(self, TraceProbe::Top | TraceProbe::Profile)
    }
}

/// One pod the plugin resolved from the user's TARGET, with the containers selected in it. The
/// plugin reads it from the Kubernetes API; the agent finds each container's cgroup by its id (as
/// the runtime reports it in `status.containerStatuses[].containerID`, `containerd://`-style prefix
/// included), and labels what it sends with these names.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct Target {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    /// The selected containers (all running ones of the pod unless `-c` named one).
    pub containers: Vec<ContainerRef>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    pub name: String,
    /// `containerd://0123…`, `cri-o://…`, `docker://…`.
    pub id: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TopScope {
    Pods,
    Containers,
    Nodes,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ProfileFormat {
    /// gzip-compressed pprof.
    Pprof,
    /// Brendan Gregg's folded stacks, one `frame;frame;frame count` line each.
    Folded,
}

/// The agent's first line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Welcome {
    Accepted {
        protocol: u32,
        agent_version: String,
        node: String,
    },
    Refused(SessionError),
}

/// Why an agent refused a request or ended it early.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SessionError {
    pub code: ErrorCode,
    /// One line for the user: what failed and, where there is one, what to do.
    pub message: String,
    /// The agent's protocol version (always set, so a mismatch can be named).
    pub protocol: u32,
    #[serde(default)]
    pub agent_version: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    ProtocolMismatch,
    BadRequest,
    /// A target's containers have no cgroup on this node (not running, or on another node).
    TargetNotFound,
    /// The probe cannot run on this node's kernel (the message says why).
    ProbeUnavailable,
    BpftraceDisabled,
    /// The agent's limits (concurrent sessions) are reached.
    Busy,
    Internal,
    /// A `TraceSession`'s log was asked for without its attach token (or with another).
    Forbidden,
}

/// What the agent streams after [`Welcome::Accepted`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    Event(Event),
    /// One event a `TraceSession` recorded, with its place in that session's log on this
    /// node (sequences start at 1 and grow by one per event; a reader resumes after the last
    /// one it saw).
    Record {
        sequence: u64,
        event: Event,
    },
    /// The first line of a `SessionLog` answer: the sequence its records start from (with
    /// `from` unset, the next one the session records), so a reader that is cut off before any
    /// record came resumes there.
    LogStart {
        sequence: u64,
    },
    Top(TopTable),
    /// A chunk of bpftrace's standard output (or error, `stream: "stderr"`).
    Output {
        stream: String,
        text: String,
    },
    /// A profile file, base64 in `data`.
    File {
        name: String,
        data: String,
    },
    Status(AgentStatus),
    /// Events the kernel or the agent dropped since the last such message (ring buffer full, the
    /// client too slow): said, never silent.
    Lost {
        count: u64,
        reason: String,
    },
    /// The last line: why the stream ended.
    End {
        reason: EndReason,
        #[serde(default)]
        error: Option<SessionError>,
    },
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    Duration,
    /// The program (bpftrace) exited on its own.
    Exited,
    Error,
    AgentStopping,
}

/// One kernel event, with where it happened.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Wall-clock time in nanoseconds since the Unix epoch (the plugin merges nodes by it).
    pub time_unix_nano: u64,
    pub node: String,
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub probe: TraceProbe,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// The probe's own fields (`filename`, `exit_code`, `daddr`, `signal`, …), as strings so the
    /// plugin's `--filter` and columns treat every probe alike.
    pub fields: BTreeMap<String, String>,
}

/// One refresh of `top`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TopTable {
    pub time_unix_nano: u64,
    pub node: String,
    pub rows: Vec<TopRow>,
}

/// One pod, container or node. A value is absent when the probe behind it is not running.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TopRow {
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub pod: String,
    #[serde(default)]
    pub container: String,
    /// CPU time used per second of wall time (1.0 = one CPU).
    pub cpu_cores: Option<f64>,
    /// The columns from the eBPF receivers' collections (on the wire beside the others).
    #[serde(flatten)]
    pub kernel: KernelColumns,
}

/// The columns of a [`TopRow`] that come from eBPF probes, over the receivers' last collection
/// interval. `None`: the probe behind it is off, no receiver collected twice yet, or (for
/// quantiles) nothing was measured in the interval.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct KernelColumns {
    pub runq_latency_p50_seconds: Option<f64>,
    pub runq_latency_p99_seconds: Option<f64>,
    pub syscalls_per_second: Option<f64>,
    pub opens_per_second: Option<f64>,
    pub tcp_retransmits_per_second: Option<f64>,
    pub requests_per_second: Option<f64>,
    pub request_latency_p99_seconds: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentStatus {
    pub node: String,
    pub agent_version: String,
    pub protocol: u32,
    pub ready: bool,
    /// Probe name → "attached" or why it was skipped.
    pub probes: BTreeMap<String, String>,
    pub bpftrace_enabled: bool,
    pub trace_probes: Vec<TraceProbe>,
}

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the session stream failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("a session line is longer than {MAX_LINE_BYTES} bytes")]
    TooLong,
    #[error("a session line is not valid: {0}")]
    Json(#[from] serde_json::Error),
}

/// Writes one value as one line and flushes it.
pub async fn write_line<W, T>(writer: &mut W, value: &T) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line).await?;
    writer.flush().await
}

/// Reads one line into a value; `Ok(None)` at the end of the stream.
pub async fn read_line<R, T>(reader: &mut R, buffer: &mut Vec<u8>) -> Result<Option<T>, ReadError>
where
    R: AsyncBufRead + Unpin,
    T: for<'de> Deserialize<'de>,
{
    buffer.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return if buffer.is_empty() {
                Ok(None)
            } else {
                Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()))
            };
        }
        match available.iter().position(|&b| b == b'\n') {
            Some(end) => {
                buffer.extend_from_slice(&available[..end]);
                reader.consume(end + 1);
                break;
            }
            None => {
                let taken = available.len();
                buffer.extend_from_slice(available);
                reader.consume(taken);
            }
        }
        if buffer.len() > MAX_LINE_BYTES {
            return Err(ReadError::TooLong);
        }
    }
    if buffer.len() > MAX_LINE_BYTES {
        return Err(ReadError::TooLong);
    }
    Ok(Some(serde_json::from_slice(buffer)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hello_crosses_a_stream_as_one_line_and_back() {
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            client_version: "0.1.0".into(),
            request: Request::Trace {
                probe: TraceProbe::Exec,
                targets: vec![Target {
                    namespace: "shop".into(),
                    pod: "web-0".into(),
                    pod_uid: "3c1d".into(),
                    containers: vec![ContainerRef {
                        name: "app".into(),
                        id: "containerd://abc".into(),
                    }],
                }],
                filters: vec!["comm=curl".into()],
                duration: Some(std::time::Duration::from_secs(30)),
            },
        };
        let mut wire = Vec::new();
        write_line(&mut wire, &hello).await.unwrap();
        assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(std::str::from_utf8(&wire)
            .unwrap()
            .contains(r#""kind":"trace""#));
        let mut reader = tokio::io::BufReader::new(&wire[..]);
        let mut buffer = Vec::new();
        let back: Hello = read_line(&mut reader, &mut buffer).await.unwrap().unwrap();
        assert_eq!(back, hello);
        let end: Option<Hello> = read_line(&mut reader, &mut buffer).await.unwrap();
        assert_eq!(end, None);
    }

    #[test]
    fn a_top_rows_kernel_columns_are_fields_of_the_row_on_the_wire() {
        let row = TopRow {
            namespace: "shop".into(),
            pod: "web-0".into(),
            container: String::new(),
            cpu_cores: Some(0.5),
            kernel: KernelColumns {
                syscalls_per_second: Some(120.0),
                ..Default::default()
            },
        };
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "namespace": "shop", "pod": "web-0", "container": "", "cpu_cores": 0.5,
                "runq_latency_p50_seconds": null, "runq_latency_p99_seconds": null,
                "syscalls_per_second": 120.0, "opens_per_second": null,
                "tcp_retransmits_per_second": null, "requests_per_second": null,
                "request_latency_p99_seconds": null,
            })
        );
        assert_eq!(serde_json::from_value::<TopRow>(json).unwrap(), row);
        // An older agent's row without some columns still reads, those absent.
        let old: TopRow =
            serde_json::from_str(r#"{"pod":"web-0","cpu_cores":null,"opens_per_second":3.0}"#)
                .unwrap();
        assert_eq!(old.kernel.opens_per_second, Some(3.0));
        assert_eq!(old.kernel.syscalls_per_second, None);
    }

    #[tokio::test]
    async fn a_line_past_the_limit_is_refused_not_buffered_forever() {
        let wire = vec![b'x'; MAX_LINE_BYTES + 10];
        let mut reader = tokio::io::BufReader::new(&wire[..]);
        let mut buffer = Vec::new();
        let result: Result<Option<Message>, _> = read_line(&mut reader, &mut buffer).await;
        assert!(matches!(result, Err(ReadError::TooLong)), "{result:?}");
    }
}
