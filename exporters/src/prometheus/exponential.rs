//! OTLP exponential histograms as the Prometheus exporters keep and show them: buckets by index
//! at one scale, merged with another histogram on the coarser of the two scales (the finer one
//! is downscaled, which is exact: its buckets nest in the coarser ones), and turned into classic
//! `le` buckets with exact bounds, negative and zero buckets included.
//!
//! Bucket `i` at scale `s` holds values `v` with `2^(i/2^s) < |v| ≤ 2^((i+1)/2^s)`; positive
//! values go to the positive buckets, negative ones (by magnitude) to the negative buckets, values
//! within `zero_threshold` of zero to the zero bucket. Pure; no I/O.

use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
use opentelemetry_proto::tonic::metrics::v1::ExponentialHistogramDataPoint;

/// Most buckets kept per sign: beyond it the histogram is downscaled (the OpenTelemetry SDKs'
/// default maximum size), so merging deltas whose ranges drift apart stays bounded.
const MAX_BUCKETS: usize = 160;

/// Counts of consecutive bucket indices from `offset`.
#[derive(Debug, Clone, Default, PartialEq)]
struct Dense {
    offset: i32,
    counts: Vec<u64>,
}

impl Dense {
    fn of(buckets: Option<&Buckets>) -> Dense {
        match buckets {
            Some(b) if b.bucket_counts.iter().any(|&c| c > 0) => Dense {
                offset: b.offset,
                counts: b.bucket_counts.clone(),
            },
            _ => Dense::default(),
        }
    }

    fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    fn last_index(&self) -> i32 {
        self.offset + self.counts.len() as i32 - 1
    }

    /// The same counts `by` scales coarser: index `i` becomes `⌊i / 2^by⌋`.
    fn downscaled(&self, by: u32) -> Dense {
        if by == 0 || self.is_empty() {
            return self.clone();
        }
        let coarse = |i: i32| (i64::from(i) >> by.min(63)) as i32;
        let offset = coarse(self.offset);
        let mut counts = vec![0u64; (coarse(self.last_index()) - offset + 1) as usize];
        for (i, &count) in self.counts.iter().enumerate() {
            counts[(coarse(self.offset + i as i32) - offset) as usize] += count;
        }
        Dense { offset, counts }
    }

    fn add(&mut self, other: &Dense) {
        if other.is_empty() {
            return;
        }
        if self.is_empty() {
            *self = other.clone();
            return;
        }
        let offset = self.offset.min(other.offset);
        let last = self.last_index().max(other.last_index());
        let mut counts = vec![0u64; (last - offset + 1) as usize];
        for part in [&*self, other] {
            for (i, &count) in part.counts.iter().enumerate() {
                counts[(part.offset - offset) as usize + i] += count;
            }
        }
        *self = Dense { offset, counts };
    }

    /// Index and count of each bucket in the range, ascending (empty ones within it too, so a
    /// histogram keeps the same `le` series from one scrape to the next).
    fn buckets(&self) -> impl DoubleEndedIterator<Item = (i32, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .map(|(i, &c)| (self.offset + i as i32, c))
    }
}

/// An exponential histogram's buckets (sum and count are kept by the caller).
#[derive(Debug, Clone, PartialEq)]
pub struct ExponentialBuckets {
    scale: i32,
    zero_count: u64,
    zero_threshold: f64,
    positive: Dense,
    negative: Dense,
}

impl ExponentialBuckets {
    pub fn of(point: &ExponentialHistogramDataPoint) -> ExponentialBuckets {
        let mut buckets = ExponentialBuckets {
            scale: point.scale,
            zero_count: point.zero_count,
            zero_threshold: point.zero_threshold.max(0.0),
            positive: Dense::of(point.positive.as_ref()),
            negative: Dense::of(point.negative.as_ref()),
        };
        buckets.fit();
        buckets
    }

    /// Adds `other`'s counts (a delta): both on the coarser scale, the wider zero bucket.
    pub fn add(&mut self, other: &ExponentialBuckets) {
        let scale = self.scale.min(other.scale);
        let mut other = other.clone();
        self.downscale_to(scale);
        other.downscale_to(scale);
        let threshold = self.zero_threshold.max(other.zero_threshold);
        self.widen_zero_bucket(threshold);
        other.widen_zero_bucket(threshold);
        self.zero_count += other.zero_count;
        self.positive.add(&other.positive);
        self.negative.add(&other.negative);
        self.fit();
    }

    fn downscale_to(&mut self, scale: i32) {
        let by = (self.scale - scale).max(0) as u32;
        self.positive = self.positive.downscaled(by);
        self.negative = self.negative.downscaled(by);
        self.scale = scale;
    }

    /// Downscales until each sign has at most [`MAX_BUCKETS`] buckets.
    fn fit(&mut self) {
        while self.positive.counts.len().max(self.negative.counts.len()) > MAX_BUCKETS {
            self.downscale_to(self.scale - 1);
        }
    }

    /// Moves into the zero bucket every bucket wholly within `threshold` of zero.
    fn widen_zero_bucket(&mut self, threshold: f64) {
        if threshold <= self.zero_threshold {
            return;
        }
        self.zero_threshold = threshold;
        for side in [&mut self.positive, &mut self.negative] {
            let mut kept = Dense::default();
            for (index, count) in side.buckets().filter(|&(_, c)| c > 0) {
                if upper_edge(index, self.scale) <= threshold {
                    self.zero_count += count;
                } else {
                    kept.add(&Dense {
                        offset: index,
                        counts: vec![count],
                    });
                }
            }
            *side = kept;
        }
    }

    /// Classic buckets: `(upper bound × factor, values at or below it)`, bounds increasing,
    /// without `+Inf`. Bounds no `f64` holds (past 2^1024) are left to `+Inf`; bounds that
    /// round to the same value are one bucket.
    pub fn classic(&self, factor: f64) -> Vec<(f64, u64)> {
        let mut out: Vec<(f64, u64)> = Vec::new();
        let mut cumulative = 0u64;
        let mut push = |bound: f64, cumulative: u64| {
            if !bound.is_finite() {
                return;
            }
            match out.last_mut() {
                // Rounded to the same bound (or a bucket below the zero bucket's edge): one
                // bucket, counted at the higher bound.
                Some(last) if bound <= last.0 => last.1 = cumulative,
                _ => out.push((bound, cumulative)),
            }
        };
        // Negative bucket i holds [-edge(i+1), -edge(i)): largest magnitudes first.
        for (index, count) in self.negative.buckets().rev() {
            cumulative += count;
            push(-lower_edge(index, self.scale) * factor, cumulative);
        }
        if self.zero_count > 0 || !self.negative.is_empty() {
            cumulative += self.zero_count;
            push(self.zero_threshold * factor, cumulative);
        }
        for (index, count) in self.positive.buckets() {
            cumulative += count;
            push(upper_edge(index, self.scale) * factor, cumulative);
        }
        out
    }
}

/// `2^((index + 1) / 2^scale)`: the upper edge of bucket `index`.
fn upper_edge(index: i32, scale: i32) -> f64 {
    power_of_two(i64::from(index) + 1, scale)
}

/// `2^(index / 2^scale)`: the lower edge of bucket `index`.
fn lower_edge(index: i32, scale: i32) -> f64 {
    power_of_two(i64::from(index), scale)
}

/// `2^(n / 2^scale)`, exact whenever the result is a power of two (then no floating-point
/// function is involved): `2^q × 2^(r / 2^scale)` with `q` whole and `0 ≤ r < 2^scale`.
fn power_of_two(n: i64, scale: i32) -> f64 {
    if scale <= 0 {
        return exp2_whole(n.saturating_mul(1i64 << (-scale).min(62)));
    }
    let scale = scale.min(62) as u32;
    let q = n >> scale;
    let r = n - (q << scale);
    let fraction = if r == 0 {
        1.0
    } else {
        (r as f64 / (1u64 << scale) as f64).exp2()
    };
    exp2_whole(q) * fraction
}

/// `2^e` built from its bits: exact, including subnormals; infinity past the largest `f64`.
fn exp2_whole(e: i64) -> f64 {
    match e {
        1024.. => f64::INFINITY,
        -1022..=1023 => f64::from_bits(((e + 1023) as u64) << 52),
        -1074..=-1023 => f64::from_bits(1u64 << (e + 1074)),
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(
        scale: i32,
        zero: u64,
        negative: (i32, Vec<u64>),
        positive: (i32, Vec<u64>),
    ) -> ExponentialBuckets {
        ExponentialBuckets::of(&ExponentialHistogramDataPoint {
            scale,
            zero_count: zero,
            negative: Some(Buckets {
                offset: negative.0,
                bucket_counts: negative.1,
            }),
            positive: Some(Buckets {
                offset: positive.0,
                bucket_counts: positive.1,
            }),
            ..Default::default()
        })
    }

    #[test]
    fn edges_are_exact_powers_of_two_where_they_should_be() {
        assert_eq!(upper_edge(7, 3), 2.0);
        assert_eq!(upper_edge(15, 3), 4.0);
        assert_eq!(lower_edge(-8, 3), 0.5);
        assert_eq!(upper_edge(0, 0), 2.0);
        assert_eq!(upper_edge(-1, 0), 1.0);
        assert_eq!(upper_edge(0, -9), 2f64.powi(512));
        assert_eq!(upper_edge(1, -9), f64::INFINITY);
        assert_eq!(lower_edge(-1074, 0), f64::from_bits(1));
        assert_eq!(lower_edge(-1075, 0), 0.0);
        // Between powers of two: 2^(1/8), as the math library computes it.
        assert_eq!(upper_edge(0, 3), 2f64.powf(0.125));
    }

    #[test]
    fn downscaling_merges_the_buckets_that_nest() {
        let dense = Dense {
            offset: -3,
            counts: vec![1, 2, 3, 4, 5],
        }; // indices -3..=1
        assert_eq!(
            dense.downscaled(1),
            Dense {
                offset: -2,
                counts: vec![1, 5, 9]
            }
        );
    }

    #[test]
    fn deltas_merge_on_the_coarser_scale() {
        let mut a = point(1, 0, (0, vec![]), (0, vec![1, 2, 4])); // (1,√2] (√2,2] (2,2√2]
        a.add(&point(0, 1, (0, vec![]), (0, vec![8]))); // (1,2]
        assert_eq!(a.scale, 0);
        assert_eq!(a.classic(1.0), vec![(0.0, 1), (2.0, 12), (4.0, 16)]);
    }

    #[test]
    fn a_histogram_too_wide_is_downscaled() {
        let mut a = point(0, 0, (0, vec![]), (0, vec![1]));
        a.add(&point(0, 0, (0, vec![]), (400, vec![1])));
        assert_eq!(a.scale, -2);
        let filled: Vec<_> = a.positive.buckets().filter(|&(_, c)| c > 0).collect();
        assert_eq!(filled, vec![(0, 1), (100, 1)]);
    }
}
