//! The series state both Prometheus exporters keep: every series they were given, by family,
//! with its latest value — deltas added up into cumulative values, exponential histograms merged
//! bucket by bucket — and when it was last updated, so that series not updated for
//! `metric_expiration` are forgotten.
//!
//! It neither translates (`translate`) nor writes (`render`): it takes observations and answers
//! which series hold what.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::time::Instant;

use opentelemetry_proto::tonic::metrics::v1::ResourceMetrics;

use super::render;
use super::translate::{translate, Observation};
pub use super::translate::{Kind, Labels, Settings, Value};

/// One series and its latest value.
pub struct Series {
    pub value: Value,
    updated: Instant,
    /// The [`Store::apply`] that last changed it.
    generation: u64,
    /// When its latest point was observed (0: not said).
    pub time_unix_nano: u64,
    /// Data points of the last `apply` that went into it (`target_info` stands for none).
    pub points: usize,
}

pub struct Family {
    pub kind: Kind,
    pub help: String,
    pub series: BTreeMap<Labels, Series>,
}

pub struct Store {
    settings: Settings,
    families: BTreeMap<String, Family>,
    generation: u64,
}

impl Store {
    pub fn new(settings: Settings) -> Store {
        Store {
            settings,
            families: BTreeMap::new(),
            generation: 0,
        }
    }

    /// Number of series held (for tests and limits).
    pub fn series_count(&self) -> usize {
        self.families.values().map(|f| f.series.len()).sum()
    }

    /// Takes in one batch of metrics received at `now`. Returns how many of its data points it
    /// took; the others have no Prometheus form (no value, or a name already taken by a family of
    /// another type).
    pub fn apply(&mut self, resource_metrics: &[ResourceMetrics], now: Instant) -> usize {
        self.generation += 1;
        let mut taken = 0;
        let settings = self.settings.clone();
        translate(resource_metrics, &settings, |observation| {
            let is_point = observation.is_point;
            if self.put(observation, now) && is_point {
                taken += 1;
            }
        });
        taken
    }

    /// Puts one observation into its series; false if its family has another type.
    fn put(&mut self, o: Observation<'_>, now: Instant) -> bool {
        let generation = self.generation;
        let family = self.families.entry(o.family).or_insert_with(|| Family {
            kind: o.kind,
            help: o.help.to_string(),
            series: BTreeMap::new(),
        });
        if family.kind != o.kind {
            // Two metrics translated to one name with different types: the first keeps it.
            return false;
        }
        match family.series.entry(o.labels) {
            Entry::Vacant(new) => {
                new.insert(Series {
                    value: o.value,
                    updated: now,
                    generation,
                    time_unix_nano: o.time_unix_nano,
                    points: usize::from(o.is_point),
                });
            }
            Entry::Occupied(mut known) => {
                let series = known.get_mut();
                if series.generation != generation {
                    series.points = 0;
                }
                series.points += usize::from(o.is_point);
                if o.delta {
                    add(&mut series.value, o.value);
                } else {
                    series.value = o.value;
                }
                series.updated = now;
                series.generation = generation;
                if o.time_unix_nano != 0 {
                    series.time_unix_nano = o.time_unix_nano;
                }
            }
        }
        true
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

    /// Every family, by name.
    pub fn families(&self) -> impl Iterator<Item = (&str, &Family)> {
        self.families.iter().map(|(name, f)| (name.as_str(), f))
    }

    /// The series the last [`Store::apply`] changed: `(family name, family, labels, series)`.
    pub fn updated(&self) -> impl Iterator<Item = (&str, &Family, &Labels, &Series)> {
        let generation = self.generation;
        self.families.iter().flat_map(move |(name, family)| {
            family
                .series
                .iter()
                .filter(move |(_, s)| s.generation == generation)
                .map(move |(labels, series)| (name.as_str(), family, labels, series))
        })
    }

    /// The exposition: Prometheus text 0.0.4, or OpenMetrics 1.0 (`# EOF`-terminated).
    pub fn render(&self, openmetrics: bool) -> String {
        render::exposition(self, openmetrics)
    }
}

/// Adds a delta to a series' value. Values of different shapes (a type changed, explicit bounds
/// changed) cannot be added: the delta starts the series over.
fn add(total: &mut Value, delta: Value) {
    match (&mut *total, delta) {
        (Value::Number(a), Value::Number(b)) => *a += b,
        (
            Value::Histogram {
                bounds,
                counts,
                sum,
                count,
            },
            Value::Histogram {
                bounds: b,
                counts: c,
                sum: s,
                count: n,
            },
        ) if *bounds == b && counts.len() == c.len() => {
            for (a, b) in counts.iter_mut().zip(c) {
                *a += b;
            }
            *sum += s;
            *count += n;
        }
        (
            Value::Exponential {
                buckets,
                sum,
                count,
                ..
            },
            Value::Exponential {
                buckets: b,
                sum: s,
                count: n,
                ..
            },
        ) => {
            buckets.add(&b);
            *sum += s;
            *count += n;
        }
        (_, other) => *total = other,
    }
}
