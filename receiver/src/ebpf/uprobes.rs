//! Config-defined uprobes: a user function's entry argument or return value, captured and
//! counted per cgroup, process and value, as a counter named by the config. One eBPF object is
//! loaded per entry; an entry that cannot attach (missing binary or symbol) is reported on its own
//! and the others still attach.
//!
//! Captured values are redacted (regexes) before they become labels, and each entry keeps at most
//! `max_series` distinct series: hits beyond that go to one `other` series and are counted in
//! `podscope_ebpf_uprobe_overflow_total`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

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
    /// The binary or shared library on the host (e.g. `/bin/bash`,
    /// `/usr/lib/x86_64-linux-gnu/libreadline.so.8`), or `container:<path>` for that path inside
    /// every container (see [`ContainerTargets`]).
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

/// The containers a `container:<path>` entry has looked at. Each container is checked once per
/// root directory, through the first of its processes seen in `/proc` with that root: a runtime
/// moves a container's first process into its cgroup before switching to the container's root,
/// so a process seen in between shows the host's root and must not settle the container.
/// The probe attaches once per distinct file (device and inode): containers of one image share
/// the binary's file through the image layer, so one attachment serves them all, and their hits
/// are still told apart by cgroup. A container whose binary is missing is skipped; one that only
/// gets the binary later (installed at run time) is not attached.
#[derive(Debug, Default)]
pub struct ContainerTargets {
    /// (container id, root device, root inode) already looked at.
    checked: HashSet<(String, u64, u64)>,
    /// (pid, root device, root inode) already looked at, pruned to the live processes at each
    /// scan. With the root in the key, a process seen before it switched root is looked at again.
    seen: HashSet<(u32, u64, u64)>,
    /// (device, inode) of every file attached.
    files: HashSet<(u64, u64)>,
}

/// A loaded entry and what it needs at collection time.
pub struct LoadedUprobe {
    pub config: UprobeConfig,
    ebpf: Ebpf,
    /// For `container:<path>` entries.
    containers: Option<ContainerTargets>,
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
    if let Target::Host(binary) = config.target() {
        if !binary.exists() {
            return Err(format!("{}: no such file", binary.display()));
        }
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
    let containers = match config.target() {
        Target::Host(binary) => {
            attach(program, &config.symbol, binary)?;
            None
        }
        // Attached per container by `scan_containers`, now and as containers start.
        Target::Container(_) => Some(ContainerTargets::default()),
    };
    Ok(LoadedUprobe {
        config: config.clone(),
        ebpf,
        containers,
        redact: config
            .redact
            .iter()
            .filter_map(|p| regex::Regex::new(p).ok())
            .collect(),
        known: BTreeSet::new(),
        overflow: HashMap::new(),
    })
}

fn attach(program: &mut UProbe, symbol: &str, binary: &Path) -> Result<(), String> {
    program
        .attach(
            symbol,
            binary,
            aya::programs::uprobe::UProbeScope::AllProcesses,
        )
        .map(|_| ())
        .map_err(|e| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        })
}

impl LoadedUprobe {
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// For a `container:<path>` entry: attaches to the binary in containers not looked at yet.
    /// Returns how many new files were attached.
    pub fn scan_containers(&mut self, proc_root: &Path) -> usize {
        let Target::Container(inner) = self.config.target() else {
            return 0;
        };
        let inner = inner.strip_prefix("/").unwrap_or(inner).to_path_buf();
        let Some(targets) = self.containers.as_mut() else {
            return 0;
        };
        let Ok(entries) = std::fs::read_dir(proc_root) else {
            return 0;
        };
        let live: HashSet<u32> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        targets.seen.retain(|(pid, _, _)| live.contains(pid));
        let function = if self.config.on_return {
            "podscope_uretprobe"
        } else {
            "podscope_uprobe"
        };
        let mut attached = 0;
        for pid in live {
            let root = proc_root.join(pid.to_string()).join("root");
            let Ok(root_meta) = std::fs::metadata(&root) else {
                continue;
            };
            if !targets.seen.insert((pid, root_meta.dev(), root_meta.ino())) {
                continue;
            }
            let Some(container) = podscope_k8s::cgroup::process_cgroup_path(proc_root, pid)
                .and_then(|path| podscope_k8s::cgroup::container_id(&path))
            else {
                continue;
            };
            if !targets
                .checked
                .insert((container.clone(), root_meta.dev(), root_meta.ino()))
            {
                continue;
            }
            let file = root.join(&inner);
            let Ok(meta) = std::fs::metadata(&file) else {
                tracing::debug!(uprobe = %self.config.location(), container = %container, "binary not in this container");
                continue;
            };
            if !targets.files.insert((meta.dev(), meta.ino())) {
                // Same file as a container already attached (one image layer): covered.
                continue;
            }
            let Some(program) = self
                .ebpf
                .program_mut(function)
                .and_then(|p| <&mut UProbe>::try_from(p).ok())
            else {
                return attached;
            };
            match attach(program, &self.config.symbol, &file) {
                Ok(()) => {
                    attached += 1;
                    tracing::info!(uprobe = %self.config.location(), container = %container, pid, "uprobe attached in container");
                }
                Err(e) => {
                    tracing::warn!(uprobe = %self.config.location(), container = %container, error = %e, "cannot attach the uprobe in this container");
                }
            }
        }
        attached
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
