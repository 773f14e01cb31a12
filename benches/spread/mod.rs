//! Figures of paired benchmark rounds summarized so that a noisy machine shows in them: the
//! median, the interquartile range and a bootstrap interval of the median.

/// The median of `v` (not empty).
pub fn median(v: Vec<f64>) -> f64 {
    quantile(&sorted(v), 0.5)
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// The `q` quantile of `sorted` (not empty), interpolated between its two nearest values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let at = q * (sorted.len() - 1) as f64;
    let (low, high) = (at.floor() as usize, at.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (at - low as f64)
}

/// The rounds' figures of one comparison, summarized: median, interquartile range and a 95 %
/// bootstrap interval of the median.
pub struct Spread {
    pub median: f64,
    pub quartiles: (f64, f64),
    pub interval: (f64, f64),
}

impl Spread {
    /// Resamples the rounds 2,000 times (a fixed seed: the same rounds give the same interval).
    pub fn of(values: &[f64]) -> Spread {
        let values = sorted(values.to_vec());
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        // splitmix64: uniform enough for resampling, and no dependency.
        let mut next = move || {
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let medians = sorted(
            (0..2000)
                .map(|_| {
                    let sample: Vec<f64> = (0..values.len())
                        .map(|_| values[(next() % values.len() as u64) as usize])
                        .collect();
                    median(sample)
                })
                .collect(),
        );
        Spread {
            median: quantile(&values, 0.5),
            quartiles: (quantile(&values, 0.25), quantile(&values, 0.75)),
            interval: (quantile(&medians, 0.025), quantile(&medians, 0.975)),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} % (IQR {:.1} to {:.1}; 95 % interval of the median {:.1} to {:.1})",
            self.median, self.quartiles.0, self.quartiles.1, self.interval.0, self.interval.1
        )
    }
}
