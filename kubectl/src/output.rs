//! How results are printed: aligned tables for people, one JSON object per line or one YAML
//! document per object for scripts.

use podscope_core::session::Event;
use serde_json::Value;

use crate::cli::Format;

/// A value as one YAML document (`---` first), for `-o yaml`.
pub fn yaml_document(value: &Value) -> String {
    let mut text = String::new();
    let mut emitter = yaml_rust2::YamlEmitter::new(&mut text);
    // Writing into a String cannot fail.
    let _ = emitter.dump(&to_yaml(value));
    text.push('\n');
    text
}

fn to_yaml(value: &Value) -> yaml_rust2::Yaml {
    use yaml_rust2::Yaml;
    match value {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            // u64 above i64::MAX and floats: YAML reals are written as text.
            None => Yaml::Real(n.to_string()),
        },
        Value::String(s) => Yaml::String(s.clone()),
        Value::Array(items) => Yaml::Array(items.iter().map(to_yaml).collect()),
        Value::Object(map) => Yaml::Hash(
            map.iter()
                .map(|(k, v)| (Yaml::String(k.clone()), to_yaml(v)))
                .collect(),
        ),
    }
}

/// One object in `format` (json: one line; yaml: one document). Not for tables.
pub fn object(format: Format, value: &Value) -> String {
    match format {
        Format::Yaml => yaml_document(value),
        _ => format!("{value}\n"),
    }
}

/// Prints events (a table's rows, or one object each in `format`) to stdout; false when its
/// reader went away (`| head`).
pub fn print_events(table: &mut EventTable, format: Format, events: &[Event]) -> bool {
    use std::io::Write as _;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for event in events {
        let text = match format {
            Format::Table => table.lines(event),
            format => object(format, &serde_json::json!(event)),
        };
        if out.write_all(text.as_bytes()).is_err() {
            return false;
        }
    }
    let _ = out.flush();
    true
}

/// A `profile` event (one folded stack of a session's pod) as a folded line with the pod as
/// its root frame, `POD;thread;…;leaf SAMPLES`; `None` for other events.
pub fn folded_line(event: &Event) -> Option<String> {
    if event.probe != podscope_core::session::TraceProbe::Profile {
        return None;
    }
    let stack = event.fields.get("stack")?;
    let samples = event.fields.get("samples")?;
    Some(format!("{};{stack} {samples}\n", event.pod))
}

/// Prints the `profile` events among `events` as folded lines; false when stdout's reader
/// went away.
pub fn print_folded(events: &[Event]) -> bool {
    use std::io::Write as _;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in events.iter().filter_map(folded_line) {
        if out.write_all(line.as_bytes()).is_err() {
            return false;
        }
    }
    let _ = out.flush();
    true
}

/// `HH:MM:SS.mmmmmm` UTC of a Unix time in nanoseconds (a trace spans seconds, not days).
pub fn clock_time(unix_nano: u64) -> String {
    let seconds = unix_nano / 1_000_000_000;
    let micros = (unix_nano % 1_000_000_000) / 1_000;
    let of_day = seconds % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{micros:06}",
        of_day / 3600,
        (of_day / 60) % 60,
        of_day % 60
    )
}

/// The event table, printed as events arrive: the columns of the first event decide the
/// layout; a field a later event has beyond them is appended as `name=value`.
#[derive(Default)]
pub struct EventTable {
    /// The probe's fields shown as columns, with their widths.
    field_columns: Option<Vec<(String, usize)>>,
}

const FIXED: [(&str, usize); 7] = [
    ("NODE", 14),
    ("NAMESPACE", 12),
    ("POD", 22),
    ("CONTAINER", 12),
    ("TIME", 15),
    ("PID", 7),
    ("COMM", 16),
];

impl EventTable {
    /// The lines for `event`: the header too before the first.
    pub fn lines(&mut self, event: &Event) -> String {
        let mut out = String::new();
        let columns = self.field_columns.get_or_insert_with(|| {
            // As wide as the first event's value (the table streams: later rows cannot widen it).
            let columns: Vec<(String, usize)> = event
                .fields
                .iter()
                .map(|(name, value)| (name.clone(), name.len().max(value.chars().count())))
                .collect();
            let mut header: Vec<String> = FIXED
                .iter()
                .map(|(name, width)| format!("{name:<width$}"))
                .collect();
            header.extend(
                columns
                    .iter()
                    .map(|(name, width)| format!("{:<width$}", name.to_ascii_uppercase())),
            );
            out.push_str(header.join(" ").trim_end());
            out.push('\n');
            columns
        });
        let fixed = [
            event.node.clone(),
            event.namespace.clone(),
            event.pod.clone(),
            event.container.clone(),
            clock_time(event.time_unix_nano),
            event.pid.to_string(),
            event.comm.clone(),
        ];
        let mut cells: Vec<String> = fixed
            .iter()
            .zip(FIXED)
            .map(|(value, (_, width))| format!("{:<width$}", dash_if_empty(value)))
            .collect();
        for (column, width) in columns.iter() {
            let value = event.fields.get(column).map(String::as_str).unwrap_or("");
            cells.push(format!("{:<width$}", dash_if_empty(value)));
        }
        for (name, value) in &event.fields {
            if !columns.iter().any(|(column, _)| column == name) {
                cells.push(format!("{name}={value}"));
            }
        }
        out.push_str(cells.join(" ").trim_end());
        out.push('\n');
        out
    }
}

fn dash_if_empty(value: &str) -> &str {
    if value.is_empty() {
        "-"
    } else {
        value
    }
}

/// Rows of cells as an aligned table (left-aligned, two spaces apart), header first.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                format!(
                    "{cell:<width$}",
                    width = widths.get(i).copied().unwrap_or(0)
                )
            })
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use podscope_core::session::TraceProbe;
    use std::collections::BTreeMap;

    fn exec(pod: &str, filename: &str, extra: Option<(&str, &str)>) -> Event {
        let mut fields = BTreeMap::from([("filename".to_string(), filename.to_string())]);
        if let Some((k, v)) = extra {
            fields.insert(k.into(), v.into());
        }
        Event {
            time_unix_nano: 1_764_689_445_123_456_789,
            node: "worker-1".into(),
            namespace: "shop".into(),
            pod: pod.into(),
            container: "app".into(),
            probe: TraceProbe::Exec,
            pid: 4242,
            tid: 4242,
            comm: "sh".into(),
            fields,
        }
    }

    #[test]
    fn a_profile_stack_is_folded_under_its_pod_and_other_events_are_left_out() {
        let mut stack = exec("busy-0", "", None);
        stack.probe = TraceProbe::Profile;
        stack.fields = BTreeMap::from([
            ("stack".to_string(), "burn;main;burn_leaf".to_string()),
            ("samples".to_string(), "42".to_string()),
        ]);
        assert_eq!(
            folded_line(&stack).as_deref(),
            Some("busy-0;burn;main;burn_leaf 42\n")
        );
        assert_eq!(folded_line(&exec("web-0", "/bin/true", None)), None);
    }

    #[test]
    fn the_event_table_has_a_header_then_one_row_per_event() {
        let mut table = EventTable::default();
        let first = table.lines(&exec("web-0", "/bin/true", None));
        assert_eq!(
            first,
            "NODE           NAMESPACE    POD                    CONTAINER    TIME            PID     COMM             FILENAME\n\
             worker-1       shop         web-0                  app          15:30:45.123456 4242    sh               /bin/true\n"
        );
        let second = table.lines(&exec("web-1", "", Some(("argv", "a b"))));
        assert_eq!(
            second,
            "worker-1       shop         web-1                  app          15:30:45.123456 4242    sh               -         argv=a b\n"
        );
    }

    #[test]
    fn yaml_output_is_one_document_per_object() {
        let value =
            serde_json::json!({"fields": {"filename": "/bin/true"}, "node": "n1", "pid": 7});
        assert_eq!(
            yaml_document(&value),
            "---\nfields:\n  filename: /bin/true\nnode: n1\npid: 7\n"
        );
        assert_eq!(object(Format::Json, &value), format!("{value}\n"));
    }

    #[test]
    fn tables_align_on_the_widest_cell() {
        let text = table(
            &["NODE", "READY"],
            &[
                vec!["worker-1".into(), "true".into()],
                vec!["n2".into(), "false".into()],
            ],
        );
        assert_eq!(text, "NODE      READY\nworker-1  true\nn2        false\n");
    }
}
