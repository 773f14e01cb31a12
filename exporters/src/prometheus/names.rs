//! OpenTelemetry → Prometheus naming, as the OpenTelemetry specification's Prometheus
//! compatibility section describes it: sanitized names and labels, unit suffixes from UCUM units,
//! `_total` on monotonic counters. Pure functions.

/// Replaces every character outside `[a-zA-Z0-9_:]` with `_`, collapses repeated `_`, and
/// prefixes `_` when the name would start with a digit.
pub fn sanitize_name(name: &str) -> String {
    sanitize(name, true)
}

/// Like [`sanitize_name`] for label names, where `:` is not allowed either.
pub fn sanitize_label(name: &str) -> String {
    sanitize(name, false)
}

fn sanitize(name: &str, allow_colon: bool) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    for c in name.chars() {
        let keep = c.is_ascii_alphanumeric() || c == '_' || (allow_colon && c == ':');
        let c = if keep { c } else { '_' };
        if c == '_' && out.ends_with('_') {
            continue;
        }
        out.push(c);
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// The Prometheus word for a UCUM unit (`s` → `seconds`, `By` → `bytes`, `m/s` →
/// `meters_per_second`); annotations in braces (`{syscall}`) carry no unit and give `None`.
pub fn unit_suffix(unit: &str) -> Option<String> {
    let without_annotations: String = {
        let mut depth = 0;
        unit.chars()
            .filter(|&c| {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        return false;
                    }
                    _ => {}
                }
                depth == 0
            })
            .collect()
    };
    let unit = without_annotations.trim();
    if unit.is_empty() {
        return None;
    }
    let word = |u: &str| -> String {
        match u {
            "d" => "days",
            "h" => "hours",
            "min" => "minutes",
            "s" => "seconds",
            "ms" => "milliseconds",
            "us" => "microseconds",
            "ns" => "nanoseconds",
            "By" => "bytes",
            "KiBy" => "kibibytes",
            "MiBy" => "mebibytes",
            "GiBy" => "gibibytes",
            "TiBy" => "tebibytes",
            "KBy" => "kilobytes",
            "MBy" => "megabytes",
            "GBy" => "gigabytes",
            "TBy" => "terabytes",
            "m" => "meters",
            "V" => "volts",
            "A" => "amperes",
            "J" => "joules",
            "W" => "watts",
            "g" => "grams",
            "Cel" => "celsius",
            "Hz" => "hertz",
            "1" => "",
            "%" => "percent",
            other => return sanitize_label(other),
        }
        .to_string()
    };
    let text = match unit.split_once('/') {
        Some((per, of)) => {
            let (a, b) = (word(per), word(of));
            let singular = b.strip_suffix('s').unwrap_or(&b).to_string();
            if a.is_empty() {
                format!("per_{singular}")
            } else {
                format!("{a}_per_{singular}")
            }
        }
        None => word(unit),
    };
    (!text.is_empty()).then_some(text)
}

/// Prometheus wants base units: values in `ns`, `ms`, `min`, `KiBy`… are scaled to seconds or
/// bytes. Returns the unit to name the metric by and the factor to multiply values with.
pub fn to_base_unit(unit: &str) -> (&str, f64) {
    match unit {
        "ns" => ("s", 1e-9),
        "us" => ("s", 1e-6),
        "ms" => ("s", 1e-3),
        "min" => ("s", 60.0),
        "h" => ("s", 3600.0),
        "d" => ("s", 86400.0),
        "KiBy" => ("By", 1024.0),
        "MiBy" => ("By", 1048576.0),
        "GiBy" => ("By", 1073741824.0),
        "KBy" => ("By", 1e3),
        "MBy" => ("By", 1e6),
        "GBy" => ("By", 1e9),
        other => (other, 1.0),
    }
}

/// The Prometheus metric name for an OTel metric.
pub fn metric_name(
    namespace: &str,
    name: &str,
    unit: &str,
    counter: bool,
    add_suffixes: bool,
) -> String {
    let mut out = sanitize_name(name);
    if !namespace.is_empty() {
        out = format!("{namespace}_{out}");
    }
    if add_suffixes {
        if let Some(suffix) = unit_suffix(unit) {
            if !out.split('_').any(|part| part == suffix) && !out.ends_with(&format!("_{suffix}")) {
                out = format!("{out}_{suffix}");
            }
        }
        if counter && !out.ends_with("_total") {
            out.push_str("_total");
        }
    }
    out
}

/// A label value as the exposition formats quote it.
pub fn escape_label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// HELP text as the exposition formats escape it.
pub fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_specification() {
        assert_eq!(
            metric_name("", "podscope.syscalls", "{syscall}", true, true),
            "podscope_syscalls_total"
        );
        assert_eq!(
            metric_name("", "podscope.block.io", "By", true, true),
            "podscope_block_io_bytes_total"
        );
        assert_eq!(
            metric_name("", "http.server.request.duration", "s", false, true),
            "http_server_request_duration_seconds"
        );
        assert_eq!(
            metric_name("", "podscope.sched.runqueue.latency", "ns", false, true),
            "podscope_sched_runqueue_latency_nanoseconds"
        );
        assert_eq!(
            metric_name("node", "cpu.utilization", "1", false, true),
            "node_cpu_utilization"
        );
        assert_eq!(
            metric_name("", "net.speed", "m/s", false, true),
            "net_speed_meters_per_second"
        );
        assert_eq!(
            metric_name("", "requests_total", "", true, true),
            "requests_total"
        );
        assert_eq!(
            metric_name("", "podscope.syscalls", "{syscall}", true, false),
            "podscope_syscalls"
        );
    }

    #[test]
    fn non_base_units_scale_to_base_units() {
        assert_eq!(to_base_unit("ns"), ("s", 1e-9));
        assert_eq!(to_base_unit("MiBy"), ("By", 1048576.0));
        assert_eq!(to_base_unit("{syscall}"), ("{syscall}", 1.0));
    }

    #[test]
    fn sanitizing() {
        assert_eq!(sanitize_label("syscall.name"), "syscall_name");
        assert_eq!(sanitize_label("k8s.pod.name"), "k8s_pod_name");
        assert_eq!(sanitize_label("2xx..count"), "_2xx_count");
        assert_eq!(sanitize_name("a:b-c"), "a:b_c");
        assert_eq!(sanitize_label("a:b"), "a_b");
        assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
