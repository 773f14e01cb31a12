//! Config-defined uprobes: a user function's entry argument or return value, captured and
//! counted per cgroup, process and value, as a counter named by the config. One eBPF object is
//! loaded per entry; an entry that cannot attach (missing binary or symbol) is reported on its own
//! and the others still attach.
//!
//! Captured values are redacted (regexes) before they become labels. The kernel keeps at most
//! `max_series` (process, value) series per entry: hits of further series (and of those a full
//! map refused) are counted per cgroup in the kernel as value `other`, and in
//! `podscope_ebpf_uprobe_overflow_total`. The series of processes that exited are reported a last
//! time, then removed from the kernel map, and their room given back.

mod config;
mod containers;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use aya::maps::{Array, MapData};
use aya::programs::UProbe;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use podscope_core::FieldError;
use podscope_ebpf::abi::UprobeKey;
use podscope_ebpf::{abi, objects};
use prometheus_client::metrics::counter::Counter;

pub use config::{CaptureKind, Target, UprobeConfig};
pub use containers::{ContainerTargets, ScanOutcome, SymbolProbe};

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
    maps: &[HITS, OTHER, SERIES, SCRATCH],
};

const ENTRY: &str = "podscope_uprobe";
const RETURN: &str = "podscope_uretprobe";

/// (cgroup, process, value) → hits, at most `max_series` entries.
const HITS: MapDef = MapDef::entries("uprobe_hits").counted(abi::UPROBES_MAP_HITS);
/// Cgroup → hits of the series beyond `max_series` or refused by a full `uprobe_hits`.
const OTHER: MapDef = MapDef::entries("uprobe_other").counted(abi::UPROBES_MAP_OTHER);
/// Series admitted by the kernel and released by the agent (`enum uprobe_series_slot`).
const SERIES: MapDef = MapDef::fixed("uprobe_series");
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
            let mut sizes = entry.max_entries.clone();
            // The kernel holds at most max_series series: their map needs no more room.
            sizes
                .0
                .entry(HITS.name.to_string())
                .or_insert(entry.max_series);
            ctx.max_entries = sizes;
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

/// A loaded entry and what it needs at collection time.
pub struct LoadedUprobe {
    config: UprobeConfig,
    object: ProbeObject,
    hits: HashTable<UprobeKey, u64>,
    other: HashTable<u64, u64>,
    series: Array<MapData, u64>,
    /// Series removed from `hits` so far (what the kernel's released slot says).
    released: u64,
    /// For `container:<path>` entries.
    containers: Option<ContainerTargets>,
    redact: Vec<regex::Regex>,
    /// Each cgroup's `other` hits as last reported, for the overflow counter.
    other_reported: HashMap<u64, u64>,
    overflow_total: Counter,
    container_attachments: Counter,
    container_detachments: Counter,
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
                Global::U32("max_series", config.max_series),
            ],
            skip: &[],
        };
        let mut object = ctx.object(&SPEC, &settings).map_err(|e| e.reason)?;
        let hits = object.hash(&HITS).map_err(|e| e.reason)?;
        let other = object.hash(&OTHER).map_err(|e| e.reason)?;
        let series = object.array(&SERIES).map_err(|e| e.reason)?;
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
            Target::Container(inner) => {
                let inner = inner.strip_prefix("/").unwrap_or(inner).to_path_buf();
                Some(ContainerTargets::new(
                    &mut object,
                    ctx.features,
                    Box::new(move |root| vec![root.join(&inner)]),
                    vec![SymbolProbe {
                        program: function,
                        symbol: config.symbol.clone(),
                        required: true,
                    }],
                    config.location(),
                ))
            }
        };
        Ok(LoadedUprobe {
            config: config.clone(),
            object,
            hits,
            other,
            series,
            released: 0,
            containers,
            redact: config
                .redact
                .iter()
                .filter_map(|p| regex::Regex::new(p).ok())
                .collect(),
            other_reported: HashMap::new(),
            overflow_total: ctx.telemetry.uprobe_overflow.clone(),
            container_attachments: ctx.telemetry.container_attachments.clone(),
            container_detachments: ctx.telemetry.container_detachments.clone(),
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
        // A process that exited before its hits are read adds none after: its series are reported
        // this last time, then removed.
        let exited: HashSet<u32> = self
            .hits
            .keys()
            .iter()
            .map(|key| key.pid)
            .filter(|pid| !Path::new("/proc").join(pid.to_string()).exists())
            .collect();
        let hits = self.hits.entries();
        let other = self.other.entries();
        out.saw(hits.keys().map(|k| k.cgroup_id));
        out.saw(other.keys().copied());
        self.add_hits(&mut out.metrics, out.host_name, &hits, &other);
        for (cgroup, count) in &other {
            let reported = self.other_reported.insert(*cgroup, *count).unwrap_or(0);
            self.overflow_total.inc_by(count.saturating_sub(reported));
        }
        let exited: Vec<UprobeKey> = hits
            .into_keys()
            .filter(|key| exited.contains(&key.pid))
            .collect();
        let removed = exited.len();
        self.hits.remove(exited);
        self.release(removed);
    }

    /// Frees the series and `other` counts of removed cgroups.
    fn forget(&mut self, gone: &HashSet<u64>) {
        let removed = self.hits.forget(gone, |k| k.cgroup_id);
        self.release(removed);
        self.other.forget(gone, |cgroup| *cgroup);
        self.other_reported.retain(|cgroup, _| !gone.contains(cgroup));
    }

    fn watches_containers(&self) -> bool {
        self.containers.is_some()
    }

    fn rescan(&mut self) {
        if let Some(containers) = &mut self.containers {
            let outcome = containers.scan(&mut self.object, Path::new("/proc"));
            self.container_attachments.inc_by(outcome.attached as u64);
            self.container_detachments.inc_by(outcome.detached as u64);
        }
    }
}

impl LoadedUprobe {
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

    /// Gives the kernel back the room of `removed` series taken out of `uprobe_hits`.
    fn release(&mut self, removed: usize) {
        if removed == 0 {
            return;
        }
        self.released += removed as u64;
        if let Err(e) = self
            .series
            .set(abi::UPROBE_SERIES_RELEASED, self.released, 0)
        {
            tracing::warn!(uprobe = %self.config.location(), error = %error_chain(&e), "cannot give the kernel back the room of removed series");
        }
    }

    /// Adds this entry's counters to `builder`: a series per (value, process) and cgroup, and
    /// each cgroup's `other` hits.
    fn add_hits(
        &self,
        builder: &mut MetricsBuilder<'_>,
        host_name: &str,
        hits: &HashMap<UprobeKey, u64>,
        other: &HashMap<u64, u64>,
    ) {
        let metric = &self.config.metric;
        let labels = &metric.labels;
        // Redaction can make two captured values one.
        let mut series: BTreeMap<(u64, u32, String), u64> = BTreeMap::new();
        for (key, count) in hits {
            let value = if self.config.capture.is_some() {
                self.value_text(key)
            } else {
                String::new()
            };
            *series.entry((key.cgroup_id, key.pid, value)).or_default() += count;
        }
        let mut points: Vec<(u64, Vec<KeyValue>, u64)> = Vec::new();
        for ((cgroup, pid, value), count) in series {
            let mut attributes = Vec::new();
            if self.config.capture.is_some() {
                attributes.push(string_attr(&labels.value, value));
            }
            attributes.push(int_attr(&labels.pid, pid as i64));
            points.push((cgroup, attributes, count));
        }
        let other: BTreeMap<u64, u64> = other.iter().map(|(k, v)| (*k, *v)).collect();
        for (cgroup, count) in other {
            points.push((cgroup, vec![string_attr(&labels.value, "other")], count));
        }
        for (cgroup, mut attributes, count) in points {
            if !labels.node.is_empty() {
                attributes.push(string_attr(&labels.node, host_name));
            }
            builder.count_named(
                Owner::Cgroup(cgroup),
                &metric.name,
                &metric.description,
                "{call}",
                attributes,
                count,
            );
        }
    }
}
