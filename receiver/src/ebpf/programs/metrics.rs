//! A program's `metrics` section checked against its object (maps, their kinds, BTF layouts) and
//! then, at each collection, its maps read into OTLP data points: counters as cumulative sums,
//! exp2 histograms as exponential histograms of scale 0, linear and explicit ones as explicit
//! histograms. Per-CPU values are summed; entries whose labels decode alike are added together;
//! each metric keeps at most `maxSeries` label sets and counts the ones it refuses.

use std::collections::{BTreeMap, HashSet};

use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, ExponentialHistogram,
    ExponentialHistogramDataPoint, Histogram, HistogramDataPoint, Metric, NumberDataPoint, Sum,
};

use super::btf::{Btf, Field, Shape, TypeId};
use super::decode::{self, Decoded};
use super::maps::{self, Entry};
use super::spec::{BucketType, CounterSpec, Decoder, HistogramSpec, LabelSpec, MetricsSpec};
use crate::ebpf::builder::{string_attr, MetricsBuilder, Owner};

/// What the object says of one map, before it is loaded.
#[derive(Debug, Clone)]
pub struct MapLayout {
    pub name: String,
    pub map_type: u32,
    pub key_size: usize,
    pub value_size: usize,
    pub max_entries: u32,
    /// BTF type ids of key and value (absent for maps declared without BTF).
    pub key_type: Option<TypeId>,
    pub value_type: Option<TypeId>,
}

#[derive(Debug)]
struct Label {
    name: String,
    field: Field,
    decoder: Decoder,
    values: BTreeMap<String, String>,
}

/// What a metric reads from each entry.
#[derive(Debug)]
enum Reading {
    Counter {
        value: Field,
    },
    Exp2 {
        bucket: Field,
    },
    /// Explicit bounds (linear ones generated); bucket k of the map is bucket k here.
    Explicit {
        bucket: Field,
        bounds: Vec<f64>,
    },
}

/// One metric of a program, ready to read its map.
#[derive(Debug)]
pub struct CompiledMetric {
    pub name: String,
    description: String,
    unit: String,
    /// The map's name in the object.
    pub map: String,
    labels: Vec<Label>,
    shape: Reading,
    max_series: usize,
    known: HashSet<Vec<Decoded>>,
    refused: HashSet<Vec<Decoded>>,
}

/// A field of `of` (a struct type) by name, or the whole of it; layouts are checked against
/// the map's declared size so that a read never goes past an entry.
fn locate(
    btf: Option<&Btf>,
    of: Option<TypeId>,
    size: usize,
    field: Option<&str>,
    what: &str,
) -> Result<Field, String> {
    let found = match (field, btf.zip(of)) {
        (Some(path), Some((btf, id))) => btf.field(id, path).map_err(|e| format!("{what} field {path:?}: {e}"))?,
        (Some(path), None) => {
            return Err(format!(
                "{what} field {path:?}: the map has no BTF layout (declare it with __type(key, …) / __type(value, …) and compile with -g)"
            ))
        }
        (None, Some((btf, id))) => btf.whole(id)?,
        (None, None) => Field {
            offset: 0,
            size,
            shape: if matches!(size, 1 | 2 | 4 | 8) {
                Shape::Integer { signed: false }
            } else {
                Shape::Bytes
            },
        },
    };
    if found.offset + found.size > size {
        return Err(format!(
            "{what}: field past the end of the {size}-byte entry"
        ));
    }
    Ok(found)
}

fn integer_field(field: &Field, what: &str) -> Result<(), String> {
    if matches!(field.size, 1 | 2 | 4 | 8) && field.shape != Shape::Composite {
        Ok(())
    } else {
        Err(format!(
            "{what} must be an integer, it is {} bytes",
            field.size
        ))
    }
}

fn compile_labels(
    labels: &[LabelSpec],
    btf: Option<&Btf>,
    map: &MapLayout,
) -> Result<Vec<Label>, String> {
    labels
        .iter()
        .map(|l| {
            let what = if l.name.is_empty() {
                "cgroup label".to_string()
            } else {
                format!("label {}", l.name)
            };
            let field = locate(
                btf,
                map.key_type,
                map.key_size,
                l.field.as_deref(),
                &format!("{what}: key"),
            )?;
            decode::check(l.decoder, &field).map_err(|e| format!("{what}: {e}"))?;
            Ok(Label {
                name: l.name.clone(),
                field,
                decoder: l.decoder,
                values: l.values.clone(),
            })
        })
        .collect()
}

fn readable<'a>(maps: &'a [MapLayout], name: &str, metric: &str) -> Result<&'a MapLayout, String> {
    let map = maps.iter().find(|m| m.name == name).ok_or_else(|| {
        let names: Vec<&str> = maps.iter().map(|m| m.name.as_str()).collect();
        format!(
            "metric {metric}: no map {name:?} in the object; its maps are {}",
            names.join(", ")
        )
    })?;
    if maps::readable_kind(map.map_type).is_none() {
        return Err(format!(
            "metric {metric}: map {name} is of type {}; metrics read hash, LRU hash and array maps and their per-CPU forms",
            map.map_type
        ));
    }
    Ok(map)
}

/// Every metric of `spec` checked against the object's maps and BTF.
pub fn compile(
    spec: &MetricsSpec,
    maps: &[MapLayout],
    btf: Option<&Btf>,
) -> Result<Vec<CompiledMetric>, String> {
    let mut out = Vec::new();
    for c in &spec.counters {
        out.push(compile_counter(c, maps, btf).map_err(|e| format!("metric {}: {e}", c.name))?);
    }
    for h in &spec.histograms {
        out.push(compile_histogram(h, maps, btf).map_err(|e| format!("metric {}: {e}", h.name))?);
    }
    Ok(out)
}

fn compile_counter(
    c: &CounterSpec,
    maps: &[MapLayout],
    btf: Option<&Btf>,
) -> Result<CompiledMetric, String> {
    let map = readable(maps, &c.map, &c.name).map_err(|e| strip_metric(&e))?;
    let value = locate(
        btf,
        map.value_type,
        map.value_size,
        c.value.as_deref(),
        "value",
    )?;
    integer_field(&value, "the counted value")?;
    Ok(CompiledMetric {
        name: c.name.clone(),
        description: c.description.clone(),
        unit: c.unit.clone(),
        map: c.map.clone(),
        labels: compile_labels(&c.labels, btf, map)?,
        shape: Reading::Counter { value },
        max_series: c.max_series,
        known: HashSet::new(),
        refused: HashSet::new(),
    })
}

fn compile_histogram(
    h: &HistogramSpec,
    maps: &[MapLayout],
    btf: Option<&Btf>,
) -> Result<CompiledMetric, String> {
    let map = readable(maps, &h.map, &h.name).map_err(|e| strip_metric(&e))?;
    let value = locate(btf, map.value_type, map.value_size, None, "value")?;
    integer_field(&value, "a histogram map's value (a bucket's count)")?;
    // The bucket: the named field, else the key's last member, else the whole (integer) key.
    let last_member = btf
        .zip(map.key_type)
        .map(|(btf, id)| btf.members(id))
        .and_then(|m| m.last().cloned());
    let bucket_path = h.bucket_field.clone().or(last_member);
    let bucket = locate(
        btf,
        map.key_type,
        map.key_size,
        bucket_path.as_deref(),
        "bucket: key",
    )?;
    integer_field(&bucket, "the bucket index")?;
    let shape = match h.bucket_type {
        BucketType::Exp2 => Reading::Exp2 { bucket },
        BucketType::Linear => {
            let (width, count) = (h.bucket_width.unwrap_or(1), h.bucket_count.unwrap_or(2));
            Reading::Explicit {
                bucket,
                bounds: (0..count.saturating_sub(1))
                    .map(|k| (u64::from(k) * width) as f64)
                    .collect(),
            }
        }
        BucketType::Explicit => Reading::Explicit {
            bucket,
            bounds: h.bounds.clone(),
        },
    };
    let labels = compile_labels(&h.labels, btf, map)?;
    if labels.iter().any(|l| l.field == bucket) {
        return Err("a label reads the bucket field; the bucket is not a label".to_string());
    }
    Ok(CompiledMetric {
        name: h.name.clone(),
        description: h.description.clone(),
        unit: h.unit.clone(),
        map: h.map.clone(),
        labels,
        shape,
        max_series: h.max_series,
        known: HashSet::new(),
        refused: HashSet::new(),
    })
}

fn strip_metric(e: &str) -> String {
    e.split_once(": ").map_or(e, |(_, rest)| rest).to_string()
}

fn read(field: &Field, bytes: &[u8]) -> u64 {
    bytes
        .get(field.offset..field.offset + field.size)
        .map(|b| decode::integer(b, false) as u64)
        .unwrap_or(0)
}

/// One series being built: its resource and label values.
type SeriesKey = (Option<u64>, Vec<Decoded>);

impl CompiledMetric {
    fn series_of(&self, key: &[u8]) -> SeriesKey {
        let mut cgroup = None;
        let labels = self
            .labels
            .iter()
            .map(|l| {
                let bytes = key
                    .get(l.field.offset..l.field.offset + l.field.size)
                    .unwrap_or_default();
                let decoded = decode::decode(l.decoder, bytes, &l.values);
                if let Decoded::Cgroup(id) = decoded {
                    cgroup = Some(id);
                }
                decoded
            })
            .collect();
        (cgroup, labels)
    }

    /// Whether the series may be exported; a new one beyond the cap is refused (and counted
    /// once, in the returned flag).
    fn admit(&mut self, series: &SeriesKey) -> (bool, bool) {
        if self.known.contains(&series.1) {
            return (true, false);
        }
        if self.known.len() < self.max_series {
            self.known.insert(series.1.clone());
            return (true, false);
        }
        (false, self.refused.insert(series.1.clone()))
    }

    fn attributes(&self, labels: &[Decoded]) -> Vec<KeyValue> {
        self.labels
            .iter()
            .zip(labels)
            .filter_map(|(l, d)| match d {
                Decoded::Text(t) => Some(string_attr(&l.name, t.clone())),
                Decoded::Cgroup(_) => None,
            })
            .collect()
    }

    fn new_metric(&self) -> Metric {
        let cumulative = AggregationTemporality::Cumulative as i32;
        Metric {
            name: self.name.clone(),
            description: self.description.clone(),
            unit: self.unit.clone(),
            data: Some(match self.shape {
                Reading::Counter { .. } => metric::Data::Sum(Sum {
                    data_points: Vec::new(),
                    aggregation_temporality: cumulative,
                    is_monotonic: true,
                }),
                Reading::Exp2 { .. } => metric::Data::ExponentialHistogram(ExponentialHistogram {
                    data_points: Vec::new(),
                    aggregation_temporality: cumulative,
                }),
                Reading::Explicit { .. } => metric::Data::Histogram(Histogram {
                    data_points: Vec::new(),
                    aggregation_temporality: cumulative,
                }),
            }),
            ..Default::default()
        }
    }

    /// Adds this metric's data points from `entries` (its map, read now). Returns the cgroups
    /// seen and how many new series the cap refused.
    pub fn collect(
        &mut self,
        entries: &[Entry],
        out: &mut MetricsBuilder<'_>,
        start_ns: u64,
        now_ns: u64,
    ) -> (Vec<u64>, u64) {
        let value_field = match &self.shape {
            Reading::Counter { value } => *value,
            // A histogram map's value is the bucket's count: the whole value.
            _ => Field {
                offset: 0,
                size: 8,
                shape: Shape::Integer { signed: false },
            },
        };
        let bucket_field = match &self.shape {
            Reading::Counter { .. } => None,
            Reading::Exp2 { bucket } | Reading::Explicit { bucket, .. } => Some(*bucket),
        };
        let mut series: BTreeMap<SeriesKey, BTreeMap<u64, u64>> = BTreeMap::new();
        for entry in entries {
            let value: u64 = entry
                .values
                .iter()
                .map(|v| read(&value_field, v))
                .fold(0, u64::wrapping_add);
            let bucket = bucket_field.map_or(0, |f| read(&f, &entry.key));
            let key = self.series_of(&entry.key);
            *series.entry(key).or_default().entry(bucket).or_default() += value;
        }
        let mut cgroups = Vec::new();
        let mut refused = 0;
        for (key, buckets) in series {
            let (admitted, newly_refused) = self.admit(&key);
            refused += u64::from(newly_refused);
            if !admitted {
                continue;
            }
            if let Some(id) = key.0 {
                cgroups.push(id);
            }
            let owner = key.0.map_or(Owner::Host, Owner::Cgroup);
            let attributes = self.attributes(&key.1);
            let point = self.point(attributes, &buckets, start_ns, now_ns);
            let metric = out.metric_entry(owner, &self.name, || self.new_metric());
            match (&mut metric.data, point) {
                (Some(metric::Data::Sum(sum)), Point::Number(p)) => sum.data_points.push(p),
                (Some(metric::Data::ExponentialHistogram(h)), Point::Exponential(p)) => {
                    h.data_points.push(p)
                }
                (Some(metric::Data::Histogram(h)), Point::Explicit(p)) => h.data_points.push(p),
                // Another program named a metric of another kind the same: its points go
                // nowhere rather than into the wrong shape.
                _ => {}
            }
        }
        (cgroups, refused)
    }

    fn point(
        &self,
        attributes: Vec<KeyValue>,
        buckets: &BTreeMap<u64, u64>,
        start: u64,
        now: u64,
    ) -> Point {
        match &self.shape {
            Reading::Counter { .. } => Point::Number(NumberDataPoint {
                attributes,
                start_time_unix_nano: start,
                time_unix_nano: now,
                value: Some(number_data_point::Value::AsInt(
                    buckets.values().sum::<u64>() as i64,
                )),
                ..Default::default()
            }),
            Reading::Exp2 { .. } => {
                // Bucket k holds (2^(k−1), 2^k]: OTLP scale-0 bucket k − 1. Indexes past 64 are
                // values no 64-bit integer has; they are counted in the last one.
                let clamped: BTreeMap<u64, u64> =
                    buckets.iter().fold(BTreeMap::new(), |mut m, (k, c)| {
                        *m.entry((*k).min(64)).or_default() += c;
                        m
                    });
                let positive = match (clamped.keys().next(), clamped.keys().next_back()) {
                    (Some(&first), Some(&last)) => Some(Buckets {
                        offset: first as i32 - 1,
                        bucket_counts: (first..=last)
                            .map(|k| clamped.get(&k).copied().unwrap_or(0))
                            .collect(),
                    }),
                    _ => None,
                };
                Point::Exponential(ExponentialHistogramDataPoint {
                    attributes,
                    start_time_unix_nano: start,
                    time_unix_nano: now,
                    count: buckets.values().sum(),
                    scale: 0,
                    positive,
                    ..Default::default()
                })
            }
            Reading::Explicit { bounds, .. } => {
                let mut counts = vec![0u64; bounds.len() + 1];
                for (k, c) in buckets {
                    let i = usize::try_from(*k).unwrap_or(usize::MAX).min(bounds.len());
                    counts[i] += c;
                }
                Point::Explicit(HistogramDataPoint {
                    attributes,
                    start_time_unix_nano: start,
                    time_unix_nano: now,
                    count: counts.iter().sum(),
                    bucket_counts: counts,
                    explicit_bounds: bounds.clone(),
                    ..Default::default()
                })
            }
        }
    }

    /// Keys of `entries` whose cgroup label names a cgroup in `gone`.
    pub fn keys_of_cgroups(&self, entries: &[Entry], gone: &HashSet<u64>) -> Vec<Vec<u8>> {
        let Some(label) = self.labels.iter().find(|l| l.decoder == Decoder::Cgroup) else {
            return Vec::new();
        };
        entries
            .iter()
            .filter(|e| gone.contains(&read(&label.field, &e.key)))
            .map(|e| e.key.clone())
            .collect()
    }

    /// `name (counter of map m: labels a, b)` for `podscope program check`.
    pub fn describe(&self) -> String {
        let kind = match &self.shape {
            Reading::Counter { .. } => "counter",
            Reading::Exp2 { .. } => "exp2 histogram",
            Reading::Explicit { .. } => "histogram",
        };
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|l| {
                if l.decoder == Decoder::Cgroup {
                    "resource from cgroup".to_string()
                } else {
                    format!("{} ({})", l.name, decode::decoder_name(l.decoder))
                }
            })
            .collect();
        format!(
            "{} ({kind} of map {}; labels: {})",
            self.name,
            self.map,
            if labels.is_empty() {
                "none".to_string()
            } else {
                labels.join(", ")
            }
        )
    }
}

enum Point {
    Number(NumberDataPoint),
    Exponential(ExponentialHistogramDataPoint),
    Explicit(HistogramDataPoint),
}
