//! Text renderings of a batch for the `debug` exporter (pure, so they are tested as text).

use std::fmt::Write as _;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, Metric};
use opentelemetry_proto::tonic::trace::v1::Span;
use podscope_core::batch::metric_points;
use podscope_core::Batch;

use super::Verbosity;

/// The lines the exporter logs for `batch`.
pub fn render(batch: &Batch, verbosity: Verbosity) -> Vec<String> {
    match verbosity {
        Verbosity::Basic => vec![summary(batch)],
        Verbosity::Normal => {
            let mut lines = vec![summary(batch)];
            lines.extend(normal(batch));
            lines
        }
        Verbosity::Detailed => {
            let mut lines = vec![summary(batch)];
            lines.extend(detailed(batch));
            lines
        }
    }
}

fn summary(batch: &Batch) -> String {
    match batch {
        Batch::Metrics(rms) => {
            let metrics: usize = rms
                .iter()
                .flat_map(|rm| &rm.scope_metrics)
                .map(|sm| sm.metrics.len())
                .sum();
            format!(
                "metrics: {} resource metrics, {} metrics, {} data points",
                rms.len(),
                metrics,
                batch.item_count()
            )
        }
        Batch::Traces(rss) => format!(
            "traces: {} resource spans, {} spans",
            rss.len(),
            batch.item_count()
        ),
        Batch::Profiles(data) => format!(
            "profiles: {} resource profiles, {} profiles, {} samples",
            data.resource_profiles.len(),
            data.resource_profiles
                .iter()
                .flat_map(|rp| &rp.scope_profiles)
                .map(|sp| sp.profiles.len())
                .sum::<usize>(),
            batch.item_count()
        ),
        Batch::Logs(rls) => format!(
            "logs: {} resource logs, {} log records",
            rls.len(),
            batch.item_count()
        ),
    }
}

fn normal(batch: &Batch) -> Vec<String> {
    let mut lines = Vec::new();
    match batch {
        Batch::Metrics(rms) => {
            for rm in rms.iter() {
                let resource = rm
                    .resource
                    .as_ref()
                    .map(|r| attributes_inline(&r.attributes))
                    .unwrap_or_default();
                for metric in rm.scope_metrics.iter().flat_map(|sm| &sm.metrics) {
                    lines.push(format!(
                        "{} {} {} points{}",
                        metric.name,
                        metric_type(metric),
                        metric_points(metric),
                        if resource.is_empty() {
                            String::new()
                        } else {
                            format!(" {{{resource}}}")
                        }
                    ));
                }
            }
        }
        Batch::Traces(rss) => {
            for span in rss
                .iter()
                .flat_map(|rs| &rs.scope_spans)
                .flat_map(|ss| &ss.spans)
            {
                lines.push(span_line(span));
            }
        }
        Batch::Profiles(data) => {
            let strings = data
                .dictionary
                .as_ref()
                .map(|d| d.string_table.as_slice())
                .unwrap_or_default();
            for rp in &data.resource_profiles {
                let resource = rp
                    .resource
                    .as_ref()
                    .map(|r| attributes_inline(&r.attributes))
                    .unwrap_or_default();
                for profile in rp.scope_profiles.iter().flat_map(|sp| &sp.profiles) {
                    lines.push(format!(
                        "{} {} samples total={}{}",
                        value_type(profile.sample_type.as_ref(), strings),
                        profile.samples.len(),
                        profile
                            .samples
                            .iter()
                            .filter_map(|s| s.values.first())
                            .sum::<i64>(),
                        if resource.is_empty() {
                            String::new()
                        } else {
                            format!(" {{{resource}}}")
                        }
                    ));
                }
            }
        }
        Batch::Logs(rls) => {
            for record in rls
                .iter()
                .flat_map(|rl| &rl.scope_logs)
                .flat_map(|sl| &sl.log_records)
            {
                lines.push(log_line(record));
            }
        }
    }
    lines
}

/// `time severity body {attributes}` of one log record.
fn log_line(record: &LogRecord) -> String {
    let severity = if record.severity_text.is_empty() {
        record.severity_number.to_string()
    } else {
        record.severity_text.clone()
    };
    let attributes = attributes_inline(&record.attributes);
    format!(
        "{} {} {}{}",
        record.time_unix_nano,
        severity,
        value_text(record.body.as_ref()),
        if attributes.is_empty() {
            String::new()
        } else {
            format!(" {{{attributes}}}")
        }
    )
}

/// `type/unit` of a profile's values.
fn value_type(
    value_type: Option<&opentelemetry_proto::tonic::profiles::v1development::ValueType>,
    strings: &[String],
) -> String {
    let text = |i: i32| strings.get(i as usize).map(String::as_str).unwrap_or("");
    value_type
        .map(|v| format!("{}/{}", text(v.type_strindex), text(v.unit_strindex)))
        .unwrap_or_default()
}

/// A sample's frames as `leaf <- caller <- …`, each its function or its mapping and address.
fn stack_line(
    dictionary: &opentelemetry_proto::tonic::profiles::v1development::ProfilesDictionary,
    stack_index: i32,
) -> String {
    let text = |i: i32| {
        dictionary
            .string_table
            .get(i as usize)
            .map(String::as_str)
            .unwrap_or("")
    };
    let Some(stack) = dictionary.stack_table.get(stack_index as usize) else {
        return String::new();
    };
    stack
        .location_indices
        .iter()
        .filter_map(|&i| dictionary.location_table.get(i as usize))
        .map(|location| {
            let function = location
                .lines
                .first()
                .and_then(|line| dictionary.function_table.get(line.function_index as usize));
            match function {
                Some(f) => text(f.name_strindex).to_string(),
                None => {
                    let mapping = dictionary
                        .mapping_table
                        .get(location.mapping_index as usize)
                        .map(|m| text(m.filename_strindex))
                        .unwrap_or("");
                    format!("{mapping}+{:#x}", location.address)
                }
            }
        })
        .collect::<Vec<_>>()
        .join(" <- ")
}

fn span_line(span: &Span) -> String {
    let duration_ns = span
        .end_time_unix_nano
        .saturating_sub(span.start_time_unix_nano);
    format!(
        "{} trace={} span={} duration={}",
        span.name,
        hex(&span.trace_id),
        hex(&span.span_id),
        format_nanos(duration_ns)
    )
}

fn detailed(batch: &Batch) -> Vec<String> {
    let mut out = String::new();
    match batch {
        Batch::Metrics(rms) => {
            for (i, rm) in rms.iter().enumerate() {
                let _ = writeln!(out, "ResourceMetrics #{i}");
                resource_block(
                    &mut out,
                    rm.resource.as_ref().map(|r| r.attributes.as_slice()),
                );
                for (j, sm) in rm.scope_metrics.iter().enumerate() {
                    let scope = sm.scope.as_ref();
                    let _ = writeln!(
                        out,
                        "ScopeMetrics #{j} {} {}",
                        scope.map(|s| s.name.as_str()).unwrap_or(""),
                        scope.map(|s| s.version.as_str()).unwrap_or("")
                    );
                    for (k, m) in sm.metrics.iter().enumerate() {
                        let _ = writeln!(
                            out,
                            "Metric #{k} {} ({}) unit={:?}: {}",
                            m.name,
                            metric_type(m),
                            m.unit,
                            m.description
                        );
                        metric_points_block(&mut out, m);
                    }
                }
            }
        }
        Batch::Traces(rss) => {
            for (i, rs) in rss.iter().enumerate() {
                let _ = writeln!(out, "ResourceSpans #{i}");
                resource_block(
                    &mut out,
                    rs.resource.as_ref().map(|r| r.attributes.as_slice()),
                );
                for (j, ss) in rs.scope_spans.iter().enumerate() {
                    let scope = ss.scope.as_ref();
                    let _ = writeln!(
                        out,
                        "ScopeSpans #{j} {} {}",
                        scope.map(|s| s.name.as_str()).unwrap_or(""),
                        scope.map(|s| s.version.as_str()).unwrap_or("")
                    );
                    for (k, span) in ss.spans.iter().enumerate() {
                        let _ = writeln!(out, "Span #{k} {}", span_line(span));
                        let _ = writeln!(
                            out,
                            "    parent={} kind={} status={}",
                            hex(&span.parent_span_id),
                            span.kind,
                            span.status.as_ref().map(|s| s.code).unwrap_or(0)
                        );
                        for a in &span.attributes {
                            let _ =
                                writeln!(out, "    -> {}: {}", a.key, value_text(a.value.as_ref()));
                        }
                    }
                }
            }
        }
        Batch::Profiles(data) => {
            let dictionary = data.dictionary.clone().unwrap_or_default();
            for (i, rp) in data.resource_profiles.iter().enumerate() {
                let _ = writeln!(out, "ResourceProfiles #{i}");
                resource_block(
                    &mut out,
                    rp.resource.as_ref().map(|r| r.attributes.as_slice()),
                );
                for (k, profile) in rp
                    .scope_profiles
                    .iter()
                    .flat_map(|sp| &sp.profiles)
                    .enumerate()
                {
                    let _ = writeln!(
                        out,
                        "Profile #{k} {}",
                        value_type(profile.sample_type.as_ref(), &dictionary.string_table)
                    );
                    for sample in &profile.samples {
                        let _ = writeln!(
                            out,
                            "    {:?} {}",
                            sample.values,
                            stack_line(&dictionary, sample.stack_index)
                        );
                    }
                }
            }
        }
        Batch::Logs(rls) => {
            for (i, rl) in rls.iter().enumerate() {
                let _ = writeln!(out, "ResourceLog #{i}");
                resource_block(
                    &mut out,
                    rl.resource.as_ref().map(|r| r.attributes.as_slice()),
                );
                for (j, sl) in rl.scope_logs.iter().enumerate() {
                    let scope = sl.scope.as_ref();
                    let _ = writeln!(
                        out,
                        "ScopeLogs #{j} {} {}",
                        scope.map(|s| s.name.as_str()).unwrap_or(""),
                        scope.map(|s| s.version.as_str()).unwrap_or("")
                    );
                    for (k, record) in sl.log_records.iter().enumerate() {
                        let _ = writeln!(
                            out,
                            "LogRecord #{k} time={} severity={} {}",
                            record.time_unix_nano,
                            record.severity_number,
                            value_text(record.body.as_ref())
                        );
                        for a in &record.attributes {
                            let _ =
                                writeln!(out, "    -> {}: {}", a.key, value_text(a.value.as_ref()));
                        }
                    }
                }
            }
        }
    }
    out.lines().map(str::to_string).collect()
}

fn resource_block(out: &mut String, attributes: Option<&[KeyValue]>) {
    let _ = writeln!(out, "Resource attributes:");
    for a in attributes.unwrap_or_default() {
        let _ = writeln!(out, "    -> {}: {}", a.key, value_text(a.value.as_ref()));
    }
}

fn metric_points_block(out: &mut String, m: &Metric) {
    let attrs = |a: &[KeyValue]| attributes_inline(a);
    match &m.data {
        Some(metric::Data::Gauge(g)) => {
            for p in &g.data_points {
                let _ = writeln!(
                    out,
                    "    {{{}}} {}",
                    attrs(&p.attributes),
                    number(p.value.as_ref())
                );
            }
        }
        Some(metric::Data::Sum(s)) => {
            for p in &s.data_points {
                let _ = writeln!(
                    out,
                    "    {{{}}} {}",
                    attrs(&p.attributes),
                    number(p.value.as_ref())
                );
            }
        }
        Some(metric::Data::Histogram(h)) => {
            for p in &h.data_points {
                let _ = writeln!(
                    out,
                    "    {{{}}} count={} sum={} bounds={:?} counts={:?}",
                    attrs(&p.attributes),
                    p.count,
                    p.sum.unwrap_or(0.0),
                    p.explicit_bounds,
                    p.bucket_counts
                );
            }
        }
        Some(metric::Data::ExponentialHistogram(h)) => {
            for p in &h.data_points {
                let positive = p.positive.as_ref();
                let _ = writeln!(
                    out,
                    "    {{{}}} count={} sum={} scale={} zero={} offset={} buckets={:?}",
                    attrs(&p.attributes),
                    p.count,
                    p.sum.unwrap_or(0.0),
                    p.scale,
                    p.zero_count,
                    positive.map(|b| b.offset).unwrap_or(0),
                    positive
                        .map(|b| b.bucket_counts.as_slice())
                        .unwrap_or_default()
                );
            }
        }
        Some(metric::Data::Summary(s)) => {
            for p in &s.data_points {
                let _ = writeln!(
                    out,
                    "    {{{}}} count={} sum={}",
                    attrs(&p.attributes),
                    p.count,
                    p.sum
                );
            }
        }
        None => {}
    }
}

fn metric_type(m: &Metric) -> &'static str {
    match &m.data {
        Some(metric::Data::Gauge(_)) => "gauge",
        Some(metric::Data::Sum(s)) if s.is_monotonic => "counter",
        Some(metric::Data::Sum(_)) => "sum",
        Some(metric::Data::Histogram(_)) => "histogram",
        Some(metric::Data::ExponentialHistogram(_)) => "exponential_histogram",
        Some(metric::Data::Summary(_)) => "summary",
        None => "empty",
    }
}

fn number(v: Option<&number_data_point::Value>) -> String {
    match v {
        Some(number_data_point::Value::AsInt(i)) => i.to_string(),
        Some(number_data_point::Value::AsDouble(d)) => d.to_string(),
        None => "-".to_string(),
    }
}

fn attributes_inline(attributes: &[KeyValue]) -> String {
    attributes
        .iter()
        .map(|a| format!("{}={}", a.key, value_text(a.value.as_ref())))
        .collect::<Vec<_>>()
        .join(", ")
}

fn value_text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::BytesValue(b)) => hex(b),
        Some(any_value::Value::ArrayValue(a)) => format!(
            "[{}]",
            a.values
                .iter()
                .map(|v| value_text(Some(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(any_value::Value::KvlistValue(kv)) => format!("{{{}}}", attributes_inline(&kv.values)),
        Some(any_value::Value::StringValueStrindex(i)) => format!("<string #{i}>"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn format_nanos(ns: u64) -> String {
    if ns >= 1_000_000_000 {
        format!("{:.3}s", ns as f64 / 1e9)
    } else if ns >= 1_000_000 {
        format!("{:.3}ms", ns as f64 / 1e6)
    } else if ns >= 1_000 {
        format!("{:.3}µs", ns as f64 / 1e3)
    } else {
        format!("{ns}ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::metrics::v1::{
        Gauge, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            key_strindex: 0,
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
        }
    }

    fn metrics() -> Batch {
        Batch::metrics(vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![kv("host.name", "node-1")],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![
                    Metric {
                        name: "podscope.syscalls".into(),
                        unit: "{syscall}".into(),
                        data: Some(metric::Data::Sum(Sum {
                            is_monotonic: true,
                            aggregation_temporality: 2,
                            data_points: vec![NumberDataPoint {
                                attributes: vec![kv("syscall", "read")],
                                value: Some(number_data_point::Value::AsInt(42)),
                                ..Default::default()
                            }],
                        })),
                        ..Default::default()
                    },
                    Metric {
                        name: "load".into(),
                        data: Some(metric::Data::Gauge(Gauge {
                            data_points: vec![
                                NumberDataPoint {
                                    value: Some(number_data_point::Value::AsDouble(0.5)),
                                    ..Default::default()
                                };
                                2
                            ],
                        })),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        }])
    }

    #[test]
    fn basic_is_one_summary_line() {
        assert_eq!(
            render(&metrics(), Verbosity::Basic),
            vec!["metrics: 1 resource metrics, 2 metrics, 3 data points"]
        );
    }

    #[test]
    fn normal_is_one_line_per_metric_or_span() {
        assert_eq!(
            render(&metrics(), Verbosity::Normal),
            vec![
                "metrics: 1 resource metrics, 2 metrics, 3 data points",
                "podscope.syscalls counter 1 points {host.name=node-1}",
                "load gauge 2 points {host.name=node-1}",
            ]
        );
        let traces = Batch::traces(vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    name: "GET /".into(),
                    trace_id: vec![0xab; 16],
                    span_id: vec![0x01; 8],
                    start_time_unix_nano: 1_000,
                    end_time_unix_nano: 2_501_000,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }]);
        assert_eq!(
            render(&traces, Verbosity::Normal),
            vec![
                "traces: 1 resource spans, 1 spans".to_string(),
                format!(
                    "GET / trace={} span=0101010101010101 duration=2.500ms",
                    "ab".repeat(16)
                ),
            ]
        );
    }

    #[test]
    fn logs_are_one_line_per_record() {
        use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
        let logs = Batch::logs(vec![ResourceLogs {
            scope_logs: vec![ScopeLogs {
                log_records: vec![LogRecord {
                    time_unix_nano: 1_000,
                    severity_text: "INFO".into(),
                    body: Some(AnyValue {
                        value: Some(any_value::Value::StringValue("exec sh[7]".into())),
                    }),
                    attributes: vec![kv("podscope.session.name", "execs")],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }]);
        assert_eq!(
            render(&logs, Verbosity::Normal),
            vec![
                "logs: 1 resource logs, 1 log records",
                "1000 INFO exec sh[7] {podscope.session.name=execs}",
            ]
        );
        let detailed = render(&logs, Verbosity::Detailed);
        assert_eq!(
            detailed[detailed.len() - 2..],
            [
                "LogRecord #0 time=1000 severity=0 exec sh[7]",
                "    -> podscope.session.name: execs"
            ]
        );
    }

    #[test]
    fn detailed_shows_resources_and_every_point() {
        let lines = render(&metrics(), Verbosity::Detailed);
        assert_eq!(
            lines,
            vec![
                "metrics: 1 resource metrics, 2 metrics, 3 data points",
                "ResourceMetrics #0",
                "Resource attributes:",
                "    -> host.name: node-1",
                "ScopeMetrics #0  ",
                "Metric #0 podscope.syscalls (counter) unit=\"{syscall}\": ",
                "    {syscall=read} 42",
                "Metric #1 load (gauge) unit=\"\": ",
                "    {} 0.5",
                "    {} 0.5",
            ]
        );
    }
}
