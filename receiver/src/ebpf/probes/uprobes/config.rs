use std::path::{Path, PathBuf};

use podscope_core::FieldError;
use serde::Deserialize;

use crate::ebpf::probes::MapSizes;

/// One entry of `probes.uprobes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UprobeConfig {
    /// The binary or shared library on the host (e.g. `/bin/bash`,
    /// `/usr/lib/x86_64-linux-gnu/libreadline.so.8`), or `container:<path>` for that path inside
    /// every container (see [`super::ContainerTargets`]).
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
    /// Distinct (process, value) series kept at most, in the kernel; hits of further series go
    /// to their cgroup's `other` series. The series of a process that exited are reported once
    /// more, then removed, which makes room for new ones. Default 1000. It is also the size of
    /// the `uprobe_hits` map unless `max_entries` sets one (a smaller one caps first: its refused
    /// inserts are counted, and their hits go to `other` as well).
    #[serde(default = "default_max_series")]
    pub max_series: u32,
    /// Regexes whose matches in a captured string are replaced by `<redacted>`.
    #[serde(default)]
    pub redact: Vec<String>,
    /// Fail startup if this entry cannot attach. Default false.
    #[serde(default)]
    pub required: bool,
    /// Kernel map sizes of this entry's object by map name (see [`MapSizes`]).
    #[serde(default)]
    pub max_entries: MapSizes,
}

fn default_max_series() -> u32 {
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
        let path = match self.target() {
            Target::Host(path) | Target::Container(path) => path,
        };
        if !path.is_absolute() {
            errors.push(FieldError::new(
                at("binary"),
                "must be an absolute path, or container:<absolute path inside the container>",
            ));
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
        self.max_entries
            .validate(super::SPEC.maps, &at("max_entries"), errors);
        for (i, pattern) in self.redact.iter().enumerate() {
            if let Err(e) = regex::Regex::new(pattern) {
                errors.push(FieldError::new(
                    format!("{prefix}.redact[{i}]"),
                    format!("invalid regex: {e}"),
                ));
            }
        }
    }

    /// Where the binary is: on the host, or inside containers.
    pub fn target(&self) -> Target<'_> {
        match self
            .binary
            .to_str()
            .and_then(|b| b.strip_prefix("container:"))
        {
            Some(inner) => Target::Container(Path::new(inner)),
            None => Target::Host(&self.binary),
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

/// Where an entry's binary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    Host(&'a Path),
    /// A path inside each container, reached as `/proc/<pid>/root/<path>`.
    Container(&'a Path),
}
