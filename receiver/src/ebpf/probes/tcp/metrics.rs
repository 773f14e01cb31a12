//! The tcp probe's metrics and how its map entries become data points: per cgroup and peer, at
//! most `max_peers` peers per cgroup, the rest summed as peer `other`.

use std::collections::{BTreeMap, HashMap, HashSet};

use opentelemetry_proto::tonic::common::v1::KeyValue;
use podscope_ebpf::abi::{Hist, TcpKey, TcpStats, TCP_ROLE_CLIENT, TCP_ROLE_SERVER};

use crate::ebpf::builder::{int_attr, string_attr, MetricsBuilder, Owner};
use crate::ebpf::catalog::{MetricDoc, MetricKind};

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
    kind: MetricKind::Counter,
    unit: "{connection}",
    description: "TCP connections established, as client (connect) or server (accept), by peer",
    attributes: TCP_ATTRIBUTES,
};
pub const TCP_CLOSED: MetricDoc = MetricDoc {
    name: "podscope.tcp.connections.closed",
    kind: MetricKind::Counter,
    unit: "{connection}",
    description: "Established TCP connections that closed, by peer",
    attributes: TCP_ATTRIBUTES,
};
pub const TCP_FAILED: MetricDoc = MetricDoc {
    name: "podscope.tcp.connections.failed",
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
    kind: MetricKind::Counter,
    unit: "{segment}",
    description: "TCP segments retransmitted, by peer",
    attributes: TCP_ATTRIBUTES,
};
pub const TCP_DURATION: MetricDoc = MetricDoc {
    name: "podscope.tcp.connection.duration",
    kind: MetricKind::Distribution,
    unit: "ns",
    description: "Lifetime of TCP connections from established to closed, by peer",
    attributes: TCP_ATTRIBUTES,
};
pub const TCP_RTT: MetricDoc = MetricDoc {
    name: "podscope.tcp.rtt",
    kind: MetricKind::Distribution,
    unit: "ns",
    description: "Smoothed round-trip time of TCP connections when they closed, by peer",
    attributes: TCP_ATTRIBUTES,
};
pub const TCP_RTT_OPEN: MetricDoc = MetricDoc {
    name: "podscope.tcp.rtt.open",
    kind: MetricKind::SampledDistribution,
    unit: "ns",
    description: "Smoothed round-trip time of open TCP connections, one sample per connection at each collection, by peer",
    attributes: TCP_ATTRIBUTES,
};

pub const METRICS: &[MetricDoc] = &[
    TCP_OPENED,
    TCP_CLOSED,
    TCP_FAILED,
    TCP_IO,
    TCP_RETRANSMITS,
    TCP_DURATION,
    TCP_RTT,
    TCP_RTT_OPEN,
];

/// A TCP peer as its label reads: the address, or `other` for peers beyond the cap.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TcpSeries {
    pub cgroup_id: u64,
    pub peer: String,
    pub server_port: u16,
    pub ipv6: bool,
    pub role: u8,
}

pub fn peer_address(key: &TcpKey) -> String {
    if key.family == 10 {
        std::net::Ipv6Addr::from(key.peer).to_string()
    } else {
        std::net::Ipv4Addr::new(key.peer[0], key.peer[1], key.peer[2], key.peer[3]).to_string()
    }
}

/// Folds the kernel's per-peer stats into series, keeping at most `max_peers` (sticky: the first
/// seen) per cgroup and summing the rest as peer `other`.
pub fn tcp_series<V: Default + Merge>(
    stats: &HashMap<TcpKey, V>,
    known: &mut BTreeMap<u64, HashSet<(String, u16, u8, bool)>>,
    max_peers: usize,
) -> BTreeMap<TcpSeries, V> {
    let mut keys: Vec<_> = stats.keys().collect();
    keys.sort_by_key(|k| (k.cgroup_id, k.peer, k.server_port, k.role, k.family));
    let mut out: BTreeMap<TcpSeries, V> = BTreeMap::new();
    for key in keys {
        let address = peer_address(key);
        let ipv6 = key.family == 10;
        let seen = known.entry(key.cgroup_id).or_default();
        let identity = (address.clone(), key.server_port, key.role, ipv6);
        let keep = seen.contains(&identity) || seen.len() < max_peers;
        if keep {
            seen.insert(identity);
        }
        let series = TcpSeries {
            cgroup_id: key.cgroup_id,
            peer: if keep { address } else { "other".to_string() },
            server_port: if keep { key.server_port } else { 0 },
            ipv6,
            role: key.role,
        };
        out.entry(series).or_default().merge_from(&stats[key]);
    }
    out
}

/// Values that fold into one series (several peers into `other`).
pub trait Merge {
    fn merge_from(&mut self, other: &Self);
}

impl Merge for TcpStats {
    fn merge_from(&mut self, other: &Self) {
        self.merge(other);
    }
}

impl Merge for Hist {
    fn merge_from(&mut self, other: &Self) {
        self.merge(other);
    }
}

/// The attributes every TCP series has: transport, address family, peer, server port (when the
/// role is known), role.
fn tcp_attributes(s: &TcpSeries) -> Vec<KeyValue> {
    let mut attributes = vec![
        string_attr("network.transport", "tcp"),
        string_attr("network.type", if s.ipv6 { "ipv6" } else { "ipv4" }),
        string_attr("network.peer.address", &s.peer),
    ];
    let role = u32::from(s.role);
    if s.server_port != 0 {
        attributes.push(int_attr("server.port", s.server_port as i64));
        // The server's port is the local one on the server side and the peer's on the client
        // side; the other end's port is ephemeral and never a label.
        let side = if role == TCP_ROLE_CLIENT {
            "network.peer.port"
        } else {
            "network.local.port"
        };
        attributes.push(int_attr(side, s.server_port as i64));
    }
    attributes.push(string_attr("podscope.tcp.role", role_name(role)));
    attributes
}

fn role_name(role: u32) -> &'static str {
    match role {
        TCP_ROLE_CLIENT => "client",
        TCP_ROLE_SERVER => "server",
        _ => "unknown",
    }
}

/// RTT samples of open connections, one distribution per series.
pub fn add_tcp_open_rtt(b: &mut MetricsBuilder<'_>, series: &BTreeMap<TcpSeries, Hist>) {
    for (s, hist) in series {
        b.distribution(
            Owner::Cgroup(s.cgroup_id),
            &TCP_RTT_OPEN,
            tcp_attributes(s),
            hist,
        );
    }
}

pub fn add_tcp(b: &mut MetricsBuilder<'_>, series: &BTreeMap<TcpSeries, TcpStats>) {
    for (s, stats) in series {
        let owner = Owner::Cgroup(s.cgroup_id);
        let base = || tcp_attributes(s);
        let with = |key: &str, value: &str| {
            let mut attributes = base();
            attributes.push(string_attr(key, value));
            attributes
        };
        if stats.opened > 0 {
            b.count(owner, &TCP_OPENED, base(), stats.opened);
        }
        if stats.closed > 0 {
            b.count(owner, &TCP_CLOSED, base(), stats.closed);
            b.count(
                owner,
                &TCP_IO,
                with("network.io.direction", "transmit"),
                stats.bytes_sent,
            );
            b.count(
                owner,
                &TCP_IO,
                with("network.io.direction", "receive"),
                stats.bytes_received,
            );
            b.distribution(owner, &TCP_DURATION, base(), &stats.duration_ns);
            b.distribution(owner, &TCP_RTT, base(), &stats.srtt_ns);
        }
        for (reason, count) in [
            ("refused", stats.failed_refused),
            ("timeout", stats.failed_timeout),
            ("reset", stats.failed_reset),
            ("other", stats.failed_other),
        ] {
            if count > 0 {
                b.count(owner, &TCP_FAILED, with("error.type", reason), count);
            }
        }
        if stats.retransmits > 0 {
            b.count(owner, &TCP_RETRANSMITS, base(), stats.retransmits);
        }
    }
}
