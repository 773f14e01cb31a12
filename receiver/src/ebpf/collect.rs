//! Reading the probes' maps into OTLP metrics: one `ResourceMetrics` per cgroup (and one for the
//! host, for per-device data), cumulative sums and exponential histograms with the receiver's
//! start time as every series' start time (the maps count from the moment they were created).

use std::collections::{BTreeMap, HashMap, HashSet};

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, ExponentialHistogram, Metric,
    NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use podscope_ebpf::abi::{
    BlockKey, BlockStats, Hist, OpenKey, OpenPathKey, ProcessKey, SwitchKey, SyscallCounts,
    SyscallKey, BLOCK_DISCARD, BLOCK_FLUSH, BLOCK_READ, BLOCK_WRITE, PROCESS_EXEC, PROCESS_EXIT,
    PROCESS_FORK, SWITCH_VOLUNTARY,
};

use super::catalog::{self, MetricDoc, MetricKind};
use super::cgroups::{container_id, CgroupIndex};
use super::histogram::exponential_point;

pub fn string_attr(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        key_strindex: 0,
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
    }
}

pub fn int_attr(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        key_strindex: 0,
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
    }
}

/// Where data points belong: a cgroup, or the host itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    Cgroup(u64),
    Host,
}

/// Collects data points and groups them into resources and metrics.
pub struct MetricsBuilder<'a> {
    host_name: &'a str,
    index: &'a CgroupIndex,
    start_ns: u64,
    now_ns: u64,
    metrics: BTreeMap<Owner, BTreeMap<String, Metric>>,
}

impl<'a> MetricsBuilder<'a> {
    pub fn new(host_name: &'a str, index: &'a CgroupIndex, start_ns: u64, now_ns: u64) -> Self {
        MetricsBuilder {
            host_name,
            index,
            start_ns,
            now_ns,
            metrics: BTreeMap::new(),
        }
    }

    fn metric(&mut self, owner: Owner, doc: &MetricDoc) -> &mut Metric {
        self.metric_named(owner, doc.name, doc.description, doc.unit, doc.kind)
    }

    fn metric_named(
        &mut self,
        owner: Owner,
        name: &str,
        description: &str,
        unit: &str,
        kind: MetricKind,
    ) -> &mut Metric {
        self.metrics
            .entry(owner)
            .or_default()
            .entry(name.to_string())
            .or_insert_with(|| Metric {
                name: name.to_string(),
                description: description.to_string(),
                unit: unit.to_string(),
                data: Some(match kind {
                    MetricKind::Counter | MetricKind::DeltaCounter => metric::Data::Sum(Sum {
                        data_points: Vec::new(),
                        aggregation_temporality: if kind == MetricKind::Counter {
                            AggregationTemporality::Cumulative as i32
                        } else {
                            AggregationTemporality::Delta as i32
                        },
                        is_monotonic: true,
                    }),
                    MetricKind::Distribution => {
                        metric::Data::ExponentialHistogram(ExponentialHistogram {
                            data_points: Vec::new(),
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        })
                    }
                    MetricKind::SampledDistribution => {
                        metric::Data::ExponentialHistogram(ExponentialHistogram {
                            data_points: Vec::new(),
                            aggregation_temporality: AggregationTemporality::Delta as i32,
                        })
                    }
                }),
                ..Default::default()
            })
    }

    /// A cumulative counter whose name comes from configuration (uprobes).
    pub fn count_named(
        &mut self,
        owner: Owner,
        name: &str,
        description: &str,
        unit: &str,
        attributes: Vec<KeyValue>,
        value: u64,
    ) {
        let (start, now) = (self.start_ns, self.now_ns);
        if let Some(metric::Data::Sum(sum)) = &mut self
            .metric_named(owner, name, description, unit, MetricKind::Counter)
            .data
        {
            sum.data_points.push(NumberDataPoint {
                attributes,
                start_time_unix_nano: start,
                time_unix_nano: now,
                value: Some(number_data_point::Value::AsInt(value as i64)),
                ..Default::default()
            });
        }
    }

    pub fn count(&mut self, owner: Owner, doc: &MetricDoc, attributes: Vec<KeyValue>, value: u64) {
        let start = self.start_ns;
        let now = self.now_ns;
        if let Some(metric::Data::Sum(sum)) = &mut self.metric(owner, doc).data {
            sum.data_points.push(NumberDataPoint {
                attributes,
                start_time_unix_nano: start,
                time_unix_nano: now,
                value: Some(number_data_point::Value::AsInt(value as i64)),
                ..Default::default()
            });
        }
    }

    pub fn distribution(
        &mut self,
        owner: Owner,
        doc: &MetricDoc,
        attributes: Vec<KeyValue>,
        hist: &Hist,
    ) {
        let start = self.start_ns;
        let now = self.now_ns;
        if let Some(metric::Data::ExponentialHistogram(h)) = &mut self.metric(owner, doc).data {
            let mut point = exponential_point(hist);
            point.attributes = attributes;
            point.start_time_unix_nano = start;
            point.time_unix_nano = now;
            h.data_points.push(point);
        }
    }

    fn resource(&self, owner: Owner) -> Resource {
        let mut attributes = vec![string_attr("host.name", self.host_name)];
        if let Owner::Cgroup(id) = owner {
            attributes.push(int_attr("podscope.cgroup.id", id as i64));
            if let Some(path) = self.index.path(id) {
                attributes.push(string_attr("podscope.cgroup.path", path));
                if let Some(container) = container_id(path) {
                    attributes.push(string_attr("container.id", &container));
                }
            }
        }
        Resource {
            attributes,
            ..Default::default()
        }
    }

    pub fn finish(self) -> Vec<ResourceMetrics> {
        let scope = InstrumentationScope {
            name: "podscope.receiver.ebpf".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        };
        self.metrics
            .iter()
            .map(|(owner, metrics)| ResourceMetrics {
                resource: Some(self.resource(*owner)),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(scope.clone()),
                    metrics: metrics.values().cloned().collect(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect()
    }
}

pub fn syscall_name(nr: u32) -> String {
    syscalls::Sysno::new(nr as usize)
        .map(|s| s.name().to_string())
        .unwrap_or_else(|| format!("syscall_{nr}"))
}

pub fn errno_name(errno: u32) -> String {
    syscalls::Errno::new(errno as i32)
        .name()
        .map(str::to_string)
        .unwrap_or_else(|| format!("errno_{errno}"))
}

pub fn add_process(
    b: &mut MetricsBuilder<'_>,
    counts: &HashMap<ProcessKey, u64>,
    lifetimes: &HashMap<u64, Hist>,
) {
    for (key, &count) in counts {
        let owner = Owner::Cgroup(key.cgroup_id);
        match key.kind {
            PROCESS_EXEC => b.count(owner, &catalog::EXECS, vec![], count),
            PROCESS_FORK => b.count(owner, &catalog::FORKS, vec![], count),
            PROCESS_EXIT => b.count(
                owner,
                &catalog::EXITS,
                vec![int_attr("process.exit.code", key.exit_code as i64)],
                count,
            ),
            _ => {}
        }
    }
    for (cgroup, hist) in lifetimes {
        b.distribution(Owner::Cgroup(*cgroup), &catalog::LIFETIME, vec![], hist);
    }
}

pub fn add_syscalls(
    b: &mut MetricsBuilder<'_>,
    counts: &HashMap<u64, SyscallCounts>,
    latency: &HashMap<SyscallKey, Hist>,
) {
    for (&cgroup, c) in counts {
        let owner = Owner::Cgroup(cgroup);
        for (nr, (&count, &errors)) in c.count.iter().zip(c.errors.iter()).enumerate() {
            if count == 0 {
                continue;
            }
            let name = syscall_name(nr as u32);
            b.count(
                owner,
                &catalog::SYSCALLS,
                vec![string_attr("syscall.name", &name)],
                count,
            );
            if errors > 0 {
                b.count(
                    owner,
                    &catalog::SYSCALL_ERRORS,
                    vec![string_attr("syscall.name", &name)],
                    errors,
                );
            }
        }
    }
    for (key, hist) in latency {
        if hist.count() > 0 {
            let name = syscall_name(key.nr);
            b.distribution(
                Owner::Cgroup(key.cgroup_id),
                &catalog::SYSCALL_LATENCY,
                vec![string_attr("syscall.name", name)],
                hist,
            );
        }
    }
}

pub fn add_files(b: &mut MetricsBuilder<'_>, opens: &HashMap<OpenKey, u64>) {
    let mut totals: BTreeMap<u64, u64> = BTreeMap::new();
    for (key, &count) in opens {
        *totals.entry(key.cgroup_id).or_default() += count;
        if key.err != 0 {
            b.count(
                Owner::Cgroup(key.cgroup_id),
                &catalog::OPEN_ERRORS,
                vec![string_attr("error.type", errno_name(key.err))],
                count,
            );
        }
    }
    for (cgroup, total) in totals {
        b.count(Owner::Cgroup(cgroup), &catalog::OPENS, vec![], total);
    }
}

/// Opens by path of the last interval: the `top` most opened per cgroup, the rest as `other`.
pub fn add_top_paths(b: &mut MetricsBuilder<'_>, paths: &HashMap<OpenPathKey, u64>, top: usize) {
    let mut per_cgroup: BTreeMap<u64, Vec<(String, u64)>> = BTreeMap::new();
    for (key, &count) in paths {
        let end = key
            .path
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(key.path.len());
        let path = String::from_utf8_lossy(&key.path[..end]).into_owned();
        per_cgroup
            .entry(key.cgroup_id)
            .or_default()
            .push((path, count));
    }
    for (cgroup, mut list) in per_cgroup {
        list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let other: u64 = list.iter().skip(top).map(|(_, c)| c).sum();
        for (path, count) in list.into_iter().take(top) {
            b.count(
                Owner::Cgroup(cgroup),
                &catalog::PATH_OPENS,
                vec![string_attr("file.path", path)],
                count,
            );
        }
        if other > 0 {
            b.count(
                Owner::Cgroup(cgroup),
                &catalog::PATH_OPENS,
                vec![string_attr("file.path", "other")],
                other,
            );
        }
    }
}

pub fn add_sched(
    b: &mut MetricsBuilder<'_>,
    runq: &HashMap<u64, Hist>,
    switches: &HashMap<SwitchKey, u64>,
) {
    for (cgroup, hist) in runq {
        b.distribution(Owner::Cgroup(*cgroup), &catalog::RUNQ_LATENCY, vec![], hist);
    }
    for (key, &count) in switches {
        let kind = if key.kind == SWITCH_VOLUNTARY {
            "voluntary"
        } else {
            "involuntary"
        };
        b.count(
            Owner::Cgroup(key.cgroup_id),
            &catalog::CONTEXT_SWITCHES,
            vec![string_attr("podscope.sched.switch", kind)],
            count,
        );
    }
}

pub fn block_operation(op: u32) -> &'static str {
    match op {
        BLOCK_READ => "read",
        BLOCK_WRITE => "write",
        BLOCK_FLUSH => "flush",
        BLOCK_DISCARD => "discard",
        _ => "other",
    }
}

/// The device name for a kernel dev_t (major << 20 | minor), from sysfs; `major:minor` if unknown.
pub fn device_name(dev: u32) -> String {
    let (major, minor) = (dev >> 20, dev & 0xfffff);
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))
        .ok()
        .and_then(|uevent| {
            uevent
                .lines()
                .find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_string))
        })
        .unwrap_or_else(|| format!("{major}:{minor}"))
}

pub fn add_block(b: &mut MetricsBuilder<'_>, stats: &HashMap<BlockKey, BlockStats>) {
    for (key, s) in stats {
        let attributes = vec![
            string_attr("system.device", device_name(key.dev)),
            string_attr("podscope.block.operation", block_operation(key.op)),
        ];
        b.count(
            Owner::Host,
            &catalog::BLOCK_BYTES,
            attributes.clone(),
            s.bytes,
        );
        b.distribution(
            Owner::Host,
            &catalog::BLOCK_LATENCY,
            attributes,
            &s.latency_ns,
        );
    }
}

/// Cgroup ids in `ids` that the index does not know (after a refresh): removed cgroups.
pub fn gone(ids: impl IntoIterator<Item = u64>, index: &CgroupIndex) -> HashSet<u64> {
    ids.into_iter()
        .filter(|id| index.path(*id).is_none())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_syscall_and_errno_tables() {
        assert_eq!(syscall_name(syscalls::Sysno::openat.id() as u32), "openat");
        assert_eq!(syscall_name(100_000), "syscall_100000");
        assert_eq!(errno_name(2), "ENOENT");
        assert_eq!(errno_name(13), "EACCES");
    }

    #[test]
    fn top_paths_keep_the_most_opened_and_sum_the_rest() {
        let key = |path: &str| {
            let mut k = OpenPathKey {
                cgroup_id: 9,
                path: [0; podscope_ebpf::abi::PATH_LEN],
            };
            k.path[..path.len()].copy_from_slice(path.as_bytes());
            k
        };
        let paths: HashMap<_, _> = [
            (key("/a"), 5),
            (key("/b"), 9),
            (key("/c"), 1),
            (key("/d"), 2),
        ]
        .into_iter()
        .collect();
        let index = CgroupIndex::default();
        let mut b = MetricsBuilder::new("h", &index, 1, 2);
        add_top_paths(&mut b, &paths, 2);
        let rms = b.finish();
        let Some(metric::Data::Sum(sum)) = &rms[0].scope_metrics[0].metrics[0].data else {
            panic!()
        };
        let got: Vec<(String, i64)> = sum
            .data_points
            .iter()
            .map(|p| {
                let Some(any_value::Value::StringValue(path)) =
                    p.attributes[0].value.clone().unwrap().value
                else {
                    panic!()
                };
                let Some(number_data_point::Value::AsInt(v)) = p.value else {
                    panic!()
                };
                (path, v)
            })
            .collect();
        assert_eq!(
            got,
            vec![("/b".into(), 9), ("/a".into(), 5), ("other".into(), 3)]
        );
        assert_eq!(
            sum.aggregation_temporality,
            AggregationTemporality::Delta as i32
        );
    }
}

/// A TCP peer as its label reads: the address, or `other` for peers beyond the cap.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TcpSeries {
    pub cgroup_id: u64,
    pub peer: String,
    pub server_port: u16,
    pub ipv6: bool,
    pub role: u8,
}

pub fn peer_address(key: &podscope_ebpf::abi::TcpKey) -> String {
    if key.family == 10 {
        std::net::Ipv6Addr::from(key.peer).to_string()
    } else {
        std::net::Ipv4Addr::new(key.peer[0], key.peer[1], key.peer[2], key.peer[3]).to_string()
    }
}

/// Folds the kernel's per-peer stats into series, keeping at most `max_peers` (sticky: the first
/// seen) per cgroup and summing the rest as peer `other`.
pub fn tcp_series<V: Default + Merge>(
    stats: &HashMap<podscope_ebpf::abi::TcpKey, V>,
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

impl Merge for podscope_ebpf::abi::TcpStats {
    fn merge_from(&mut self, other: &Self) {
        self.merge(other);
    }
}

impl Merge for Hist {
    fn merge_from(&mut self, other: &Self) {
        self.merge(other);
    }
}

/// The attributes every TCP series has: transport, address family, peer, server port, role.
fn tcp_attributes(s: &TcpSeries) -> Vec<KeyValue> {
    let mut attributes = vec![
        string_attr("network.transport", "tcp"),
        string_attr("network.type", if s.ipv6 { "ipv6" } else { "ipv4" }),
        string_attr("network.peer.address", &s.peer),
    ];
    let server = s.role != podscope_ebpf::abi::TCP_ROLE_CLIENT;
    if s.server_port != 0 {
        attributes.push(int_attr("server.port", s.server_port as i64));
        // The server's port is the local one on the server side and the peer's on the client
        // side; the other end's port is ephemeral and never a label.
        let side = if server {
            "network.local.port"
        } else {
            "network.peer.port"
        };
        attributes.push(int_attr(side, s.server_port as i64));
    }
    attributes.push(string_attr(
        "podscope.tcp.role",
        if s.role == podscope_ebpf::abi::TCP_ROLE_CLIENT {
            "client"
        } else {
            "server"
        },
    ));
    attributes
}

/// RTT samples of open connections, one distribution per series.
pub fn add_tcp_open_rtt(b: &mut MetricsBuilder<'_>, series: &BTreeMap<TcpSeries, Hist>) {
    for (s, hist) in series {
        b.distribution(
            Owner::Cgroup(s.cgroup_id),
            &catalog::TCP_RTT_OPEN,
            tcp_attributes(s),
            hist,
        );
    }
}

pub fn add_tcp(
    b: &mut MetricsBuilder<'_>,
    series: &BTreeMap<TcpSeries, podscope_ebpf::abi::TcpStats>,
) {
    for (s, stats) in series {
        let owner = Owner::Cgroup(s.cgroup_id);
        let base = || tcp_attributes(s);
        let with = |key: &str, value: &str| {
            let mut attributes = base();
            attributes.push(string_attr(key, value));
            attributes
        };
        if stats.opened > 0 {
            b.count(owner, &catalog::TCP_OPENED, base(), stats.opened);
        }
        if stats.closed > 0 {
            b.count(owner, &catalog::TCP_CLOSED, base(), stats.closed);
            b.count(
                owner,
                &catalog::TCP_IO,
                with("network.io.direction", "transmit"),
                stats.bytes_sent,
            );
            b.count(
                owner,
                &catalog::TCP_IO,
                with("network.io.direction", "receive"),
                stats.bytes_received,
            );
            b.distribution(owner, &catalog::TCP_DURATION, base(), &stats.duration_ns);
            b.distribution(owner, &catalog::TCP_RTT, base(), &stats.srtt_ns);
        }
        for (reason, count) in [
            ("refused", stats.failed_refused),
            ("timeout", stats.failed_timeout),
            ("reset", stats.failed_reset),
            ("other", stats.failed_other),
        ] {
            if count > 0 {
                b.count(
                    owner,
                    &catalog::TCP_FAILED,
                    with("error.type", reason),
                    count,
                );
            }
        }
        if stats.retransmits > 0 {
            b.count(owner, &catalog::TCP_RETRANSMITS, base(), stats.retransmits);
        }
    }
}
