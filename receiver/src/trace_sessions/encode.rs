//! Exported sessions' events as OTLP log records and their summaries as OTLP metrics (pure).

use std::time::SystemTime;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde_json::{Map, Value};

use crate::session::{probe_name, ExportedEvent, ExportedSummary, AGENT_STOPPED};

/// The attribute naming the session of a record or data point.
pub const SESSION_NAME: &str = "podscope.session.name";
/// The probe that saw an event, or that a figure is of.
pub const PROBE: &str = "podscope.probe";
/// Prefix of an event's own fields (`podscope.event.filename`).
pub const EVENT_FIELD_PREFIX: &str = "podscope.event.";

/// The attribute naming the phase of a `podscope.session.phase` point.
pub const PHASE: &str = "phase";
/// The phases of a summary, one `podscope.session.phase` point each: a node's status phases and,
/// for a run the agent's stop ended, [`AGENT_STOPPED`].
pub const PHASES: [&str; 4] = ["Running", "Completed", "Failed", AGENT_STOPPED];

/// The quantiles a status entry's `durations` carries, by key.
const QUANTILES: [(&str, &str); 3] = [("p50", "0.5"), ("p90", "0.9"), ("p99", "0.99")];

fn string_kv(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn int_kv(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

fn scope() -> Option<InstrumentationScope> {
    Some(InstrumentationScope {
        name: "podscope/trace_sessions".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    })
}

fn node_resource(node: &str) -> Option<Resource> {
    Some(Resource {
        attributes: vec![string_kv("k8s.node.name", node)],
        ..Default::default()
    })
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One log record per event, under one resource per node (in the order the nodes first come).
/// `observed`: when the receiver took them.
pub fn log_records(events: &[ExportedEvent], observed: SystemTime) -> Vec<ResourceLogs> {
    let mut by_node: Vec<ResourceLogs> = Vec::new();
    for exported in events {
        let node = exported.event.node.as_str();
        let position = by_node.iter().position(|rl| {
            rl.resource
                .as_ref()
                .is_some_and(|r| r.attributes.first() == Some(&string_kv("k8s.node.name", node)))
        });
        let resource_logs = match position {
            Some(i) => &mut by_node[i],
            None => {
                by_node.push(ResourceLogs {
                    resource: node_resource(node),
                    scope_logs: vec![ScopeLogs {
                        scope: scope(),
                        ..Default::default()
                    }],
                    ..Default::default()
                });
                by_node.last_mut().expect("just pushed")
            }
        };
        resource_logs.scope_logs[0]
            .log_records
            .push(log_record(exported, observed));
    }
    by_node
}

/// The event as the plugin shows it, `<probe> <comm>[<pid>] key=value …`, as its body; its
/// session, pod and fields as attributes.
fn log_record(exported: &ExportedEvent, observed: SystemTime) -> LogRecord {
    let event = &exported.event;
    let probe = probe_name(event.probe);
    let mut body = format!("{probe} {}[{}]", event.comm, event.pid);
    for (key, value) in &event.fields {
        body.push_str(&format!(" {key}={value}"));
    }
    let mut attributes = vec![
        string_kv(SESSION_NAME, &exported.session),
        string_kv("k8s.namespace.name", &event.namespace),
    ];
    for (key, value) in [
        ("k8s.pod.name", &event.pod),
        ("k8s.container.name", &event.container),
    ] {
        if !value.is_empty() {
            attributes.push(string_kv(key, value));
        }
    }
    attributes.push(string_kv(PROBE, &probe));
    attributes.push(int_kv("process.pid", i64::from(event.pid)));
    attributes.push(int_kv("thread.id", i64::from(event.tid)));
    attributes.push(string_kv("process.command", &event.comm));
    for (key, value) in &event.fields {
        attributes.push(string_kv(&format!("{EVENT_FIELD_PREFIX}{key}"), value));
    }
    LogRecord {
        time_unix_nano: event.time_unix_nano,
        observed_time_unix_nano: unix_nanos(observed),
        severity_number: SeverityNumber::Info as i32,
        severity_text: "INFO".to_string(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(body)),
        }),
        attributes,
        event_name: format!("podscope.session.{probe}"),
        ..Default::default()
    }
}

/// The data points [`summary_metrics`] makes of a status entry.
pub fn summary_points(entry: &Map<String, Value>) -> usize {
    let probes = entry
        .get("events")
        .and_then(Value::as_object)
        .map_or(0, Map::len);
    let durations = entry
        .get("durations")
        .and_then(Value::as_object)
        .map_or(0, |d| {
            d.values()
                .map(|q| QUANTILES.iter().filter(|(k, _)| q[*k].is_u64()).count())
                .sum()
        });
    probes + 2 + PHASES.len() + durations
}

/// A node's summary of a session as metrics: events per probe, dropped (over the event-rate
/// cap) and lost (the kernel's ring buffer was full) as cumulative sums from the run's start;
/// the run's phase as a gauge per phase of [`PHASES`], 1 for the entry's and 0 for the others
/// (so a dashboard sees a run end, whichever way); the duration quantiles of probes that
/// measure one (exit: process lifetime, tcp_close: connection lifetime) as gauges in
/// nanoseconds.
pub fn summary_metrics(summary: &ExportedSummary) -> ResourceMetrics {
    let common = || {
        vec![
            string_kv(SESSION_NAME, &summary.session),
            string_kv("k8s.namespace.name", &summary.namespace),
        ]
    };
    let (start, time) = (unix_nanos(summary.start), unix_nanos(summary.time));
    let point = |attributes: Vec<KeyValue>, value: number_data_point::Value| NumberDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: time,
        value: Some(value),
        ..Default::default()
    };
    let counter = |name: &str, description: &str, points: Vec<NumberDataPoint>| Metric {
        name: name.to_string(),
        description: description.to_string(),
        unit: "{event}".to_string(),
        data: Some(metric::Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    };
    let count = |key: &str| summary.entry.get(key).and_then(Value::as_u64).unwrap_or(0);
    let events = summary
        .entry
        .get("events")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(probe, count)| {
            let mut attributes = common();
            attributes.push(string_kv(PROBE, probe));
            point(
                attributes,
                number_data_point::Value::AsInt(count.as_u64().unwrap_or(0) as i64),
            )
        })
        .collect();
    let mut metrics = vec![
        counter(
            "podscope.session.events",
            "Events a TraceSession counted on this node, per probe",
            events,
        ),
        counter(
            "podscope.session.dropped",
            "Events a TraceSession dropped over its events-per-second cap on this node",
            vec![point(
                common(),
                number_data_point::Value::AsInt(count("dropped") as i64),
            )],
        ),
        counter(
            "podscope.session.lost",
            "Events of a TraceSession the kernel lost on this node (ring buffer full)",
            vec![point(
                common(),
                number_data_point::Value::AsInt(count("lost") as i64),
            )],
        ),
    ];
    let phase = summary.entry.get("phase").and_then(Value::as_str);
    let phases = PHASES
        .iter()
        .map(|name| {
            let mut attributes = common();
            attributes.push(string_kv(PHASE, *name));
            NumberDataPoint {
                start_time_unix_nano: 0,
                ..point(
                    attributes,
                    number_data_point::Value::AsInt(i64::from(phase == Some(*name))),
                )
            }
        })
        .collect();
    metrics.push(Metric {
        name: "podscope.session.phase".to_string(),
        description: "The phase of a TraceSession's run on this node: 1 for its phase, 0 for the others (AgentStopped: the agent stopped before the run ended)".to_string(),
        unit: "1".to_string(),
        data: Some(metric::Data::Gauge(Gauge {
            data_points: phases,
        })),
        ..Default::default()
    });
    let quantiles: Vec<NumberDataPoint> = summary
        .entry
        .get("durations")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .flat_map(|(probe, durations)| {
            QUANTILES.iter().filter_map(move |(key, quantile)| {
                let value = durations[*key].as_u64()?;
                Some((probe.clone(), *quantile, value))
            })
        })
        .map(|(probe, quantile, value)| {
            let mut attributes = common();
            attributes.push(string_kv(PROBE, probe));
            attributes.push(string_kv("quantile", quantile));
            NumberDataPoint {
                start_time_unix_nano: 0,
                ..point(attributes, number_data_point::Value::AsInt(value as i64))
            }
        })
        .collect();
    if !quantiles.is_empty() {
        metrics.push(Metric {
            name: "podscope.session.duration".to_string(),
            description:
                "Quantiles of the durations a TraceSession's probe measured on this node (exit: process lifetime, tcp_close: connection lifetime, http: request latency)"
                    .to_string(),
            unit: "ns".to_string(),
            data: Some(metric::Data::Gauge(Gauge {
                data_points: quantiles,
            })),
            ..Default::default()
        });
    }
    ResourceMetrics {
        resource: node_resource(&summary.node),
        scope_metrics: vec![ScopeMetrics {
            scope: scope(),
            metrics,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use podscope_core::session::{Event, TraceProbe};
    use podscope_core::Batch;
    use serde_json::json;

    use super::*;

    fn exec(node: &str, pod: &str, pid: u32) -> ExportedEvent {
        ExportedEvent {
            session: "execs".into(),
            event: Event {
                time_unix_nano: 1_800_000_000_000_000_000 + u64::from(pid),
                node: node.into(),
                namespace: "team-a".into(),
                pod: pod.into(),
                container: if pod.is_empty() { "" } else { "app" }.into(),
                probe: TraceProbe::Exec,
                pid,
                tid: pid,
                comm: "sh".into(),
                fields: BTreeMap::from([("filename".into(), "/bin/true".into())]),
            },
        }
    }

    fn attribute(attributes: &[KeyValue], key: &str) -> Option<any_value::Value> {
        attributes
            .iter()
            .find(|kv| kv.key == key)?
            .value
            .clone()?
            .value
    }

    fn text(value: &str) -> Option<any_value::Value> {
        Some(any_value::Value::StringValue(value.to_string()))
    }

    #[test]
    fn each_event_is_one_log_record_under_its_nodes_resource() {
        let observed = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let events = [
            exec("node-1", "web-1", 10),
            exec("node-2", "web-2", 11),
            exec("node-1", "", 12),
        ];
        let resources = log_records(&events, observed);
        assert_eq!(Batch::logs(resources.clone()).item_count(), 3);
        assert_eq!(resources.len(), 2, "one resource per node");
        let node_of = |rl: &ResourceLogs| {
            attribute(&rl.resource.as_ref().unwrap().attributes, "k8s.node.name")
        };
        assert_eq!(node_of(&resources[0]), text("node-1"));
        let records = &resources[0].scope_logs[0].log_records;
        assert_eq!(records.len(), 2);
        let first = &records[0];
        assert_eq!(first.time_unix_nano, 1_800_000_000_000_000_010);
        assert_eq!(first.observed_time_unix_nano, 1_900_000_000_000_000_000);
        assert_eq!(first.event_name, "podscope.session.exec");
        assert_eq!(
            first.body.as_ref().unwrap().value,
            text("exec sh[10] filename=/bin/true")
        );
        let a = &first.attributes;
        assert_eq!(attribute(a, SESSION_NAME), text("execs"));
        assert_eq!(attribute(a, "k8s.namespace.name"), text("team-a"));
        assert_eq!(attribute(a, "k8s.pod.name"), text("web-1"));
        assert_eq!(attribute(a, "k8s.container.name"), text("app"));
        assert_eq!(attribute(a, PROBE), text("exec"));
        assert_eq!(
            attribute(a, "process.pid"),
            Some(any_value::Value::IntValue(10))
        );
        assert_eq!(attribute(a, "podscope.event.filename"), text("/bin/true"));
        // A process outside any pod: no pod or container attribute rather than empty ones.
        assert_eq!(attribute(&records[1].attributes, "k8s.pod.name"), None);
        assert_eq!(
            attribute(&records[1].attributes, "k8s.container.name"),
            None
        );
    }

    #[test]
    fn a_summary_is_cumulative_counts_and_duration_quantiles() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let entry = json!({
            "phase": "Running",
            "events": {"exec": 3, "exit": 4},
            "lost": 1,
            "dropped": 2,
            "durations": {"exit": {"count": 4, "p50": 1000, "p90": 2000, "p99": 3000, "buckets": {}}},
        });
        let summary = ExportedSummary {
            namespace: "team-a".into(),
            session: "execs".into(),
            node: "node-1".into(),
            start,
            time: start + Duration::from_secs(5),
            entry: entry.as_object().unwrap().clone(),
        };
        let rm = summary_metrics(&summary);
        assert_eq!(
            Batch::metrics(vec![rm.clone()]).item_count(),
            summary_points(&summary.entry)
        );
        let metrics = &rm.scope_metrics[0].metrics;
        let names: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "podscope.session.events",
                "podscope.session.dropped",
                "podscope.session.lost",
                "podscope.session.phase",
                "podscope.session.duration"
            ]
        );
        let Some(metric::Data::Sum(events)) = &metrics[0].data else {
            panic!("events is a sum")
        };
        assert!(events.is_monotonic);
        assert_eq!(
            events.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        let by_probe: Vec<(Option<any_value::Value>, Option<number_data_point::Value>)> = events
            .data_points
            .iter()
            .map(|p| (attribute(&p.attributes, PROBE), p.value))
            .collect();
        assert_eq!(
            by_probe,
            [
                (text("exec"), Some(number_data_point::Value::AsInt(3))),
                (text("exit"), Some(number_data_point::Value::AsInt(4))),
            ]
        );
        let point = &events.data_points[0];
        assert_eq!(point.start_time_unix_nano, 1_800_000_000_000_000_000);
        assert_eq!(point.time_unix_nano, 1_800_000_005_000_000_000);
        assert_eq!(attribute(&point.attributes, SESSION_NAME), text("execs"));
        assert_eq!(
            attribute(&point.attributes, "k8s.namespace.name"),
            text("team-a")
        );
        let Some(metric::Data::Gauge(durations)) = &metrics[4].data else {
            panic!("duration is a gauge")
        };
        let quantiles: Vec<(Option<any_value::Value>, Option<number_data_point::Value>)> =
            durations
                .data_points
                .iter()
                .map(|p| (attribute(&p.attributes, "quantile"), p.value))
                .collect();
        assert_eq!(
            quantiles,
            [
                (text("0.5"), Some(number_data_point::Value::AsInt(1000))),
                (text("0.9"), Some(number_data_point::Value::AsInt(2000))),
                (text("0.99"), Some(number_data_point::Value::AsInt(3000))),
            ]
        );
        assert_eq!(phases_of(&summary), [1, 0, 0, 0], "Running");
        // No durations measured: no duration metric.
        let mut plain = summary.clone();
        plain.entry.remove("durations");
        let rm = summary_metrics(&plain);
        assert_eq!(rm.scope_metrics[0].metrics.len(), 4);
        assert_eq!(
            Batch::metrics(vec![rm]).item_count(),
            summary_points(&plain.entry)
        );
    }

    /// The `podscope.session.phase` values of `summary`, in the order of [`PHASES`].
    fn phases_of(summary: &ExportedSummary) -> Vec<i64> {
        let rm = summary_metrics(summary);
        let phase = rm.scope_metrics[0]
            .metrics
            .iter()
            .find(|m| m.name == "podscope.session.phase")
            .expect("a phase metric");
        let Some(metric::Data::Gauge(gauge)) = &phase.data else {
            panic!("phase is a gauge")
        };
        let names: Vec<Option<any_value::Value>> = gauge
            .data_points
            .iter()
            .map(|p| attribute(&p.attributes, PHASE))
            .collect();
        assert_eq!(names, PHASES.map(text));
        gauge
            .data_points
            .iter()
            .map(|p| match p.value {
                Some(number_data_point::Value::AsInt(v)) => v,
                other => panic!("an integer: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_run_that_failed_or_that_the_agents_stop_ended_says_so_in_its_phase() {
        let summary = |phase: &str| ExportedSummary {
            namespace: "team-a".into(),
            session: "execs".into(),
            node: "node-1".into(),
            start: SystemTime::UNIX_EPOCH,
            time: SystemTime::UNIX_EPOCH,
            entry: json!({"phase": phase, "events": {"bpftrace": 0}, "message": "bpftrace exited"})
                .as_object()
                .unwrap()
                .clone(),
        };
        assert_eq!(phases_of(&summary("Completed")), [0, 1, 0, 0]);
        assert_eq!(phases_of(&summary("Failed")), [0, 0, 1, 0]);
        assert_eq!(phases_of(&summary("AgentStopped")), [0, 0, 0, 1]);
        let failed = summary("Failed");
        assert_eq!(
            Batch::metrics(vec![summary_metrics(&failed)]).item_count(),
            summary_points(&failed.entry)
        );
    }
}
