//! `syscalls`: per cgroup and syscall (or syscall group), the count, the errors and optionally
//! the latency. Counting runs one program on every syscall (on exit, or on entry without
//! errors); latency of every syscall adds one on entry; latency of chosen syscalls runs on their
//! own tracepoints only.

mod config;
mod groups;
mod metrics;

use std::collections::HashSet;
use std::str::FromStr as _;

use podscope_core::FieldError;
use podscope_ebpf::abi::{Hist, SyscallCounts, SyscallKey, PODSCOPE_SYSCALL_NRS};
use podscope_ebpf::{abi, objects};

pub use config::{SyscallsBy, SyscallsProbeConfig};

use super::{Collection, LoadContext, Probe, SingleObjectProbe};
use crate::ebpf::catalog::MetricDoc;
use crate::ebpf::kernel_memory::Typical;
use crate::ebpf::object::{
    tp_btf, Global, HashTable, MapDef, ObjectSettings, PerCpuHashTable, ProbeError, ProbeObject,
    ProbeSpec,
};
use crate::ebpf::tracefs;

const SPEC: ProbeSpec = ProbeSpec {
    name: "syscalls",
    object: objects::SYSCALLS,
    programs: &[
        tp_btf(EXIT, "sys_exit"),
        tp_btf(COUNT, "sys_enter"),
        tp_btf(ENTER, "sys_enter"),
    ],
    maps: &[COUNTS, LATENCY, START],
};

/// Counts, errors and latency, on exit.
const EXIT: &str = "podscope_sys_exit";
/// Counts only, on entry.
const COUNT: &str = "podscope_sys_count";
/// Times the entry, on every syscall.
const ENTER: &str = "podscope_sys_enter";
/// Time the chosen syscalls on their own tracepoints (attached by the probe, one per syscall).
const LATENCY_ENTER: &str = "podscope_latency_enter";
const LATENCY_EXIT: &str = "podscope_latency_exit";

const COUNTS: MapDef = MapDef::entries("syscall_counts")
    .counted(abi::SYSCALLS_MAP_COUNTS)
    .typically(Typical::PerCgroup(10));
const LATENCY: MapDef = MapDef::entries("syscall_latency")
    .counted(abi::SYSCALLS_MAP_LATENCY)
    .typically(Typical::PerCgroup(2));
/// Entry times, in task storage (sized by the kernel: one per task).
const START: MapDef = MapDef::fixed("syscall_start");

pub struct Syscalls;

/// How the latency of chosen syscalls is measured.
enum ChosenLatency<'a> {
    /// On their own tracepoints.
    Tracepoints(&'a [String]),
    /// By the programs on every syscall (no tracefs), timing only those: why.
    EverySyscall(&'static str),
}

impl SingleObjectProbe for Syscalls {
    type Config = SyscallsProbeConfig;
    const SPEC: ProbeSpec = SPEC;
    const METRICS: &'static [MetricDoc] = metrics::METRICS;

    fn validate(config: &SyscallsProbeConfig, prefix: &str, errors: &mut Vec<FieldError>) {
        if config.latency && !config.latency_syscalls.is_empty() {
            errors.push(FieldError::new(
                format!("{prefix}.latency_syscalls"),
                "latency: true already measures every syscall; set one or the other",
            ));
        }
        for (i, name) in config.latency_syscalls.iter().enumerate() {
            if syscall_nr(name).is_none() {
                errors.push(FieldError::new(
                    format!("{prefix}.latency_syscalls[{i}]"),
                    format!("{name:?} is not a syscall of this architecture"),
                ));
            }
        }
    }

    fn open(
        config: &SyscallsProbeConfig,
        ctx: &mut LoadContext<'_>,
    ) -> Result<Box<dyn Probe>, ProbeError> {
        let nrs = PODSCOPE_SYSCALL_NRS as usize;
        let chosen = (!config.latency_syscalls.is_empty()).then(|| match tracefs::available() {
            Ok(_) => ChosenLatency::Tracepoints(&config.latency_syscalls),
            Err(why) => ChosenLatency::EverySyscall(why),
        });
        // Which syscalls the programs on every syscall time: all, the chosen ones without
        // tracefs, or none.
        let mut timed = vec![config.latency as u8; nrs];
        if let Some(ChosenLatency::EverySyscall(_)) = chosen {
            for nr in config.latency_syscalls.iter().filter_map(|n| syscall_nr(n)) {
                timed[nr] = 1;
            }
        }
        let on_every_entry = timed.contains(&1);
        let on_exit = config.errors || on_every_entry;
        let skip: &[&str] = match (on_exit, on_every_entry) {
            (true, true) => &[COUNT],
            (true, false) => &[COUNT, ENTER],
            (false, _) => &[EXIT, ENTER],
        };
        let slots: Vec<u16> = match config.by {
            SyscallsBy::Syscall => (0..nrs as u16).collect(),
            SyscallsBy::Group => groups::group_slots(nrs),
        };
        if !config.latency && chosen.is_none() {
            ctx.size_unless_set(LATENCY.name, 1);
        }
        let settings = ObjectSettings {
            globals: vec![
                Global::U32("measure_latency", on_every_entry as u32),
                Global::U32("count_errors", config.errors as u32),
                Global::U16s("slot_of", slots),
                Global::U8s("timed", timed),
            ],
            skip,
        };
        let mut object = ctx.object(&SPEC, &settings)?;
        let mut hooks = vec![if on_exit {
            "tp_btf/sys_exit"
        } else {
            "tp_btf/sys_enter"
        }
        .to_string()];
        match chosen {
            Some(ChosenLatency::Tracepoints(names)) => {
                for name in names {
                    let attach = |object: &mut ProbeObject, function, event: String| {
                        object
                            .attach_tracepoint(function, "syscalls", &event)
                            .map_err(|reason| ProbeError {
                                probe: SPEC.name,
                                hook: None,
                                reason: format!("latency of {name}: {reason}"),
                            })
                    };
                    attach(&mut object, LATENCY_ENTER, format!("sys_enter_{name}"))?;
                    attach(&mut object, LATENCY_EXIT, format!("sys_exit_{name}"))?;
                }
                hooks.push(format!(
                    "latency of {} on their syscalls:sys_enter/sys_exit tracepoints",
                    names.join(", ")
                ));
            }
            Some(ChosenLatency::EverySyscall(why)) => hooks.push(format!(
                "latency of {} timed on every syscall's entry ({why})",
                config.latency_syscalls.join(", ")
            )),
            None if config.latency => hooks.push("latency of every syscall".to_string()),
            None => {}
        }
        Ok(Box::new(Loaded {
            counts: object.per_cpu_hash(&COUNTS, SyscallCounts::merge)?,
            latency: object.hash(&LATENCY)?,
            object,
            by: config.by,
            measures_latency: config.latency || chosen.is_some(),
            hooks: hooks.join("; "),
        }))
    }
}

/// The number of syscall `name`, if this architecture has it and the probe can count it.
fn syscall_nr(name: &str) -> Option<usize> {
    syscalls::Sysno::from_str(name)
        .ok()
        .map(|s| s.id() as usize)
        .filter(|&nr| nr < PODSCOPE_SYSCALL_NRS as usize)
}

struct Loaded {
    object: ProbeObject,
    counts: PerCpuHashTable<SyscallKey, SyscallCounts>,
    latency: HashTable<SyscallKey, Hist>,
    by: SyscallsBy,
    measures_latency: bool,
    hooks: String,
}

impl Probe for Loaded {
    fn objects_mut(&mut self) -> Vec<&mut ProbeObject> {
        vec![&mut self.object]
    }

    fn hooks(&self) -> String {
        self.hooks.clone()
    }

    fn collect(&mut self, out: &mut Collection<'_>) {
        let counts = self.counts.entries();
        let latency = if self.measures_latency {
            self.latency.entries()
        } else {
            Default::default()
        };
        out.saw(counts.keys().map(|k| k.cgroup_id));
        out.saw(latency.keys().map(|k| k.cgroup_id));
        metrics::add(&mut out.metrics, self.by, &counts, &latency);
    }

    fn forget(&mut self, gone: &HashSet<u64>) {
        self.counts.forget(gone, |k| k.cgroup_id);
        self.latency.forget(gone, |k| k.cgroup_id);
    }
}
