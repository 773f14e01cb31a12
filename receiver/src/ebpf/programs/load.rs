//! Loading one user program: the object checked (size, SHA-256, sections, allowed program
//! types, metrics against its maps and BTF) before anything reaches the kernel, then its maps
//! created (their kernel memory held to the limit), its `const volatile` globals set, and each
//! program loaded through the verifier and attached by its section name. Any failure is an
//! error naming the program and what is wrong (a verifier rejection with the end of the
//! verifier's log); nothing half-loaded stays behind, since dropping the object detaches it.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::PathBuf;

use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use aya::programs::uprobe::UProbeScope;
use aya::programs::{
    BtfTracePoint, Iter, PerfEvent, Program, ProgramError, RawTracePoint, TracePoint, UProbe,
};
use aya::{Ebpf, EbpfLoader};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use serde::Deserialize;

use super::btf::Btf;
use super::maps::{self, RawMap};
use super::metrics::{self, CompiledMetric, MapLayout};
use super::spec::ProgramSpec;
use crate::ebpf::object::error_chain;

/// The map a program declares for its pod selection (see `docs/programs.md`): cgroup id (u64)
/// → u8, kept by the agent to the cgroups of the pods the spec selects.
pub const POD_FILTER_MAP: &str = "podscope_pods";

/// How a program attaches, from its section name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachKind {
    Tracepoint {
        category: String,
        name: String,
    },
    RawTracepoint(String),
    TpBtf(String),
    /// `uprobe/…` or `uretprobe/…`; the text after the slash, if any, is `BINARY:SYMBOL`.
    Uprobe {
        ret: bool,
        target: Option<String>,
    },
    PerfEvent,
    Iter(String),
}

impl AttachKind {
    /// The program type as `limits.allowed_types` names it.
    pub fn type_name(&self) -> &'static str {
        match self {
            AttachKind::Tracepoint { .. } => "tracepoint",
            AttachKind::RawTracepoint(_) => "raw_tp",
            AttachKind::TpBtf(_) => "tp_btf",
            AttachKind::Uprobe { ret: false, .. } => "uprobe",
            AttachKind::Uprobe { ret: true, .. } => "uretprobe",
            AttachKind::PerfEvent => "perf_event",
            AttachKind::Iter(_) => "iter",
        }
    }

    /// The section's kind, or why it is not one podscope attaches.
    pub fn from_section(section: &str) -> Result<AttachKind, String> {
        let (kind, rest) = section.split_once('/').unwrap_or((section, ""));
        let named = |what: &str| {
            if rest.is_empty() {
                Err(format!("section {section:?} names no {what}"))
            } else {
                Ok(rest.to_string())
            }
        };
        Ok(match kind {
            "tracepoint" | "tp" => {
                let (category, name) = rest
                    .split_once('/')
                    .filter(|(c, n)| !c.is_empty() && !n.is_empty())
                    .ok_or_else(|| format!("section {section:?}: expected tracepoint/<category>/<name>"))?;
                AttachKind::Tracepoint { category: category.to_string(), name: name.to_string() }
            }
            "raw_tp" | "raw_tracepoint" => AttachKind::RawTracepoint(named("tracepoint")?),
            "tp_btf" => AttachKind::TpBtf(named("tracepoint")?),
            "uprobe" | "uretprobe" => AttachKind::Uprobe {
                ret: kind == "uretprobe",
                target: (!rest.is_empty()).then(|| rest.to_string()),
            },
            "perf_event" => AttachKind::PerfEvent,
            "iter" => AttachKind::Iter(named("iterator")?),
            "kprobe" | "kretprobe" | "fentry" | "fexit" | "xdp" | "socket" | "classifier" | "tc"
            | "cgroup_skb" | "cgroup" | "sockops" | "sk_skb" | "sk_msg" | "lsm" | "raw_tp.w"
            | "sk_lookup" | "flow_dissector" | "struct_ops" | "freplace" => {
                return Err(format!(
                    "section {section:?} is a {kind} program, which podscope does not run for users"
                ))
            }
            _ => {
                return Err(format!(
                    "unknown section {section:?}; podscope attaches tracepoint/<category>/<name>, raw_tp/<name>, tp_btf/<name>, uprobe/ and uretprobe/, perf_event, iter/<target>"
                ))
            }
        })
    }
}

/// `user_programs:` limits (the agent's, not a program's).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Program types users may run. Default: every type podscope attaches.
    pub allowed_types: Vec<String>,
    /// Largest object accepted, in bytes. Default 4 MiB.
    pub max_object_bytes: u64,
    /// Kernel memory all user programs' maps may hold together (`bytes_memlock`, counted in
    /// the receiver's `podscope_ebpf_map_memory_total_bytes`). Default 64 MiB.
    pub max_map_memory_bytes: u64,
}

/// Every program type podscope attaches for users.
pub const PROGRAM_TYPES: &[&str] = &[
    "tracepoint",
    "raw_tp",
    "tp_btf",
    "uprobe",
    "uretprobe",
    "perf_event",
    "iter",
];

impl Default for Limits {
    fn default() -> Self {
        Limits {
            allowed_types: PROGRAM_TYPES.iter().map(|t| t.to_string()).collect(),
            max_object_bytes: 4 << 20,
            max_map_memory_bytes: 64 << 20,
        }
    }
}

/// One program (C function) of an object.
#[derive(Debug, Clone)]
pub struct ProgramInfo {
    pub function: String,
    pub section: String,
    pub kind: Result<AttachKind, String>,
}

/// What an object holds, read without the kernel.
pub struct ObjectInfo {
    pub programs: Vec<ProgramInfo>,
    pub maps: Vec<MapLayout>,
    pub btf: Option<Btf>,
    /// `const volatile` globals: name → size.
    pub globals: HashMap<String, usize>,
}

/// The largest `.bss` section an object may declare: the kernel's largest map value (an array
/// map's value is one kmalloc, at most 4 MiB with 4 KiB pages).
const MAX_UNINITIALIZED_SECTION: u64 = 4 << 20;

/// Reads an object's programs, maps and BTF.
pub fn inspect(bytes: &[u8]) -> Result<ObjectInfo, String> {
    let file = object::File::parse(bytes).map_err(|e| format!("not an ELF object: {e}"))?;
    if file.architecture() != object::Architecture::Bpf {
        return Err(format!(
            "an ELF object for {:?}, not for BPF (compile with clang -target bpf)",
            file.architecture()
        ));
    }
    let mut programs = Vec::new();
    for symbol in file.symbols() {
        if symbol.kind() != object::SymbolKind::Text || !symbol.is_global() {
            continue;
        }
        let Some(section) = symbol
            .section_index()
            .and_then(|i| file.section_by_index(i).ok())
        else {
            continue;
        };
        let section = section.name().unwrap_or_default().to_string();
        if section == ".text" {
            continue; // functions called by programs
        }
        programs.push(ProgramInfo {
            function: symbol.name().unwrap_or_default().to_string(),
            kind: AttachKind::from_section(&section),
            section,
        });
    }
    programs.sort_by(|a, b| a.function.cmp(&b.function));
    if programs.is_empty() {
        return Err("the object has no programs (functions in SEC(\"…\") sections)".to_string());
    }
    // aya refuses sections it does not know with a message less direct than ours.
    if let Some(p) = programs.iter().find(|p| p.kind.is_err()) {
        return Err(format!(
            "program {}: {}",
            p.function,
            p.kind.clone().unwrap_err()
        ));
    }
    // aya-obj 0.3 allocates a zeroed buffer of a `.bss` section's declared size: a size no
    // kernel would take as a map value would abort the agent (an allocation failure is not a
    // panic, so the catch below cannot help). Found by fuzzing.
    if let Some(section) = file.sections().find(|s| {
        s.kind() == object::SectionKind::UninitializedData && s.size() > MAX_UNINITIALIZED_SECTION
    }) {
        return Err(format!(
            "section {}: {} bytes of uninitialized data, more than a map value can hold ({} bytes)",
            section.name().unwrap_or("?"),
            section.size(),
            MAX_UNINITIALIZED_SECTION
        ));
    }
    let btf = match file.section_by_name(".BTF") {
        Some(section) => Some(
            Btf::parse(section.data().map_err(|e| format!(".BTF: {e}"))?)
                .map_err(|e| format!(".BTF: {e}"))?,
        ),
        None => None,
    };
    // aya-obj 0.3 panics on some malformed BTF (an out-of-range slice, found by fuzzing): a
    // user's object is untrusted input, so that is its error, not the agent's crash.
    let parsed = std::panic::catch_unwind(|| aya_obj::Object::parse(bytes))
        .map_err(|_| {
            "cannot read the object: malformed (its BTF or ELF made the object parser fail)"
                .to_string()
        })?
        .map_err(|e| format!("cannot read the object: {}", error_chain(&e)))?;
    let mut maps: Vec<MapLayout> = parsed
        .maps
        .iter()
        .filter(|(name, _)| !name.starts_with('.'))
        .map(|(name, map)| {
            let (key_type, value_type) = match map {
                aya_obj::Map::Btf(m) => (
                    Some(m.def.btf_key_type_id).filter(|&t| t != 0),
                    Some(m.def.btf_value_type_id).filter(|&t| t != 0),
                ),
                aya_obj::Map::Legacy(_) => (None, None),
            };
            MapLayout {
                name: name.clone(),
                map_type: map.map_type(),
                key_size: map.key_size() as usize,
                value_size: map.value_size() as usize,
                max_entries: map.max_entries(),
                key_type,
                value_type,
            }
        })
        .collect();
    maps.sort_by(|a, b| a.name.cmp(&b.name));
    let globals = btf.as_ref().map(Btf::rodata_globals).unwrap_or_default();
    Ok(ObjectInfo {
        programs,
        maps,
        btf,
        globals,
    })
}

/// What loading needs beside the spec.
pub struct LoadSettings<'a> {
    pub kernel_btf: &'a aya::Btf,
    pub limits: &'a Limits,
    /// Map memory the other user programs hold now.
    pub map_memory_in_use: u64,
}

/// A user program loaded and attached; dropping it detaches it and frees its maps.
pub struct LoadedProgram {
    pub name: String,
    ebpf: Ebpf,
    /// The maps metrics read, by name.
    maps: Vec<RawMap>,
    pub pods: Option<RawMap>,
    pub metrics: Vec<CompiledMetric>,
    /// Iterator programs, run at each collection.
    iters: Vec<String>,
    /// `section (function)` of every attached program.
    pub attached: Vec<String>,
    /// When its maps began counting (the start time of its series).
    pub loaded_ns: u64,
}

/// Reads a local object file (the spec's `object.file`).
pub fn read_file(path: &PathBuf, limits: &Limits) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(limits.max_object_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(bytes)
}

/// The lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The last lines of a verifier log (where it says why), at most about 1 KiB.
pub fn trim_verifier_log(log: &str) -> String {
    const KEEP: usize = 1024;
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut kept: Vec<&str> = Vec::new();
    let mut size = 0;
    for line in lines.iter().rev() {
        // Statistics lines come after the reason; they say nothing to the author.
        if kept.is_empty()
            && (line.starts_with("processed ") || line.starts_with("verification time"))
        {
            continue;
        }
        if size + line.len() > KEEP && !kept.is_empty() {
            break;
        }
        size += line.len() + 1;
        kept.push(line);
    }
    kept.reverse();
    kept.join("\n")
}

/// Checks the object against the spec and the limits without loading anything.
pub fn check(
    bytes: &[u8],
    spec: &ProgramSpec,
    limits: &Limits,
) -> Result<(ObjectInfo, Vec<CompiledMetric>), String> {
    if bytes.len() as u64 > limits.max_object_bytes {
        return Err(format!(
            "the object is {} bytes, over the limit of {} (user_programs.limits.max_object_bytes)",
            bytes.len(),
            limits.max_object_bytes
        ));
    }
    if let Some(want) = &spec.sha256 {
        let got = sha256_hex(bytes);
        if !got.eq_ignore_ascii_case(want) {
            return Err(format!(
                "the object's SHA-256 is {got}, the spec says {want}"
            ));
        }
    }
    let info = inspect(bytes)?;
    for p in &info.programs {
        if let Ok(kind) = &p.kind {
            if !limits.allowed_types.iter().any(|t| t == kind.type_name()) {
                return Err(format!(
                    "program {} ({}): {} programs are not allowed here (user_programs.limits.allowed_types: {})",
                    p.function,
                    p.section,
                    kind.type_name(),
                    limits.allowed_types.join(", ")
                ));
            }
        }
    }
    for name in spec.globals.keys() {
        if !info.globals.contains_key(name) {
            let mut known: Vec<&str> = info.globals.keys().map(String::as_str).collect();
            known.sort();
            return Err(format!(
                "global {name}: not a const volatile global of the object (it has: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        }
    }
    for a in &spec.attach {
        if !info.programs.iter().any(|p| p.function == a.program) {
            return Err(format!("attach: no program {} in the object", a.program));
        }
    }
    let metrics = metrics::compile(&spec.metrics, &info.maps, info.btf.as_ref())?;
    Ok((info, metrics))
}

/// Loads and attaches `bytes` as program `name`.
pub fn load(
    name: &str,
    spec: &ProgramSpec,
    bytes: &[u8],
    settings: &LoadSettings<'_>,
) -> Result<LoadedProgram, String> {
    let (info, metrics) = check(bytes, spec, settings.limits)?;
    let globals: Vec<(String, Vec<u8>)> = spec
        .globals
        .iter()
        .map(|(g, value)| {
            let size = info.globals.get(g).copied().unwrap_or(0);
            value
                .bytes(size)
                .map(|b| (g.clone(), b))
                .map_err(|e| format!("global {g}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let mut loader = EbpfLoader::new();
    loader
        .btf(Some(settings.kernel_btf))
        .allow_unsupported_maps();
    for (g, value) in &globals {
        loader.override_global(g, value.as_slice(), true);
    }
    let mut ebpf = loader.load(bytes).map_err(|e| {
        format!(
            "cannot create its maps or read its programs: {}",
            error_chain(&e)
        )
    })?;

    let memory: u64 = ebpf
        .maps()
        .filter_map(|(_, m)| maps::kernel_identity(m))
        .map(|(_, bytes)| bytes)
        .sum();
    let available = settings
        .limits
        .max_map_memory_bytes
        .saturating_sub(settings.map_memory_in_use);
    if memory > available {
        return Err(format!(
            "its maps take {memory} bytes of kernel memory; user programs may hold {} bytes together (user_programs.limits.max_map_memory_bytes) and others hold {} already",
            settings.limits.max_map_memory_bytes, settings.map_memory_in_use
        ));
    }

    let mut attached = Vec::new();
    let mut iters = Vec::new();
    for p in &info.programs {
        let Ok(kind) = &p.kind else { continue };
        attach(&mut ebpf, p, kind, spec, settings.kernel_btf)
            .map_err(|e| format!("program {} ({}): {e}", p.function, p.section))?;
        if matches!(kind, AttachKind::Iter(_)) {
            iters.push(p.function.clone());
        }
        attached.push(format!("{} ({})", p.section, p.function));
    }

    let mut wanted: Vec<&str> = metrics.iter().map(|m| m.map.as_str()).collect();
    wanted.sort();
    wanted.dedup();
    let mut raw = Vec::new();
    for map_name in wanted {
        let layout = info
            .maps
            .iter()
            .find(|m| m.name == map_name)
            .ok_or_else(|| format!("map {map_name}: missing"))?;
        let map = ebpf
            .take_map(map_name)
            .ok_or_else(|| format!("map {map_name}: missing after load"))?;
        raw.push(RawMap::new(
            map_name,
            map,
            layout.map_type,
            layout.key_size,
            layout.value_size,
        )?);
    }
    let pods = match info.maps.iter().find(|m| m.name == POD_FILTER_MAP) {
        Some(layout) => {
            if layout.map_type != maps::HASH || layout.key_size != 8 || layout.value_size != 1 {
                return Err(format!("map {POD_FILTER_MAP}: the pod filter map is a hash map of __u64 cgroup id → __u8"));
            }
            let map = ebpf
                .take_map(POD_FILTER_MAP)
                .ok_or("pod filter map missing after load")?;
            Some(RawMap::new(POD_FILTER_MAP, map, layout.map_type, 8, 1)?)
        }
        None => None,
    };
    Ok(LoadedProgram {
        name: name.to_string(),
        ebpf,
        maps: raw,
        pods,
        metrics,
        iters,
        attached,
        loaded_ns: crate::ebpf::collector::unix_nanos(),
    })
}

fn verifier(e: ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => format!(
            "the verifier rejected it ({io_error}):\n{}",
            trim_verifier_log(&format!("{verifier_log:?}"))
        ),
        other => error_chain(&other),
    }
}

fn attach(
    ebpf: &mut Ebpf,
    info: &ProgramInfo,
    kind: &AttachKind,
    spec: &ProgramSpec,
    btf: &aya::Btf,
) -> Result<(), String> {
    let program: &mut Program = ebpf
        .program_mut(&info.function)
        .ok_or_else(|| "missing from the object".to_string())?;
    let settings = spec.attach.iter().find(|a| a.program == info.function);
    let describe = |e: &dyn std::error::Error| error_chain(e);
    match kind {
        AttachKind::Tracepoint { category, name } => {
            let p: &mut TracePoint = program.try_into().map_err(|e| describe(&e))?;
            p.load().map_err(verifier)?;
            p.attach(category, name).map_err(|e| describe(&e))?;
        }
        AttachKind::RawTracepoint(name) => {
            let p: &mut RawTracePoint = program.try_into().map_err(|e| describe(&e))?;
            p.load().map_err(verifier)?;
            p.attach(name).map_err(|e| describe(&e))?;
        }
        AttachKind::TpBtf(name) => {
            let p: &mut BtfTracePoint = program.try_into().map_err(|e| describe(&e))?;
            p.load(name, btf).map_err(verifier)?;
            p.attach().map_err(|e| describe(&e))?;
        }
        AttachKind::Uprobe { target, .. } => {
            let from_section = target.as_deref().and_then(|t| t.rsplit_once(':'));
            let binary = settings
                .and_then(|s| s.binary.clone())
                .or_else(|| from_section.map(|(b, _)| PathBuf::from(b)))
                .ok_or("a uprobe needs a binary: set attach[].binary, or name it in the section (uprobe/<binary>:<symbol>)")?;
            let symbol = settings
                .and_then(|s| s.symbol.clone())
                .or_else(|| from_section.map(|(_, s)| s.to_string()))
                .ok_or("a uprobe needs a symbol: set attach[].symbol, or name it in the section (uprobe/<binary>:<symbol>)")?;
            let p: &mut UProbe = program.try_into().map_err(|e| describe(&e))?;
            p.load().map_err(verifier)?;
            p.attach(symbol.as_str(), &binary, UProbeScope::AllProcesses)
                .map_err(|e| format!("{}:{symbol}: {}", binary.display(), describe(&e)))?;
        }
        AttachKind::PerfEvent => {
            let frequency = settings.and_then(|s| s.frequency).unwrap_or(99);
            let p: &mut PerfEvent = program.try_into().map_err(|e| describe(&e))?;
            p.load().map_err(verifier)?;
            let cpus = aya::util::online_cpus().map_err(|(path, e)| format!("{path}: {e}"))?;
            for cpu in cpus {
                p.attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(frequency),
                    true,
                )
                .map_err(|e| format!("CPU {cpu}: {}", describe(&e)))?;
            }
        }
        AttachKind::Iter(target) => {
            let p: &mut Iter = program.try_into().map_err(|e| describe(&e))?;
            p.load(target, btf).map_err(verifier)?;
        }
    }
    Ok(())
}

impl LoadedProgram {
    /// Runs its iterator programs once (they fill maps from kernel state); their output is
    /// read and dropped.
    pub fn run_iterators(&mut self) -> Result<(), String> {
        for function in &self.iters {
            let iter: &mut Iter = self
                .ebpf
                .program_mut(function)
                .ok_or("iterator missing")?
                .try_into()
                .map_err(|e: ProgramError| e.to_string())?;
            let link = iter.attach().map_err(|e| error_chain(&e))?;
            let link = iter.take_link(link).map_err(|e| error_chain(&e))?;
            let mut file = link.into_file().map_err(|e| error_chain(&e))?;
            std::io::copy(&mut file, &mut std::io::sink())
                .map_err(|e| format!("iterator {function}: {e}"))?;
        }
        Ok(())
    }

    /// The maps metrics read.
    pub fn maps(&self) -> &[RawMap] {
        &self.maps
    }

    /// Kernel memory of each of its maps (those still in the object and those taken out).
    pub fn map_memory(&self) -> Vec<(String, u32, u64)> {
        let mut out: Vec<(String, u32, u64)> = self
            .ebpf
            .maps()
            .filter_map(|(name, m)| {
                maps::kernel_identity(m).map(|(id, bytes)| (name.to_string(), id, bytes))
            })
            .collect();
        for map in self.maps.iter().chain(&self.pods) {
            if let Some((id, bytes)) = map.kernel_memory() {
                out.push((map.name.clone(), id, bytes));
            }
        }
        out
    }
}
