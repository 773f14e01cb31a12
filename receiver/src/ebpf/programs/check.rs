//! `podscope program check`: what a program author wants to know before shipping an object —
//! its programs and sections, its maps with their BTF layouts and its globals, whether this
//! kernel's verifier takes it and it attaches, and the data points its spec makes of a few
//! seconds of this machine's activity — or the exact error, as the agent would report it.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use super::load::{self, Limits, LoadSettings};
use super::maps::readable_kind;
use super::spec::{MetricsSpec, ObjectSource, ProgramSpec};
use crate::ebpf::builder::{Identity, MetricsBuilder, Owner};
use crate::ebpf::cgroups::{cgroup2_mount, CgroupIndex};
use crate::ebpf::collector::unix_nanos;

/// What the object holds, as text.
fn describe_object(bytes: &[u8], info: &load::ObjectInfo, out: &mut String) {
    let _ = writeln!(
        out,
        "object: {} bytes, sha256 {}",
        bytes.len(),
        load::sha256_hex(bytes)
    );
    let _ = writeln!(out, "programs:");
    for p in &info.programs {
        let kind = p.kind.as_ref().map(|k| k.type_name()).unwrap_or("?");
        let _ = writeln!(out, "  {}  {}  ({kind})", p.function, p.section);
    }
    let _ = writeln!(out, "maps:");
    for m in &info.maps {
        let layout = |id: Option<u32>, size: usize| match (&info.btf, id) {
            (Some(btf), Some(id)) => btf.describe(id),
            _ => format!("{size} bytes, no BTF layout"),
        };
        let _ = writeln!(
            out,
            "  {}  {}  max_entries {}\n    key:   {}\n    value: {}",
            m.name,
            readable_kind(m.map_type).map_or_else(
                || format!("type {} (not readable as metrics)", m.map_type),
                str::to_string
            ),
            m.max_entries,
            layout(m.key_type, m.key_size),
            layout(m.value_type, m.value_size),
        );
    }
    let mut globals: Vec<_> = info.globals.iter().collect();
    globals.sort();
    let _ = writeln!(out, "globals (const volatile):");
    if globals.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for (name, size) in globals {
        let _ = writeln!(out, "  {name} ({size} bytes)");
    }
}

/// Checks `object` (with `spec`'s metrics, globals and attach settings; its `object` is
/// replaced by the file given), waits `wait` and prints what the metrics would be. `Err` holds
/// the report so far and the error.
pub async fn check(
    object: &Path,
    spec: Option<ProgramSpec>,
    wait: Duration,
) -> Result<String, (String, String)> {
    let mut out = String::new();
    let limits = Limits::default();
    let bytes = load::read_file(&object.to_path_buf(), &limits).map_err(|e| (out.clone(), e))?;
    let mut spec = spec.unwrap_or_else(|| ProgramSpec {
        object: ObjectSource::default(),
        sha256: None,
        globals: Default::default(),
        attach: Vec::new(),
        node_selector: None,
        pod_selector: None,
        namespace_selector: None,
        metrics: MetricsSpec::default(),
    });
    spec.object = ObjectSource {
        file: Some(object.to_path_buf()),
        ..ObjectSource::default()
    };
    let info = match load::inspect(&bytes) {
        Ok(info) => info,
        Err(e) => return Err((out, e)),
    };
    describe_object(&bytes, &info, &mut out);
    let kernel_btf =
        aya::Btf::from_sys_fs().map_err(|e| (out.clone(), format!("kernel BTF: {e}")))?;
    let mut program = load::load(
        "check",
        &spec,
        &bytes,
        &LoadSettings {
            kernel_btf: &kernel_btf,
            limits: &limits,
            map_memory_in_use: 0,
        },
    )
    .map_err(|e| (out.clone(), e))?;
    let _ = writeln!(out, "verified and attached:");
    for attached in &program.attached {
        let _ = writeln!(out, "  {attached}");
    }
    let memory: u64 = program.map_memory().iter().map(|(_, _, bytes)| bytes).sum();
    let _ = writeln!(out, "kernel memory of its maps: {memory} bytes");
    if program.metrics.is_empty() {
        let _ = writeln!(
            out,
            "metrics: none (give --spec to see what a spec makes of the maps)"
        );
        return Ok(out);
    }
    let mut index = CgroupIndex::new(cgroup2_mount().unwrap_or_else(|| "/sys/fs/cgroup".into()));
    index.refresh();
    // No pod cache here: a program's pod filter gets every cgroup, so it counts what it would
    // for the pods it selects.
    if let Some(pods) = &program.pods {
        for (id, _) in index.iter() {
            let _ = pods.insert(&id.to_ne_bytes(), &[1]);
        }
        let _ = writeln!(
            out,
            "pod filter map {}: every cgroup of this machine",
            super::POD_FILTER_MAP
        );
    }
    tokio::time::sleep(wait).await;
    program.run_iterators().map_err(|e| (out.clone(), e))?;
    index.refresh();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut builder = MetricsBuilder::new(host.trim(), unix_nanos());
    let entries: Vec<(String, Vec<super::maps::Entry>)> = program
        .maps()
        .iter()
        .map(|m| (m.name.clone(), m.entries()))
        .collect();
    for metric in &mut program.metrics {
        if let Some((_, e)) = entries.iter().find(|(name, _)| *name == metric.map) {
            metric.collect(e, &mut builder, program.loaded_ns, unix_nanos());
        }
    }
    let _ = writeln!(out, "metrics after {wait:?}:");
    for metric in &program.metrics {
        let _ = writeln!(out, "  {}", metric.describe());
    }
    // Every owner is reported, cgroups under their path (the agent leaves out unselected ones).
    let loaded_ns = program.loaded_ns;
    let identify = |owner| {
        Some(Identity {
            path: match owner {
                Owner::Cgroup(id) => index.path(id).map(str::to_string),
                Owner::Host => None,
            },
            start_ns: loaded_ns,
        })
    };
    for rm in builder.finish(identify) {
        let resource = rm
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .filter(|a| a.key == "podscope.cgroup.path")
            .map(|a| format!(" cgroup {}", text(a.value.as_ref())))
            .collect::<String>();
        for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
            for line in data_points(m) {
                let _ = writeln!(out, "  {}{line}{resource}", m.name);
            }
        }
    }
    Ok(out)
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// `{labels} value` per data point (histograms as count and buckets).
fn data_points(m: &opentelemetry_proto::tonic::metrics::v1::Metric) -> Vec<String> {
    use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point::Value};
    let labels = |attributes: &[opentelemetry_proto::tonic::common::v1::KeyValue]| {
        let inner: Vec<String> = attributes
            .iter()
            .map(|a| format!("{}={:?}", a.key, text(a.value.as_ref())))
            .collect();
        format!("{{{}}}", inner.join(","))
    };
    match &m.data {
        Some(Data::Sum(s)) => s
            .data_points
            .iter()
            .map(|p| {
                let value = match p.value {
                    Some(Value::AsInt(i)) => i.to_string(),
                    Some(Value::AsDouble(d)) => d.to_string(),
                    None => "-".to_string(),
                };
                format!("{} {value}", labels(&p.attributes))
            })
            .collect(),
        Some(Data::ExponentialHistogram(h)) => h
            .data_points
            .iter()
            .map(|p| {
                let b = p.positive.clone().unwrap_or_default();
                format!(
                    "{} count {} (scale 0, buckets from index {}: {:?})",
                    labels(&p.attributes),
                    p.count,
                    b.offset,
                    b.bucket_counts
                )
            })
            .collect(),
        Some(Data::Histogram(h)) => h
            .data_points
            .iter()
            .map(|p| {
                format!(
                    "{} count {} (bounds {:?}, buckets {:?})",
                    labels(&p.attributes),
                    p.count,
                    p.explicit_bounds,
                    p.bucket_counts
                )
            })
            .collect(),
        _ => Vec::new(),
    }
}
