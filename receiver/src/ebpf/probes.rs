//! The probe table and the loader: which programs each probe has, on which hooks, and loading
//! them with the load-time settings. Each probe loads and attaches on its own, so one that this
//! kernel refuses does not take the others down.

use std::collections::{HashMap as StdHashMap, HashSet};
use std::fmt;
use std::path::Path;

use aya::maps::HashMap;
use aya::programs::BtfTracePoint;
use aya::{Btf, Ebpf, EbpfLoader};
use podscope_ebpf::objects;

use super::cgroups::{CgroupGlob, CgroupIndex};

/// Where a program attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// BTF-typed tracepoint: typed arguments and direct loads from kernel structs (no helper
    /// call per field), needs kernel BTF. Every probe uses it: measured cheaper than raw_tp with
    /// helper calls on the hottest path (see BENCHMARKS.md).
    TpBtf(&'static str),
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hook::TpBtf(tp) => write!(f, "tp_btf/{tp}"),
        }
    }
}

/// A program of a probe: its C function name and hook.
#[derive(Debug, Clone, Copy)]
pub struct ProgramSpec {
    pub function: &'static str,
    pub hook: Hook,
}

#[derive(Debug, Clone, Copy)]
pub struct ProbeSpec {
    pub name: &'static str,
    pub object: &'static [u8],
    pub programs: &'static [ProgramSpec],
}

const fn tp_btf(function: &'static str, tp: &'static str) -> ProgramSpec {
    ProgramSpec {
        function,
        hook: Hook::TpBtf(tp),
    }
}

pub const PROCESS: ProbeSpec = ProbeSpec {
    name: "process",
    object: objects::PROCESS,
    programs: &[
        tp_btf("podscope_process_exec", "sched_process_exec"),
        tp_btf("podscope_process_fork", "sched_process_fork"),
        tp_btf("podscope_process_exit", "sched_process_exit"),
    ],
};

pub const SYSCALLS: ProbeSpec = ProbeSpec {
    name: "syscalls",
    object: objects::SYSCALLS,
    programs: &[
        tp_btf("podscope_sys_enter", "sys_enter"),
        tp_btf("podscope_sys_exit", "sys_exit"),
        tp_btf("podscope_sys_count", "sys_enter"),
    ],
};

pub const FILES: ProbeSpec = ProbeSpec {
    name: "files",
    object: objects::FILES,
    programs: &[
        tp_btf("podscope_files_enter", "sys_enter"),
        tp_btf("podscope_files_exit", "sys_exit"),
    ],
};

pub const SCHED: ProbeSpec = ProbeSpec {
    name: "sched",
    object: objects::SCHED,
    programs: &[
        tp_btf("podscope_sched_wakeup", "sched_wakeup"),
        tp_btf("podscope_sched_wakeup_new", "sched_wakeup_new"),
        tp_btf("podscope_sched_switch", "sched_switch"),
    ],
};

pub const TCP: ProbeSpec = ProbeSpec {
    name: "tcp",
    object: objects::TCP,
    programs: &[
        tp_btf("podscope_tcp_state", "inet_sock_set_state"),
        tp_btf("podscope_tcp_retransmit", "tcp_retransmit_skb"),
    ],
};

pub const BLOCK_IO: ProbeSpec = ProbeSpec {
    name: "block_io",
    object: objects::BLOCK_IO,
    programs: &[
        tp_btf("podscope_block_issue", "block_rq_issue"),
        tp_btf("podscope_block_complete", "block_rq_complete"),
    ],
};

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
pub enum Global {
    U32(&'static str, u32),
    U64(&'static str, u64),
}

/// Loads `spec`'s object with `globals`, then loads and attaches every program not in `skip`.
pub fn load(
    spec: &ProbeSpec,
    features: &KernelFeatures,
    globals: &[Global],
    skip: &[&str],
) -> Result<Ebpf, ProbeError> {
    let btf = features.btf.as_ref().map_err(|reason| ProbeError {
        probe: spec.name,
        hook: spec.programs.first().map(|p| p.hook),
        reason: reason.clone(),
    })?;
    let mut loader = EbpfLoader::new();
    // Task storage (syscall entry times) has no aya wrapper; only the kernel side uses it.
    loader.btf(Some(btf)).allow_unsupported_maps();
    for global in globals {
        // Settings every probe's object may or may not use: absent ones are not an error.
        match global {
            Global::U32(name, value) => loader.override_global(name, value, false),
            Global::U64(name, value) => loader.override_global(name, value, false),
        };
    }
    let mut ebpf = loader.load(spec.object).map_err(|e| ProbeError {
        probe: spec.name,
        hook: None,
        reason: error_chain(&e),
    })?;
    for program in spec.programs.iter().filter(|p| !skip.contains(&p.function)) {
        attach(&mut ebpf, program, btf).map_err(|reason| ProbeError {
            probe: spec.name,
            hook: Some(program.hook),
            reason,
        })?;
    }
    Ok(ebpf)
}

fn attach(ebpf: &mut Ebpf, program: &ProgramSpec, btf: &Btf) -> Result<(), String> {
    let prog = ebpf
        .program_mut(program.function)
        .ok_or_else(|| format!("program {} missing from the object", program.function))?;
    let describe = |e: &dyn std::error::Error| error_chain(e);
    match program.hook {
        Hook::TpBtf(tp) => {
            let p: &mut BtfTracePoint = prog.try_into().map_err(|e| describe(&e))?;
            p.load(tp, btf).map_err(|e| describe(&e))?;
            p.attach().map_err(|e| describe(&e))?;
        }
    }
    Ok(())
}

/// Loads the tcp probe's iterator over the kernel's TCP sockets (run at each collection).
pub fn load_tcp_iterator(ebpf: &mut Ebpf, features: &KernelFeatures) -> Result<(), String> {
    let btf = features.btf.as_ref().map_err(Clone::clone)?;
    let program: &mut aya::programs::Iter = ebpf
        .program_mut(TCP_OPEN_RTT)
        .ok_or("program missing from the object")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| error_chain(&e))?;
    program.load("tcp", btf).map_err(|e| error_chain(&e))
}

/// The iterator program sampling open connections' RTT.
const TCP_OPEN_RTT: &str = "podscope_tcp_live_rtt";

/// Runs the iterator once: the smoothed RTT of every open connection the probe saw established,
/// per connection key. The map is emptied first, so it holds exactly this run's samples.
pub fn sample_open_tcp_rtt(
    ebpf: &mut Ebpf,
) -> Result<StdHashMap<podscope_ebpf::abi::TcpKey, podscope_ebpf::abi::Hist>, String> {
    use podscope_ebpf::abi::{Hist, TcpKey};
    let stale: Vec<TcpKey> = read_hash::<TcpKey, Hist>(ebpf, "tcp_live_rtt")
        .into_keys()
        .collect();
    remove_keys::<TcpKey, Hist>(ebpf, "tcp_live_rtt", stale);
    let program: &mut aya::programs::Iter = ebpf
        .program_mut(TCP_OPEN_RTT)
        .ok_or("program missing from the object")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| error_chain(&e))?;
    let link = program.attach().map_err(|e| error_chain(&e))?;
    let link = program.take_link(link).map_err(|e| error_chain(&e))?;
    let mut output = link.into_file().map_err(|e| error_chain(&e))?;
    // Reading runs the program over every socket; it writes nothing.
    std::io::copy(&mut output, &mut std::io::sink()).map_err(|e| e.to_string())?;
    Ok(read_hash(ebpf, "tcp_live_rtt"))
}

/// An error and its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Pods the filter includes, resolved through a `k8s_metadata` extension's cache.
#[derive(Clone)]
pub struct PodSelection {
    pub metadata: std::sync::Arc<podscope_k8s::K8sMetadata>,
    pub selector: podscope_k8s::PodSelector,
}

impl PodSelection {
    fn selects(&self, path: &str) -> bool {
        podscope_k8s::cgroup::parse_container_cgroup(path)
            .and_then(|c| c.pod_uid)
            .is_some_and(|uid| self.metadata.pod_selected(&uid, &self.selector))
    }
}

/// The kernel-side cgroup filter: mode 0 (everything), 1 (only listed ids), 2 (all but listed).
#[derive(Clone)]
pub struct CgroupFilter {
    pub mode: u32,
    include: Vec<CgroupGlob>,
    exclude: Vec<CgroupGlob>,
    pods: Option<PodSelection>,
}

impl CgroupFilter {
    pub fn new(include: &[String], exclude: &[String], pods: Option<PodSelection>) -> CgroupFilter {
        let globs = |list: &[String]| {
            list.iter()
                .filter_map(|g| CgroupGlob::new(g).ok())
                .collect::<Vec<_>>()
        };
        let (include, exclude) = (globs(include), globs(exclude));
        let mode = if !include.is_empty() || pods.is_some() {
            1
        } else if !exclude.is_empty() {
            2
        } else {
            0
        };
        CgroupFilter {
            mode,
            include,
            exclude,
            pods,
        }
    }

    /// Changes of the pod cache the filter selects pods through.
    pub fn pod_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.pods.as_ref().map(|p| p.metadata.changes())
    }

    /// The ids to put in the kernel map for the current cgroups.
    pub fn listed_ids(&self, index: &CgroupIndex) -> HashSet<u64> {
        index
            .iter()
            .filter(|(_, path)| match self.mode {
                1 => {
                    (self.include.iter().any(|g| g.matches(path))
                        || self.pods.as_ref().is_some_and(|p| p.selects(path)))
                        && !self.exclude.iter().any(|g| g.matches(path))
                }
                2 => self.exclude.iter().any(|g| g.matches(path)),
                _ => false,
            })
            .map(|(id, _)| id)
            .collect()
    }

    /// Brings a probe's `cgroup_filter` map to exactly `ids`.
    pub fn sync(&self, ebpf: &mut Ebpf, ids: &HashSet<u64>) -> Result<(), String> {
        if self.mode == 0 {
            return Ok(());
        }
        let map = ebpf
            .map_mut("cgroup_filter")
            .ok_or("no cgroup_filter map")?;
        let mut map: HashMap<_, u64, u8> = HashMap::try_from(map).map_err(|e| e.to_string())?;
        let present: HashSet<u64> = map.keys().filter_map(Result::ok).collect();
        for stale in present.difference(ids) {
            let _ = map.remove(stale);
        }
        for id in ids.difference(&present) {
            map.insert(id, 1, 0).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Reads every entry of a hash map, skipping entries deleted while iterating.
pub fn read_hash<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
    ebpf: &Ebpf,
    name: &str,
) -> StdHashMap<K, V> {
    let Some(map) = ebpf.map(name) else {
        return StdHashMap::new();
    };
    let Ok(map) = HashMap::<_, K, V>::try_from(map) else {
        return StdHashMap::new();
    };
    map.iter().filter_map(Result::ok).collect()
}

/// Reads every entry of a per-CPU hash map, merging each key's per-CPU values with `merge`.
pub fn read_per_cpu_hash<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
    ebpf: &Ebpf,
    name: &str,
    merge: impl Fn(&mut V, &V),
) -> StdHashMap<K, V> {
    let Some(map) = ebpf.map(name) else {
        return StdHashMap::new();
    };
    let Ok(map) = aya::maps::PerCpuHashMap::<_, K, V>::try_from(map) else {
        return StdHashMap::new();
    };
    map.iter()
        .filter_map(Result::ok)
        .filter_map(|(key, values)| {
            let mut iter = values.iter();
            let mut total = *iter.next()?;
            for v in iter {
                merge(&mut total, v);
            }
            Some((key, total))
        })
        .collect()
}

/// Removes `keys` from a per-CPU hash map.
pub fn remove_per_cpu_keys<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    keys: impl IntoIterator<Item = K>,
) {
    let Some(map) = ebpf.map_mut(name) else {
        return;
    };
    let Ok(mut map) = aya::maps::PerCpuHashMap::<_, K, V>::try_from(map) else {
        return;
    };
    for key in keys {
        let _ = map.remove(&key);
    }
}

/// Removes `keys` from a hash map (entries of cgroups that no longer exist, or a per-interval
/// map being cleared).
pub fn remove_keys<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    keys: impl IntoIterator<Item = K>,
) {
    let Some(map) = ebpf.map_mut(name) else {
        return;
    };
    let Ok(mut map) = HashMap::<_, K, V>::try_from(map) else {
        return;
    };
    for key in keys {
        let _ = map.remove(&key);
    }
}
