//! Kernel log2 distributions as OTLP exponential histograms (scale 0). Backends that need
//! classic buckets get them from the exporter (`exporters/src/prometheus/exponential.rs`).
//!
//! Kernel slot k holds values in (2^(k−1), 2^k] (slot 0 holds 1), which is exactly the OTLP
//! scale-0 bucket with index k − 1, so the conversion is a shift, not an approximation.

use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
use opentelemetry_proto::tonic::metrics::v1::ExponentialHistogramDataPoint;
use podscope_ebpf::abi::Hist;

/// The exponential-histogram data point for a kernel histogram (attributes and times left empty).
pub fn exponential_point(hist: &Hist) -> ExponentialHistogramDataPoint {
    let last = hist.slots.iter().rposition(|&c| c != 0);
    let first = hist.slots.iter().position(|&c| c != 0);
    let positive = match (first, last) {
        (Some(first), Some(last)) => Some(Buckets {
            offset: first as i32 - 1,
            bucket_counts: hist.slots[first..=last].to_vec(),
        }),
        _ => None,
    };
    ExponentialHistogramDataPoint {
        count: hist.count(),
        sum: Some(hist.sum as f64),
        scale: 0,
        zero_count: hist.zero_count,
        positive,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's slot for a value (mirror of podscope_hist_add).
    fn slot(v: u64) -> usize {
        if v == 1 {
            0
        } else {
            64 - (v - 1).leading_zeros() as usize
        }
    }

    #[test]
    fn kernel_slots_are_otlp_scale_zero_buckets() {
        let mut h = Hist::default();
        for v in [0u64, 1, 2, 3, 4, 5, 1000, 1024, 1025] {
            if v == 0 {
                h.zero_count += 1;
            } else {
                h.slots[slot(v)] += 1;
            }
            h.sum += v;
        }
        let p = exponential_point(&h);
        assert_eq!(p.count, 9);
        assert_eq!(p.zero_count, 1);
        assert_eq!(p.sum, Some(3064.0));
        let b = p.positive.unwrap();
        // index -1: (0.5, 1] = {1}; 0: (1, 2] = {2}; 1: (2, 4] = {3, 4}; 2: (4, 8] = {5};
        // 9: (512, 1024] = {1000, 1024}; 10: (1024, 2048] = {1025}
        assert_eq!(b.offset, -1);
        assert_eq!(b.bucket_counts, vec![1, 1, 2, 1, 0, 0, 0, 0, 0, 0, 2, 1]);
    }

    #[test]
    fn the_last_kernel_slot_is_the_bucket_up_to_two_to_the_64() {
        let mut h = Hist::default();
        h.slots[64] = 1; // (2^63, 2^64)
        h.slots[48] = 2; // (2^47, 2^48]
        h.sum = (1u64 << 63) + 2 * ((1u64 << 47) + 1);
        let p = exponential_point(&h);
        let b = p.positive.as_ref().unwrap();
        assert_eq!((b.offset, b.bucket_counts.len()), (47, 17));
        assert_eq!((b.bucket_counts[0], b.bucket_counts[16]), (2, 1));
    }

    #[test]
    fn empty_histograms_have_no_buckets() {
        let p = exponential_point(&Hist::default());
        assert_eq!((p.count, p.positive), (0, None));
    }
}
