//! RED metrics: request durations per container, method, route (or server, for clients) and
//! status, as exponential histograms in seconds at scale 4 (buckets 2^(1/16) ≈ 4.4 % wide), so a
//! quantile read from them is within 4.4 % of the true one. Every exchange is recorded, sampled
//! spans or not.

use std::collections::HashSet;

use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
use opentelemetry_proto::tonic::metrics::v1::ExponentialHistogramDataPoint;

use super::tracker::SpanKind;
use crate::ebpf::builder::{int_attr, string_attr, MetricsBuilder, Owner};

/// Scale of the duration histograms: bucket i holds (2^(i/16), 2^((i+1)/16)] seconds.
pub const SCALE: i32 = 4;

/// A cumulative exponential histogram of durations in seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DurationHistogram {
    count: u64,
    zero_count: u64,
    sum: f64,
    min: f64,
    max: f64,
    /// Index of `counts[0]`.
    offset: i32,
    counts: Vec<u64>,
}

/// The bucket of a positive value at [`SCALE`]: (base^i, base^(i+1)] with base 2^(2^-SCALE).
fn bucket_index(value: f64) -> i32 {
    (value.log2() * f64::from(1 << SCALE)).ceil() as i32 - 1
}

impl DurationHistogram {
    pub fn record(&mut self, seconds: f64) {
        if self.count == 0 || seconds < self.min {
            self.min = seconds;
        }
        if self.count == 0 || seconds > self.max {
            self.max = seconds;
        }
        self.count += 1;
        self.sum += seconds;
        if seconds <= 0.0 {
            self.zero_count += 1;
            return;
        }
        let index = bucket_index(seconds);
        if self.counts.is_empty() {
            self.offset = index;
            self.counts.push(0);
        } else if index < self.offset {
            let grow = (self.offset - index) as usize;
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.offset = index;
        } else if index >= self.offset + self.counts.len() as i32 {
            self.counts.resize((index - self.offset) as usize + 1, 0);
        }
        self.counts[(index - self.offset) as usize] += 1;
    }

    pub fn point(&self, attributes: Vec<KeyValue>) -> ExponentialHistogramDataPoint {
        ExponentialHistogramDataPoint {
            attributes,
            count: self.count,
            sum: Some(self.sum),
            scale: SCALE,
            zero_count: self.zero_count,
            positive: (!self.counts.is_empty()).then(|| Buckets {
                offset: self.offset,
                bucket_counts: self.counts.clone(),
            }),
            min: Some(self.min),
            max: Some(self.max),
            ..Default::default()
        }
    }
}

/// An attribute value of a RED series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttrValue {
    Text(String),
    Int(i64),
}

/// An attribute value as an exchange has it: series are looked up without allocating.
#[derive(Debug, Clone, Copy)]
pub enum AttrRef<'a> {
    Text(&'a str),
    Int(i64),
}

impl AttrRef<'_> {
    fn matches(&self, owned: &AttrValue) -> bool {
        match (self, owned) {
            (AttrRef::Text(a), AttrValue::Text(b)) => *a == b,
            (AttrRef::Int(a), AttrValue::Int(b)) => a == b,
            _ => false,
        }
    }

    fn to_value(self) -> AttrValue {
        match self {
            AttrRef::Text(t) => AttrValue::Text(t.to_string()),
            AttrRef::Int(n) => AttrValue::Int(n),
        }
    }
}

/// What a RED series is per: the container, the metric and its attributes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RedKey {
    pub cgroup: u64,
    /// Index into [`super::metrics::METRICS`].
    pub metric: usize,
    pub attributes: Vec<(&'static str, AttrValue)>,
}

impl RedKey {
    fn matches(&self, cgroup: u64, metric: usize, attributes: &[(&'static str, AttrRef<'_>)]) -> bool {
        self.cgroup == cgroup
            && self.metric == metric
            && self.attributes.len() == attributes.len()
            && self
                .attributes
                .iter()
                .zip(attributes)
                .all(|((k, v), (name, value))| k == name && value.matches(v))
    }
}

/// Whether an HTTP status code is an error for that end (semantic conventions: 5xx for
/// servers, 4xx and 5xx for clients).
pub fn is_error(kind: SpanKind, status: u16) -> bool {
    match kind {
        SpanKind::Server => status >= 500,
        SpanKind::Client => status >= 400,
    }
}

/// Whether a gRPC status code is an error for that end (semantic conventions: any but OK for
/// clients; UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE and DATA_LOSS for
/// servers).
pub fn is_grpc_error(kind: SpanKind, code: i64) -> bool {
    match kind {
        SpanKind::Server => matches!(code, 2 | 4 | 12 | 13 | 14 | 15),
        SpanKind::Client => code != 0,
    }
}

/// Every RED series, by a hash of its key (series with the same hash share a bucket).
#[derive(Default)]
pub struct RedTable {
    series: std::collections::HashMap<u64, Vec<(RedKey, DurationHistogram)>>,
    hasher: foldhash::fast::RandomState,
}

impl RedTable {
    /// Records one duration in the series of (`cgroup`, `metric`, `attributes`).
    pub fn record(
        &mut self,
        cgroup: u64,
        metric: usize,
        attributes: &[(&'static str, AttrRef<'_>)],
        seconds: f64,
    ) {
        use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
        let mut hasher = self.hasher.build_hasher();
        cgroup.hash(&mut hasher);
        metric.hash(&mut hasher);
        for (name, value) in attributes {
            name.hash(&mut hasher);
            match value {
                AttrRef::Text(t) => t.hash(&mut hasher),
                AttrRef::Int(n) => n.hash(&mut hasher),
            }
        }
        let bucket = self.series.entry(hasher.finish()).or_default();
        if let Some((_, histogram)) = bucket
            .iter_mut()
            .find(|(key, _)| key.matches(cgroup, metric, attributes))
        {
            histogram.record(seconds);
            return;
        }
        let mut histogram = DurationHistogram::default();
        histogram.record(seconds);
        let key = RedKey {
            cgroup,
            metric,
            attributes: attributes.iter().map(|(k, v)| (*k, v.to_value())).collect(),
        };
        bucket.push((key, histogram));
    }

    /// Forgets the series of removed containers (reported a last time before).
    pub fn forget(&mut self, gone: &HashSet<u64>) {
        for bucket in self.series.values_mut() {
            bucket.retain(|(k, _)| !gone.contains(&k.cgroup));
        }
        self.series.retain(|_, bucket| !bucket.is_empty());
    }

    pub fn cgroups(&self) -> impl Iterator<Item = u64> + '_ {
        self.series.values().flatten().map(|(k, _)| k.cgroup)
    }

    pub fn add_to(&self, b: &mut MetricsBuilder<'_>) {
        let mut series: Vec<&(RedKey, DurationHistogram)> = self.series.values().flatten().collect();
        series.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, histogram) in series {
            let attributes = key
                .attributes
                .iter()
                .map(|(name, value)| match value {
                    AttrValue::Text(text) => string_attr(name, text),
                    AttrValue::Int(n) => int_attr(name, *n),
                })
                .collect::<Vec<KeyValue>>();
            let doc = &super::metrics::METRICS[key.metric];
            b.exponential(Owner::Cgroup(key.cgroup), doc, histogram.point(attributes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value at quantile `q` as read from the histogram: the upper bound of the bucket that
    /// holds the rank (what Prometheus-style estimates never exceed).
    fn quantile(h: &DurationHistogram, q: f64) -> f64 {
        let rank = (q * h.count as f64).ceil() as u64;
        let mut seen = h.zero_count;
        for (i, &c) in h.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let index = h.offset + i as i32;
                return 2f64.powf(f64::from(index + 1) / f64::from(1 << SCALE));
            }
        }
        h.max
    }

    #[test]
    fn buckets_are_the_otlp_buckets_of_the_scale() {
        let base = 2f64.powf(1.0 / 16.0);
        // (base^i, base^(i+1)]: the upper edge is in, the lower edge is not.
        assert_eq!(bucket_index(1.0), -1);
        assert_eq!(bucket_index(1.0001), 0);
        assert_eq!(bucket_index(base * 1.0000001), 1);
        assert_eq!(bucket_index(2.0), 15);
        assert_eq!(bucket_index(0.5), -17);
    }

    #[test]
    fn p99_read_from_the_histogram_is_within_5_percent_of_the_true_p99() {
        // Latencies from 50 µs to 3 s, log-uniform with a heavy tail: a deterministic sequence.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for (low, high) in [(50e-6, 3.0f64), (1e-3, 2e-3), (0.2, 0.21)] {
            let mut values: Vec<f64> = (0..100_000)
                .map(|_| low * (high / low).powf(next().powi(3)))
                .collect();
            let mut h = DurationHistogram::default();
            for v in &values {
                h.record(*v);
            }
            values.sort_by(f64::total_cmp);
            for q in [0.5, 0.9, 0.99, 0.999] {
                let truth = values[(q * values.len() as f64).ceil() as usize - 1];
                let read = quantile(&h, q);
                let error = (read - truth).abs() / truth;
                assert!(error <= 0.05, "q{q} in [{low}, {high}]: true {truth}, read {read}, error {error}");
            }
            assert_eq!(h.count, 100_000);
        }
    }

    #[test]
    fn the_data_point_carries_exact_counts_and_the_scale() {
        let mut h = DurationHistogram::default();
        for v in [0.0, 0.001, 0.001, 0.002, 1.5] {
            h.record(v);
        }
        let p = h.point(Vec::new());
        assert_eq!((p.count, p.zero_count, p.scale), (5, 1, SCALE));
        let buckets = p.positive.unwrap();
        assert_eq!(buckets.bucket_counts.iter().sum::<u64>(), 4);
        assert_eq!(buckets.offset, bucket_index(0.001));
        assert_eq!(p.min, Some(0.0));
        assert_eq!(p.max, Some(1.5));
    }
}
