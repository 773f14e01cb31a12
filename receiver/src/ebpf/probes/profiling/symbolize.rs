//! Names for frames, on the node: kernel frames from `/proc/kallsyms`, binaries' frames from
//! their ELF symbols (through [`ModuleCache`]), JIT frames from the process's perf map
//! (`/tmp/perf-<pid>.map` inside its root, under the pid its own namespace gives it). A frame
//! without a name keeps its mapping (file, build id) and file offset, and is counted.
//!
//! It must not read samples or know output formats.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::elf::{KernelSymbols, PerfMap};
use super::modules::{ModuleCache, ModuleId};
use super::stacks::Frame;

/// Where a frame's code lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrameMapping {
    Kernel,
    Module(ModuleId),
    /// A process's JIT code (its perf map's path, as the process sees it).
    Jit(String),
    Unknown,
}

/// A frame with its name, if one was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedFrame {
    pub function: Option<String>,
    pub mapping: FrameMapping,
    /// File offset for binaries' frames, the address otherwise.
    pub address: u64,
}

/// Perf maps read, with when, so a growing map is read again.
struct CachedPerfMap {
    modified: Option<SystemTime>,
    len: u64,
    map: PerfMap,
}

pub struct Symbolizer {
    proc_root: PathBuf,
    kallsyms: PathBuf,
    kernel: Option<KernelSymbols>,
    perf_maps: HashMap<u32, CachedPerfMap>,
    /// Frames that got no name, so far.
    pub unsymbolized: u64,
}

impl Symbolizer {
    pub fn new(proc_root: PathBuf) -> Symbolizer {
        Symbolizer {
            kallsyms: proc_root.join("kallsyms"),
            proc_root,
            kernel: None,
            perf_maps: HashMap::new(),
            unsymbolized: 0,
        }
    }

    /// Names for every frame of `frames` (each looked up once).
    pub fn name_all<'f>(
        &mut self,
        modules: &mut ModuleCache,
        frames: impl Iterator<Item = &'f Frame>,
    ) -> HashMap<Frame, NamedFrame> {
        let mut named = HashMap::new();
        for frame in frames {
            if !named.contains_key(frame) {
                let name = self.name(modules, frame);
                if name.function.is_none() {
                    self.unsymbolized += 1;
                }
                named.insert(*frame, name);
            }
        }
        // Perf maps of processes that are gone are not needed again.
        let root = self.proc_root.clone();
        self.perf_maps
            .retain(|pid, _| root.join(pid.to_string()).exists());
        named
    }

    fn name(&mut self, modules: &mut ModuleCache, frame: &Frame) -> NamedFrame {
        match *frame {
            Frame::Kernel { address } => {
                let kernel = self
                    .kernel
                    .get_or_insert_with(|| KernelSymbols::read(&self.kallsyms));
                NamedFrame {
                    function: kernel.lookup(address).map(str::to_string),
                    mapping: FrameMapping::Kernel,
                    address,
                }
            }
            Frame::User { module, offset } => {
                let function = if modules.ensure_symbols(module) {
                    modules.get(module).and_then(|m| m.function_at(offset))
                } else {
                    None
                };
                NamedFrame {
                    function,
                    mapping: FrameMapping::Module(module),
                    address: offset,
                }
            }
            Frame::Jit { pid, address } => {
                let (path, map) = self.perf_map(pid);
                NamedFrame {
                    function: map.and_then(|m| m.lookup(address)).map(str::to_string),
                    mapping: FrameMapping::Jit(path),
                    address,
                }
            }
            Frame::Unknown { address } => NamedFrame {
                function: None,
                mapping: FrameMapping::Unknown,
                address,
            },
        }
    }

    /// `pid`'s perf map (read again when it changed), and its path as the process sees it.
    fn perf_map(&mut self, pid: u32) -> (String, Option<&PerfMap>) {
        let process = self.proc_root.join(pid.to_string());
        let ns_pid = namespace_pid(&process).unwrap_or(pid);
        let inner = format!("/tmp/perf-{ns_pid}.map");
        let path = process.join("root").join(inner.trim_start_matches('/'));
        let Ok(meta) = std::fs::metadata(&path) else {
            return (inner, self.perf_maps.get(&pid).map(|c| &c.map));
        };
        let modified = meta.modified().ok();
        let stale = self
            .perf_maps
            .get(&pid)
            .is_none_or(|c| c.modified != modified || c.len != meta.len());
        if stale {
            if let Ok(text) = std::fs::read_to_string(&path) {
                self.perf_maps.insert(
                    pid,
                    CachedPerfMap {
                        modified,
                        len: meta.len(),
                        map: PerfMap::parse(&text),
                    },
                );
            }
        }
        (inner, self.perf_maps.get(&pid).map(|c| &c.map))
    }
}

/// The pid a process has in its own pid namespace (the last `NSpid` of its status): the number
/// its JIT writes in the perf map's name.
fn namespace_pid(process: &Path) -> Option<u32> {
    let status = std::fs::read_to_string(process.join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}
