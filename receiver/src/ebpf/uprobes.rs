//! Config-defined uprobes: a user function's entry argument or return value, captured and
//! counted per cgroup, process and value, as a counter named by the config. One eBPF object is
//! loaded per entry; an entry that cannot attach (missing binary or symbol) is reported on its own
//! and the others still attach.
//!
//! Captured values are redacted (regexes) before they become labels, and each entry keeps at most
//! `max_series` distinct series: hits beyond that go to one `other` series and are counted in
//! `podscope_ebpf_uprobe_overflow_total`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use aya::programs::UProbe;
use aya::{Ebpf, EbpfLoader};
use podscope_core::FieldError;
use podscope_ebpf::abi::UprobeKey;
use serde::Deserialize;

use super::collect::{int_attr, string_attr, MetricsBuilder, Owner};
use super::probes::{self, KernelFeatures};

/// One entry of `probes.uprobes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UprobeConfig {
    /// The binary or shared library on the host (e.g. `/bin/bash`, `/usr/lib/x86_64-linux-gnu/libreadline.so.8`).
    pub binary: PathBuf,
    /// The function, looked up in the ELF's dynamic and static symbol tables.
    pub symbol: String,
    /// `true`: a uretprobe (on return); `false` (default): on entry.
    #[serde(default, rename = "return")]
    pub on_return: bool,
    /// What to capture; nothing by default (hits are counted per process only).
    #[serde(default)]
    pub capture: Option<CaptureConfig>,
    pub metric: UprobeMetricConfig,
    /// Distinct series kept at most; hits beyond go to one `other` series. Default 1000.
    #[serde(default = "default_max_series")]
    pub max_series: usize,
    /// Regexes whose matches in a captured string are replaced by `<redacted>`.
    #[serde(default)]
    pub redact: Vec<String>,
    /// Fail startup if this entry cannot attach. Default false.
    #[serde(default)]
    pub required: bool,
}

fn default_max_series() -> usize {
    1000
}

/// `capture:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// `retval` (with `return: true`) or `arg1` … `arg6` (on entry).
    pub value: String,
    /// `string` (read from the process's memory) or `int`.
    #[serde(rename = "type")]
    pub kind: CaptureKind,
    /// Longest string kept, in bytes (1–255). Default 80.
    #[serde(default = "default_max_len")]
    pub max_len: u32,
}

fn default_max_len() -> u32 {
    80
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureKind {
    String,
    Int,
}

/// `metric:` — the counter's name and its labels.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UprobeMetricConfig {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Attribute names for the captured value, the process id and the node. Defaults `value`,
    /// `process.pid`, `host.name`; the talk's demo uses `command`, `pid`, `nodename`.
    #[serde(default)]
    pub labels: UprobeLabels,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UprobeLabels {
    pub value: String,
    pub pid: String,
    /// Empty: no node attribute on the data point (the resource has `host.name` anyway).
    pub node: String,
}

impl Default for UprobeLabels {
    fn default() -> Self {
        UprobeLabels {
            value: "value".into(),
            pid: "process.pid".into(),
            node: String::new(),
        }
    }
}

impl UprobeConfig {
    /// Problems, with paths under `prefix` (`probes.uprobes[0]`).
    pub fn validate(&self, prefix: &str, errors: &mut Vec<FieldError>) {
        let at = |key: &str| format!("{prefix}.{key}");
        if self.binary.to_string_lossy().starts_with("container:") {
            errors.push(FieldError::new(
                at("binary"),
                "container:<path> binaries are not supported yet; give the path on the host",
            ));
        } else if !self.binary.is_absolute() {
            errors.push(FieldError::new(at("binary"), "must be an absolute path"));
        }
        if self.symbol.is_empty() {
            errors.push(FieldError::new(at("symbol"), "must not be empty"));
        }
        if let Some(capture) = &self.capture {
            let ok = match capture.value.as_str() {
                "retval" => self.on_return,
                "arg1" | "arg2" | "arg3" | "arg4" | "arg5" | "arg6" => !self.on_return,
                _ => false,
            };
            if !ok {
                errors.push(FieldError::new(
                    at("capture.value"),
                    "retval goes with return: true, arg1 … arg6 with return: false",
                ));
            }
            if !(1..=255).contains(&capture.max_len) {
                errors.push(FieldError::new(at("capture.max_len"), "must be 1 to 255"));
            }
        }
        if self.metric.name.is_empty() {
            errors.push(FieldError::new(at("metric.name"), "must not be empty"));
        }
        if self.max_series == 0 {
            errors.push(FieldError::new(at("max_series"), "must be at least 1"));
        }
        for (i, pattern) in self.redact.iter().enumerate() {
            if let Err(e) = regex::Regex::new(pattern) {
                errors.push(FieldError::new(
                    format!("{prefix}.redact[{i}]"),
                    format!("invalid regex: {e}"),
                ));
            }
        }
    }

    /// `binary:symbol`, and `%return` for uretprobes, for messages.
    pub fn location(&self) -> String {
        format!(
            "{}:{}{}",
            self.binary.display(),
            self.symbol,
            if self.on_return { "%return" } else { "" }
        )
    }
}

/// A loaded entry and what it needs at collection time.
pub struct LoadedUprobe {
    pub config: UprobeConfig,
    ebpf: Ebpf,
    redact: Vec<regex::Regex>,
    /// Series seen so far (value, pid, cgroup): the cardinality cap counts these.
    known: BTreeSet<(String, u32, u64)>,
    /// Hits folded into `other`, per cgroup, from keys beyond the cap: their last counts.
    overflow: HashMap<(String, u32, u64), u64>,
}

/// Loads and attaches one entry.
pub fn load(
    config: &UprobeConfig,
    features: &KernelFeatures,
    agent_tgid: u32,
    filter_mode: u32,
) -> Result<LoadedUprobe, String> {
    let btf = features.btf.as_ref().map_err(Clone::clone)?;
    if !config.binary.exists() {
        return Err(format!("{}: no such file", config.binary.display()));
    }
    let (kind, arg) = match &config.capture {
        None => (0u32, 0u32),
        Some(c) => (
            if c.kind == CaptureKind::String { 1 } else { 2 },
            c.value
                .strip_prefix("arg")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
        ),
    };
    let max_len = config.capture.as_ref().map(|c| c.max_len).unwrap_or(80);
    let mut loader = EbpfLoader::new();
    loader
        .btf(Some(btf))
        .override_global("agent_tgid", &agent_tgid, false)
        .override_global("filter_mode", &filter_mode, false)
        .override_global("capture_kind", &kind, true)
        .override_global("capture_arg", &arg, true)
        .override_global("max_len", &max_len, true);
    let mut ebpf = loader
        .load(podscope_ebpf::objects::UPROBES)
        .map_err(|e| e.to_string())?;
    let function = if config.on_return {
        "podscope_uretprobe"
    } else {
        "podscope_uprobe"
    };
    let program: &mut UProbe = ebpf
        .program_mut(function)
        .ok_or("program missing from the object")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    program.load().map_err(|e| e.to_string())?;
    program
        .attach(
            config.symbol.as_str(),
            &config.binary,
            aya::programs::uprobe::UProbeScope::AllProcesses,
        )
        .map_err(|e| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        })?;
    Ok(LoadedUprobe {
        config: config.clone(),
        ebpf,
        redact: config
            .redact
            .iter()
            .filter_map(|p| regex::Regex::new(p).ok())
            .collect(),
        known: BTreeSet::new(),
        overflow: HashMap::new(),
    })
}

impl LoadedUprobe {
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    fn value_text(&self, key: &UprobeKey) -> String {
        let bytes = key.value_bytes();
        let text = match self.config.capture.as_ref().map(|c| c.kind) {
            Some(CaptureKind::Int) => {
                let mut raw = [0u8; 8];
                raw[..bytes.len().min(8)].copy_from_slice(&bytes[..bytes.len().min(8)]);
                i64::from_ne_bytes(raw).to_string()
            }
            _ => String::from_utf8_lossy(bytes).into_owned(),
        };
        self.redact
            .iter()
            .fold(text, |t, re| re.replace_all(&t, "<redacted>").into_owned())
    }

    /// Adds this entry's counters to `builder`; returns how many new hits overflowed the cap.
    pub fn collect(&mut self, builder: &mut MetricsBuilder<'_>, host_name: &str) -> u64 {
        let hits = probes::read_hash::<UprobeKey, u64>(&self.ebpf, "uprobe_hits");
        let (name, description) = (
            self.config.metric.name.clone(),
            self.config.metric.description.clone(),
        );
        let labels = self.config.metric.labels.clone();
        let mut other: BTreeMap<u64, u64> = BTreeMap::new();
        let mut overflowed = 0;
        let mut series: BTreeMap<(String, u32, u64), u64> = BTreeMap::new();
        for (key, count) in &hits {
            let value = if self.config.capture.is_some() {
                self.value_text(key)
            } else {
                String::new()
            };
            *series.entry((value, key.pid, key.cgroup_id)).or_default() += count;
        }
        for (id, count) in series {
            if self.known.contains(&id) || self.known.len() < self.config.max_series {
                self.known.insert(id.clone());
                let (value, pid, cgroup) = id;
                let mut attributes = Vec::new();
                if self.config.capture.is_some() {
                    attributes.push(string_attr(&labels.value, value));
                }
                attributes.push(int_attr(&labels.pid, pid as i64));
                if !labels.node.is_empty() {
                    attributes.push(string_attr(&labels.node, host_name));
                }
                builder.count_named(
                    Owner::Cgroup(cgroup),
                    &name,
                    &description,
                    "{call}",
                    attributes,
                    count,
                );
            } else {
                let previous = self.overflow.insert(id.clone(), count).unwrap_or(0);
                overflowed += count.saturating_sub(previous);
                *other.entry(id.2).or_default() += count;
            }
        }
        for (cgroup, count) in other {
            let mut attributes = vec![string_attr(&labels.value, "other")];
            if !labels.node.is_empty() {
                attributes.push(string_attr(&labels.node, host_name));
            }
            builder.count_named(
                Owner::Cgroup(cgroup),
                &name,
                &description,
                "{call}",
                attributes,
                count,
            );
        }
        overflowed
    }
}
