//! The unit of data that flows through a pipeline: a list of OTLP `ResourceMetrics`,
//! `ResourceSpans` or `ResourceLogs`, or one OTLP profiles message (its resources and their one dictionary),
//! shared copy-on-write so that fan-out to several consumers costs a reference count, and only a
//! consumer that mutates pays for a copy.
//!
//! Items received as OTLP protobuf stay encoded until something reads them ([`Items`]): a
//! pipeline whose processors and exporters only group and forward them never decodes them.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, OnceLock};

use bytes::{Buf, Bytes};
use prost::Message;

use opentelemetry_proto::tonic::logs::v1::{ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, Metric, ResourceMetrics, ScopeMetrics,
};
use opentelemetry_proto::tonic::profiles::v1development::ProfilesData;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};

use crate::profiles;

/// The kinds of telemetry a pipeline carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Signal {
    Metrics,
    Traces,
    /// OTLP profiles, the development version of the protocol (experimental).
    Profiles,
    /// OTLP log records.
    Logs,
}

impl Signal {
    pub const ALL: [Signal; 4] = [
        Signal::Metrics,
        Signal::Traces,
        Signal::Profiles,
        Signal::Logs,
    ];

    /// The name used in configuration (`service.pipelines.metrics`) and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Metrics => "metrics",
            Signal::Traces => "traces",
            Signal::Profiles => "profiles",
            Signal::Logs => "logs",
        }
    }

    /// What one counted item of this signal is, for messages and docs.
    pub fn item_name(self) -> &'static str {
        match self {
            Signal::Metrics => "data points",
            Signal::Traces => "spans",
            Signal::Profiles => "samples",
            Signal::Logs => "log records",
        }
    }

    pub fn parse(name: &str) -> Option<Signal> {
        Signal::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The items of a batch (`ResourceSpans`, `ResourceMetrics`, `ResourceLogs`), read as a `Vec`.
///
/// Items that arrived as OTLP protobuf and were checked (`otlp::scan`) keep those bytes, and are
/// decoded only when first read; an exporter sending protobuf sends the bytes as they came.
/// Writing to the items (`DerefMut`) drops the bytes, which would no longer match.
pub struct Items<T> {
    decoded: OnceLock<Vec<T>>,
    /// Set while the items are still exactly what was received.
    encoded: Option<Encoded>,
}

#[derive(Clone)]
struct Encoded {
    /// Export request bodies made only of `repeated <item> = 1` elements, so that their
    /// concatenation is a request too.
    bodies: Vec<Bytes>,
    items: usize,
}

impl<T> From<Vec<T>> for Items<T> {
    fn from(items: Vec<T>) -> Self {
        Items {
            decoded: OnceLock::from(items),
            encoded: None,
        }
    }
}

impl<T: Message + Default> Items<T> {
    /// Items still as the request `body` holds them (`repeated <item> = 1` and nothing else,
    /// checked to decode), with their count (data points or spans).
    pub fn encoded(body: Bytes, items: usize) -> Self {
        Items {
            decoded: OnceLock::new(),
            encoded: Some(Encoded {
                bodies: vec![body],
                items,
            }),
        }
    }

    /// The protobuf request bodies these items were received in (their concatenation is one
    /// request), if nothing changed them since.
    pub fn encoded_bodies(&self) -> Option<&[Bytes]> {
        self.encoded.as_ref().map(|e| &e.bodies[..])
    }

    /// The item count known without decoding, for items still encoded.
    fn encoded_items(&self) -> Option<usize> {
        self.encoded.as_ref().map(|e| e.items)
    }

    pub fn into_vec(self) -> Vec<T> {
        match self.decoded.into_inner() {
            Some(items) => items,
            None => decode(self.encoded.as_ref()),
        }
    }

    /// Appends `other`'s items; two batches still encoded stay encoded (the bodies are joined,
    /// not copied).
    fn append(&mut self, other: Items<T>) {
        if let (Some(mine), Some(theirs)) = (&mut self.encoded, &other.encoded) {
            mine.bodies.extend(theirs.bodies.iter().cloned());
            mine.items += theirs.items;
            self.decoded = OnceLock::new();
            return;
        }
        if self.encoded.is_none() && self.decoded.get().is_some_and(Vec::is_empty) {
            *self = other;
            return;
        }
        let others = other.into_vec();
        self.extend(others);
    }
}

/// The elements of checked request bodies. The check (`otlp::scan`) accepts only what prost
/// decodes, so an element that does not is a bug, logged rather than taking the agent down.
fn decode<T: Message + Default>(encoded: Option<&Encoded>) -> Vec<T> {
    let mut items = Vec::new();
    for body in encoded.into_iter().flat_map(|e| &e.bodies) {
        let mut rest = body.clone();
        while rest.has_remaining() {
            rest.advance(1); // the key of field 1, length-delimited
            let element = prost::decode_length_delimiter(&mut rest)
                .ok()
                .filter(|len| *len <= rest.remaining())
                .map(|len| rest.split_to(len))
                .and_then(|element| T::decode(element).ok());
            match element {
                Some(element) => items.push(element),
                None => {
                    debug_assert!(false, "a checked OTLP request did not decode");
                    tracing::error!(
                        "a checked OTLP request did not decode: its remaining items are lost"
                    );
                    break;
                }
            }
        }
    }
    items
}

impl<T: Message + Default> Deref for Items<T> {
    type Target = Vec<T>;

    fn deref(&self) -> &Vec<T> {
        self.decoded.get_or_init(|| decode(self.encoded.as_ref()))
    }
}

impl<T: Message + Default> DerefMut for Items<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        if self.decoded.get().is_none() {
            self.decoded = OnceLock::from(decode(self.encoded.as_ref()));
        }
        self.encoded = None;
        self.decoded.get_mut().expect("decoded just above")
    }
}

impl<T: Clone> Clone for Items<T> {
    fn clone(&self) -> Self {
        Items {
            decoded: self.decoded.clone(),
            encoded: self.encoded.clone(),
        }
    }
}

impl<T: Message + Default + PartialEq> PartialEq for Items<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Message + Default + fmt::Debug> fmt::Debug for Items<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

/// A batch of OTLP data of one signal.
///
/// Cloning is cheap (reference count). Use [`Batch::metrics_mut`] / [`Batch::traces_mut`] /
/// [`Batch::profiles_mut`] / [`Batch::logs_mut`] to mutate: they copy the data only when another consumer still holds
/// it.
#[derive(Debug, Clone, PartialEq)]
pub enum Batch {
    Metrics(Arc<Items<ResourceMetrics>>),
    Traces(Arc<Items<ResourceSpans>>),
    Profiles(Arc<ProfilesData>),
    Logs(Arc<Items<ResourceLogs>>),
}

impl Batch {
    pub fn metrics(resource_metrics: Vec<ResourceMetrics>) -> Batch {
        Batch::Metrics(Arc::new(Items::from(resource_metrics)))
    }

    pub fn traces(resource_spans: Vec<ResourceSpans>) -> Batch {
        Batch::Traces(Arc::new(Items::from(resource_spans)))
    }

    pub fn logs(resource_logs: Vec<ResourceLogs>) -> Batch {
        Batch::Logs(Arc::new(Items::from(resource_logs)))
    }

    /// A batch still as the protobuf export request `body` of `signal` (checked by
    /// `otlp::scan`, made only of its `repeated` items field) holds it, with its item count;
    /// `None` for profiles, whose items share the request's dictionary and so cannot be joined as
    /// bytes.
    pub fn encoded(signal: Signal, body: Bytes, items: usize) -> Option<Batch> {
        match signal {
            Signal::Metrics => Some(Batch::Metrics(Arc::new(Items::encoded(body, items)))),
            Signal::Traces => Some(Batch::Traces(Arc::new(Items::encoded(body, items)))),
            Signal::Logs => Some(Batch::Logs(Arc::new(Items::encoded(body, items)))),
            Signal::Profiles => None,
        }
    }

    /// The protobuf request bodies the batch was received in, if nothing changed it since:
    /// concatenated, they are its export request.
    pub fn encoded_bodies(&self) -> Option<&[Bytes]> {
        match self {
            Batch::Metrics(rms) => rms.encoded_bodies(),
            Batch::Traces(rss) => rss.encoded_bodies(),
            Batch::Logs(rls) => rls.encoded_bodies(),
            Batch::Profiles(_) => None,
        }
    }

    pub fn profiles(data: ProfilesData) -> Batch {
        Batch::Profiles(Arc::new(data))
    }

    pub fn empty(signal: Signal) -> Batch {
        match signal {
            Signal::Metrics => Batch::metrics(Vec::new()),
            Signal::Traces => Batch::traces(Vec::new()),
            Signal::Profiles => Batch::profiles(ProfilesData::default()),
            Signal::Logs => Batch::logs(Vec::new()),
        }
    }

    pub fn signal(&self) -> Signal {
        match self {
            Batch::Metrics(_) => Signal::Metrics,
            Batch::Traces(_) => Signal::Traces,
            Batch::Profiles(_) => Signal::Profiles,
            Batch::Logs(_) => Signal::Logs,
        }
    }

    /// Items as the Collector counts them: data points for metrics, spans for traces, samples
    /// for profiles, log records for logs.
    pub fn item_count(&self) -> usize {
        match self {
            Batch::Metrics(rms) => rms
                .encoded_items()
                .unwrap_or_else(|| rms.iter().map(resource_metrics_points).sum()),
            Batch::Traces(rss) => rss
                .encoded_items()
                .unwrap_or_else(|| rss.iter().map(resource_spans_count).sum()),
            Batch::Profiles(data) => profiles::sample_count(data),
            Batch::Logs(rls) => rls
                .encoded_items()
                .unwrap_or_else(|| rls.iter().map(resource_logs_count).sum()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.item_count() == 0
    }

    /// Mutable access to metrics; copies only if the data is shared. `None` for another signal.
    pub fn metrics_mut(&mut self) -> Option<&mut Vec<ResourceMetrics>> {
        match self {
            Batch::Metrics(rms) => Some(Arc::make_mut(rms).deref_mut()),
            _ => None,
        }
    }

    /// Mutable access to spans; copies only if the data is shared. `None` for another signal.
    pub fn traces_mut(&mut self) -> Option<&mut Vec<ResourceSpans>> {
        match self {
            Batch::Traces(rss) => Some(Arc::make_mut(rss).deref_mut()),
            _ => None,
        }
    }

    /// Mutable access to log records; copies only if the data is shared. `None` for another
    /// signal.
    pub fn logs_mut(&mut self) -> Option<&mut Vec<ResourceLogs>> {
        match self {
            Batch::Logs(rls) => Some(Arc::make_mut(rls).deref_mut()),
            _ => None,
        }
    }

    /// Mutable access to profiles; copies only if the data is shared. `None` for another signal.
    pub fn profiles_mut(&mut self) -> Option<&mut ProfilesData> {
        match self {
            Batch::Profiles(data) => Some(Arc::make_mut(data)),
            _ => None,
        }
    }

    /// Appends `other` (same signal) to this batch. Batches of different signals are a bug of the
    /// caller, reported as an error rather than mixed.
    pub fn append(&mut self, other: Batch) -> Result<(), Batch> {
        match (self, other) {
            (Batch::Metrics(a), Batch::Metrics(b)) => {
                Arc::make_mut(a).append(take_or_clone(b));
                Ok(())
            }
            (Batch::Traces(a), Batch::Traces(b)) => {
                Arc::make_mut(a).append(take_or_clone(b));
                Ok(())
            }
            (Batch::Logs(a), Batch::Logs(b)) => {
                Arc::make_mut(a).append(take_or_clone(b));
                Ok(())
            }
            (Batch::Profiles(a), Batch::Profiles(b)) => {
                let b = Arc::try_unwrap(b).unwrap_or_else(|shared| (*shared).clone());
                profiles::append(Arc::make_mut(a), b);
                Ok(())
            }
            (_, other) => Err(other),
        }
    }

    /// Splits into batches of at most `max_items` items each (data points, spans, samples or
    /// log records),
    /// keeping resource, scope and metric (profile) descriptions on every piece. `max_items == 0` means no limit.
    pub fn split(self, max_items: usize) -> Vec<Batch> {
        if max_items == 0 || self.item_count() <= max_items {
            return vec![self];
        }
        match self {
            Batch::Metrics(rms) => split_metrics(take_or_clone(rms).into_vec(), max_items)
                .into_iter()
                .map(Batch::metrics)
                .collect(),
            Batch::Traces(rss) => split_traces(take_or_clone(rss).into_vec(), max_items)
                .into_iter()
                .map(Batch::traces)
                .collect(),
            Batch::Logs(rls) => split_logs(take_or_clone(rls).into_vec(), max_items)
                .into_iter()
                .map(Batch::logs)
                .collect(),
            Batch::Profiles(data) => {
                let data = Arc::try_unwrap(data).unwrap_or_else(|shared| (*shared).clone());
                profiles::split(data, max_items)
                    .into_iter()
                    .map(Batch::profiles)
                    .collect()
            }
        }
    }
}

fn take_or_clone<T: Clone>(shared: Arc<T>) -> T {
    Arc::try_unwrap(shared).unwrap_or_else(|still_shared| (*still_shared).clone())
}

fn resource_metrics_points(rm: &ResourceMetrics) -> usize {
    rm.scope_metrics
        .iter()
        .flat_map(|sm| sm.metrics.iter())
        .map(metric_points)
        .sum()
}

fn resource_spans_count(rs: &ResourceSpans) -> usize {
    rs.scope_spans.iter().map(|ss| ss.spans.len()).sum()
}

fn resource_logs_count(rl: &ResourceLogs) -> usize {
    rl.scope_logs.iter().map(|sl| sl.log_records.len()).sum()
}

/// Number of data points in one metric.
pub fn metric_points(metric: &Metric) -> usize {
    match &metric.data {
        Some(Data::Gauge(g)) => g.data_points.len(),
        Some(Data::Sum(s)) => s.data_points.len(),
        Some(Data::Histogram(h)) => h.data_points.len(),
        Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
        Some(Data::Summary(s)) => s.data_points.len(),
        None => 0,
    }
}

/// Removes up to `n` data points from the front of `metric`, returning a metric with the same
/// description holding them.
fn take_points(metric: &mut Metric, n: usize) -> Metric {
    fn take<T>(points: &mut Vec<T>, n: usize) -> Vec<T> {
        let n = n.min(points.len());
        points.drain(..n).collect()
    }
    let data = match &mut metric.data {
        Some(Data::Gauge(g)) => {
            let mut part = g.clone();
            part.data_points = take(&mut g.data_points, n);
            Some(Data::Gauge(part))
        }
        Some(Data::Sum(s)) => Some(Data::Sum(opentelemetry_proto::tonic::metrics::v1::Sum {
            data_points: take(&mut s.data_points, n),
            aggregation_temporality: s.aggregation_temporality,
            is_monotonic: s.is_monotonic,
        })),
        Some(Data::Histogram(h)) => Some(Data::Histogram(
            opentelemetry_proto::tonic::metrics::v1::Histogram {
                data_points: take(&mut h.data_points, n),
                aggregation_temporality: h.aggregation_temporality,
            },
        )),
        Some(Data::ExponentialHistogram(h)) => Some(Data::ExponentialHistogram(
            opentelemetry_proto::tonic::metrics::v1::ExponentialHistogram {
                data_points: take(&mut h.data_points, n),
                aggregation_temporality: h.aggregation_temporality,
            },
        )),
        Some(Data::Summary(s)) => Some(Data::Summary(
            opentelemetry_proto::tonic::metrics::v1::Summary {
                data_points: take(&mut s.data_points, n),
            },
        )),
        None => None,
    };
    Metric {
        name: metric.name.clone(),
        description: metric.description.clone(),
        unit: metric.unit.clone(),
        metadata: metric.metadata.clone(),
        data,
    }
}

fn split_metrics(rms: Vec<ResourceMetrics>, max_items: usize) -> Vec<Vec<ResourceMetrics>> {
    let mut out: Vec<Vec<ResourceMetrics>> = Vec::new();
    let mut current: Vec<ResourceMetrics> = Vec::new();
    let mut room = max_items;
    for rm in rms {
        let mut rm_part = ResourceMetrics {
            resource: rm.resource.clone(),
            scope_metrics: Vec::new(),
            schema_url: rm.schema_url.clone(),
        };
        for sm in rm.scope_metrics {
            let mut sm_part = ScopeMetrics {
                scope: sm.scope.clone(),
                metrics: Vec::new(),
                schema_url: sm.schema_url.clone(),
            };
            for mut metric in sm.metrics {
                loop {
                    let points = metric_points(&metric);
                    if points <= room {
                        room -= points;
                        sm_part.metrics.push(metric);
                        break;
                    }
                    sm_part.metrics.push(take_points(&mut metric, room));
                    // The current batch is full: close every open level and start again.
                    let full_scope = std::mem::replace(
                        &mut sm_part,
                        ScopeMetrics {
                            scope: sm.scope.clone(),
                            metrics: Vec::new(),
                            schema_url: sm.schema_url.clone(),
                        },
                    );
                    rm_part.scope_metrics.push(full_scope);
                    let full_resource = std::mem::replace(
                        &mut rm_part,
                        ResourceMetrics {
                            resource: rm.resource.clone(),
                            scope_metrics: Vec::new(),
                            schema_url: rm.schema_url.clone(),
                        },
                    );
                    current.push(full_resource);
                    out.push(std::mem::take(&mut current));
                    room = max_items;
                }
            }
            if !sm_part.metrics.is_empty() {
                rm_part.scope_metrics.push(sm_part);
            }
        }
        if !rm_part.scope_metrics.is_empty() {
            current.push(rm_part);
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn split_traces(rss: Vec<ResourceSpans>, max_items: usize) -> Vec<Vec<ResourceSpans>> {
    split_scoped(
        rss,
        max_items,
        |rs: &mut ResourceSpans| &mut rs.scope_spans,
        |ss: &mut ScopeSpans| &mut ss.spans,
    )
}

fn split_logs(rls: Vec<ResourceLogs>, max_items: usize) -> Vec<Vec<ResourceLogs>> {
    split_scoped(
        rls,
        max_items,
        |rl: &mut ResourceLogs| &mut rl.scope_logs,
        |sl: &mut ScopeLogs| &mut sl.log_records,
    )
}

/// Resources of scopes of items (spans, log records) in groups of at most `max_items` items,
/// each piece under a copy of its resource and scope. `scopes` and `items` reach a resource's
/// scopes and a scope's items.
fn split_scoped<R: Clone, S: Clone, I>(
    resources: Vec<R>,
    max_items: usize,
    scopes: impl Fn(&mut R) -> &mut Vec<S>,
    items: impl Fn(&mut S) -> &mut Vec<I>,
) -> Vec<Vec<R>> {
    let mut out: Vec<Vec<R>> = Vec::new();
    let mut current: Vec<R> = Vec::new();
    let mut room = max_items;
    for mut resource in resources {
        // `resource` keeps its description, without scopes: each piece starts as a copy.
        let resource_scopes = std::mem::take(scopes(&mut resource));
        let mut part = resource.clone();
        for mut scope in resource_scopes {
            let mut scope_items = std::mem::take(items(&mut scope)).into_iter().peekable();
            while scope_items.peek().is_some() {
                let chunk: Vec<I> = scope_items.by_ref().take(room).collect();
                room -= chunk.len();
                let mut piece = scope.clone();
                *items(&mut piece) = chunk;
                scopes(&mut part).push(piece);
                if room == 0 {
                    current.push(std::mem::replace(&mut part, resource.clone()));
                    out.push(std::mem::take(&mut current));
                    room = max_items;
                }
            }
        }
        if !scopes(&mut part).is_empty() {
            current.push(part);
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::metrics::v1::{Gauge, NumberDataPoint};
    use opentelemetry_proto::tonic::trace::v1::Span;

    fn gauge(name: &str, points: usize) -> Metric {
        Metric {
            name: name.into(),
            data: Some(Data::Gauge(Gauge {
                data_points: (0..points)
                    .map(|i| NumberDataPoint {
                        time_unix_nano: i as u64,
                        ..Default::default()
                    })
                    .collect(),
            })),
            ..Default::default()
        }
    }

    fn metrics_batch(resources: usize, metrics: usize, points: usize) -> Batch {
        Batch::metrics(
            (0..resources)
                .map(|_| ResourceMetrics {
                    scope_metrics: vec![ScopeMetrics {
                        metrics: (0..metrics)
                            .map(|m| gauge(&format!("m{m}"), points))
                            .collect(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .collect(),
        )
    }

    #[test]
    fn counts_data_points_and_spans() {
        assert_eq!(metrics_batch(2, 3, 4).item_count(), 24);
        let traces = Batch::traces(vec![ResourceSpans {
            scope_spans: vec![
                ScopeSpans {
                    spans: vec![Span::default(); 3],
                    ..Default::default()
                },
                ScopeSpans {
                    spans: vec![Span::default(); 2],
                    ..Default::default()
                },
            ],
            ..Default::default()
        }]);
        assert_eq!(traces.item_count(), 5);
        assert_eq!(traces.signal(), Signal::Traces);
    }

    #[test]
    fn split_metrics_keeps_every_point_and_respects_the_limit() {
        let batch = metrics_batch(3, 2, 5); // 30 points
        let parts = batch.clone().split(7);
        let sizes: Vec<usize> = parts.iter().map(Batch::item_count).collect();
        assert_eq!(sizes, vec![7, 7, 7, 7, 2]);
        // The points come out in the original order, each under its original metric name.
        let flatten = |b: &Batch| -> Vec<(String, u64)> {
            let Batch::Metrics(rms) = b else {
                unreachable!()
            };
            rms.iter()
                .flat_map(|rm| rm.scope_metrics.iter())
                .flat_map(|sm| sm.metrics.iter())
                .flat_map(|m| {
                    let Some(Data::Gauge(g)) = &m.data else {
                        unreachable!()
                    };
                    g.data_points
                        .iter()
                        .map(|p| (m.name.clone(), p.time_unix_nano))
                })
                .collect()
        };
        let rejoined: Vec<_> = parts.iter().flat_map(flatten).collect();
        assert_eq!(rejoined, flatten(&batch));
    }

    #[test]
    fn split_traces_respects_the_limit() {
        let batch = Batch::traces(vec![
            ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span::default(); 5],
                    ..Default::default()
                }],
                ..Default::default()
            };
            2
        ]);
        let sizes: Vec<usize> = batch.split(4).iter().map(Batch::item_count).collect();
        assert_eq!(sizes, vec![4, 4, 2]);
    }

    #[test]
    fn log_records_are_counted_split_and_appended_like_spans() {
        use opentelemetry_proto::tonic::logs::v1::LogRecord;
        let records = |n: u64| ResourceLogs {
            scope_logs: vec![ScopeLogs {
                log_records: (0..n)
                    .map(|i| LogRecord {
                        time_unix_nano: i,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut batch = Batch::logs(vec![records(5), records(3)]);
        assert_eq!((batch.signal(), batch.item_count()), (Signal::Logs, 8));
        batch.append(Batch::logs(vec![records(2)])).unwrap();
        assert!(batch.append(Batch::traces(vec![])).is_err());
        let parts = batch.split(4);
        let sizes: Vec<usize> = parts.iter().map(Batch::item_count).collect();
        assert_eq!(sizes, vec![4, 4, 2]);
        let times: Vec<u64> = parts
            .iter()
            .flat_map(|b| {
                let Batch::Logs(rls) = b else { unreachable!() };
                rls.iter()
                    .flat_map(|rl| &rl.scope_logs)
                    .flat_map(|sl| sl.log_records.iter().map(|r| r.time_unix_nano))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(times, vec![0, 1, 2, 3, 4, 0, 1, 2, 0, 1]);
        assert_eq!(Signal::parse("logs"), Some(Signal::Logs));
    }

    #[test]
    fn split_with_no_limit_or_small_batch_is_identity() {
        let batch = metrics_batch(1, 1, 3);
        assert_eq!(batch.clone().split(0), vec![batch.clone()]);
        assert_eq!(batch.clone().split(3), vec![batch]);
    }

    #[test]
    fn mutation_copies_only_shared_data() {
        let mut a = metrics_batch(1, 1, 1);
        let b = a.clone();
        a.metrics_mut().unwrap().clear();
        assert_eq!(a.item_count(), 0);
        assert_eq!(b.item_count(), 1, "the other holder keeps its data");
    }

    #[test]
    fn append_refuses_mixed_signals() {
        let mut a = metrics_batch(1, 1, 2);
        a.append(metrics_batch(1, 1, 3)).unwrap();
        assert_eq!(a.item_count(), 5);
        assert!(a.append(Batch::traces(vec![])).is_err());
    }
}
