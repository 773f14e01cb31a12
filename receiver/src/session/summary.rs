//! Bounded summaries of a TraceSession's events, beside the counts: per probe the top keys (the
//! commands executed, the paths opened, the peers connected to, …) and, for the probes that
//! measure a duration (exit: the process's lifetime; tcp_close: the connection's), p50, p90 and
//! p99.
//!
//! What a status carries stays small whatever the traffic: at most [`TOP`] keys per probe, and
//! durations as a sparse histogram of at most a few hundred buckets. The merge across nodes is
//! the nodes' tables summed then cut to [`TOP`], and their histograms summed, so merged
//! quantiles are exactly those one node with every event would report.
//!
//! In memory a node keeps at most [`MAX_KEYS`] distinct keys per probe; events of keys past that
//! are counted under [`OTHER`].

use std::collections::{BTreeMap, HashMap};

use podscope_core::session::TraceProbe;
use podscope_ebpf::abi::TraceEvent;
use serde_json::{json, Map, Value};

use super::events::{address, signal_name};
use super::server::probe_name;

/// Keys per probe in a status's table.
pub const TOP: usize = 10;
/// Distinct keys a node keeps per probe and run.
pub const MAX_KEYS: usize = 1000;
/// The key events of keys past [`MAX_KEYS`] are counted under.
pub const OTHER: &str = "(other)";
/// Sub-buckets per power of two: a quantile is the upper bound of its bucket, at most 1/8
/// (12.5 %) above the true value.
const SUB_BUCKETS_LOG2: u32 = 3;

/// What the key of an event of `probe` is, and whether its probe has durations.
fn key_of(probe: TraceProbe, event: &TraceEvent) -> Option<String> {
    Some(match probe {
        TraceProbe::Exec | TraceProbe::Open => event.filename(),
        TraceProbe::Exit | TraceProbe::OomKill => event.comm(),
        TraceProbe::TcpConnect
        | TraceProbe::TcpAccept
        | TraceProbe::TcpClose
        | TraceProbe::TcpRetransmit => {
            format!("{}:{}", address(event.family, &event.daddr), event.dport)
        }
        TraceProbe::Signal => signal_name(event.signal),
        TraceProbe::Http | TraceProbe::Top | TraceProbe::Profile => return None,
    })
}

fn duration_of(probe: TraceProbe, event: &TraceEvent) -> Option<u64> {
    match probe {
        TraceProbe::Exit => Some(event.duration_ns),
        TraceProbe::TcpClose if event.flags & podscope_ebpf::abi::TRACE_FLAG_DURATION != 0 => {
            Some(event.duration_ns)
        }
        _ => None,
    }
}

/// The upper bound of the histogram bucket `value` falls in: values below 16 exactly, above
/// that 8 buckets per power of two.
pub fn bucket_of(value: u64) -> u64 {
    if value < 1 << (SUB_BUCKETS_LOG2 + 1) {
        return value;
    }
    let shift = 63 - value.leading_zeros() - SUB_BUCKETS_LOG2;
    // In u128: the last buckets' bounds pass u64::MAX, which then bounds them.
    let upper = (u128::from(value >> shift) + 1) << shift;
    u64::try_from(upper - 1).unwrap_or(u64::MAX)
}

/// The value at quantile `q` (nearest rank) of a histogram: the upper bound of its bucket.
pub fn quantile(histogram: &BTreeMap<u64, u64>, q: f64) -> Option<u64> {
    let total: u64 = histogram.values().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    histogram.iter().find_map(|(bound, count)| {
        seen += count;
        (seen >= rank).then_some(*bound)
    })
}

/// One probe's keys and durations on this node, for the current run.
#[derive(Debug, Default)]
struct ProbeTable {
    keys: HashMap<String, u64>,
    histogram: BTreeMap<u64, u64>,
}

/// A run's summary on this node, fed by its probes' counting tasks.
#[derive(Debug, Default)]
pub struct RunSummary {
    probes: BTreeMap<String, ProbeTable>,
    /// `top`'s per-pod totals (already bounded), when the run has that probe.
    pod_counters: Option<Value>,
}

impl RunSummary {
    /// Adds a counted event of `probe`.
    pub fn add(&mut self, probe: TraceProbe, event: &TraceEvent) {
        let Some(key) = key_of(probe, event) else {
            return;
        };
        self.add_keyed(probe, key, duration_of(probe, event));
    }

    /// Adds `count` to `key` of `probe` (a probe whose events are not the trace object's: an
    /// http exchange's `GET /users/{id} 200`, a profile's function), with the event's
    /// duration when it has one.
    pub fn add_keyed(&mut self, probe: TraceProbe, key: String, duration_ns: Option<u64>) {
        self.add_counted(probe, key, 1, duration_ns);
    }

    /// As [`Self::add_keyed`], `count` times at once (a profile's samples of one function).
    pub fn add_counted(
        &mut self,
        probe: TraceProbe,
        key: String,
        count: u64,
        duration_ns: Option<u64>,
    ) {
        let table = self.probes.entry(probe_name(probe)).or_default();
        let key = if table.keys.len() >= MAX_KEYS && !table.keys.contains_key(&key) {
            OTHER.to_string()
        } else {
            key
        };
        *table.keys.entry(key).or_default() += count;
        if let Some(duration) = duration_ns {
            *table.histogram.entry(bucket_of(duration)).or_default() += count;
        }
    }

    /// `top`'s per-pod totals as of its last sample.
    pub fn set_pod_counters(&mut self, pods: Value) {
        self.pod_counters = Some(pods);
    }

    /// The `podCounters` of a status entry (runs with `top` only).
    pub fn pod_counters(&self) -> Option<Value> {
        self.pod_counters.clone()
    }

    /// `top` and `durations` of a status entry.
    pub fn to_status(&self) -> (Value, Value) {
        let mut top = Map::new();
        let mut durations = Map::new();
        for (probe, table) in &self.probes {
            let keys: BTreeMap<String, u64> =
                table.keys.iter().map(|(k, v)| (k.clone(), *v)).collect();
            top.insert(probe.clone(), top_table(keys));
            if !table.histogram.is_empty() {
                durations.insert(probe.clone(), durations_entry(&table.histogram));
            }
        }
        (Value::Object(top), Value::Object(durations))
    }
}

/// The [`TOP`] keys by count (then by key), as `[{key, count}]`.
fn top_table(keys: BTreeMap<String, u64>) -> Value {
    let mut rows: Vec<(String, u64)> = keys.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    rows.truncate(TOP);
    Value::Array(
        rows.into_iter()
            .map(|(key, count)| json!({"key": key, "count": count}))
            .collect(),
    )
}

fn durations_entry(histogram: &BTreeMap<u64, u64>) -> Value {
    json!({
        "count": histogram.values().sum::<u64>(),
        "p50": quantile(histogram, 0.50),
        "p90": quantile(histogram, 0.90),
        "p99": quantile(histogram, 0.99),
        "buckets": histogram.iter().map(|(bound, count)| (bound.to_string(), json!(count))).collect::<Map<String, Value>>(),
    })
}

/// The merged `top` and `durations` of nodes' entries: tables summed then cut, histograms
/// summed.
pub fn merge<'a>(entries: impl IntoIterator<Item = &'a Value>) -> (Value, Value) {
    let mut keys: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut histograms: BTreeMap<String, BTreeMap<u64, u64>> = BTreeMap::new();
    for entry in entries {
        for (probe, rows) in entry["top"].as_object().into_iter().flatten() {
            let table = keys.entry(probe.clone()).or_default();
            for row in rows.as_array().into_iter().flatten() {
                if let (Some(key), Some(count)) = (row["key"].as_str(), row["count"].as_u64()) {
                    *table.entry(key.to_string()).or_default() += count;
                }
            }
        }
        for (probe, durations) in entry["durations"].as_object().into_iter().flatten() {
            let histogram = histograms.entry(probe.clone()).or_default();
            for (bound, count) in durations["buckets"].as_object().into_iter().flatten() {
                if let (Ok(bound), Some(count)) = (bound.parse::<u64>(), count.as_u64()) {
                    *histogram.entry(bound).or_default() += count;
                }
            }
        }
    }
    let top = keys
        .into_iter()
        .map(|(probe, keys)| (probe, top_table(keys)))
        .collect();
    let durations = histograms
        .into_iter()
        .map(|(probe, histogram)| (probe, durations_entry(&histogram)))
        .collect();
    (Value::Object(top), Value::Object(durations))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(filename: &str) -> TraceEvent {
        // SAFETY: TraceEvent is plain old data (aya::Pod): all zeroes is a valid value.
        let mut event: TraceEvent = unsafe { std::mem::zeroed() };
        event.filename[..filename.len()].copy_from_slice(filename.as_bytes());
        event
    }

    fn exit(comm: &str, lifetime_ns: u64) -> TraceEvent {
        // SAFETY: as above.
        let mut event: TraceEvent = unsafe { std::mem::zeroed() };
        event.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        event.duration_ns = lifetime_ns;
        event
    }

    #[test]
    fn buckets_are_exact_below_16_then_eight_per_power_of_two() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(15), 15);
        assert_eq!(bucket_of(16), 17);
        assert_eq!(bucket_of(17), 17);
        assert_eq!(bucket_of(18), 19);
        assert_eq!(bucket_of(1000), 1023);
        assert_eq!(bucket_of(1_000_000), 1_048_575);
        assert_eq!(bucket_of(u64::MAX), u64::MAX);
    }

    #[test]
    fn a_node_keeps_its_top_keys_and_duration_quantiles() {
        let mut summary = RunSummary::default();
        for (name, n) in [("/bin/true", 3), ("/bin/echo", 5), ("/bin/ls", 1)] {
            for _ in 0..n {
                summary.add(TraceProbe::Exec, &exec(name));
            }
        }
        for lifetime in 1..=100 {
            summary.add(TraceProbe::Exit, &exit("true", lifetime * 1_000_000));
        }
        let (top, durations) = summary.to_status();
        assert_eq!(
            top["exec"],
            json!([
                {"key": "/bin/echo", "count": 5},
                {"key": "/bin/true", "count": 3},
                {"key": "/bin/ls", "count": 1},
            ])
        );
        assert_eq!(top["exit"], json!([{"key": "true", "count": 100}]));
        let exit = &durations["exit"];
        assert_eq!(exit["count"], 100);
        // The 50th, 90th and 99th lifetimes (50, 90, 99 ms) rounded up to their buckets.
        assert_eq!(exit["p50"], bucket_of(50_000_000));
        assert_eq!(exit["p90"], bucket_of(90_000_000));
        assert_eq!(exit["p99"], bucket_of(99_000_000));
        assert_eq!(bucket_of(50_000_000), 50_331_647);
        assert!(durations.get("exec").is_none());
    }

    #[test]
    fn keys_past_the_bound_are_counted_as_other() {
        let mut summary = RunSummary::default();
        for i in 0..MAX_KEYS + 5 {
            summary.add(TraceProbe::Exec, &exec(&format!("/bin/{i}")));
        }
        summary.add(TraceProbe::Exec, &exec("/bin/0"));
        let (top, _) = summary.to_status();
        assert_eq!(top["exec"][0], json!({"key": OTHER, "count": 5}));
        assert_eq!(top["exec"][1], json!({"key": "/bin/0", "count": 2}));
        assert_eq!(top["exec"].as_array().unwrap().len(), TOP);
    }

    #[test]
    fn nodes_merge_by_summing_tables_then_cutting_and_summing_histograms() {
        let mut one = RunSummary::default();
        let mut two = RunSummary::default();
        let mut both = RunSummary::default();
        for i in 0..12u64 {
            for _ in 0..=i {
                one.add(TraceProbe::Exec, &exec(&format!("/bin/a{i:02}")));
                both.add(TraceProbe::Exec, &exec(&format!("/bin/a{i:02}")));
            }
        }
        // /bin/a00 is first on the second node; its one exec on the first node was cut from
        // that node's table, so the merge has the second node's 20 (tables are summed as
        // written, then cut).
        for _ in 0..20 {
            two.add(TraceProbe::Exec, &exec("/bin/a00"));
        }
        for lifetime in 1..=60 {
            let node = if lifetime % 3 == 0 {
                &mut two
            } else {
                &mut one
            };
            node.add(TraceProbe::Exit, &exit("x", lifetime * 1000));
            both.add(TraceProbe::Exit, &exit("x", lifetime * 1000));
        }
        let entry = |summary: &RunSummary| {
            let (top, durations) = summary.to_status();
            json!({"top": top, "durations": durations})
        };
        let (top, durations) = merge([&entry(&one), &entry(&two)]);
        assert_eq!(top["exec"][0], json!({"key": "/bin/a00", "count": 20}));
        assert_eq!(top["exec"][1], json!({"key": "/bin/a11", "count": 12}));
        assert_eq!(top["exec"][9], json!({"key": "/bin/a03", "count": 4}));
        assert_eq!(top["exec"].as_array().unwrap().len(), TOP);
        // The histograms merge exactly: as one node with every exit.
        assert_eq!(durations["exit"], both.to_status().1["exit"]);
        assert_eq!(durations["exit"]["p50"], bucket_of(30_000));
    }
}
