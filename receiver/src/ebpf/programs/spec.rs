//! A user program's spec: where its object comes from, how its programs attach, which pods it
//! sees, and which of its maps become which metrics. The same spec is a local program's entry
//! (`receivers.ebpf.programs.<name>`) and an `EbpfProgram` object's `spec`, field for field
//! (camelCase, as Kubernetes objects are), so a program moves between a file and a cluster
//! unchanged. See `docs/programs.md`.
//!
//! Only what can be checked without the object is checked here; the object's maps, fields and
//! sections are checked when it loads (`load.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use podscope_core::FieldError;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProgramSpec {
    /// The compiled object (`clang -g -O2 -target bpf`; `-g` keeps the BTF that lays out maps).
    pub object: ObjectSource,
    /// The object's SHA-256 in hex; when set, another object is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `const volatile` globals of the object, by name: integers or booleans.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub globals: BTreeMap<String, GlobalValue>,
    /// Attach settings of programs whose section does not say everything: uprobes (binary,
    /// symbol) and perf_event programs (frequency).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attach: Vec<AttachSpec>,
    /// Nodes to run on (an `EbpfProgram`'s; a local program runs where it is configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelectorSpec>,
    /// Pods whose cgroup ids the agent keeps in the object's `podscope_pods` map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelectorSpec>,
    /// Namespaces (by their labels; `kubernetes.io/metadata.name` is the name) of those pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelectorSpec>,
    pub metrics: MetricsSpec,
}

/// Exactly one of `file`, `configMap`, `base64`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectSource {
    /// A path on the agent's filesystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// A key of a ConfigMap's `binaryData`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapKey>,
    /// The object itself, base64-encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base64: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigMapKey {
    pub namespace: String,
    pub name: String,
    pub key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum GlobalValue {
    Bool(bool),
    Int(i64),
    Unsigned(u64),
}

impl GlobalValue {
    /// The value as `size` little-endian bytes, or why it does not fit.
    pub fn bytes(&self, size: usize) -> Result<Vec<u8>, String> {
        let (value, negative) = match *self {
            GlobalValue::Bool(b) => (u64::from(b), false),
            GlobalValue::Int(i) => (i as u64, i < 0),
            GlobalValue::Unsigned(u) => (u, false),
        };
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(format!("a {size}-byte global cannot be set from a number"));
        }
        let bits = size * 8;
        let fits = if negative {
            bits == 64 || (value as i64) >= -(1i64 << (bits - 1))
        } else {
            bits == 64 || value < (1u64 << bits)
        };
        if !fits {
            return Err(format!("{value} does not fit in {size} bytes"));
        }
        Ok(value.to_le_bytes()[..size].to_vec())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AttachSpec {
    /// The program's C function name.
    pub program: String,
    /// uprobe/uretprobe: the binary or library (absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<PathBuf>,
    /// uprobe/uretprobe: the function symbol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbol: Option<String>,
    /// perf_event: samples per second on each CPU (software CPU clock). Default 99.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency: Option<u64>,
}

/// A Kubernetes label selector, as in every object: `matchLabels` and `matchExpressions`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelectorSpec {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelExpression>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelExpression {
    pub key: String,
    /// In, NotIn, Exists, DoesNotExist.
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

impl LabelSelectorSpec {
    /// As a selector (kube's model, what `podscope_k8s::labels` parses into), or what is wrong
    /// with it.
    pub fn selector(&self) -> Result<podscope_k8s::labels::Selector, String> {
        let mut terms: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for e in &self.match_expressions {
            let values = e.values.join(",");
            terms.push(match e.operator.as_str() {
                "In" => format!("{} in ({values})", e.key),
                "NotIn" => format!("{} notin ({values})", e.key),
                "Exists" => e.key.clone(),
                "DoesNotExist" => format!("!{}", e.key),
                other => {
                    return Err(format!(
                        "operator {other:?}: one of In, NotIn, Exists, DoesNotExist"
                    ))
                }
            });
        }
        podscope_k8s::labels::parse_selector(&terms.join(","))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MetricsSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub counters: Vec<CounterSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub histograms: Vec<HistogramSpec>,
}

/// A cumulative counter per map entry: labels from the key, the count from the value.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CounterSpec {
    /// The OTLP metric name (`myapp.syscalls`).
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// UCUM unit (`{call}`, `By`). Default `1`.
    #[serde(default = "default_unit")]
    pub unit: String,
    /// The map, by its name in the object.
    pub map: String,
    /// The value's field holding the count (a struct value); unset: the value is the count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<LabelSpec>,
    /// Distinct label sets kept at most; entries beyond are not exported and are counted in
    /// `podscope_ebpf_program_series_overflow_total`. Default 1000.
    #[serde(default = "default_max_series")]
    pub max_series: usize,
}

/// A histogram: the map's key is the labels and a bucket index, its value a count.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HistogramSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "default_unit")]
    pub unit: String,
    pub map: String,
    /// How bucket indexes map to values.
    pub bucket_type: BucketType,
    /// The key field holding the bucket index; unset: the key's last field, or the key itself
    /// when it is an integer (an array map indexed by bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket_field: Option<String>,
    /// `linear`: bucket k holds values in ((k−1)·width, k·width].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket_width: Option<u64>,
    /// `linear`: buckets 0 … count−1; the last also holds everything above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket_count: Option<u32>,
    /// `explicit`: bucket k holds values in (bounds[k−1], bounds[k]]; bucket len(bounds) the rest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bounds: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<LabelSpec>,
    #[serde(default = "default_max_series")]
    pub max_series: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BucketType {
    /// Bucket k holds values in (2^(k−1), 2^k] (bucket 0: values up to 1), exported as an OTLP
    /// exponential histogram of scale 0, exactly.
    Exp2,
    Linear,
    Explicit,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSpec {
    /// The attribute name (not needed with `decoder: cgroup`, which sets the resource).
    #[serde(default)]
    pub name: String,
    /// The key's field, by name (`a.b` for a nested struct); unset: the whole key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default)]
    pub decoder: Decoder,
    /// `static_map`: value → text; other values are shown as numbers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decoder {
    /// An unsigned integer, in decimal.
    #[default]
    Uint,
    /// A signed integer, in decimal.
    Int,
    /// Bytes up to the first NUL, as UTF-8 (invalid bytes replaced).
    String,
    /// An errno (positive or negative) as its name: `ENOENT`.
    Errno,
    /// An IPv4 (4 bytes, or a 32-bit integer in network order) or IPv6 (16 bytes) address.
    Inet,
    /// A kernel address as the symbol containing it (`/proc/kallsyms`).
    Ksym,
    /// An integer looked up in `values`.
    StaticMap,
    /// A syscall number as its name (x86_64).
    Syscall,
    /// A cgroup id: the data point's resource becomes that cgroup (its container, and through
    /// `k8sattributes` its pod), as for the built-in probes.
    Cgroup,
}

fn default_unit() -> String {
    "1".to_string()
}

fn default_max_series() -> usize {
    1000
}

impl ProgramSpec {
    /// Problems, with paths under `prefix`.
    pub fn validate(&self, prefix: &str, errors: &mut Vec<FieldError>) {
        let at = |key: &str| format!("{prefix}.{key}");
        let o = &self.object;
        let sources = [o.file.is_some(), o.config_map.is_some(), o.base64.is_some()];
        if sources.iter().filter(|s| **s).count() != 1 {
            errors.push(FieldError::new(
                at("object"),
                "set exactly one of file, configMap, base64",
            ));
        }
        if let Some(file) = &o.file {
            if !file.is_absolute() {
                errors.push(FieldError::new(
                    at("object.file"),
                    "must be an absolute path",
                ));
            }
        }
        if let Some(sha) = &self.sha256 {
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                errors.push(FieldError::new(at("sha256"), "64 hex digits"));
            }
        }
        for (i, a) in self.attach.iter().enumerate() {
            if a.program.is_empty() {
                errors.push(FieldError::new(
                    at(&format!("attach[{i}].program")),
                    "must not be empty",
                ));
            }
            if let Some(binary) = &a.binary {
                if !binary.is_absolute() {
                    errors.push(FieldError::new(
                        at(&format!("attach[{i}].binary")),
                        "must be an absolute path",
                    ));
                }
            }
            if a.frequency == Some(0) {
                errors.push(FieldError::new(
                    at(&format!("attach[{i}].frequency")),
                    "must be at least 1",
                ));
            }
        }
        for (key, selector) in [
            ("nodeSelector", &self.node_selector),
            ("podSelector", &self.pod_selector),
            ("namespaceSelector", &self.namespace_selector),
        ] {
            if let Some(Err(e)) = selector.as_ref().map(LabelSelectorSpec::selector) {
                errors.push(FieldError::new(at(key), e));
            }
        }
        if self.metrics.counters.is_empty() && self.metrics.histograms.is_empty() {
            errors.push(FieldError::new(
                at("metrics"),
                "name at least one counter or histogram: a program without metrics shows nothing",
            ));
        }
        for (i, c) in self.metrics.counters.iter().enumerate() {
            let at = format!("{prefix}.metrics.counters[{i}]");
            check_metric(&at, &c.name, &c.map, c.max_series, &c.labels, errors);
        }
        for (i, h) in self.metrics.histograms.iter().enumerate() {
            let at = format!("{prefix}.metrics.histograms[{i}]");
            check_metric(&at, &h.name, &h.map, h.max_series, &h.labels, errors);
            match h.bucket_type {
                BucketType::Exp2 => {}
                BucketType::Linear => {
                    if h.bucket_width.unwrap_or(0) == 0 || h.bucket_count.unwrap_or(0) < 2 {
                        errors.push(FieldError::new(
                            format!("{at}.bucketType"),
                            "linear needs bucketWidth (at least 1) and bucketCount (at least 2)",
                        ));
                    }
                }
                BucketType::Explicit => {
                    if h.bounds.is_empty() || h.bounds.windows(2).any(|w| w[0] >= w[1]) {
                        errors.push(FieldError::new(
                            format!("{at}.bounds"),
                            "explicit needs bounds, strictly increasing",
                        ));
                    }
                }
            }
        }
    }
}

fn check_metric(
    at: &str,
    name: &str,
    map: &str,
    max_series: usize,
    labels: &[LabelSpec],
    errors: &mut Vec<FieldError>,
) {
    if name.is_empty() {
        errors.push(FieldError::new(format!("{at}.name"), "must not be empty"));
    }
    if map.is_empty() {
        errors.push(FieldError::new(format!("{at}.map"), "must not be empty"));
    }
    if max_series == 0 {
        errors.push(FieldError::new(
            format!("{at}.maxSeries"),
            "must be at least 1",
        ));
    }
    let mut cgroups = 0;
    for (j, label) in labels.iter().enumerate() {
        let at = format!("{at}.labels[{j}]");
        if label.decoder == Decoder::Cgroup {
            cgroups += 1;
        } else if label.name.is_empty() {
            errors.push(FieldError::new(format!("{at}.name"), "must not be empty"));
        }
        if label.decoder == Decoder::StaticMap && label.values.is_empty() {
            errors.push(FieldError::new(
                format!("{at}.values"),
                "static_map needs values",
            ));
        }
        if label.decoder != Decoder::StaticMap && !label.values.is_empty() {
            errors.push(FieldError::new(
                format!("{at}.values"),
                "only static_map takes values",
            ));
        }
    }
    if cgroups > 1 {
        errors.push(FieldError::new(
            format!("{at}.labels"),
            "at most one cgroup label: it picks the data point's resource",
        ));
    }
}
