//! Remote write 1.0 requests: the protobuf messages of the protocol (prost), built from the series
//! the store last updated (flattened by the same walk as the scrape page), sharded by series,
//! split by sample count, snappy-compressed. Pure: no I/O here.

use std::collections::BTreeMap;
use std::hash::{Hash as _, Hasher as _};

use prost::Message as _;

use crate::prometheus::render::for_each_sample;
use crate::prometheus::{Labels, Store};

#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// The remote-write requests for the series `store`'s last `apply` changed, as
/// `(shard, request, data points it carries)`.
///
/// Each series' samples carry its labels, `__name__`, the external labels it has no label of the
/// same name for, sorted by name, and the time of its latest point (`now_ms` if the point did not
/// say). A series always goes to the same one of `shards` shards (by a hash of its name and
/// labels), so the shards can be sent side by side while each series' samples stay in time
/// order. A shard's samples are split into requests of at most `max_samples`; a series' data
/// points are counted in the request that holds its first sample.
pub fn build_requests(
    store: &Store,
    external_labels: &BTreeMap<String, String>,
    now_ms: i64,
    shards: usize,
    max_samples: usize,
) -> Vec<(usize, WriteRequest, usize)> {
    let shards = shards.max(1);
    let max_samples = max_samples.max(1);
    let mut open: Vec<(WriteRequest, usize)> = vec![(WriteRequest::default(), 0); shards];
    let mut full = Vec::new();
    for (name, _, labels, series) in store.updated() {
        let shard = shard_of(name, labels, shards);
        let timestamp = match series.time_unix_nano {
            0 => now_ms,
            nanos => (nanos / 1_000_000) as i64,
        };
        let mut points = series.points;
        for_each_sample(&series.value, |sample| {
            let (request, items) = &mut open[shard];
            if request.timeseries.len() == max_samples {
                full.push((shard, std::mem::take(request), std::mem::take(items)));
            }
            let (request, items) = &mut open[shard];
            // The first sample of the series takes its data points.
            *items += std::mem::take(&mut points);
            let metric = format!("{name}{}", sample.suffix);
            request.timeseries.push(TimeSeries {
                labels: sample_labels(labels, metric, sample.extra, external_labels),
                samples: vec![Sample {
                    value: sample.value,
                    timestamp,
                }],
            });
        });
    }
    full.extend(
        open.into_iter()
            .enumerate()
            .filter(|(_, (request, _))| !request.timeseries.is_empty())
            .map(|(shard, (request, items))| (shard, request, items)),
    );
    full
}

fn shard_of(name: &str, labels: &Labels, shards: usize) -> usize {
    let mut hasher = std::hash::DefaultHasher::new();
    (name, labels).hash(&mut hasher);
    (hasher.finish() % shards as u64) as usize
}

fn sample_labels(
    labels: &Labels,
    metric: String,
    extra: Option<(&'static str, String)>,
    external_labels: &BTreeMap<String, String>,
) -> Vec<Label> {
    let mut all: Vec<Label> = labels
        .iter()
        .map(|(name, value)| Label {
            name: name.clone(),
            value: value.clone(),
        })
        .collect();
    all.push(Label {
        name: "__name__".into(),
        value: metric,
    });
    if let Some((name, value)) = extra {
        all.push(Label {
            name: name.into(),
            value,
        });
    }
    for (name, value) in external_labels {
        if !labels.iter().any(|(n, _)| n == name) {
            all.push(Label {
                name: name.clone(),
                value: value.clone(),
            });
        }
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

/// The body as sent: protobuf, snappy block format.
pub fn encode(request: &WriteRequest) -> Vec<u8> {
    snap::raw::Encoder::new()
        .compress_vec(&request.encode_to_vec())
        .expect("snappy accepts any input size below 4 GiB")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::metrics::v1::{
        metric, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
    };

    use super::*;
    use crate::prometheus::Settings;

    fn store_with(series: usize, time_unix_nano: u64) -> Store {
        let mut store = Store::new(Settings {
            namespace: String::new(),
            add_metric_suffixes: true,
            add_scope_labels: true,
            all_resource_attributes: false,
            promoted: Vec::new(),
            expiration: Duration::from_secs(60),
        });
        let points = (0..series)
            .map(|i| NumberDataPoint {
                attributes: vec![KeyValue {
                    key: "a".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue(i.to_string())),
                    }),
                    ..Default::default()
                }],
                time_unix_nano,
                value: Some(number_data_point::Value::AsDouble(i as f64)),
                ..Default::default()
            })
            .collect();
        store.apply(
            &[ResourceMetrics {
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![Metric {
                        name: "m".into(),
                        data: Some(metric::Data::Gauge(Gauge {
                            data_points: points,
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            Instant::now(),
        );
        store
    }

    #[test]
    fn requests_split_sort_labels_and_round_trip_through_snappy() {
        let store = store_with(5, 0);
        let external = [("cluster".to_string(), "prod".to_string())]
            .into_iter()
            .collect();
        let requests = build_requests(&store, &external, 1_700_000_000_000, 1, 2);
        assert_eq!(
            requests
                .iter()
                .map(|(shard, r, items)| (*shard, r.timeseries.len(), *items))
                .collect::<Vec<_>>(),
            vec![(0, 2, 2), (0, 2, 2), (0, 1, 1)]
        );
        let first = &requests[0].1.timeseries[0];
        let names: Vec<&str> = first.labels.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, vec!["__name__", "a", "cluster"]);
        assert_eq!(
            first.samples,
            vec![Sample {
                value: 0.0,
                timestamp: 1_700_000_000_000
            }]
        );
        let body = encode(&requests[1].1);
        let decoded = WriteRequest::decode(
            snap::raw::Decoder::new()
                .decompress_vec(&body)
                .unwrap()
                .as_slice(),
        )
        .unwrap();
        assert_eq!(decoded, requests[1].1);
    }

    #[test]
    fn samples_carry_their_point_time_and_each_series_keeps_its_shard() {
        let store = store_with(40, 1_600_000_000_123_456_789);
        let requests = build_requests(&store, &BTreeMap::new(), 1, 4, 1000);
        let mut seen = BTreeMap::new();
        for (shard, request, items) in &requests {
            assert_eq!(*items, request.timeseries.len());
            for series in &request.timeseries {
                assert_eq!(series.samples[0].timestamp, 1_600_000_000_123);
                let a = series.labels.iter().find(|l| l.name == "a").unwrap();
                assert_eq!(
                    shard_of("m", &vec![("a".into(), a.value.clone())], 4),
                    *shard
                );
                seen.insert(a.value.clone(), *shard);
            }
        }
        assert_eq!(seen.len(), 40);
        assert!(
            seen.values()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                > 1,
            "40 series spread over the shards"
        );
    }
}
