//! A trace event as the kernel wrote it ([`TraceEvent`]) into the protocol's [`Event`]: its
//! probe's fields as strings, the kernel's monotonic time as wall-clock time.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use podscope_core::session::{Event, TraceProbe};
use podscope_ebpf::abi::{TraceEvent, TRACE_FLAG_DURATION};

use super::exchanges::HttpExchange;
use super::targets::CgroupLabels;
use super::trace::probe_of_index;

pub use crate::ebpf::clock::clock_offset_ns;

/// The protocol's event of a kernel event, labelled; `None` for a probe number this agent does
/// not know (never written by its own object).
pub fn to_event(
    raw: &TraceEvent,
    labels: &CgroupLabels,
    node: &str,
    clock_offset: u64,
) -> Option<Event> {
    let probe = probe_of_index(raw.probe)?;
    Some(Event {
        time_unix_nano: raw.timestamp_ns.saturating_add(clock_offset),
        node: node.to_string(),
        namespace: labels.namespace.clone(),
        pod: labels.pod.clone(),
        container: labels.container.clone(),
        probe,
        pid: raw.pid,
        tid: raw.tid,
        comm: raw.comm(),
        fields: fields(probe, raw),
    })
}

/// The protocol's event of an http exchange, labelled: at the request's first bytes, with the
/// process's `comm` as the caller read it.
pub fn exchange_event(
    exchange: &HttpExchange,
    labels: &CgroupLabels,
    node: &str,
    clock_offset: u64,
    comm: String,
) -> Event {
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut fields = BTreeMap::from([
        ("role".to_string(), exchange.role.as_str().to_string()),
        ("method".to_string(), exchange.method.clone()),
        ("path".to_string(), exchange.path.clone()),
        ("route".to_string(), exchange.route.clone()),
        ("status".to_string(), exchange.status().to_string()),
        ("duration_ns".to_string(), exchange.duration_ns.to_string()),
        ("peer".to_string(), exchange.peer.to_string()),
        (
            "scheme".to_string(),
            if exchange.tls { "https" } else { "http" }.to_string(),
        ),
        ("version".to_string(), exchange.version.to_string()),
        ("trace_id".to_string(), hex(&exchange.trace_id)),
        ("span_id".to_string(), hex(&exchange.span_id)),
    ]);
    if let Some(call) = &exchange.grpc {
        fields.insert("grpc_service".to_string(), call.service.clone());
        fields.insert("grpc_method".to_string(), call.method.clone());
        fields.insert("http_status".to_string(), exchange.http_status.to_string());
    }
    Event {
        time_unix_nano: exchange.start_ns.saturating_add(clock_offset),
        node: node.to_string(),
        namespace: labels.namespace.clone(),
        pod: labels.pod.clone(),
        container: labels.container.clone(),
        probe: TraceProbe::Http,
        pid: exchange.tgid,
        tid: exchange.tid,
        comm,
        fields,
    }
}

fn fields(probe: TraceProbe, raw: &TraceEvent) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    let mut put = |key: &str, value: String| {
        fields.insert(key.to_string(), value);
    };
    match probe {
        TraceProbe::Exec => {
            put("filename", raw.filename());
            put("argv0", raw.argv0());
            put("ppid", raw.ppid.to_string());
        }
        TraceProbe::Exit => {
            put("exit_code", raw.exit_code.to_string());
            if raw.exit_code > 128 {
                put("signal", signal_name(raw.exit_code as u32 - 128));
            }
            put("ppid", raw.ppid.to_string());
            put("lifetime_ns", raw.duration_ns.to_string());
        }
        TraceProbe::Open => {
            put("path", raw.filename());
            put("flags", open_flags(raw.open_flags));
            put("result", raw.result.to_string());
            if raw.result < 0 {
                put("error", errno_name(-raw.result));
            }
        }
        TraceProbe::TcpConnect
        | TraceProbe::TcpAccept
        | TraceProbe::TcpClose
        | TraceProbe::TcpRetransmit => {
            put(
                "family",
                if raw.family == 10 { "ipv6" } else { "ipv4" }.to_string(),
            );
            put("saddr", address(raw.family, &raw.saddr).to_string());
            put("sport", raw.sport.to_string());
            put("daddr", address(raw.family, &raw.daddr).to_string());
            put("dport", raw.dport.to_string());
            if probe == TraceProbe::TcpClose && raw.flags & TRACE_FLAG_DURATION != 0 {
                put("duration_ns", raw.duration_ns.to_string());
            }
            if probe == TraceProbe::TcpConnect {
                put("result", raw.result.to_string());
                if raw.result < 0 {
                    put("error", errno_name(-raw.result));
                }
            }
        }
        TraceProbe::OomKill => {
            put("trigger_pid", raw.sender_pid.to_string());
            put("trigger_comm", raw.sender_comm());
        }
        TraceProbe::Signal => {
            put("signal", signal_name(raw.signal));
            put("signal_number", raw.signal.to_string());
            put("sender_pid", raw.sender_pid.to_string());
            put("sender_comm", raw.sender_comm());
            put("result", raw.result.to_string());
        }
        // Not the trace object's: their events are made where they are measured.
        TraceProbe::Http | TraceProbe::Top | TraceProbe::Profile => {}
    }
    fields
}

pub(super) fn address(family: u16, bytes: &[u8; 16]) -> IpAddr {
    if family == 10 {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

/// `SIGKILL` for 9; the number for signals without a name here (real-time ones).
pub fn signal_name(signal: u32) -> String {
    const NAMES: [&str; 32] = [
        "",
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    match NAMES.get(signal as usize) {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => signal.to_string(),
    }
}

/// `ENOENT` for 2; `errno 200` for numbers without a name here.
fn errno_name(errno: i64) -> String {
    let name = match errno {
        1 => "EPERM",
        2 => "ENOENT",
        4 => "EINTR",
        5 => "EIO",
        6 => "ENXIO",
        9 => "EBADF",
        11 => "EAGAIN",
        12 => "ENOMEM",
        13 => "EACCES",
        14 => "EFAULT",
        16 => "EBUSY",
        17 => "EEXIST",
        19 => "ENODEV",
        20 => "ENOTDIR",
        21 => "EISDIR",
        22 => "EINVAL",
        23 => "ENFILE",
        24 => "EMFILE",
        26 => "ETXTBSY",
        27 => "EFBIG",
        28 => "ENOSPC",
        30 => "EROFS",
        36 => "ENAMETOOLONG",
        40 => "ELOOP",
        95 => "EOPNOTSUPP",
        101 => "ENETUNREACH",
        104 => "ECONNRESET",
        110 => "ETIMEDOUT",
        111 => "ECONNREFUSED",
        113 => "EHOSTUNREACH",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

/// `O_WRONLY|O_CREAT|O_TRUNC` for the open flags (x86_64 values).
fn open_flags(flags: u32) -> String {
    let mut names = vec![match flags & 0o3 {
        0 => "O_RDONLY",
        1 => "O_WRONLY",
        2 => "O_RDWR",
        _ => "O_ACCMODE",
    }
    .to_string()];
    const BITS: [(u32, &str); 11] = [
        (0o100, "O_CREAT"),
        (0o200, "O_EXCL"),
        (0o400, "O_NOCTTY"),
        (0o1000, "O_TRUNC"),
        (0o2000, "O_APPEND"),
        (0o4000, "O_NONBLOCK"),
        (0o200000, "O_DIRECTORY"),
        (0o400000, "O_NOFOLLOW"),
        (0o2000000, "O_CLOEXEC"),
        (0o10000, "O_DSYNC"),
        (0o20000000, "O_PATH"),
    ];
    let mut rest = flags & !0o3;
    for (bit, name) in BITS {
        if rest & bit != 0 {
            names.push(name.to_string());
            rest &= !bit;
        }
    }
    if rest != 0 {
        names.push(format!("0o{rest:o}"));
    }
    names.join("|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_flags_are_named() {
        assert_eq!(open_flags(0), "O_RDONLY");
        assert_eq!(open_flags(0o1101), "O_WRONLY|O_CREAT|O_TRUNC");
        assert_eq!(open_flags(0o2000000), "O_RDONLY|O_CLOEXEC");
        assert_eq!(open_flags(0o2 | 0o40000000), "O_RDWR|0o40000000");
    }

    #[test]
    fn signals_and_errors_are_named() {
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(40), "40");
        assert_eq!(errno_name(2), "ENOENT");
        assert_eq!(errno_name(200), "errno 200");
    }

    #[test]
    fn a_kernel_event_becomes_a_labelled_event_in_wall_clock_time() {
        let mut raw = TraceEvent {
            probe: podscope_ebpf::abi::TRACE_TCP_CLOSE,
            timestamp_ns: 1_000,
            pid: 7,
            tid: 8,
            family: 2,
            sport: 40000,
            dport: 8080,
            duration_ns: 5_000,
            flags: TRACE_FLAG_DURATION,
            ..Default::default()
        };
        raw.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        raw.daddr[..4].copy_from_slice(&[10, 1, 2, 3]);
        raw.comm[..4].copy_from_slice(b"curl");
        let labels = CgroupLabels {
            namespace: "shop".into(),
            pod: "web-0".into(),
            container: "app".into(),
        };
        let event = to_event(&raw, &labels, "node-1", 1_700_000_000_000_000_000).unwrap();
        assert_eq!(event.time_unix_nano, 1_700_000_000_000_001_000);
        assert_eq!(event.probe, TraceProbe::TcpClose);
        assert_eq!((event.pid, event.tid, event.comm.as_str()), (7, 8, "curl"));
        assert_eq!(
            (event.node.as_str(), event.pod.as_str()),
            ("node-1", "web-0")
        );
        let fields: Vec<(&str, &str)> = event
            .fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("daddr", "10.1.2.3"),
                ("dport", "8080"),
                ("duration_ns", "5000"),
                ("family", "ipv4"),
                ("saddr", "127.0.0.1"),
                ("sport", "40000"),
            ]
        );
    }
}
