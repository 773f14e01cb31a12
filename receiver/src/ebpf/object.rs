//! One probe's eBPF object, loaded: load-time settings (`const volatile` globals), its programs
//! attached, and typed handles to its maps. Each map is taken by name once, at load, into the
//! handle type the probe reads it with; a map that is missing, or whose type, key or value size
//! differs from what the probe expects, is a load error naming the map (never an empty read).
//!
//! Every object includes `podscope.h`, so every object has the `cgroup_filter` maps and the
//! `map_full` counters of failed inserts; this module takes them for the receiver. It also sets
//! map sizes from config (`max_entries`) and reads what each map costs the kernel, the way
//! bpftool does (`memlock:` in the map fd's fdinfo). It must not know any particular probe.

use std::collections::{BTreeMap, HashMap as StdHashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::{BtfTracePoint, Program, TracePoint};
use aya::{Btf, Ebpf, EbpfLoader, Pod};

use super::kernel_memory::Typical;

/// Where a program attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// BTF-typed tracepoint: typed arguments and direct loads from kernel structs (no helper
    /// call per field), needs kernel BTF. Every probe uses it: measured cheaper than raw_tp with
    /// helper calls on the hottest path (see BENCHMARKS.md).
    TpBtf(&'static str),
    /// Classic tracepoint (`category:name`), e.g. one syscall's `syscalls:sys_enter_write`:
    /// unlike the raw `sys_enter`, other syscalls run no program. Needs tracefs
    /// ([`super::tracefs::available`] mounts it when missing).
    TracePoint(&'static str, &'static str),
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hook::TpBtf(tp) => write!(f, "tp_btf/{tp}"),
            Hook::TracePoint(category, name) => write!(f, "tracepoint/{category}/{name}"),
        }
    }
}

/// A program of a probe: its C function name and hook.
#[derive(Debug, Clone, Copy)]
pub struct ProgramSpec {
    pub function: &'static str,
    pub hook: Hook,
    /// A program for the same hook to attach instead when this one cannot load (a kernel whose
    /// tracepoint lacks an argument it reads).
    pub fallback: Option<&'static str>,
}

pub const fn tp_btf(function: &'static str, tp: &'static str) -> ProgramSpec {
    ProgramSpec {
        function,
        hook: Hook::TpBtf(tp),
        fallback: None,
    }
}

impl ProgramSpec {
    /// The same program, with `function` attached instead when it cannot load.
    pub const fn or(self, function: &'static str) -> ProgramSpec {
        ProgramSpec {
            fallback: Some(function),
            ..self
        }
    }
}

pub const fn tracepoint(
    function: &'static str,
    category: &'static str,
    name: &'static str,
) -> ProgramSpec {
    ProgramSpec {
        function,
        hook: Hook::TracePoint(category, name),
        fallback: None,
    }
}

/// A probe's object, the programs the loader attaches (others, such as uprobes and iterators,
/// the probe attaches itself) and its maps.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSpec {
    pub name: &'static str,
    pub object: &'static [u8],
    pub programs: &'static [ProgramSpec],
    /// Every map of the object but those of `podscope.h` and the globals' sections.
    pub maps: &'static [MapDef],
}

/// A map of a probe's object, named once: the probe takes its handle through this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapDef {
    pub name: &'static str,
    /// What its `max_entries` setting means, if it has one.
    pub size: MapSize,
    /// Its slot in the object's `map_full` array (the `*_map_slot` enums of `podscope.h`), when
    /// the probe counts its failed inserts.
    pub full_slot: Option<u32>,
    /// How many entries it holds on a node (for the kernel memory figures of
    /// [`super::kernel_memory`]).
    pub typical: Typical,
}

/// What `max_entries` sets for a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapSize {
    /// Not settable (scratch space, fixed-size arrays).
    Fixed,
    /// Entries (hash maps, and arrays the programs use as hash tables of slots).
    Entries,
    /// Bytes (ring buffers: a power of two, at least a page).
    RingBytes,
}

impl MapDef {
    /// A hash map, sized by `max_entries`.
    pub const fn entries(name: &'static str) -> MapDef {
        MapDef {
            name,
            size: MapSize::Entries,
            full_slot: None,
            typical: Typical::PerCgroup(1),
        }
    }

    /// A map whose size is fixed.
    pub const fn fixed(name: &'static str) -> MapDef {
        MapDef {
            name,
            size: MapSize::Fixed,
            full_slot: None,
            typical: Typical::Full,
        }
    }

    /// A ring buffer, sized in bytes by `max_entries`.
    pub const fn ring(name: &'static str) -> MapDef {
        MapDef {
            name,
            size: MapSize::RingBytes,
            full_slot: None,
            typical: Typical::Full,
        }
    }

    /// The same map, holding `typical` entries on a node (a hash map holds one per cgroup unless
    /// said otherwise).
    pub const fn typically(self, typical: Typical) -> MapDef {
        MapDef { typical, ..self }
    }

    /// The same map, its failed inserts counted at `slot`.
    pub const fn counted(self, slot: u32) -> MapDef {
        MapDef {
            full_slot: Some(slot),
            ..self
        }
    }
}

/// Smallest ring buffer: one page (x86_64).
pub const RING_MIN_BYTES: u32 = 4096;

/// Why a probe could not run: which probe, which hook, what is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeError {
    pub probe: &'static str,
    pub hook: Option<Hook>,
    pub reason: String,
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.hook {
            Some(hook) => write!(
                f,
                "probe {}: cannot attach {hook}: {}",
                self.probe, self.reason
            ),
            None => write!(f, "probe {}: cannot load: {}", self.probe, self.reason),
        }
    }
}

/// What the kernel offers, detected once at start.
pub struct KernelFeatures {
    pub btf: Result<Btf, String>,
}

impl KernelFeatures {
    pub fn detect(btf_path: &Path) -> KernelFeatures {
        let btf = Btf::parse_file(btf_path, aya::Endianness::default()).map_err(|e| {
            format!(
                "kernel BTF is not available at {} ({e}); CO-RE programs need it (set btf_path)",
                btf_path.display()
            )
        });
        KernelFeatures { btf }
    }
}

/// A load-time setting (`const volatile` global in the C program).
#[derive(Debug, Clone)]
pub enum Global {
    U32(&'static str, u32),
    U64(&'static str, u64),
    /// An array (a table indexed by syscall number).
    U16s(&'static str, Vec<u16>),
    U8s(&'static str, Vec<u8>),
}

/// What one object is loaded with.
#[derive(Default)]
pub struct ObjectSettings<'a> {
    /// Globals of this object; the receiver adds those every object has (`agent_tgid`,
    /// `filter_mode`).
    pub globals: Vec<Global>,
    /// Programs of the spec not to attach (a mode that does not need them).
    pub skip: &'a [&'static str],
}

/// The maps every object has (from `podscope.h`): the cgroup ids the filter lists, and the
/// failed inserts per map slot.
const CGROUP_FILTER: MapDef = MapDef::fixed("cgroup_filter");
const CGROUP_FILTER_ROOTS: MapDef = MapDef::fixed("cgroup_filter_roots");
/// Lists new cgroups under `cgroup_filter_roots` as they are created (with an include filter).
const CGROUP_ADMIT: &str = "podscope_cgroup_admit";
const MAP_FULL: MapDef = MapDef::fixed("map_full");

/// What a map of a loaded object costs the kernel now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapMemory {
    pub probe: &'static str,
    pub map: String,
    /// The kernel's id of the map (`bpftool map show id N`).
    pub id: u32,
    /// `memlock:` of its fdinfo, what bpftool shows as `bytes_memlock`.
    pub bytes: u64,
}

/// A loaded object with its programs attached and its maps being taken by the probe.
pub struct ProbeObject {
    probe: &'static str,
    ebpf: Ebpf,
    cgroup_filter: HashMap<MapData, u64, u8>,
    cgroup_filter_roots: HashMap<MapData, u64, u8>,
    map_full: PerCpuCounters,
    /// Counted maps: slot, name and the failed inserts already reported.
    counted: Vec<(u32, &'static str, u64)>,
    /// Every map of the object, with a descriptor of its own (the handles move into the probe).
    maps: Vec<(String, OwnedFd)>,
}

impl ProbeObject {
    /// Loads `spec`'s object with `globals` and the map sizes `max_entries` (map name →
    /// `max_entries`, checked against the spec's maps by config validation), then loads and
    /// attaches every program not in `settings.skip`.
    pub fn load(
        spec: &ProbeSpec,
        features: &KernelFeatures,
        globals: &[Global],
        max_entries: &BTreeMap<String, u32>,
        settings: &ObjectSettings<'_>,
    ) -> Result<ProbeObject, ProbeError> {
        let btf = features.btf.as_ref().map_err(|reason| ProbeError {
            probe: spec.name,
            hook: spec.programs.first().map(|p| p.hook),
            reason: reason.clone(),
        })?;
        let mut loader = EbpfLoader::new();
        // Task storage (per-thread state) has no aya wrapper; only the kernel side uses it.
        loader.btf(Some(btf)).allow_unsupported_maps();
        // The filter's maps hold nothing without a filter, and its roots only with an include
        // one (podscope.h): one entry then instead of their compiled size.
        let filter_mode = globals
            .iter()
            .find_map(|g| match g {
                Global::U32("filter_mode", mode) => Some(*mode),
                _ => None,
            })
            .unwrap_or(0);
        if filter_mode == 0 {
            loader.map_max_entries(CGROUP_FILTER.name, 1);
        }
        if filter_mode != 1 {
            loader.map_max_entries(CGROUP_FILTER_ROOTS.name, 1);
        }
        for (map, entries) in max_entries {
            loader.map_max_entries(map, *entries);
        }
        for global in globals.iter().chain(&settings.globals) {
            // The receiver's settings may be unused by an object: absent ones are not an error.
            match global {
                Global::U32(name, value) => loader.override_global(name, value, false),
                Global::U64(name, value) => loader.override_global(name, value, false),
                Global::U16s(name, values) => {
                    loader.override_global(name, values.as_slice(), false)
                }
                Global::U8s(name, values) => loader.override_global(name, values.as_slice(), false),
            };
        }
        let mut ebpf = loader.load(spec.object).map_err(|e| ProbeError {
            probe: spec.name,
            hook: None,
            reason: error_chain(&e),
        })?;
        for program in spec
            .programs
            .iter()
            .filter(|p| !settings.skip.contains(&p.function))
        {
            let attached = attach(&mut ebpf, program.function, program.hook, btf);
            let attached = match (attached, program.fallback) {
                (Err(reason), Some(fallback)) => {
                    tracing::info!(probe = spec.name, program = program.function, %reason, fallback, "this kernel refuses a program; its fallback attaches instead");
                    attach(&mut ebpf, fallback, program.hook, btf)
                }
                (attached, _) => attached,
            };
            attached.map_err(|reason| ProbeError {
                probe: spec.name,
                hook: Some(program.hook),
                reason,
            })?;
        }
        // An include filter lists new cgroups as they are created (see podscope.h).
        if filter_mode == 1 {
            attach(&mut ebpf, CGROUP_ADMIT, Hook::TpBtf("cgroup_mkdir"), btf).map_err(
                |reason| ProbeError {
                    probe: spec.name,
                    hook: Some(Hook::TpBtf("cgroup_mkdir")),
                    reason,
                },
            )?;
        }
        let mut maps = Vec::new();
        for (name, map) in ebpf.maps() {
            if let Some(fd) = map_fd(map) {
                let fd = fd.try_clone_to_owned().map_err(|e| ProbeError {
                    probe: spec.name,
                    hook: None,
                    reason: format!("map {name}: cannot keep a descriptor: {e}"),
                })?;
                maps.push((name.to_string(), fd));
            }
        }
        if let Some(missing) = spec
            .maps
            .iter()
            .find(|def| !maps.iter().any(|(name, _)| name == def.name))
        {
            return Err(ProbeError {
                probe: spec.name,
                hook: None,
                reason: format!("map {}: missing from the object", missing.name),
            });
        }
        let cgroup_filter = take(spec.name, &mut ebpf, &CGROUP_FILTER, "hash map")?;
        let cgroup_filter_roots = take(spec.name, &mut ebpf, &CGROUP_FILTER_ROOTS, "hash map")?;
        let map_full = PerCpuCounters(take(spec.name, &mut ebpf, &MAP_FULL, "per-CPU array")?);
        Ok(ProbeObject {
            probe: spec.name,
            ebpf,
            cgroup_filter,
            cgroup_filter_roots,
            map_full,
            counted: spec
                .maps
                .iter()
                .filter_map(|def| Some((def.full_slot?, def.name, 0)))
                .chain([(
                    podscope_ebpf::abi::PODSCOPE_MAP_SLOT_CGROUP_FILTER,
                    CGROUP_FILTER.name,
                    0,
                )])
                .collect(),
            maps,
        })
    }

    /// A hash (or LRU hash) map.
    pub fn hash<K: Pod + Eq + Hash, V: Pod>(
        &mut self,
        def: &MapDef,
    ) -> Result<HashTable<K, V>, ProbeError> {
        Ok(HashTable(take(
            self.probe,
            &mut self.ebpf,
            def,
            "hash map",
        )?))
    }

    /// A hash map the agent writes (entries it inserts and removes itself).
    pub fn hash_map<K: Pod, V: Pod>(
        &mut self,
        def: &MapDef,
    ) -> Result<HashMap<MapData, K, V>, ProbeError> {
        take(self.probe, &mut self.ebpf, def, "hash map")
    }

    /// A per-CPU hash map; each key's per-CPU values are summed with `merge` when read.
    pub fn per_cpu_hash<K: Pod + Eq + Hash, V: Pod>(
        &mut self,
        def: &MapDef,
        merge: fn(&mut V, &V),
    ) -> Result<PerCpuHashTable<K, V>, ProbeError> {
        Ok(PerCpuHashTable {
            map: take(self.probe, &mut self.ebpf, def, "per-CPU hash map")?,
            merge,
        })
    }

    /// An array (settings the probe writes at run time).
    pub fn array<V: Pod>(&mut self, def: &MapDef) -> Result<Array<MapData, V>, ProbeError> {
        take(self.probe, &mut self.ebpf, def, "array")
    }

    /// A per-CPU array of counters, read as the sum over CPUs.
    pub fn per_cpu_counters(&mut self, def: &MapDef) -> Result<PerCpuCounters, ProbeError> {
        Ok(PerCpuCounters(take(
            self.probe,
            &mut self.ebpf,
            def,
            "per-CPU array",
        )?))
    }

    pub fn ring_buf(&mut self, def: &MapDef) -> Result<RingBuf<MapData>, ProbeError> {
        take(self.probe, &mut self.ebpf, def, "ring buffer")
    }

    /// Attaches program `function` (of type `tracepoint`, loaded on first use) to the classic
    /// tracepoint `category:name`: tracefs must be there ([`super::tracefs::available`]).
    pub fn attach_tracepoint(
        &mut self,
        function: &str,
        category: &str,
        name: &str,
    ) -> Result<(), String> {
        let program: &mut TracePoint = self
            .program_mut(function)?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| error_chain(&e))?;
        if program.fd().is_err() {
            program.load().map_err(|e| error_chain(&e))?;
        }
        program
            .attach(category, name)
            .map(drop)
            .map_err(|e| format!("{category}:{name}: {}", error_chain(&e)))
    }

    /// A program the probe loads and attaches itself (uprobes, iterators).
    pub fn program_mut(&mut self, function: &str) -> Result<&mut Program, String> {
        self.ebpf
            .program_mut(function)
            .ok_or_else(|| format!("program {function} missing from the object"))
    }

    /// The kernel's `cgroup_filter` map of this object.
    pub fn cgroup_filter_mut(&mut self) -> &mut HashMap<MapData, u64, u8> {
        &mut self.cgroup_filter
    }

    /// The kernel's `cgroup_filter_roots` map of this object: cgroups whose new descendants it
    /// lists in `cgroup_filter` as they are created.
    pub fn cgroup_filter_roots_mut(&mut self) -> &mut HashMap<MapData, u64, u8> {
        &mut self.cgroup_filter_roots
    }

    /// What each map of the object costs the kernel now (maps without preallocation change with
    /// their entries). A map whose fdinfo cannot be read is left out.
    pub fn map_memory(&self) -> Vec<MapMemory> {
        self.maps
            .iter()
            .filter_map(|(name, fd)| {
                let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
                    .ok()?;
                let field = |key: &str| -> Option<u64> {
                    info.lines()
                        .find_map(|l| l.strip_prefix(key))
                        .and_then(|v| v.trim().parse().ok())
                };
                Some(MapMemory {
                    probe: self.probe,
                    map: name.clone(),
                    id: field("map_id:")? as u32,
                    bytes: field("memlock:")?,
                })
            })
            .collect()
    }

    pub fn probe(&self) -> &'static str {
        self.probe
    }

    /// Failed inserts of each counted map since the last call (the kernel's counts only grow).
    pub fn failed_inserts(&mut self) -> Vec<(&'static str, u64)> {
        self.counted
            .iter_mut()
            .map(|(slot, name, reported)| {
                let total = self.map_full.get(*slot);
                let new = total.saturating_sub(*reported);
                *reported = total.max(*reported);
                (*name, new)
            })
            .collect()
    }
}

/// A map's descriptor, for the kinds podscope's objects have.
fn map_fd(map: &Map) -> Option<std::os::fd::BorrowedFd<'_>> {
    match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::PerCpuHashMap(m)
        | Map::PerCpuLruHashMap(m)
        | Map::RingBuf(m)
        | Map::Unsupported(m) => Some(m.fd().as_fd()),
        _ => None,
    }
}

/// Takes map `def` out of `ebpf` as a `T` (a `handle`, for messages).
fn take<T>(
    probe: &'static str,
    ebpf: &mut Ebpf,
    def: &MapDef,
    handle: &str,
) -> Result<T, ProbeError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let error = |reason: String| ProbeError {
        probe,
        hook: None,
        reason: format!("map {}: {reason}", def.name),
    };
    let map = ebpf
        .take_map(def.name)
        .ok_or_else(|| error("missing from the object".to_string()))?;
    T::try_from(map).map_err(|e| {
        error(format!(
            "not a {handle} of the probe's key and value types ({})",
            error_chain(&e)
        ))
    })
}

fn attach(ebpf: &mut Ebpf, function: &str, hook: Hook, btf: &Btf) -> Result<(), String> {
    let prog = ebpf
        .program_mut(function)
        .ok_or_else(|| format!("program {function} missing from the object"))?;
    let describe = |e: &dyn std::error::Error| error_chain(e);
    match hook {
        Hook::TpBtf(tp) => {
            let p: &mut BtfTracePoint = prog.try_into().map_err(|e| describe(&e))?;
            p.load(tp, btf).map_err(|e| describe(&e))?;
            p.attach().map_err(|e| describe(&e))?;
        }
        Hook::TracePoint(category, name) => {
            let p: &mut TracePoint = prog.try_into().map_err(|e| describe(&e))?;
            p.load().map_err(|e| describe(&e))?;
            p.attach(category, name).map_err(|e| describe(&e))?;
        }
    }
    Ok(())
}

/// An error and its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A hash map of the kernel, read whole at each collection.
pub struct HashTable<K: Pod, V: Pod>(HashMap<MapData, K, V>);

impl<K: Pod + Eq + Hash, V: Pod> HashTable<K, V> {
    /// Every entry (entries deleted while iterating are skipped).
    pub fn entries(&self) -> StdHashMap<K, V> {
        self.0.iter().filter_map(Result::ok).collect()
    }

    /// Every key (entries deleted while iterating are skipped).
    pub fn keys(&self) -> Vec<K> {
        self.0.keys().filter_map(Result::ok).collect()
    }

    /// Removes `keys` (entries of cgroups that no longer exist, or a per-interval map cleared).
    pub fn remove(&mut self, keys: impl IntoIterator<Item = K>) {
        for key in keys {
            let _ = self.0.remove(&key);
        }
    }

    /// Removes every entry whose key belongs to a cgroup in `gone`; returns how many.
    pub fn forget(&mut self, gone: &HashSet<u64>, cgroup: impl Fn(&K) -> u64) -> usize {
        let keys: Vec<K> = self
            .keys()
            .into_iter()
            .filter(|k| gone.contains(&cgroup(k)))
            .collect();
        let removed = keys.len();
        self.remove(keys);
        removed
    }
}

/// A per-CPU hash map of the kernel; a key's values are summed over CPUs when read.
pub struct PerCpuHashTable<K: Pod, V: Pod> {
    map: PerCpuHashMap<MapData, K, V>,
    merge: fn(&mut V, &V),
}

impl<K: Pod + Eq + Hash, V: Pod> PerCpuHashTable<K, V> {
    /// Every entry, its per-CPU values merged.
    pub fn entries(&self) -> StdHashMap<K, V> {
        self.map
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, values)| {
                let mut iter = values.iter();
                let mut total = *iter.next()?;
                for v in iter {
                    (self.merge)(&mut total, v);
                }
                Some((key, total))
            })
            .collect()
    }

    /// Removes every entry whose key belongs to a cgroup in `gone`.
    pub fn forget(&mut self, gone: &HashSet<u64>, cgroup: impl Fn(&K) -> u64) {
        let keys: Vec<K> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| gone.contains(&cgroup(k)))
            .collect();
        for key in keys {
            let _ = self.map.remove(&key);
        }
    }
}

/// A per-CPU array of `u64` counters.
pub struct PerCpuCounters(PerCpuArray<MapData, u64>);

impl PerCpuCounters {
    /// Counter `index`, summed over CPUs (0 if unreadable).
    pub fn get(&self, index: u32) -> u64 {
        self.0
            .get(&index, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }
}
