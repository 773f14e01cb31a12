//! OTLP metrics → Prometheus observations: the family (name, type, help) and series (labels)
//! each data point belongs to and the value it carries, in base units, as the OpenTelemetry
//! specification translates them (see `names` for the naming rules). Resource attributes become
//! `job` / `instance`, promoted labels and `target_info`.
//!
//! Pure. What happens to an observation — replacing a series' value or adding a delta to it —
//! is the series state's job (`store`), and how it is written is `render`'s.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Metric, NumberDataPoint, ResourceMetrics,
};

use super::exponential::ExponentialBuckets;
use super::names::{metric_name, sanitize_label, to_base_unit};

/// Sorted label pairs.
pub type Labels = Vec<(String, String)>;

/// How observations are named and labelled.
#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    pub add_metric_suffixes: bool,
    pub add_scope_labels: bool,
    pub all_resource_attributes: bool,
    pub promoted: Vec<String>,
    /// Series not updated for this long are forgotten (see `Store::expire`).
    pub expiration: std::time::Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Summary => "summary",
        }
    }
}

/// What a data point says, in base units.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    /// Explicit buckets: upper bounds, and the count of each bucket (one more: past every bound).
    Histogram {
        bounds: Vec<f64>,
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
    /// Exponential buckets, whose bounds `factor` turns into base units.
    Exponential {
        buckets: ExponentialBuckets,
        factor: f64,
        sum: f64,
        count: u64,
    },
    /// Quantiles `(q, value)`.
    Summary {
        quantiles: Vec<(f64, f64)>,
        sum: f64,
        count: u64,
    },
}

/// One data point (or a resource's `target_info`) as Prometheus sees it.
pub struct Observation<'a> {
    pub family: String,
    pub kind: Kind,
    pub help: &'a str,
    pub labels: Labels,
    pub value: Value,
    /// A delta, to add to what the series holds (else it replaces it).
    pub delta: bool,
    /// When the point was observed (0: not said).
    pub time_unix_nano: u64,
    /// False for `target_info`, which no data point of the batch stands for.
    pub is_point: bool,
}

/// Translates every data point of `resource_metrics` into `emit`. Returns the number of data
/// points that have no Prometheus form (no value).
pub fn translate<'a>(
    resource_metrics: &'a [ResourceMetrics],
    settings: &Settings,
    mut emit: impl FnMut(Observation<'a>),
) -> usize {
    let mut untranslatable = 0;
    for rm in resource_metrics {
        let resource_attributes = rm
            .resource
            .as_ref()
            .map(|r| r.attributes.as_slice())
            .unwrap_or_default();
        let (resource_labels, target_labels) = resource_labels(resource_attributes, settings);
        if !target_labels.is_empty() {
            let mut labels = resource_labels.clone();
            labels.extend(target_labels);
            let family = if settings.namespace.is_empty() {
                "target_info".to_string()
            } else {
                format!("{}_target_info", settings.namespace)
            };
            emit(Observation {
                family,
                kind: Kind::Gauge,
                help: "Target metadata",
                labels: labels.into_iter().collect(),
                value: Value::Number(1.0),
                delta: false,
                time_unix_nano: 0,
                is_point: false,
            });
        }
        for sm in &rm.scope_metrics {
            let mut scope_labels = resource_labels.clone();
            if let Some(scope) = sm.scope.as_ref().filter(|_| settings.add_scope_labels) {
                if !scope.name.is_empty() {
                    scope_labels.insert("otel_scope_name".into(), scope.name.clone());
                }
                if !scope.version.is_empty() {
                    scope_labels.insert("otel_scope_version".into(), scope.version.clone());
                }
            }
            for metric in &sm.metrics {
                untranslatable += translate_metric(metric, &scope_labels, settings, &mut emit);
            }
        }
    }
    untranslatable
}

/// The labels every series of a resource gets (`job`, `instance`, promoted attributes), and the
/// rest of its attributes (for `target_info`).
fn resource_labels(
    attributes: &[KeyValue],
    settings: &Settings,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut resource = BTreeMap::new();
    let mut target = BTreeMap::new();
    let find = |key: &str| {
        attributes
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
        resource.insert("job".into(), job);
    }
    if let Some(instance) = find("service.instance.id") {
        resource.insert("instance".into(), instance);
    }
    for (key, value) in labels_of(attributes) {
        let promoted = attributes
            .iter()
            .any(|a| sanitize_label(&a.key) == key && settings.promoted.contains(&a.key));
        if settings.all_resource_attributes || promoted {
            resource.insert(key, value);
        } else {
            target.insert(key, value);
        }
    }
    (resource, target)
}

/// A data point's attributes, its value (`None`: it has none), and when it was observed.
type Point<'a> = (&'a [KeyValue], Option<Value>, u64);

fn translate_metric<'a>(
    m: &'a Metric,
    scope_labels: &BTreeMap<String, String>,
    settings: &Settings,
    emit: &mut impl FnMut(Observation<'a>),
) -> usize {
    let (unit, factor) = to_base_unit(&m.unit);
    let is_delta = |t: i32| t == AggregationTemporality::Delta as i32;
    let numbers = |points: &'a [NumberDataPoint]| -> Box<dyn Iterator<Item = Point<'a>> + 'a> {
        Box::new(points.iter().map(move |p| {
            let value = number(&p.value, factor).map(Value::Number);
            (p.attributes.as_slice(), value, p.time_unix_nano)
        }))
    };
    let (kind, delta, points): (Kind, bool, Box<dyn Iterator<Item = Point<'a>> + 'a>) =
        match &m.data {
            Some(metric::Data::Gauge(g)) => (Kind::Gauge, false, numbers(&g.data_points)),
            Some(metric::Data::Sum(sum)) => {
                let kind = if sum.is_monotonic {
                    Kind::Counter
                } else {
                    Kind::Gauge
                };
                let delta = is_delta(sum.aggregation_temporality);
                (kind, delta, numbers(&sum.data_points))
            }
            Some(metric::Data::Histogram(h)) => {
                let points = h.data_points.iter().map(move |p| {
                    let value = Value::Histogram {
                        bounds: p.explicit_bounds.iter().map(|b| b * factor).collect(),
                        counts: p.bucket_counts.clone(),
                        sum: p.sum.unwrap_or(0.0) * factor,
                        count: p.count,
                    };
                    (p.attributes.as_slice(), Some(value), p.time_unix_nano)
                });
                let delta = is_delta(h.aggregation_temporality);
                (Kind::Histogram, delta, Box::new(points))
            }
            Some(metric::Data::ExponentialHistogram(h)) => {
                let points = h.data_points.iter().map(move |p| {
                    let value = Value::Exponential {
                        buckets: ExponentialBuckets::of(p),
                        factor,
                        sum: p.sum.unwrap_or(0.0) * factor,
                        count: p.count,
                    };
                    (p.attributes.as_slice(), Some(value), p.time_unix_nano)
                });
                let delta = is_delta(h.aggregation_temporality);
                (Kind::Histogram, delta, Box::new(points))
            }
            Some(metric::Data::Summary(summary)) => {
                let points = summary.data_points.iter().map(move |p| {
                    let value = Value::Summary {
                        quantiles: p
                            .quantile_values
                            .iter()
                            .map(|q| (q.quantile, q.value * factor))
                            .collect(),
                        sum: p.sum * factor,
                        count: p.count,
                    };
                    (p.attributes.as_slice(), Some(value), p.time_unix_nano)
                });
                (Kind::Summary, false, Box::new(points))
            }
            None => return 0,
        };
    let family = metric_name(
        &settings.namespace,
        &m.name,
        unit,
        kind == Kind::Counter,
        settings.add_metric_suffixes,
    );
    // The label a histogram's buckets or a summary's quantiles add, which no attribute may take.
    let reserved = match kind {
        Kind::Histogram => Some("le"),
        Kind::Summary => Some("quantile"),
        Kind::Counter | Kind::Gauge => None,
    };
    let mut untranslatable = 0;
    for (attributes, value, time_unix_nano) in points {
        let Some(value) = value else {
            untranslatable += 1;
            continue;
        };
        emit(Observation {
            family: family.clone(),
            kind,
            help: &m.description,
            labels: point_labels(scope_labels, attributes, reserved),
            value,
            delta,
            time_unix_nano,
            is_point: true,
        });
    }
    untranslatable
}

/// A data point's labels: its resource's and scope's, then its attributes (which win over those
/// of the same name); an attribute named as the `reserved` label gets Prometheus' own fix for a
/// label name it cannot use, a `key_` prefix.
fn point_labels(
    scope_labels: &BTreeMap<String, String>,
    attributes: &[KeyValue],
    reserved: Option<&str>,
) -> Labels {
    let mut all = scope_labels.clone();
    all.extend(labels_of(attributes));
    if let Some((name, value)) = reserved.and_then(|name| all.remove_entry(name)) {
        all.entry(format!("key_{name}"))
            .and_modify(|v| {
                v.push(';');
                v.push_str(&value);
            })
            .or_insert(value);
    }
    all.into_iter().collect()
}

fn number(value: &Option<number_data_point::Value>, factor: f64) -> Option<f64> {
    match value {
        Some(number_data_point::Value::AsInt(i)) => Some(*i as f64 * factor),
        Some(number_data_point::Value::AsDouble(d)) => Some(*d * factor),
        None => None,
    }
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
