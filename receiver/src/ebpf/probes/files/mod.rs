//! `files`: opens (every open syscall of the architecture) per cgroup and result, and with `capture_paths` the most
//! opened paths per cgroup and interval (the kernel map is cleared after each collection).

mod config;
mod metrics;

use std::collections::HashSet;

use podscope_ebpf::abi::{OpenKey, OpenPathKey};
use podscope_ebpf::{abi, objects};

pub use config::FilesProbeConfig;

use super::{Collection, LoadContext, Probe, SingleObjectProbe};
use crate::ebpf::catalog::MetricDoc;
use crate::ebpf::object::{
    tp_btf, Global, HashTable, MapDef, ObjectSettings, ProbeError, ProbeObject, ProbeSpec,
};
use podscope_core::FieldError;

const SPEC: ProbeSpec = ProbeSpec {
    name: "files",
    object: objects::FILES,
    programs: &[tp_btf(ENTER, "sys_enter"), tp_btf(EXIT, "sys_exit")],
    maps: &[OPENS, PATHS, INFLIGHT, PATH_SCRATCH],
};

/// Notes the path argument (only with `capture_paths`).
const ENTER: &str = "podscope_files_enter";
const EXIT: &str = "podscope_files_exit";

const OPENS: MapDef = MapDef::entries("opens").counted(abi::FILES_MAP_OPENS);
const PATHS: MapDef = MapDef::entries("open_paths").counted(abi::FILES_MAP_PATHS);
/// Thread → path being opened, between entry and exit.
const INFLIGHT: MapDef = MapDef::entries("open_inflight").counted(abi::FILES_MAP_INFLIGHT);
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
    }

    fn open(
        config: &FilesProbeConfig,
        ctx: &mut LoadContext<'_>,
    ) -> Result<Box<dyn Probe>, ProbeError> {
        let settings = ObjectSettings {
            globals: vec![
                Global::U32("nr_open", syscalls::Sysno::open.id() as u32),
                Global::U32("nr_creat", syscalls::Sysno::creat.id() as u32),
                Global::U32("nr_openat", syscalls::Sysno::openat.id() as u32),
                Global::U32("nr_openat2", syscalls::Sysno::openat2.id() as u32),
                Global::U32(
                    "nr_open_by_handle_at",
                    syscalls::Sysno::open_by_handle_at.id() as u32,
                ),
                Global::U32("capture_paths", config.capture_paths as u32),
            ],
            skip: if config.capture_paths { &[] } else { &[ENTER] },
        };
        let mut object = ctx.object(&SPEC, &settings)?;
        Ok(Box::new(Loaded {
            opens: object.hash(&OPENS)?,
            paths: object.hash(&PATHS)?,
            object,
            top_paths: config.capture_paths.then_some(config.top_paths),
        }))
    }
}

struct Loaded {
    object: ProbeObject,
    opens: HashTable<OpenKey, u64>,
    paths: HashTable<OpenPathKey, u64>,
    /// With `capture_paths`: paths reported per cgroup and interval.
    top_paths: Option<usize>,
}

impl Probe for Loaded {
    fn objects_mut(&mut self) -> Vec<&mut ProbeObject> {
        vec![&mut self.object]
    }

    fn collect(&mut self, out: &mut Collection<'_>) {
        let opens = self.opens.entries();
        out.saw(opens.keys().map(|k| k.cgroup_id));
        metrics::add_opens(&mut out.metrics, &opens);
        if let Some(top) = self.top_paths {
            let paths = self.paths.entries();
            metrics::add_top_paths(&mut out.metrics, &paths, top);
            // Path counts are per interval: clear what was reported.
            self.paths.remove(paths.into_keys());
        }
    }

    fn forget(&mut self, gone: &HashSet<u64>) {
        self.opens.forget(gone, |k| k.cgroup_id);
    }
}
