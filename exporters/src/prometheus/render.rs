//! Series as Prometheus samples: [`for_each_sample`] flattens one series the way Prometheus
//! stores it (histograms as `_bucket` / `_sum` / `_count`, summaries as quantiles, `_sum`,
//! `_count`) — the one walk both the scrape page ([`exposition`]) and remote write are built
//! from — and the text formats (Prometheus 0.0.4, OpenMetrics 1.0).

use std::fmt::Write as _;

use super::names::{escape_help, escape_label_value};
use super::store::{Kind, Labels, Store, Value};

/// One sample of a series: the suffix to its family name (`""`, `_bucket`, `_sum`, `_count`),
/// the label it adds (`le`, `quantile`), and its value.
pub struct Sample {
    pub suffix: &'static str,
    pub extra: Option<(&'static str, String)>,
    pub value: f64,
}

/// Every sample of a series with this value, in exposition order.
pub fn for_each_sample(value: &Value, mut emit: impl FnMut(Sample)) {
    let mut sample = |suffix, extra, value| {
        emit(Sample {
            suffix,
            extra,
            value,
        })
    };
    match value {
        Value::Number(v) => sample("", None, *v),
        Value::Histogram {
            bounds,
            counts,
            sum,
            count,
        } => {
            let mut cumulative = 0;
            let buckets = bounds.iter().zip(counts).map(|(&bound, &n)| {
                cumulative += n;
                (bound, cumulative)
            });
            classic_histogram(buckets, *sum, *count, &mut sample);
        }
        Value::Exponential {
            buckets,
            factor,
            sum,
            count,
        } => classic_histogram(buckets.classic(*factor), *sum, *count, &mut sample),
        Value::Summary {
            quantiles,
            sum,
            count,
        } => {
            for (q, v) in quantiles {
                sample("", Some(("quantile", format_float(*q))), *v);
            }
            sample("_sum", None, *sum);
            sample("_count", None, *count as f64);
        }
    }
}

/// The samples of a classic histogram from `(upper bound, cumulative count)` pairs: the flattening
/// of explicit and exponential histograms alike. A bound of `+Inf` in the data is the `+Inf`
/// bucket, which is written once.
fn classic_histogram(
    buckets: impl IntoIterator<Item = (f64, u64)>,
    sum: f64,
    count: u64,
    sample: &mut impl FnMut(&'static str, Option<(&'static str, String)>, f64),
) {
    for (bound, cumulative) in buckets {
        if bound.is_finite() {
            sample(
                "_bucket",
                Some(("le", format_float(bound))),
                cumulative as f64,
            );
        }
    }
    sample("_bucket", Some(("le", "+Inf".into())), count as f64);
    sample("_sum", None, sum);
    sample("_count", None, count as f64);
}

/// The scrape page for everything `store` holds.
pub fn exposition(store: &Store, openmetrics: bool) -> String {
    let mut out = String::new();
    for (name, family) in store.families() {
        let family_name = if openmetrics && family.kind == Kind::Counter {
            name.strip_suffix("_total").unwrap_or(name)
        } else {
            name
        };
        if !family.help.is_empty() {
            let _ = writeln!(out, "# HELP {family_name} {}", escape_help(&family.help));
        }
        let _ = writeln!(out, "# TYPE {family_name} {}", family.kind.as_str());
        // OpenMetrics counters' samples end in `_total` even when their family does not.
        let counter_suffix =
            if openmetrics && family.kind == Kind::Counter && !name.ends_with("_total") {
                "_total"
            } else {
                ""
            };
        for (labels, series) in &family.series {
            for_each_sample(&series.value, |s| {
                let suffix = if s.suffix.is_empty() {
                    counter_suffix
                } else {
                    s.suffix
                };
                line(&mut out, name, suffix, labels, s.extra, s.value);
            });
        }
    }
    if openmetrics {
        out.push_str("# EOF\n");
    }
    out
}

fn line(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &Labels,
    extra: Option<(&str, String)>,
    value: f64,
) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || extra.is_some() {
        out.push('{');
        let mut first = true;
        for (k, v) in labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(extra.as_ref().map(|(k, v)| (*k, v.as_str())))
        {
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(out, "{k}=\"{}\"", escape_label_value(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", format_float(value));
}

/// Numbers as the exposition formats write them (shortest round-trip form, no exponent).
pub fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}
