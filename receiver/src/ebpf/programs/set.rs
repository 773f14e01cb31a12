//! The user programs running in one receiver, and their status. Programs are put in and taken
//! out while the receiver runs (an `EbpfProgram` created, changed or deleted); the collection
//! task reads all of them at each interval through [`ProgramsProbe`], one probe among the
//! built-in ones.
//!
//! A new version of a program is loaded before the old one is taken out (`install`), so its
//! data never pauses; dropping the old one detaches it. One program failing changes nothing
//! for the others.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::load::LoadedProgram;
use super::maps::Entry;
use crate::ebpf::object::{MapMemory, ProbeObject};
use crate::ebpf::probes::{Collection, Probe};

/// Where a program stands on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Loaded,
    Failed,
}

impl Phase {
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Loaded => "Loaded",
            Phase::Failed => "Failed",
        }
    }
}

/// A program's status on this node, as `EbpfProgram.status.nodes[]` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramStatus {
    pub phase: Phase,
    /// `section (function)` of each attached program.
    pub attached: Vec<String>,
    /// Why it failed (the verifier's last lines included), or what was loaded.
    pub message: String,
    pub time: SystemTime,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct SeriesLabels {
    pub program: String,
    pub metric: String,
}

#[derive(Default)]
struct State {
    loaded: BTreeMap<String, LoadedProgram>,
    statuses: BTreeMap<String, ProgramStatus>,
}

/// The receiver's user programs; clones share them.
#[derive(Clone, Default)]
pub struct ProgramSet {
    state: Arc<Mutex<State>>,
}

impl ProgramSet {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Each update is one insert or remove: a panic elsewhere leaves the maps consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a freshly loaded program in (the version it replaces, if any, is dropped after, which
    /// detaches it), or records why it could not load (an older version is then taken out too:
    /// its spec is no longer the one asked for).
    pub fn install(&self, name: &str, result: Result<LoadedProgram, String>) -> ProgramStatus {
        let status = match &result {
            Ok(p) => ProgramStatus {
                phase: Phase::Loaded,
                attached: p.attached.clone(),
                message: format!(
                    "{} program(s) attached, {} metric(s)",
                    p.attached.len(),
                    p.metrics.len()
                ),
                time: SystemTime::now(),
            },
            Err(e) => ProgramStatus {
                phase: Phase::Failed,
                attached: Vec::new(),
                message: e.clone(),
                time: SystemTime::now(),
            },
        };
        let old = {
            let mut state = self.lock();
            state.statuses.insert(name.to_string(), status.clone());
            match result {
                Ok(program) => state.loaded.insert(name.to_string(), program),
                Err(_) => state.loaded.remove(name),
            }
        };
        drop(old);
        status
    }

    /// Detaches and forgets a program.
    pub fn remove(&self, name: &str) {
        let old = {
            let mut state = self.lock();
            state.statuses.remove(name);
            state.loaded.remove(name)
        };
        drop(old);
    }

    /// Every program's status.
    pub fn statuses(&self) -> BTreeMap<String, ProgramStatus> {
        self.lock().statuses.clone()
    }

    /// Names of the programs loaded now.
    pub fn loaded(&self) -> Vec<String> {
        self.lock().loaded.keys().cloned().collect()
    }

    /// Map memory of the loaded programs, except `except`'s (the one being replaced).
    pub fn map_memory_except(&self, except: &str) -> u64 {
        self.lock()
            .loaded
            .iter()
            .filter(|(name, _)| *name != except)
            .flat_map(|(_, p)| p.map_memory())
            .map(|(_, _, bytes)| bytes)
            .sum()
    }

    /// Runs `f` on each loaded program that has a pod filter map.
    pub fn with_pod_filters(&self, mut f: impl FnMut(&str, &LoadedProgram)) {
        for (name, program) in &self.lock().loaded {
            if program.pods.is_some() {
                f(name, program);
            }
        }
    }
}

/// The user programs as one probe of the collection task.
pub struct ProgramsProbe {
    pub set: ProgramSet,
    pub overflow: Family<SeriesLabels, Counter>,
}

impl Probe for ProgramsProbe {
    fn objects_mut(&mut self) -> Vec<&mut ProbeObject> {
        Vec::new()
    }

    fn collect(&mut self, out: &mut Collection<'_>) {
        let now = crate::ebpf::collector::unix_nanos();
        let mut state = self.set.lock();
        for (name, program) in state.loaded.iter_mut() {
            if let Err(e) = program.run_iterators() {
                tracing::warn!(program = %name, error = %e, "cannot run the program's iterator");
            }
            let entries: BTreeMap<String, Vec<Entry>> = program
                .maps()
                .iter()
                .map(|m| (m.name.clone(), m.entries()))
                .collect();
            let start = program.loaded_ns;
            for metric in &mut program.metrics {
                let Some(entries) = entries.get(&metric.map) else {
                    continue;
                };
                let (cgroups, refused) = metric.collect(entries, &mut out.metrics, start, now);
                out.saw(cgroups);
                if refused > 0 {
                    self.overflow
                        .get_or_create(&SeriesLabels {
                            program: name.clone(),
                            metric: metric.name.clone(),
                        })
                        .inc_by(refused);
                }
            }
        }
    }

    fn forget(&mut self, gone: &HashSet<u64>) {
        let state = self.set.lock();
        for program in state.loaded.values() {
            for map in program.maps() {
                let entries = map.entries();
                for metric in program.metrics.iter().filter(|m| m.map == map.name) {
                    for key in metric.keys_of_cgroups(&entries, gone) {
                        map.remove(&key);
                    }
                }
            }
        }
    }

    fn extra_map_memory(&self) -> Vec<MapMemory> {
        let state = self.set.lock();
        state
            .loaded
            .iter()
            .flat_map(|(program, p)| {
                p.map_memory()
                    .into_iter()
                    .map(move |(map, id, bytes)| MapMemory {
                        probe: "programs",
                        map: format!("{program}/{map}"),
                        id,
                        bytes,
                    })
            })
            .collect()
    }
}
