//! `files`: opens (every open syscall of the architecture) per cgroup and result, and with
//! `capture_paths` the most opened paths per cgroup and interval. The probe attaches to the open
//! syscalls' own tracepoints where tracefs can be used (nothing runs on other syscalls), else to
//! tp_btf sys_enter/sys_exit.
//!
//! Paths are counted per collection epoch, three in turn: at each collection the kernel moves on
//! to the next epoch and the probe reads (and deletes) the one the kernel left a whole interval
//! ago, so no count races the read; path counts are therefore reported one interval late, with
//! that interval's start and end.

mod config;
mod metrics;

use std::collections::HashSet;

use aya::maps::{Array, MapData};
use podscope_ebpf::abi::{
    OpenKey, OpenPathCgroup, OpenPathCgroupKey, OpenPathKey, PODSCOPE_PATH_EPOCHS,
};
use podscope_ebpf::{abi, objects};

pub use config::{FilesHooks, FilesProbeConfig};

use super::{Collection, LoadContext, Probe, SingleObjectProbe};
use crate::ebpf::catalog::MetricDoc;
use crate::ebpf::collector::unix_nanos;
use crate::ebpf::kernel_memory::Typical;
use crate::ebpf::object::{
    error_chain, tp_btf, Global, HashTable, MapDef, ObjectSettings, ProbeError, ProbeObject,
    ProbeSpec,
};
use crate::ebpf::tracefs;
use podscope_core::FieldError;

const SPEC: ProbeSpec = ProbeSpec {
    name: "files",
    object: objects::FILES,
    programs: &[tp_btf(ENTER, "sys_enter"), tp_btf(EXIT, "sys_exit")],
    maps: &[
        OPENS,
        PATHS,
        PATH_CGROUPS,
        PATH_EPOCH,
        PATH_ARG,
        PATH_SCRATCH,
    ],
};

/// On every syscall (without tracefs): notes the path argument (only with `capture_paths`).
const ENTER: &str = "podscope_files_enter";
const EXIT: &str = "podscope_files_exit";
/// On the open syscalls' own tracepoints (attached by the probe).
const OPEN_ENTER: &str = "podscope_files_open_enter";
const OPEN_EXIT: &str = "podscope_files_open_exit";

/// Every open syscall of x86_64.
const OPEN_SYSCALLS: [syscalls::Sysno; 5] = [
    syscalls::Sysno::open,
    syscalls::Sysno::creat,
    syscalls::Sysno::openat,
    syscalls::Sysno::openat2,
    syscalls::Sysno::open_by_handle_at,
];

const OPENS: MapDef = MapDef::entries("opens")
    .counted(abi::FILES_MAP_OPENS)
    .typically(Typical::PerCgroup(2));
const PATHS: MapDef = MapDef::entries("open_paths")
    .counted(abi::FILES_MAP_PATHS)
    .typically(Typical::PerCgroup(40));
/// Per cgroup and epoch: distinct paths tracked and opens counted as `other`.
const PATH_CGROUPS: MapDef =
    MapDef::entries("open_path_cgroups")
    .counted(abi::FILES_MAP_PATH_CGROUPS)
    .typically(Typical::PerCgroup(2));
const PATH_EPOCH: MapDef = MapDef::fixed("path_epoch");
/// Per thread (task storage): the path being opened, between entry and exit.
const PATH_ARG: MapDef = MapDef::fixed("open_path_arg");
const PATH_SCRATCH: MapDef = MapDef::fixed("path_scratch");

pub struct Files;

impl SingleObjectProbe for Files {
    type Config = FilesProbeConfig;
    const SPEC: ProbeSpec = SPEC;
    const METRICS: &'static [MetricDoc] = metrics::METRICS;

    fn validate(config: &FilesProbeConfig, prefix: &str, errors: &mut Vec<FieldError>) {
        if config.capture_paths && config.top_paths == 0 {
            errors.push(FieldError::new(
                format!("{prefix}.top_paths"),
                "must be at least 1 with capture_paths",
            ));
        }
        if config.capture_paths && (config.tracked_paths as usize) < config.top_paths {
            errors.push(FieldError::new(
                format!("{prefix}.tracked_paths"),
                "must be at least top_paths",
            ));
        }
    }

    fn open(
        config: &FilesProbeConfig,
        ctx: &mut LoadContext<'_>,
    ) -> Result<Box<dyn Probe>, ProbeError> {
        let error = |reason: String| ProbeError {
            probe: SPEC.name,
            hook: None,
            reason,
        };
        let tracepoints = match (config.hooks, tracefs::available()) {
            (FilesHooks::TpBtf, _) => Err("hooks: tp_btf"),
            (_, Ok(_)) => Ok(()),
            (FilesHooks::Tracepoints, Err(why)) => {
                return Err(error(format!("hooks: tracepoints: {why}")))
            }
            (FilesHooks::Auto, Err(why)) => Err(why),
        };
        if !config.capture_paths {
            for map in [PATHS.name, PATH_CGROUPS.name] {
                ctx.size_unless_set(map, 1);
            }
        }
        let nr = |s: syscalls::Sysno| s.id() as u32;
        let settings = ObjectSettings {
            globals: vec![
                Global::U32("nr_open", nr(syscalls::Sysno::open)),
                Global::U32("nr_creat", nr(syscalls::Sysno::creat)),
                Global::U32("nr_openat", nr(syscalls::Sysno::openat)),
                Global::U32("nr_openat2", nr(syscalls::Sysno::openat2)),
                Global::U32("nr_open_by_handle_at", nr(syscalls::Sysno::open_by_handle_at)),
                Global::U32("capture_paths", config.capture_paths as u32),
                Global::U32("tracked_paths", config.tracked_paths),
            ],
            skip: match (&tracepoints, config.capture_paths) {
                (Ok(()), _) => &[ENTER, EXIT],
                (Err(_), true) => &[],
                (Err(_), false) => &[ENTER],
            },
        };
        let mut object = ctx.object(&SPEC, &settings)?;
        let hooks = match tracepoints {
            Ok(()) => {
                for syscall in OPEN_SYSCALLS {
                    let name = syscall.name();
                    object
                        .attach_tracepoint(OPEN_EXIT, "syscalls", &format!("sys_exit_{name}"))
                        .map_err(error)?;
                    if config.capture_paths && syscall != syscalls::Sysno::open_by_handle_at {
                        object
                            .attach_tracepoint(
                                OPEN_ENTER,
                                "syscalls",
                                &format!("sys_enter_{name}"),
                            )
                            .map_err(error)?;
                    }
                }
                "the open syscalls' tracepoints (syscalls:sys_exit_open, _creat, _openat, _openat2, _open_by_handle_at)".to_string()
            }
            Err(why) => format!("tp_btf sys_enter/sys_exit, on every syscall ({why})"),
        };
        let paths = match config.capture_paths {
            true => Some(PathCapture {
                paths: object.hash(&PATHS)?,
                cgroups: object.hash(&PATH_CGROUPS)?,
                epoch: object.array(&PATH_EPOCH)?,
                current: 0,
                started_ns: [unix_nanos(); PODSCOPE_PATH_EPOCHS as usize],
                top: config.top_paths,
            }),
            false => None,
        };
        Ok(Box::new(Loaded {
            opens: object.hash(&OPENS)?,
            paths,
            object,
            hooks,
        }))
    }
}

/// With `capture_paths`: the path maps, and which epoch the kernel counts in.
struct PathCapture {
    paths: HashTable<OpenPathKey, u64>,
    cgroups: HashTable<OpenPathCgroupKey, OpenPathCgroup>,
    epoch: Array<MapData, u32>,
    /// The epoch the kernel counts in now.
    current: u32,
    /// When the kernel started counting in each epoch.
    started_ns: [u64; PODSCOPE_PATH_EPOCHS as usize],
    top: usize,
}

impl PathCapture {
    /// Moves the kernel to the next epoch, then reads and deletes the one it left an interval
    /// ago, reported with that interval's start and end.
    fn collect(&mut self, out: &mut Collection<'_>) {
        let epochs = PODSCOPE_PATH_EPOCHS;
        let next = (self.current + 1) % epochs;
        if let Err(e) = self.epoch.set(0, next, 0) {
            tracing::warn!(receiver = %out.receiver, error = %error_chain(&e), "files: cannot move path counting to the next interval");
            return;
        }
        let now = unix_nanos();
        let done = (next + 1) % epochs;
        let (start, end) = (
            self.started_ns[done as usize],
            self.started_ns[self.current as usize],
        );
        self.started_ns[next as usize] = now;
        self.current = next;
        let mut paths = self.paths.entries();
        paths.retain(|k, _| k.epoch == done);
        let mut cgroups = self.cgroups.entries();
        cgroups.retain(|k, _| k.epoch == done);
        out.saw(cgroups.keys().map(|k| k.cgroup_id));
        metrics::add_top_paths(&mut out.metrics, &paths, &cgroups, self.top, start, end);
        self.paths.remove(paths.into_keys());
        self.cgroups.remove(cgroups.into_keys());
    }
}

struct Loaded {
    object: ProbeObject,
    opens: HashTable<OpenKey, u64>,
    paths: Option<PathCapture>,
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
        let opens = self.opens.entries();
        out.saw(opens.keys().map(|k| k.cgroup_id));
        metrics::add_opens(&mut out.metrics, &opens);
        if let Some(paths) = &mut self.paths {
            paths.collect(out);
        }
    }

    /// Path counts are left to their epoch's collection: they are reported once more either way.
    fn forget(&mut self, gone: &HashSet<u64>) {
        self.opens.forget(gone, |k| k.cgroup_id);
    }
}
