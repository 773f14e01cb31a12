//! Data points into OTLP metrics: one `ResourceMetrics` per cgroup (and one for the host, for
//! per-device data), cumulative sums and exponential histograms with the receiver's start time as
//! every series' start time (the maps count from the moment they were created). The probes add
//! their data points here; this module knows no probe.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, ExponentialHistogram,
    ExponentialHistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use podscope_ebpf::abi::Hist;

use super::catalog::{MetricDoc, MetricKind};
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

/// The receiver's instrumentation scope, on its metrics and spans.
pub fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "podscope.receiver.ebpf".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    }
}

/// The resource of `owner`'s data (metrics and spans alike): the host, and for a cgroup its id,
/// path and container id, from which the Kubernetes processor finds the pod.
pub fn resource(host_name: &str, index: &CgroupIndex, owner: Owner) -> Resource {
    let mut attributes = vec![string_attr("host.name", host_name)];
    if let Owner::Cgroup(id) = owner {
        attributes.push(int_attr("podscope.cgroup.id", id as i64));
        if let Some(path) = index.path(id) {
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

    /// An exponential-histogram data point made by the probe (a scale other than the kernel's).
    pub fn exponential(
        &mut self,
        owner: Owner,
        doc: &MetricDoc,
        mut point: ExponentialHistogramDataPoint,
    ) {
        point.start_time_unix_nano = self.start_ns;
        point.time_unix_nano = self.now_ns;
        if let Some(metric::Data::ExponentialHistogram(h)) = &mut self.metric(owner, doc).data {
            h.data_points.push(point);
        }
    }

    pub fn finish(self) -> Vec<ResourceMetrics> {
        let scope = scope();
        self.metrics
            .iter()
            .map(|(owner, metrics)| ResourceMetrics {
                resource: Some(resource(self.host_name, self.index, *owner)),
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
