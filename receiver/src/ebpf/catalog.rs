//! Every metric the eBPF receiver emits: the single source for the names used in code and for
//! `docs/metrics.md` (a test regenerates the table and compares).

/// One emitted metric.
#[derive(Debug, Clone, Copy)]
pub struct MetricDoc {
    pub name: &'static str,
    pub probe: &'static str,
    pub kind: MetricKind,
    pub unit: &'static str,
    pub description: &'static str,
    /// Data point attributes (resource attributes are the cgroup's, or the host's for block_io).
    pub attributes: &'static [&'static str],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Monotonic cumulative sum.
    Counter,
    /// Monotonic delta sum: counts of the last interval only.
    DeltaCounter,
    /// Cumulative exponential histogram, scale 0.
    Distribution,
    /// Delta exponential histogram, scale 0: values sampled at one collection.
    SampledDistribution,
}

impl MetricKind {
    fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "sum (monotonic, cumulative)",
            MetricKind::DeltaCounter => "sum (monotonic, delta)",
            MetricKind::Distribution => "exponential histogram (scale 0, cumulative)",
            MetricKind::SampledDistribution => {
                "exponential histogram (scale 0, delta: sampled at each collection)"
            }
        }
    }
}

pub const EXECS: MetricDoc = MetricDoc {
    name: "podscope.process.execs",
    probe: "process",
    kind: MetricKind::Counter,
    unit: "{exec}",
    description: "Programs executed (execve) in the cgroup",
    attributes: &[],
};
pub const FORKS: MetricDoc = MetricDoc {
    name: "podscope.process.forks",
    probe: "process",
    kind: MetricKind::Counter,
    unit: "{process}",
    description: "Processes created (fork/clone of a new process, not a thread)",
    attributes: &[],
};
pub const EXITS: MetricDoc = MetricDoc {
    name: "podscope.process.exits",
    probe: "process",
    kind: MetricKind::Counter,
    unit: "{process}",
    description: "Processes that exited, by exit code (128 + signal when killed by a signal)",
    attributes: &["process.exit.code"],
};
pub const LIFETIME: MetricDoc = MetricDoc {
    name: "podscope.process.lifetime",
    probe: "process",
    kind: MetricKind::Distribution,
    unit: "ns",
    description: "Lifetime of processes that exited, from start to exit",
    attributes: &[],
};
pub const SYSCALLS: MetricDoc = MetricDoc {
    name: "podscope.syscalls",
    probe: "syscalls",
    kind: MetricKind::Counter,
    unit: "{syscall}",
    description: "System calls completed, by syscall",
    attributes: &["syscall.name"],
};
pub const SYSCALL_ERRORS: MetricDoc = MetricDoc {
    name: "podscope.syscalls.errors",
    probe: "syscalls",
    kind: MetricKind::Counter,
    unit: "{syscall}",
    description: "System calls that returned an error (-4095..-1), by syscall",
    attributes: &["syscall.name"],
};
pub const SYSCALL_LATENCY: MetricDoc = MetricDoc {
    name: "podscope.syscalls.latency",
    probe: "syscalls",
    kind: MetricKind::Distribution,
    unit: "ns",
    description: "Time from syscall entry to exit, by syscall (with `latency: true`)",
    attributes: &["syscall.name"],
};
pub const OPENS: MetricDoc = MetricDoc {
    name: "podscope.files.opens",
    probe: "files",
    kind: MetricKind::Counter,
    unit: "{open}",
    description: "File opens (openat, openat2), successful or not",
    attributes: &[],
};
pub const OPEN_ERRORS: MetricDoc = MetricDoc {
    name: "podscope.files.open_errors",
    probe: "files",
    kind: MetricKind::Counter,
    unit: "{open}",
    description: "File opens that failed, by errno name",
    attributes: &["error.type"],
};
pub const PATH_OPENS: MetricDoc = MetricDoc {
    name: "podscope.files.path_opens",
    probe: "files",
    kind: MetricKind::DeltaCounter,
    unit: "{open}",
    description: "Successful opens in the last interval for the top `top_paths` paths, the rest as `other` (with `capture_paths: true`)",
    attributes: &["file.path"],
};
pub const RUNQ_LATENCY: MetricDoc = MetricDoc {
    name: "podscope.sched.runqueue.latency",
    probe: "sched",
    kind: MetricKind::Distribution,
    unit: "ns",
    description: "Time threads waited runnable for a CPU (wakeup or preemption → switched in)",
    attributes: &[],
};
pub const CONTEXT_SWITCHES: MetricDoc = MetricDoc {
    name: "podscope.sched.context_switches",
    probe: "sched",
    kind: MetricKind::Counter,
    unit: "{switch}",
    description: "Context switches away from the cgroup's threads, voluntary (blocked) or involuntary (preempted)",
    attributes: &["podscope.sched.switch"],
};
pub const BLOCK_LATENCY: MetricDoc = MetricDoc {
    name: "podscope.block.latency",
    probe: "block_io",
    kind: MetricKind::Distribution,
    unit: "ns",
    description: "Block request latency from issue to completion, by device and operation",
    attributes: &["system.device", "podscope.block.operation"],
};
pub const BLOCK_BYTES: MetricDoc = MetricDoc {
    name: "podscope.block.io",
    probe: "block_io",
    kind: MetricKind::Counter,
    unit: "By",
    description: "Bytes completed by block requests, by device and operation",
    attributes: &["system.device", "podscope.block.operation"],
};

const TCP_ATTRIBUTES: &[&str] = &[
    "network.transport",
    "network.type",
    "network.peer.address",
    "server.port",
    "network.peer.port",
    "network.local.port",
    "podscope.tcp.role",
];

pub const TCP_OPENED: MetricDoc = MetricDoc {
    name: "podscope.tcp.connections.opened",
    probe: "tcp",
    kind: MetricKind::Counter,
    unit: "{connection}",
    description: "TCP connections established, as client (connect) or server (accept), by peer",
    attributes: TCP_ATTRIBUTES,
};
pub const TCP_CLOSED: MetricDoc = MetricDoc {
    name: "podscope.tcp.connections.closed",
    probe: "tcp",
    kind: MetricKind::Counter,
    unit: "{connection}",
    description: "Established TCP connections that closed, by peer",
    attributes: TCP_ATTRIBUTES,
};
pub const TCP_FAILED: MetricDoc = MetricDoc {
    name: "podscope.tcp.connections.failed",
    probe: "tcp",
    kind: MetricKind::Counter,
    unit: "{connection}",
    description:
        "Connection attempts that failed, by peer and reason (refused, timeout, reset, other)",
    attributes: &[
        "network.transport",
        "network.type",
        "network.peer.address",
        "server.port",
        "network.peer.port",
        "podscope.tcp.role",
        "error.type",
    ],
};
pub const TCP_IO: MetricDoc = MetricDoc {
    name: "podscope.tcp.io",
    probe: "tcp",
    kind: MetricKind::Counter,
    unit: "By",
    description: "Bytes sent (acknowledged by the peer) and received on connections that closed",
    attributes: &[
        "network.transport",
        "network.type",
        "network.peer.address",
        "server.port",
        "network.peer.port",
        "network.local.port",
        "podscope.tcp.role",
        "network.io.direction",
    ],
};
pub const TCP_RETRANSMITS: MetricDoc = MetricDoc {
    name: "podscope.tcp.retransmits",
    probe: "tcp",
    kind: MetricKind::Counter,
    unit: "{segment}",
    description: "TCP segments retransmitted, by peer",
    attributes: TCP_ATTRIBUTES,
};
pub const TCP_DURATION: MetricDoc = MetricDoc {
    name: "podscope.tcp.connection.duration",
    probe: "tcp",
    kind: MetricKind::Distribution,
    unit: "ns",
    description: "Lifetime of TCP connections from established to closed, by peer",
    attributes: TCP_ATTRIBUTES,
};
pub const TCP_RTT: MetricDoc = MetricDoc {
    name: "podscope.tcp.rtt",
    probe: "tcp",
    kind: MetricKind::Distribution,
    unit: "ns",
    description: "Smoothed round-trip time of TCP connections when they closed, by peer",
    attributes: TCP_ATTRIBUTES,
};
pub const TCP_RTT_OPEN: MetricDoc = MetricDoc {
    name: "podscope.tcp.rtt.open",
    probe: "tcp",
    kind: MetricKind::SampledDistribution,
    unit: "ns",
    description: "Smoothed round-trip time of open TCP connections, one sample per connection at each collection, by peer",
    attributes: TCP_ATTRIBUTES,
};

pub const ALL: &[MetricDoc] = &[
    EXECS,
    FORKS,
    EXITS,
    LIFETIME,
    SYSCALLS,
    SYSCALL_ERRORS,
    SYSCALL_LATENCY,
    OPENS,
    OPEN_ERRORS,
    PATH_OPENS,
    RUNQ_LATENCY,
    CONTEXT_SWITCHES,
    BLOCK_LATENCY,
    BLOCK_BYTES,
    TCP_OPENED,
    TCP_CLOSED,
    TCP_FAILED,
    TCP_IO,
    TCP_RETRANSMITS,
    TCP_DURATION,
    TCP_RTT,
    TCP_RTT_OPEN,
];

/// The metrics table of `docs/metrics.md`.
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| metric | probe | type | unit | attributes | description |\n|---|---|---|---|---|---|\n",
    );
    for m in ALL {
        let attributes = if m.attributes.is_empty() {
            "—".to_string()
        } else {
            m.attributes
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | `{}` | {} | {} |\n",
            m.name,
            m.probe,
            m.kind.as_str(),
            m.unit,
            attributes,
            m.description
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    /// `docs/metrics.md` holds the table between markers; `UPDATE_DOCS=1 cargo test` rewrites it.
    #[test]
    fn docs_metrics_md_lists_every_metric() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
        let text = std::fs::read_to_string(&path).unwrap();
        let (begin, end) = (
            "<!-- metrics-table:begin -->\n",
            "<!-- metrics-table:end -->",
        );
        let start = text.find(begin).expect("begin marker") + begin.len();
        let stop = text.find(end).expect("end marker");
        let table = super::markdown_table();
        if std::env::var_os("UPDATE_DOCS").is_some() {
            let updated = format!("{}{}{}", &text[..start], table, &text[stop..]);
            std::fs::write(&path, updated).unwrap();
            return;
        }
        assert_eq!(&text[start..stop], table, "docs/metrics.md is stale: run UPDATE_DOCS=1 cargo test -p podscope-receiver docs_metrics");
    }
}
