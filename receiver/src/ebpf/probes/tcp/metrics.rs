//! The tcp probe's metrics and how its map entries become data points: counters per cgroup and
//! peer (the kernel keeps at most `max_peers` peers per cgroup and counts the rest, and whatever a
//! full map refused, as peer `other`), distributions per cgroup, role and server port.

use std::net::{Ipv4Addr, Ipv6Addr};

use opentelemetry_proto::tonic::common::v1::KeyValue;
use podscope_ebpf::abi::{
    Hist, TcpCounts, TcpDistKey, TcpDists, TcpKey, TcpOtherKey, TCP_ROLE_CLIENT, TCP_ROLE_SERVER,
};

use crate::ebpf::builder::{int_attr, string_attr, MetricsBuilder, Owner};
use crate::ebpf::catalog::{MetricDoc, MetricKind};

const PEER_ATTRIBUTES: &[&str] = &[
    "network.transport",
    "network.type",
    "network.peer.address",
    "server.port",
    "network.peer.port",
    "network.local.port",
    "podscope.tcp.role",
];

/// Distributions are per role and server port, not per peer.
const DISTRIBUTION_ATTRIBUTES: &[&str] = &[
    "network.transport",
    "server.port",
    "network.peer.port",
    "network.local.port",
    "podscope.tcp.role",
];

/// Durations are per role and server port too, and say how many connections they sample.
const DURATION_ATTRIBUTES: &[&str] = &[
    "network.transport",
    "server.port",
    "network.peer.port",
    "network.local.port",
    "podscope.tcp.role",
    "podscope.sampling.one_in",
];

pub const TCP_OPENED: MetricDoc = MetricDoc {
    name: "podscope.tcp.connections.opened",
    kind: MetricKind::Counter,
    unit: "{connection}",
    description: "TCP connections established, as client (connect) or server (accept), by peer; those open when the probe loaded count once",
    attributes: PEER_ATTRIBUTES,
};
pub const TCP_CLOSED: MetricDoc = MetricDoc {
    name: "podscope.tcp.connections.closed",
    kind: MetricKind::Counter,
    unit: "{connection}",
    description: "Established TCP connections that closed (also those open before the probe loaded), by peer",
    attributes: PEER_ATTRIBUTES,
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
    attributes: PEER_ATTRIBUTES,
};
pub const TCP_DURATION: MetricDoc = MetricDoc {
    name: "podscope.tcp.connection.duration",
    kind: MetricKind::Distribution,
    unit: "ns",
    description: "Lifetime of TCP connections from established to closed, by role and server port, of one connection in `podscope.sampling.one_in` (`duration_sample_one_in`, default 16)",
    attributes: DURATION_ATTRIBUTES,
};
pub const TCP_RTT: MetricDoc = MetricDoc {
    name: "podscope.tcp.rtt",
    kind: MetricKind::Distribution,
    unit: "ns",
    description:
        "Smoothed round-trip time of TCP connections when they closed, by role and server port",
    attributes: DISTRIBUTION_ATTRIBUTES,
};
pub const TCP_RTT_OPEN: MetricDoc = MetricDoc {
    name: "podscope.tcp.rtt.open",
    kind: MetricKind::SampledDistribution,
    unit: "ns",
    description: "Smoothed round-trip time of open TCP connections, one sample per connection at each collection, by role and server port",
    attributes: DISTRIBUTION_ATTRIBUTES,
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

const AF_INET6: u8 = 10;

/// The peer a counter series is about: an address (and the server port, when the role is
/// known), or its cgroup's `other` entry.
pub struct Peer {
    pub cgroup_id: u64,
    /// `None`: the cgroup's peers beyond `max_peers`, and whatever a full map refused.
    pub address: Option<String>,
    pub ipv6: bool,
    pub server_port: u16,
    pub role: u32,
}

impl Peer {
    pub fn of(key: &TcpKey) -> Peer {
        let ipv6 = key.family == AF_INET6;
        let address = if ipv6 {
            Ipv6Addr::from(key.peer).to_string()
        } else {
            Ipv4Addr::new(key.peer[0], key.peer[1], key.peer[2], key.peer[3]).to_string()
        };
        Peer {
            cgroup_id: key.cgroup_id,
            address: Some(address),
            ipv6,
            server_port: key.server_port,
            role: key.role.into(),
        }
    }

    pub fn other(key: &TcpOtherKey) -> Peer {
        Peer {
            cgroup_id: key.cgroup_id,
            address: None,
            ipv6: key.family == AF_INET6,
            server_port: 0,
            role: key.role.into(),
        }
    }

    fn attributes(&self) -> Vec<KeyValue> {
        let mut attributes = vec![
            string_attr("network.transport", "tcp"),
            string_attr("network.type", if self.ipv6 { "ipv6" } else { "ipv4" }),
            string_attr(
                "network.peer.address",
                self.address.as_deref().unwrap_or("other"),
            ),
        ];
        add_role_and_port(&mut attributes, self.role, self.server_port);
        attributes
    }
}

/// `server.port` (when known, 0 otherwise) and its copy on the server's side, then the role.
fn add_role_and_port(attributes: &mut Vec<KeyValue>, role: u32, server_port: u16) {
    if server_port != 0 {
        attributes.push(int_attr("server.port", server_port as i64));
        // The server's port is the local one on the server side and the peer's on the client
        // side; the other end's port is ephemeral and never a label.
        let side = if role == TCP_ROLE_CLIENT {
            "network.peer.port"
        } else {
            "network.local.port"
        };
        attributes.push(int_attr(side, server_port as i64));
    }
    let role = match role {
        TCP_ROLE_CLIENT => "client",
        TCP_ROLE_SERVER => "server",
        _ => "unknown",
    };
    attributes.push(string_attr("podscope.tcp.role", role));
}

/// A distribution series' attributes: no peer, the server port (absent for the connections
/// counted as peer `other`) and the role.
fn distribution_attributes(key: &TcpDistKey) -> Vec<KeyValue> {
    let mut attributes = vec![string_attr("network.transport", "tcp")];
    add_role_and_port(&mut attributes, key.role.into(), key.server_port);
    attributes
}

/// One peer's counters.
pub fn add_counts(b: &mut MetricsBuilder<'_>, peer: &Peer, counts: &TcpCounts) {
    let owner = Owner::Cgroup(peer.cgroup_id);
    let base = || peer.attributes();
    let with = |key: &str, value: &str| {
        let mut attributes = base();
        attributes.push(string_attr(key, value));
        attributes
    };
    if counts.opened > 0 {
        b.count(owner, &TCP_OPENED, base(), counts.opened);
    }
    if counts.closed > 0 {
        b.count(owner, &TCP_CLOSED, base(), counts.closed);
        b.count(
            owner,
            &TCP_IO,
            with("network.io.direction", "transmit"),
            counts.bytes_sent,
        );
        b.count(
            owner,
            &TCP_IO,
            with("network.io.direction", "receive"),
            counts.bytes_received,
        );
    }
    for (reason, count) in [
        ("refused", counts.failed_refused),
        ("timeout", counts.failed_timeout),
        ("reset", counts.failed_reset),
        ("other", counts.failed_other),
    ] {
        if count > 0 {
            b.count(owner, &TCP_FAILED, with("error.type", reason), count);
        }
    }
    if counts.retransmits > 0 {
        b.count(owner, &TCP_RETRANSMITS, base(), counts.retransmits);
    }
}

/// Durations (of the connections sampled, one in `duration_sample_one_in`) and RTTs at close
/// (of every connection) of one (cgroup, role, server port).
pub fn add_dists(
    b: &mut MetricsBuilder<'_>,
    key: &TcpDistKey,
    dists: &TcpDists,
    duration_sample_one_in: u32,
) {
    let owner = Owner::Cgroup(key.cgroup_id);
    if dists.duration_ns.count() > 0 {
        let mut attributes = distribution_attributes(key);
        attributes.push(int_attr(
            "podscope.sampling.one_in",
            duration_sample_one_in.into(),
        ));
        b.distribution(owner, &TCP_DURATION, attributes, &dists.duration_ns);
    }
    if dists.srtt_ns.count() == 0 {
        return;
    }
    b.distribution(
        owner,
        &TCP_RTT,
        distribution_attributes(key),
        &dists.srtt_ns,
    );
}

/// RTT samples of the open connections of one (cgroup, role, server port).
pub fn add_open_rtt(b: &mut MetricsBuilder<'_>, key: &TcpDistKey, hist: &Hist) {
    b.distribution(
        Owner::Cgroup(key.cgroup_id),
        &TCP_RTT_OPEN,
        distribution_attributes(key),
        hist,
    );
}
