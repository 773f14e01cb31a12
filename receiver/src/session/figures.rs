//! The kernel columns of `top`: after each collection an eBPF receiver naming this extension
//! (`session:`) hands it its per-cgroup figures — cumulative counters and histogram buckets, read
//! from the data points it just built — and `top` turns the last two collections into rates and
//! quantiles.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, ExponentialHistogramDataPoint, ResourceMetrics,
};
use podscope_core::session::KernelColumns;

/// The data points each column is read from.
const RUNQ_LATENCY_NS: &str = "podscope.sched.runqueue.latency";
const SYSCALLS: &str = "podscope.syscalls";
const OPENS: &str = "podscope.files.opens";
const TCP_RETRANSMITS: &str = "podscope.tcp.retransmits";
const HTTP_SERVER_DURATION_S: &str = "http.server.request.duration";

/// An exponential histogram (OTLP's: bucket `i` at scale `s` holds values in
/// `(2^(i·2^-s), 2^((i+1)·2^-s)]`), merged at the coarsest scale of what it was made of.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Distribution {
    /// `None` until a data point is added.
    scale: Option<i32>,
    zero_count: u64,
    buckets: BTreeMap<i32, u64>,
}

impl Distribution {
    pub fn add_point(&mut self, point: &ExponentialHistogramDataPoint) {
        let mut other = Distribution {
            scale: Some(point.scale),
            zero_count: point.zero_count,
            buckets: BTreeMap::new(),
        };
        if let Some(positive) = &point.positive {
            for (i, &count) in positive.bucket_counts.iter().enumerate() {
                if count != 0 {
                    *other
                        .buckets
                        .entry(positive.offset.saturating_add(i as i32))
                        .or_default() += count;
                }
            }
        }
        self.merge(&other);
    }

    pub fn merge(&mut self, other: &Distribution) {
        let Some(other_scale) = other.scale else {
            return;
        };
        let scale = self.scale.map_or(other_scale, |s| s.min(other_scale));
        self.downscale(scale);
        self.scale = Some(scale);
        let other = other.downscaled(scale);
        self.zero_count += other.zero_count;
        for (index, count) in other.buckets {
            *self.buckets.entry(index).or_default() += count;
        }
    }

    /// What was added between `earlier` and `self` (both cumulative). A count that went down
    /// means the series restarted (its map entries were freed): then all of `self` is new.
    pub fn since(&self, earlier: &Distribution) -> Distribution {
        let Some(scale) = self.scale else {
            return Distribution::default();
        };
        let scale = earlier.scale.map_or(scale, |s| s.min(scale));
        let later = self.downscaled(scale);
        let earlier = earlier.downscaled(scale);
        let restarted = earlier.zero_count > later.zero_count
            || earlier
                .buckets
                .iter()
                .any(|(index, &count)| later.buckets.get(index).copied().unwrap_or(0) < count);
        if restarted {
            return later;
        }
        Distribution {
            scale: Some(scale),
            zero_count: later.zero_count - earlier.zero_count,
            buckets: later
                .buckets
                .iter()
                .map(|(index, &count)| (*index, count - earlier.buckets.get(index).unwrap_or(&0)))
                .filter(|(_, count)| *count != 0)
                .collect(),
        }
    }

    pub fn count(&self) -> u64 {
        self.zero_count + self.buckets.values().sum::<u64>()
    }

    /// The `q` quantile, interpolated linearly inside its bucket as Prometheus'
    /// `histogram_quantile` does for classic buckets (values in the zero bucket are 0);
    /// `None` without values.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let scale = self.scale?;
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        if rank <= self.zero_count as f64 {
            return Some(0.0);
        }
        let mut below = self.zero_count as f64;
        let mut last_upper = 0.0;
        for (&index, &count) in &self.buckets {
            let (lower, upper) = bucket_bounds(index, scale);
            last_upper = upper;
            if below + count as f64 >= rank {
                return Some(lower + (upper - lower) * (rank - below) / count as f64);
            }
            below += count as f64;
        }
        Some(last_upper)
    }

    fn downscale(&mut self, scale: i32) {
        *self = self.downscaled(scale);
    }

    fn downscaled(&self, scale: i32) -> Distribution {
        let Some(current) = self.scale else {
            return self.clone();
        };
        if current <= scale {
            return self.clone();
        }
        let shift = (current - scale).min(31) as u32;
        let mut buckets = BTreeMap::new();
        for (&index, &count) in &self.buckets {
            *buckets.entry(index >> shift).or_default() += count;
        }
        Distribution {
            scale: Some(scale),
            zero_count: self.zero_count,
            buckets,
        }
    }
}

fn bucket_bounds(index: i32, scale: i32) -> (f64, f64) {
    let width = 2f64.powi(-scale);
    (
        2f64.powf(index as f64 * width),
        2f64.powf((index as f64 + 1.0) * width),
    )
}

/// One cgroup's cumulative figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupFigures {
    pub runq_latency_ns: Distribution,
    pub syscalls: u64,
    pub opens: u64,
    pub tcp_retransmits: u64,
    pub request_duration_s: Distribution,
}

impl CgroupFigures {
    /// What was added between `earlier` and `self`; a counter that went down restarted.
    pub fn since(&self, earlier: &CgroupFigures) -> CgroupFigures {
        let counter = |later: u64, earlier: u64| later.checked_sub(earlier).unwrap_or(later);
        CgroupFigures {
            runq_latency_ns: self.runq_latency_ns.since(&earlier.runq_latency_ns),
            syscalls: counter(self.syscalls, earlier.syscalls),
            opens: counter(self.opens, earlier.opens),
            tcp_retransmits: counter(self.tcp_retransmits, earlier.tcp_retransmits),
            request_duration_s: self.request_duration_s.since(&earlier.request_duration_s),
        }
    }

    fn add(&mut self, other: &CgroupFigures) {
        self.runq_latency_ns.merge(&other.runq_latency_ns);
        self.syscalls += other.syscalls;
        self.opens += other.opens;
        self.tcp_retransmits += other.tcp_retransmits;
        self.request_duration_s.merge(&other.request_duration_s);
    }
}

/// One collection's figures, by cgroup path (as `podscope.cgroup.path` shows it: from the
/// cgroup2 root, with a leading `/`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub time_unix_nano: u64,
    pub cgroups: HashMap<String, CgroupFigures>,
}

impl Snapshot {
    /// The figures of one collection's data points (resources without a cgroup path are left
    /// out: no row can name them).
    pub fn of(resource_metrics: &[ResourceMetrics], time_unix_nano: u64) -> Snapshot {
        let mut cgroups: HashMap<String, CgroupFigures> = HashMap::new();
        for rm in resource_metrics {
            let Some(path) = rm.resource.as_ref().and_then(|r| {
                r.attributes.iter().find_map(|kv| {
                    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(any_value::Value::StringValue(s))
                            if kv.key == "podscope.cgroup.path" =>
                        {
                            Some(s.clone())
                        }
                        _ => None,
                    }
                })
            }) else {
                continue;
            };
            let figures = cgroups.entry(path).or_default();
            for metric in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
                match (metric.name.as_str(), &metric.data) {
                    (RUNQ_LATENCY_NS, Some(metric::Data::ExponentialHistogram(h))) => {
                        h.data_points
                            .iter()
                            .for_each(|p| figures.runq_latency_ns.add_point(p));
                    }
                    (HTTP_SERVER_DURATION_S, Some(metric::Data::ExponentialHistogram(h))) => {
                        h.data_points
                            .iter()
                            .for_each(|p| figures.request_duration_s.add_point(p));
                    }
                    (SYSCALLS, Some(metric::Data::Sum(s))) => {
                        figures.syscalls += sum_points(&s.data_points)
                    }
                    (OPENS, Some(metric::Data::Sum(s))) => {
                        figures.opens += sum_points(&s.data_points)
                    }
                    (TCP_RETRANSMITS, Some(metric::Data::Sum(s))) => {
                        figures.tcp_retransmits += sum_points(&s.data_points)
                    }
                    _ => {}
                }
            }
        }
        Snapshot {
            time_unix_nano,
            cgroups,
        }
    }
}

fn sum_points(points: &[opentelemetry_proto::tonic::metrics::v1::NumberDataPoint]) -> u64 {
    points
        .iter()
        .map(|p| match p.value {
            Some(number_data_point::Value::AsInt(v)) => v.max(0) as u64,
            Some(number_data_point::Value::AsDouble(v)) if v > 0.0 => v as u64,
            _ => 0,
        })
        .sum()
}

/// Which of the probes behind the kernel columns a receiver has attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbesOn {
    pub sched: bool,
    pub syscalls: bool,
    pub files: bool,
    pub tcp: bool,
    pub http: bool,
}

impl ProbesOn {
    fn any(&self) -> bool {
        self.sched || self.syscalls || self.files || self.tcp || self.http
    }
}

/// A receiver's last two collections.
#[derive(Debug, Clone, Default)]
struct ReceiverFigures {
    probes: ProbesOn,
    previous: Option<Arc<Snapshot>>,
    latest: Option<Arc<Snapshot>>,
}

/// What every receiver naming the extension handed it.
#[derive(Debug, Default)]
pub struct KernelFigures(Mutex<BTreeMap<String, ReceiverFigures>>);

impl KernelFigures {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ReceiverFigures>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Which probes `receiver` attached, at its start: its figures start over.
    pub fn set_probes(&self, receiver: &str, probes: ProbesOn) {
        self.lock().insert(
            receiver.to_string(),
            ReceiverFigures {
                probes,
                ..Default::default()
            },
        );
    }

    pub fn forget(&self, receiver: &str) {
        self.lock().remove(receiver);
    }

    /// `receiver`'s newest collection.
    pub fn push(&self, receiver: &str, snapshot: Snapshot) {
        let mut all = self.lock();
        let figures = all.entry(receiver.to_string()).or_default();
        figures.previous = figures.latest.take();
        figures.latest = Some(Arc::new(snapshot));
    }

    /// The cumulative figures of the cgroups at or below `dirs` (absolute, under
    /// `cgroup_root`) as of each receiver's latest collection, summed over the receivers; the
    /// probes behind them and the newest collection's time. `None` before any collection.
    pub fn cumulative(
        &self,
        cgroup_root: &Path,
        dirs: &[PathBuf],
    ) -> Option<(u64, ProbesOn, CgroupFigures)> {
        let all = self.lock();
        let mut newest = None;
        let mut probes = ProbesOn::default();
        let mut sum = CgroupFigures::default();
        for figures in all.values().filter(|f| f.probes.any()) {
            let Some(latest) = &figures.latest else {
                continue;
            };
            newest = newest.max(Some(latest.time_unix_nano));
            probes.sched |= figures.probes.sched;
            probes.syscalls |= figures.probes.syscalls;
            probes.files |= figures.probes.files;
            probes.tcp |= figures.probes.tcp;
            probes.http |= figures.probes.http;
            for (path, cumulative) in &latest.cgroups {
                let dir = cgroup_root.join(path.trim_start_matches('/'));
                if dirs.iter().any(|d| dir.starts_with(d)) {
                    sum.add(cumulative);
                }
            }
        }
        Some((newest?, probes, sum))
    }

    /// The columns of a row summing the cgroups at or below `dirs` (absolute, under
    /// `cgroup_root`; empty: the whole node), over each receiver's last collection interval.
    pub fn columns(&self, cgroup_root: &Path, dirs: &[PathBuf]) -> KernelColumns {
        let all = self.lock();
        let mut probes = ProbesOn::default();
        let mut delta = CgroupFigures::default();
        let rate_of = |count: u64, seconds: f64| count as f64 / seconds;
        let mut rates = [0.0f64; 4];
        let mut measured = false;
        for figures in all.values().filter(|f| f.probes.any()) {
            let (Some(previous), Some(latest)) = (&figures.previous, &figures.latest) else {
                continue;
            };
            let seconds = latest
                .time_unix_nano
                .saturating_sub(previous.time_unix_nano) as f64
                / 1e9;
            if seconds <= 0.0 {
                continue;
            }
            measured = true;
            probes.sched |= figures.probes.sched;
            probes.syscalls |= figures.probes.syscalls;
            probes.files |= figures.probes.files;
            probes.tcp |= figures.probes.tcp;
            probes.http |= figures.probes.http;
            let mut receiver_delta = CgroupFigures::default();
            for (path, later) in &latest.cgroups {
                let dir = cgroup_root.join(path.trim_start_matches('/'));
                if !dirs.is_empty() && !dirs.iter().any(|d| dir.starts_with(d)) {
                    continue;
                }
                let earlier = previous.cgroups.get(path).cloned().unwrap_or_default();
                receiver_delta.add(&later.since(&earlier));
            }
            rates[0] += rate_of(receiver_delta.syscalls, seconds);
            rates[1] += rate_of(receiver_delta.opens, seconds);
            rates[2] += rate_of(receiver_delta.tcp_retransmits, seconds);
            rates[3] += rate_of(receiver_delta.request_duration_s.count(), seconds);
            delta.add(&receiver_delta);
        }
        if !measured {
            return KernelColumns::default();
        }
        KernelColumns {
            runq_latency_p50_seconds: probes
                .sched
                .then(|| delta.runq_latency_ns.quantile(0.5).map(|ns| ns / 1e9))
                .flatten(),
            runq_latency_p99_seconds: probes
                .sched
                .then(|| delta.runq_latency_ns.quantile(0.99).map(|ns| ns / 1e9))
                .flatten(),
            syscalls_per_second: probes.syscalls.then_some(rates[0]),
            opens_per_second: probes.files.then_some(rates[1]),
            tcp_retransmits_per_second: probes.tcp.then_some(rates[2]),
            requests_per_second: probes.http.then_some(rates[3]),
            request_latency_p99_seconds: probes
                .http
                .then(|| delta.request_duration_s.quantile(0.99))
                .flatten(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;

    fn point(scale: i32, zero_count: u64, offset: i32, counts: &[u64]) -> Distribution {
        let mut d = Distribution::default();
        d.add_point(&ExponentialHistogramDataPoint {
            scale,
            zero_count,
            positive: Some(Buckets {
                offset,
                bucket_counts: counts.to_vec(),
            }),
            ..Default::default()
        });
        d
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        // Scale 0: bucket 0 is (1, 2], 1 is (2, 4], 2 is (4, 8].
        let d = point(0, 0, 0, &[2, 0, 2]);
        // rank 2 of 4 ends bucket (1, 2].
        assert_eq!(d.quantile(0.5), Some(2.0));
        // rank 3 of 4: halfway through (4, 8].
        assert_eq!(d.quantile(0.75), Some(6.0));
        // rank 1 of 4: halfway through (1, 2].
        assert_eq!(d.quantile(0.25), Some(1.5));
        // Zero values first.
        assert_eq!(point(0, 3, 0, &[1]).quantile(0.5), Some(0.0));
        assert_eq!(Distribution::default().quantile(0.5), None);
    }

    #[test]
    fn finer_scales_merge_at_the_coarser_one() {
        // Scale 1 buckets 2 and 3 are (2, 2^1.5] and (2^1.5, 4]: bucket 1 at scale 0.
        let mut d = point(1, 0, 2, &[1, 3]);
        d.merge(&point(0, 1, 1, &[2]));
        assert_eq!(d, point(0, 1, 1, &[6]));
    }

    #[test]
    fn deltas_subtract_buckets_and_start_over_after_a_restart() {
        let earlier = point(0, 1, 0, &[2, 1]);
        let later = point(0, 3, 0, &[5, 1, 4]);
        assert_eq!(later.since(&earlier), {
            let mut d = point(0, 2, 0, &[3]);
            d.merge(&point(0, 0, 2, &[4]));
            d
        });
        // Fewer in a bucket than before: the series restarted.
        let restarted = point(0, 0, 0, &[1]);
        assert_eq!(restarted.since(&earlier), restarted);
        assert_eq!(restarted.since(&Distribution::default()), restarted);
    }

    fn figures(syscalls: u64, opens: u64, runq: Distribution) -> CgroupFigures {
        CgroupFigures {
            runq_latency_ns: runq,
            syscalls,
            opens,
            ..Default::default()
        }
    }

    #[test]
    fn columns_are_rates_over_the_last_two_collections_of_the_rows_cgroups() {
        let all = KernelFigures::default();
        let probes = ProbesOn {
            sched: true,
            syscalls: true,
            files: false,
            tcp: false,
            http: false,
        };
        all.set_probes("ebpf", probes);
        let root = Path::new("/sys/fs/cgroup");
        let pod = root.join("kubepods/pod1");
        let snapshot =
            |time_s: u64, a: CgroupFigures, b: CgroupFigures, other: CgroupFigures| Snapshot {
                time_unix_nano: time_s * 1_000_000_000,
                cgroups: HashMap::from([
                    ("/kubepods/pod1/a".to_string(), a),
                    ("/kubepods/pod1/b".to_string(), b),
                    ("/kubepods/pod2/c".to_string(), other),
                ]),
            };
        all.push(
            "ebpf",
            snapshot(
                10,
                figures(100, 0, point(0, 0, 10, &[1])),
                figures(50, 0, Distribution::default()),
                figures(7, 0, Distribution::default()),
            ),
        );
        // One collection: no interval yet.
        assert_eq!(
            all.columns(root, std::slice::from_ref(&pod)),
            KernelColumns::default()
        );
        all.push(
            "ebpf",
            snapshot(
                14,
                // 300 more syscalls; runq: 3 in (1024, 2048] ns, 1 in (2048, 4096] ns more.
                figures(400, 0, point(0, 0, 10, &[4, 1])),
                // Restarted at 20.
                figures(20, 0, Distribution::default()),
                figures(1_000, 0, Distribution::default()),
            ),
        );
        let columns = all.columns(root, std::slice::from_ref(&pod));
        // (300 + 20) syscalls in 4 s.
        assert_eq!(columns.syscalls_per_second, Some(80.0));
        assert_eq!(columns.opens_per_second, None);
        assert_eq!(columns.tcp_retransmits_per_second, None);
        assert_eq!(columns.requests_per_second, None);
        // rank 2 of 4: two thirds through (1024, 2048].
        assert_eq!(
            columns.runq_latency_p50_seconds,
            Some((1024.0 + 1024.0 * 2.0 / 3.0) / 1e9)
        );
        // rank 3.96 of 4: 96 % through (2048, 4096].
        let p99 = columns.runq_latency_p99_seconds.unwrap();
        assert!(
            (p99 - (2048.0 + 2048.0 * 0.96) / 1e9).abs() < 1e-15,
            "{p99}"
        );
        // The whole node: pod2's (1000 - 7) too.
        assert_eq!(all.columns(root, &[]).syscalls_per_second, Some(328.25));
    }
}
