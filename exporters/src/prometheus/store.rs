//! What the `prometheus` exporter serves: every series it received, translated to Prometheus
//! families, deltas accumulated into cumulative values, expired when not updated for
//! `metric_expiration`; and the rendering of it all as text 0.0.4 or OpenMetrics 1.0.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, ExponentialHistogramDataPoint,
    ResourceMetrics,
};

use super::translate::{
    escape_help, escape_label_value, metric_name, sanitize_label, to_base_unit,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Summary => "summary",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Number(f64),
    /// Upper bounds with cumulative counts (without +Inf), sum, count.
    Histogram {
        buckets: Vec<(f64, u64)>,
        sum: f64,
        count: u64,
    },
    /// Quantiles, sum, count.
    Summary {
        quantiles: Vec<(f64, f64)>,
        sum: f64,
        count: u64,
    },
}

/// Sorted label pairs.
pub type Labels = Vec<(String, String)>;

struct Series {
    value: Value,
    updated: Instant,
}

struct Family {
    kind: Kind,
    help: String,
    series: BTreeMap<Labels, Series>,
}

/// Translation settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    pub add_metric_suffixes: bool,
    pub add_scope_labels: bool,
    pub all_resource_attributes: bool,
    pub promoted: Vec<String>,
    pub expiration: Duration,
}

pub struct Store {
    settings: Settings,
    /// When the batch being applied arrived.
    now: Instant,
    families: BTreeMap<String, Family>,
}

fn text_of(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// Attributes as sanitized labels; keys that sanitize to the same name join their values with `;`
/// in the order of their original keys, as the specification says.
fn labels_of(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    let mut sorted: Vec<&KeyValue> = attributes.iter().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for kv in sorted {
        let value = text_of(kv.value.as_ref());
        out.entry(sanitize_label(&kv.key))
            .and_modify(|v| {
                v.push(';');
                v.push_str(&value);
            })
            .or_insert(value);
    }
    out
}

fn exponential_buckets(p: &ExponentialHistogramDataPoint, factor: f64) -> Vec<(f64, u64)> {
    let base = 2f64.powf(2f64.powi(-p.scale));
    let mut cumulative = p.zero_count;
    let mut out = Vec::new();
    if let Some(positive) = &p.positive {
        for (i, &count) in positive.bucket_counts.iter().enumerate() {
            cumulative += count;
            let index = positive.offset as f64 + i as f64;
            out.push((base.powf(index + 1.0) * factor, cumulative));
        }
    }
    out
}

impl Store {
    pub fn new(settings: Settings) -> Store {
        Store {
            settings,
            now: Instant::now(),
            families: BTreeMap::new(),
        }
    }

    /// Number of series held (for tests and limits).
    pub fn series_count(&self) -> usize {
        self.families.values().map(|f| f.series.len()).sum()
    }

    fn put(
        &mut self,
        name: String,
        kind: Kind,
        help: &str,
        labels: Labels,
        value: Value,
        accumulate: bool,
    ) {
        let now = self.now;
        let family = self.families.entry(name).or_insert_with(|| Family {
            kind,
            help: help.to_string(),
            series: BTreeMap::new(),
        });
        if family.kind != kind {
            // Two metrics translated to one name with different types: keep the first.
            return;
        }
        let series = family.series.entry(labels).or_insert_with(|| Series {
            value: zero_like(&value),
            updated: now,
        });
        series.updated = now;
        if !accumulate {
            series.value = value;
            return;
        }
        match (&mut series.value, value) {
            (Value::Number(a), Value::Number(b)) => *a += b,
            (
                Value::Histogram {
                    buckets,
                    sum,
                    count,
                },
                Value::Histogram {
                    buckets: add,
                    sum: s,
                    count: c,
                },
            ) => {
                if buckets.len() == add.len() && buckets.iter().zip(&add).all(|(a, b)| a.0 == b.0) {
                    for (a, b) in buckets.iter_mut().zip(add) {
                        a.1 += b.1;
                    }
                } else {
                    *buckets = add;
                }
                *sum += s;
                *count += c;
            }
            (slot, other) => *slot = other,
        }
    }

    /// Takes in one batch of metrics.
    pub fn apply(&mut self, resource_metrics: &[ResourceMetrics], now: Instant) {
        self.now = now;
        for rm in resource_metrics {
            let resource_attributes = rm
                .resource
                .as_ref()
                .map(|r| r.attributes.as_slice())
                .unwrap_or_default();
            let mut resource_labels: BTreeMap<String, String> = BTreeMap::new();
            let mut target_labels: BTreeMap<String, String> = BTreeMap::new();
            let find = |key: &str| {
                resource_attributes
                    .iter()
                    .find(|a| a.key == key)
                    .map(|a| text_of(a.value.as_ref()))
            };
            let job = match (find("service.namespace"), find("service.name")) {
                (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
                (None, Some(name)) => Some(name),
                _ => None,
            };
            if let Some(job) = job {
                resource_labels.insert("job".into(), job);
            }
            if let Some(instance) = find("service.instance.id") {
                resource_labels.insert("instance".into(), instance);
            }
            for (key, value) in labels_of(resource_attributes) {
                let original_promoted = resource_attributes.iter().any(|a| {
                    sanitize_label(&a.key) == key && self.settings.promoted.contains(&a.key)
                });
                if self.settings.all_resource_attributes || original_promoted {
                    resource_labels.insert(key, value);
                } else {
                    target_labels.insert(key, value);
                }
            }
            if !target_labels.is_empty() {
                let mut labels = resource_labels.clone();
                labels.extend(target_labels);
                let name = if self.settings.namespace.is_empty() {
                    "target_info".to_string()
                } else {
                    format!("{}_target_info", self.settings.namespace)
                };
                self.put(
                    name,
                    Kind::Gauge,
                    "Target metadata",
                    labels.into_iter().collect(),
                    Value::Number(1.0),
                    false,
                );
            }

            for sm in &rm.scope_metrics {
                let mut scope_labels = resource_labels.clone();
                if let Some(scope) = sm.scope.as_ref().filter(|_| self.settings.add_scope_labels) {
                    if !scope.name.is_empty() {
                        scope_labels.insert("otel_scope_name".into(), scope.name.clone());
                    }
                    if !scope.version.is_empty() {
                        scope_labels.insert("otel_scope_version".into(), scope.version.clone());
                    }
                }
                for m in &sm.metrics {
                    self.apply_metric(m, &scope_labels);
                }
            }
        }
    }

    fn apply_metric(
        &mut self,
        m: &opentelemetry_proto::tonic::metrics::v1::Metric,
        scope_labels: &BTreeMap<String, String>,
    ) {
        let (unit, factor) = to_base_unit(&m.unit);
        let labels = |attributes: &[KeyValue], extra: Option<(&str, String)>| -> Labels {
            let mut all = scope_labels.clone();
            // Data point attributes win over resource labels of the same name.
            all.extend(labels_of(attributes));
            if let Some((k, v)) = extra {
                all.insert(k.to_string(), v);
            }
            all.into_iter().collect()
        };
        let number = |v: &Option<number_data_point::Value>| match v {
            Some(number_data_point::Value::AsInt(i)) => Some(*i as f64 * factor),
            Some(number_data_point::Value::AsDouble(d)) => Some(*d * factor),
            None => None,
        };
        let s = &self.settings;
        let delta = |t: i32| t == AggregationTemporality::Delta as i32;
        match &m.data {
            Some(metric::Data::Gauge(g)) => {
                let name = metric_name(&s.namespace, &m.name, unit, false, s.add_metric_suffixes);
                for p in &g.data_points {
                    if let Some(v) = number(&p.value) {
                        self.put(
                            name.clone(),
                            Kind::Gauge,
                            &m.description,
                            labels(&p.attributes, None),
                            Value::Number(v),
                            false,
                        );
                    }
                }
            }
            Some(metric::Data::Sum(sum)) => {
                let kind = if sum.is_monotonic {
                    Kind::Counter
                } else {
                    Kind::Gauge
                };
                let name = metric_name(
                    &s.namespace,
                    &m.name,
                    unit,
                    sum.is_monotonic,
                    s.add_metric_suffixes,
                );
                for p in &sum.data_points {
                    if let Some(v) = number(&p.value) {
                        self.put(
                            name.clone(),
                            kind,
                            &m.description,
                            labels(&p.attributes, None),
                            Value::Number(v),
                            delta(sum.aggregation_temporality),
                        );
                    }
                }
            }
            Some(metric::Data::Histogram(h)) => {
                let name = metric_name(&s.namespace, &m.name, unit, false, s.add_metric_suffixes);
                for p in &h.data_points {
                    let mut cumulative = 0;
                    let buckets = p
                        .explicit_bounds
                        .iter()
                        .zip(&p.bucket_counts)
                        .map(|(bound, count)| {
                            cumulative += count;
                            (bound * factor, cumulative)
                        })
                        .collect();
                    let value = Value::Histogram {
                        buckets,
                        sum: p.sum.unwrap_or(0.0) * factor,
                        count: p.count,
                    };
                    self.put(
                        name.clone(),
                        Kind::Histogram,
                        &m.description,
                        labels(&p.attributes, None),
                        value,
                        delta(h.aggregation_temporality),
                    );
                }
            }
            Some(metric::Data::ExponentialHistogram(h)) => {
                let name = metric_name(&s.namespace, &m.name, unit, false, s.add_metric_suffixes);
                for p in &h.data_points {
                    let value = Value::Histogram {
                        buckets: exponential_buckets(p, factor),
                        sum: p.sum.unwrap_or(0.0) * factor,
                        count: p.count,
                    };
                    self.put(
                        name.clone(),
                        Kind::Histogram,
                        &m.description,
                        labels(&p.attributes, None),
                        value,
                        delta(h.aggregation_temporality),
                    );
                }
            }
            Some(metric::Data::Summary(summary)) => {
                let name = metric_name(&s.namespace, &m.name, unit, false, s.add_metric_suffixes);
                for p in &summary.data_points {
                    let quantiles = p
                        .quantile_values
                        .iter()
                        .map(|q| (q.quantile, q.value * factor))
                        .collect();
                    let value = Value::Summary {
                        quantiles,
                        sum: p.sum * factor,
                        count: p.count,
                    };
                    self.put(
                        name.clone(),
                        Kind::Summary,
                        &m.description,
                        labels(&p.attributes, None),
                        value,
                        false,
                    );
                }
            }
            None => {}
        }
    }

    /// Every sample of the series updated by the last `apply`, flattened as Prometheus stores
    /// them (histograms as `_bucket`/`_sum`/`_count`), each with its `__name__` label; labels
    /// sorted by name. For remote write.
    pub fn updated_samples(&self) -> Vec<(Labels, f64)> {
        let mut out = Vec::new();
        for (name, family) in &self.families {
            for (labels, series) in family.series.iter().filter(|(_, s)| s.updated == self.now) {
                let with = |metric: &str, extra: Option<(&str, String)>| {
                    let mut all: Vec<(String, String)> = labels.clone();
                    all.push(("__name__".to_string(), metric.to_string()));
                    if let Some((k, v)) = extra {
                        all.push((k.to_string(), v));
                    }
                    all.sort();
                    all
                };
                match &series.value {
                    Value::Number(v) => out.push((with(name, None), *v)),
                    Value::Histogram {
                        buckets,
                        sum,
                        count,
                    } => {
                        for (bound, cumulative) in buckets {
                            out.push((
                                with(
                                    &format!("{name}_bucket"),
                                    Some(("le", format_float(*bound))),
                                ),
                                *cumulative as f64,
                            ));
                        }
                        out.push((
                            with(&format!("{name}_bucket"), Some(("le", "+Inf".into()))),
                            *count as f64,
                        ));
                        out.push((with(&format!("{name}_sum"), None), *sum));
                        out.push((with(&format!("{name}_count"), None), *count as f64));
                    }
                    Value::Summary {
                        quantiles,
                        sum,
                        count,
                    } => {
                        for (q, v) in quantiles {
                            out.push((with(name, Some(("quantile", format_float(*q)))), *v));
                        }
                        out.push((with(&format!("{name}_sum"), None), *sum));
                        out.push((with(&format!("{name}_count"), None), *count as f64));
                    }
                }
            }
        }
        out
    }

    /// Drops series not updated within the expiration.
    pub fn expire(&mut self, now: Instant) {
        let expiration = self.settings.expiration;
        for family in self.families.values_mut() {
            family
                .series
                .retain(|_, s| now.duration_since(s.updated) <= expiration);
        }
        self.families.retain(|_, f| !f.series.is_empty());
    }

    /// The exposition: Prometheus text 0.0.4, or OpenMetrics 1.0 (`# EOF`-terminated).
    pub fn render(&self, openmetrics: bool) -> String {
        let mut out = String::new();
        for (name, family) in &self.families {
            let family_name = if openmetrics && family.kind == Kind::Counter {
                name.strip_suffix("_total").unwrap_or(name)
            } else {
                name.as_str()
            };
            if !family.help.is_empty() {
                let _ = writeln!(out, "# HELP {family_name} {}", escape_help(&family.help));
            }
            let _ = writeln!(out, "# TYPE {family_name} {}", family.kind.as_str());
            for (labels, series) in &family.series {
                match &series.value {
                    Value::Number(v) => {
                        let sample = if family.kind == Kind::Counter
                            && !name.ends_with("_total")
                            && openmetrics
                        {
                            format!("{name}_total")
                        } else {
                            name.clone()
                        };
                        line(&mut out, &sample, labels, None, *v);
                    }
                    Value::Histogram {
                        buckets,
                        sum,
                        count,
                    } => {
                        for (bound, cumulative) in buckets {
                            line(
                                &mut out,
                                &format!("{name}_bucket"),
                                labels,
                                Some(("le", format_float(*bound))),
                                *cumulative as f64,
                            );
                        }
                        line(
                            &mut out,
                            &format!("{name}_bucket"),
                            labels,
                            Some(("le", "+Inf".into())),
                            *count as f64,
                        );
                        line(&mut out, &format!("{name}_sum"), labels, None, *sum);
                        line(
                            &mut out,
                            &format!("{name}_count"),
                            labels,
                            None,
                            *count as f64,
                        );
                    }
                    Value::Summary {
                        quantiles,
                        sum,
                        count,
                    } => {
                        for (q, v) in quantiles {
                            line(
                                &mut out,
                                name,
                                labels,
                                Some(("quantile", format_float(*q))),
                                *v,
                            );
                        }
                        line(&mut out, &format!("{name}_sum"), labels, None, *sum);
                        line(
                            &mut out,
                            &format!("{name}_count"),
                            labels,
                            None,
                            *count as f64,
                        );
                    }
                }
            }
        }
        if openmetrics {
            out.push_str("# EOF\n");
        }
        out
    }
}

fn zero_like(value: &Value) -> Value {
    match value {
        Value::Number(_) => Value::Number(0.0),
        Value::Histogram { buckets, .. } => Value::Histogram {
            buckets: buckets.iter().map(|b| (b.0, 0)).collect(),
            sum: 0.0,
            count: 0,
        },
        Value::Summary { .. } => Value::Summary {
            quantiles: Vec::new(),
            sum: 0.0,
            count: 0,
        },
    }
}

fn line(out: &mut String, name: &str, labels: &Labels, extra: Option<(&str, String)>, value: f64) {
    out.push_str(name);
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
