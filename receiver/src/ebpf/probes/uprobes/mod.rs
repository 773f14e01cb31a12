//! Config-defined uprobes: a user function's entry argument or return value, captured and
//! counted per cgroup, process and value, as a counter named by the config. One eBPF object is
//! loaded per entry; an entry that cannot attach (missing binary or symbol) is reported on its own
//! and the others still attach.
//!
//! Captured values are redacted (regexes) before they become labels, and each entry keeps at most
//! `max_series` distinct series: hits beyond that go to one `other` series and are counted in
//! `podscope_ebpf_uprobe_overflow_total`.

mod config;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use aya::programs::UProbe;
use podscope_core::FieldError;
use podscope_ebpf::abi::UprobeKey;
use podscope_ebpf::{abi, objects};
use prometheus_client::metrics::counter::Counter;

pub use config::{CaptureKind, Target, UprobeConfig};

use super::{Collection, LoadContext, Probe, ProbeKind};
use crate::ebpf::builder::{int_attr, string_attr, MetricsBuilder, Owner};
use crate::ebpf::catalog::MetricDoc;
use crate::ebpf::object::{
    error_chain, Global, HashTable, MapDef, ObjectSettings, ProbeError, ProbeObject, ProbeSpec,
};

/// The programs are attached by this module: on the entry's binary, or per container.
const SPEC: ProbeSpec = ProbeSpec {
    name: "uprobes",
    object: objects::UPROBES,
    programs: &[],
    maps: &[HITS, SCRATCH],
};

const ENTRY: &str = "podscope_uprobe";
const RETURN: &str = "podscope_uretprobe";

const HITS: MapDef = MapDef::entries("uprobe_hits").counted(abi::UPROBES_MAP_HITS);
const SCRATCH: MapDef = MapDef::fixed("uprobe_scratch");

pub struct Uprobes;

impl ProbeKind for Uprobes {
    type Config = Vec<UprobeConfig>;
    const SPEC: ProbeSpec = SPEC;
    /// Each entry names its own counter.
    const METRICS: &'static [MetricDoc] = &[];

    fn enabled(config: &Vec<UprobeConfig>) -> bool {
        !config.is_empty()
    }

    fn listed(config: &Vec<UprobeConfig>) -> bool {
        !config.is_empty()
    }

    fn validate(config: &Vec<UprobeConfig>, prefix: &str, errors: &mut Vec<FieldError>) {
        for (i, entry) in config.iter().enumerate() {
            entry.validate(&format!("{prefix}[{i}]"), errors);
        }
    }

    /// One probe per entry; each is skipped (or fails startup, when required) on its own.
    fn load(
        config: &Vec<UprobeConfig>,
        ctx: &mut LoadContext<'_>,
    ) -> anyhow::Result<Vec<Box<dyn Probe>>> {
        let mut probes: Vec<Box<dyn Probe>> = Vec::new();
        for (i, entry) in config.iter().enumerate() {
            ctx.max_entries = entry.max_entries.clone();
            let loaded = ctx.attempt(entry.required, "uprobe", |ctx| {
                LoadedUprobe::load(entry, ctx).map_err(|reason| ProbeError {
                    probe: SPEC.name,
                    hook: None,
                    reason: format!("uprobes[{i}] {}: {reason}", entry.location()),
                })
            })?;
            if let Some(loaded) = loaded {
                tracing::info!(receiver = %ctx.receiver, uprobe = %entry.location(), "uprobe attached");
                probes.push(Box::new(loaded));
            }
        }
        Ok(probes)
    }
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

impl ContainerTargets {
    /// Looks at the containers not looked at yet: in each, the files `files(root)` names
    /// (inside the container's root, as seen from here) that exist and were not attached before
    /// are given to `attach`. `what` names the probe in log lines. Returns how many attached.
    pub fn scan(
        &mut self,
        proc_root: &Path,
        what: &str,
        files: impl Fn(&Path) -> Vec<std::path::PathBuf>,
        mut attach: impl FnMut(&Path) -> Result<(), String>,
    ) -> usize {
        let Ok(entries) = std::fs::read_dir(proc_root) else {
            return 0;
        };
        let live: HashSet<u32> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        self.seen.retain(|(pid, _, _)| live.contains(pid));
        let mut attached = 0;
        for pid in live {
            let root = proc_root.join(pid.to_string()).join("root");
            let Ok(root_meta) = std::fs::metadata(&root) else {
                continue;
            };
            if !self.seen.insert((pid, root_meta.dev(), root_meta.ino())) {
                continue;
            }
            let Some(container) = podscope_core::cgroup::process_cgroup_path(proc_root, pid)
                .and_then(|path| podscope_core::cgroup::container_id(&path))
            else {
                continue;
            };
            if !self
                .checked
                .insert((container.clone(), root_meta.dev(), root_meta.ino()))
            {
                continue;
            }
            for file in files(&root) {
                let Ok(meta) = std::fs::metadata(&file) else {
                    tracing::debug!(probe = %what, container = %container, file = %file.display(), "not in this container");
                    continue;
                };
                if !self.files.insert((meta.dev(), meta.ino())) {
                    // Same file as a container already attached (one image layer): covered.
                    continue;
                }
                match attach(&file) {
                    Ok(()) => {
                        attached += 1;
                        tracing::info!(probe = %what, container = %container, pid, file = %file.display(), "uprobe attached in container");
                    }
                    Err(e) => {
                        tracing::warn!(probe = %what, container = %container, file = %file.display(), error = %e, "cannot attach the uprobe in this container");
                    }
                }
            }
        }
        attached
    }

    /// Marks a file as attached (on the host), so containers sharing it are not attached again.
    pub fn attached_on_host(&mut self, file: &Path) {
        if let Ok(meta) = std::fs::metadata(file) {
            self.files.insert((meta.dev(), meta.ino()));
        }
    }
}

/// A loaded entry and what it needs at collection time.
pub struct LoadedUprobe {
    config: UprobeConfig,
    object: ProbeObject,
    hits: HashTable<UprobeKey, u64>,
    /// For `container:<path>` entries.
    containers: Option<ContainerTargets>,
    redact: Vec<regex::Regex>,
    /// Series seen so far (value, pid, cgroup): the cardinality cap counts these.
    known: BTreeSet<(String, u32, u64)>,
    /// Hits folded into `other`, per cgroup, from keys beyond the cap: their last counts.
    overflow: HashMap<(String, u32, u64), u64>,
    overflow_total: Counter,
    container_attachments: Counter,
}

impl LoadedUprobe {
    /// Loads one entry and attaches it (a `container:` entry attaches at each rescan).
    fn load(config: &UprobeConfig, ctx: &mut LoadContext<'_>) -> Result<LoadedUprobe, String> {
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
        let settings = ObjectSettings {
            globals: vec![
                Global::U32("capture_kind", kind),
                Global::U32("capture_arg", arg),
                Global::U32("max_len", max_len),
            ],
            skip: &[],
        };
        let mut object = ctx.object(&SPEC, &settings).map_err(|e| e.reason)?;
        let hits = object.hash(&HITS).map_err(|e| e.reason)?;
        let function = if config.on_return { RETURN } else { ENTRY };
        let program: &mut UProbe = object
            .program_mut(function)?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        program.load().map_err(|e| e.to_string())?;
        let containers = match config.target() {
            Target::Host(binary) => {
                attach(program, &config.symbol, binary)?;
                None
            }
            // Attached per container by `rescan`, now and as containers start.
            Target::Container(_) => Some(ContainerTargets::default()),
        };
        Ok(LoadedUprobe {
            config: config.clone(),
            object,
            hits,
            containers,
            redact: config
                .redact
                .iter()
                .filter_map(|p| regex::Regex::new(p).ok())
                .collect(),
            known: BTreeSet::new(),
            overflow: HashMap::new(),
            overflow_total: ctx.telemetry.uprobe_overflow.clone(),
            container_attachments: ctx.telemetry.container_attachments.clone(),
        })
    }
}

fn attach(program: &mut UProbe, symbol: &str, binary: &Path) -> Result<(), String> {
    program
        .attach(
            symbol,
            binary,
            aya::programs::uprobe::UProbeScope::AllProcesses,
        )
        .map(|_| ())
        .map_err(|e| error_chain(&e))
}

impl Probe for LoadedUprobe {
    fn objects_mut(&mut self) -> Vec<&mut ProbeObject> {
        vec![&mut self.object]
    }

    fn collect(&mut self, out: &mut Collection<'_>) {
        let overflowed = self.add_hits(&mut out.metrics, out.host_name);
        if overflowed > 0 {
            self.overflow_total.inc_by(overflowed);
        }
    }

    fn watches_containers(&self) -> bool {
        self.containers.is_some()
    }

    fn rescan(&mut self) {
        let attached = self.scan_containers(Path::new("/proc"));
        self.container_attachments.inc_by(attached as u64);
    }
}

impl LoadedUprobe {
    /// For a `container:<path>` entry: attaches to the binary in containers not looked at yet.
    /// Returns how many new files were attached.
    fn scan_containers(&mut self, proc_root: &Path) -> usize {
        let Target::Container(inner) = self.config.target() else {
            return 0;
        };
        let inner = inner.strip_prefix("/").unwrap_or(inner).to_path_buf();
        let Some(targets) = self.containers.as_mut() else {
            return 0;
        };
        let function = if self.config.on_return { RETURN } else { ENTRY };
        let (object, symbol, location) = (
            &mut self.object,
            &self.config.symbol,
            self.config.location(),
        );
        targets.scan(
            proc_root,
            &location,
            |root| vec![root.join(&inner)],
            |file| {
                let program = object
                    .program_mut(function)
                    .and_then(|p| <&mut UProbe>::try_from(p).map_err(|e| e.to_string()))?;
                attach(program, symbol, file)
            },
        )
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
    fn add_hits(&mut self, builder: &mut MetricsBuilder<'_>, host_name: &str) -> u64 {
        let hits = self.hits.entries();
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
