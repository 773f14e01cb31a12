//! Data points into OTLP metrics: one `ResourceMetrics` per cgroup (and one for the host, for
//! per-device data), cumulative sums and exponential histograms. The probes add their data points
//! here; which owners are reported, with what identity and series start time, is decided when the
//! collection is finished ([`MetricsBuilder::finish`]). This module knows no probe.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, ExponentialHistogram,
    ExponentialHistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use podscope_ebpf::abi::Hist;

use super::catalog::{MetricDoc, MetricKind};
use super::cgroups::container_id;
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

/// The receiver's instrumentation scope, on its metrics and spans.
pub fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "podscope.receiver.ebpf".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    }
}

/// The resource of `owner`'s data (metrics, spans and profiles alike): the host, and for a cgroup its id,
/// path (when known) and container id, from which the Kubernetes processor finds the pod.
pub fn resource(host_name: &str, owner: Owner, path: Option<&str>) -> Resource {
    let mut attributes = vec![string_attr("host.name", host_name)];
    if let Owner::Cgroup(id) = owner {
        attributes.push(int_attr("podscope.cgroup.id", id as i64));
        if let Some(path) = path {
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

/// Where data points belong: a cgroup, or the host itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    Cgroup(u64),
    Host,
}

/// How an owner's data points are reported: its cgroup path (when known) and the start time of
/// its cumulative series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub path: Option<String>,
    pub start_ns: u64,
}

/// Collects data points and groups them into resources and metrics.
pub struct MetricsBuilder<'a> {
    host_name: &'a str,
    now_ns: u64,
    metrics: BTreeMap<Owner, BTreeMap<String, Metric>>,
}

impl<'a> MetricsBuilder<'a> {
    pub fn new(host_name: &'a str, now_ns: u64) -> Self {
        MetricsBuilder {
            host_name,
            now_ns,
            metrics: BTreeMap::new(),
        }
    }

    /// The owners that have data points.
    pub fn owners(&self) -> impl Iterator<Item = Owner> + '_ {
        self.metrics.keys().copied()
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
                    MetricKind::Distribution | MetricKind::Duration => {
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

    /// The metric `name` of `owner`, made by `create` when absent: for metrics whose shape and
    /// start time are their own (user programs' maps, loaded after the receiver started).
    pub fn metric_entry(
        &mut self,
        owner: Owner,
        name: &str,
        create: impl FnOnce() -> Metric,
    ) -> &mut Metric {
        self.metrics
            .entry(owner)
            .or_default()
            .entry(name.to_string())
            .or_insert_with(create)
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
        let now = self.now_ns;
        if let Some(metric::Data::Sum(sum)) = &mut self
            .metric_named(owner, name, description, unit, MetricKind::Counter)
            .data
        {
            sum.data_points.push(NumberDataPoint {
                attributes,
                time_unix_nano: now,
                value: Some(number_data_point::Value::AsInt(value as i64)),
                ..Default::default()
            });
        }
    }

    pub fn count(&mut self, owner: Owner, doc: &MetricDoc, attributes: Vec<KeyValue>, value: u64) {
        let now = self.now_ns;
        if let Some(metric::Data::Sum(sum)) = &mut self.metric(owner, doc).data {
            sum.data_points.push(NumberDataPoint {
                attributes,
                time_unix_nano: now,
                value: Some(number_data_point::Value::AsInt(value as i64)),
                ..Default::default()
            });
        }
    }

    /// A delta count over the interval from `start_ns` to `end_ns` (not the collection's).
    pub fn count_over(
        &mut self,
        owner: Owner,
        doc: &MetricDoc,
        attributes: Vec<KeyValue>,
        value: u64,
        (start_ns, end_ns): (u64, u64),
    ) {
        if let Some(metric::Data::Sum(sum)) = &mut self.metric(owner, doc).data {
            sum.data_points.push(NumberDataPoint {
                attributes,
                start_time_unix_nano: start_ns,
                time_unix_nano: end_ns,
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
        let now = self.now_ns;
        if let Some(metric::Data::ExponentialHistogram(h)) = &mut self.metric(owner, doc).data {
            let mut point = exponential_point(hist);
            point.attributes = attributes;
            point.time_unix_nano = now;
            h.data_points.push(point);
        }
    }

    /// An exponential-histogram data point made by the probe (a scale other than the kernel's);
    /// its start time, when it has none, is its owner's series start, as for the others.
    pub fn exponential(
        &mut self,
        owner: Owner,
        doc: &MetricDoc,
        mut point: ExponentialHistogramDataPoint,
    ) {
        point.time_unix_nano = self.now_ns;
        if let Some(metric::Data::ExponentialHistogram(h)) = &mut self.metric(owner, doc).data {
            h.data_points.push(point);
        }
    }

    /// The resources of the owners `identify` names (the others' points are left out), every
    /// point that has no start time yet given its owner's.
    pub fn finish(self, identify: impl Fn(Owner) -> Option<Identity>) -> Vec<ResourceMetrics> {
        let scope = scope();
        let mut out = Vec::new();
        for (owner, metrics) in &self.metrics {
            let Some(identity) = identify(*owner) else {
                continue;
            };
            let mut metrics: Vec<Metric> = metrics.values().cloned().collect();
            for metric in &mut metrics {
                set_missing_start(metric, identity.start_ns);
            }
            out.push(ResourceMetrics {
                resource: Some(resource(self.host_name, *owner, identity.path.as_deref())),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(scope.clone()),
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
        out
    }
}

/// Gives every point of `metric` without a start time `start_ns`.
fn set_missing_start(metric: &mut Metric, start_ns: u64) {
    let fill = |t: &mut u64| {
        if *t == 0 {
            *t = start_ns;
        }
    };
    match &mut metric.data {
        Some(metric::Data::Sum(sum)) => sum
            .data_points
            .iter_mut()
            .for_each(|p| fill(&mut p.start_time_unix_nano)),
        Some(metric::Data::ExponentialHistogram(h)) => h
            .data_points
            .iter_mut()
            .for_each(|p| fill(&mut p.start_time_unix_nano)),
        _ => {}
    }
}
