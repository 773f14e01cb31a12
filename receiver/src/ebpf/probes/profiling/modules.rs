//! The binaries the profiled processes map, each read once and shared by every process that maps
//! it: keyed by the file (device and inode, as `/proc/<pid>/maps` shows them) and by build id,
//! so one image's binary in many containers is one entry. The symbol tables and unwind tables
//! they hold are kept within a memory budget, least recently used first out: a huge binary cannot
//! grow the agent without bound; its frames then keep their build id and file offset instead of
//! a name (and are counted).
//!
//! A binary is opened through the process that maps it: its path inside the process's root
//! (`/proc/<pid>/root/<path>`: containers' binaries), or, when that path now names another file
//! (replaced, deleted), the mapping itself (`/proc/<pid>/map_files/<range>`).
//!
//! It must not know samples or output formats.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::elf::{hex, ElfModule, LoadSegment, SymbolTable, UnwindTables};

/// A binary's place in [`ModuleCache`]; stable for the cache's lifetime.
pub type ModuleId = u32;

/// A file as `/proc/<pid>/maps` names it: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    pub device: u64,
    pub inode: u64,
}

/// Why a module has no symbols now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolsState {
    Loaded,
    /// Its symbol table alone is larger than the budget.
    OverBudget,
    /// Dropped to make room; read again when needed, while a process still maps it.
    Evicted,
    /// The file could not be read.
    Unreadable,
}

pub struct ModuleRecord {
    /// Its path as the process sees it.
    pub name: String,
    /// Lower-case hex, when the file has one.
    pub build_id: Option<String>,
    pub segments: Vec<LoadSegment>,
    pub unwind: Option<Arc<UnwindTables>>,
    symbols: SymbolTable,
    pub symbols_state: SymbolsState,
    /// Where it was read from (a `/proc/<pid>/…` path, valid while that process lives).
    source: PathBuf,
    last_used: u64,
}

impl ModuleRecord {
    fn held_bytes(&self) -> usize {
        self.symbols.bytes() + self.unwind.as_ref().map_or(0, |u| u.bytes())
    }

    /// The function at file offset `offset`, if the symbols know it.
    pub fn function_at(&self, offset: u64) -> Option<String> {
        let svma = super::elf::svma_of(&self.segments, offset)?;
        self.symbols.lookup(svma)
    }
}

/// Every binary seen, and the memory their tables hold.
pub struct ModuleCache {
    by_file: HashMap<FileIdentity, ModuleId>,
    by_build_id: HashMap<Vec<u8>, ModuleId>,
    records: Vec<ModuleRecord>,
    budget: usize,
    held: usize,
    clock: u64,
    evictions: u64,
}

impl ModuleCache {
    /// A cache whose symbol and unwind tables hold at most `budget` bytes.
    pub fn new(budget: usize) -> ModuleCache {
        ModuleCache {
            by_file: HashMap::new(),
            by_build_id: HashMap::new(),
            records: Vec::new(),
            budget,
            held: 0,
            clock: 0,
            evictions: 0,
        }
    }

    pub fn get(&self, id: ModuleId) -> Option<&ModuleRecord> {
        self.records.get(id as usize)
    }

    /// Bytes the tables hold now.
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// Modules whose tables were dropped to stay within the budget, so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Marks `id` as used now (for the least-recently-used order).
    pub fn touch(&mut self, id: ModuleId) {
        self.clock += 1;
        if let Some(record) = self.records.get_mut(id as usize) {
            record.last_used = self.clock;
        }
    }

    /// The module of the file `pid` maps at `start..end` (`path` as its maps show it), read now
    /// if it is new.
    pub fn module_for(
        &mut self,
        proc_root: &Path,
        pid: u32,
        file: FileIdentity,
        range: (u64, u64),
        path: &str,
    ) -> ModuleId {
        if let Some(&id) = self.by_file.get(&file) {
            self.reload_if_evicted(id, proc_root, pid, range, path);
            self.touch(id);
            return id;
        }
        let read = open_mapped_file(proc_root, pid, file, range, path)
            .and_then(|source| Ok((ElfModule::read(&source, self.budget)?, source)));
        let id = match read {
            Ok((elf, source)) => self.insert(elf, source, path),
            Err(error) => {
                tracing::debug!(pid, path, %error, "cannot read a mapped binary");
                self.push(ModuleRecord {
                    name: path.to_string(),
                    build_id: None,
                    segments: Vec::new(),
                    unwind: None,
                    symbols: SymbolTable::default(),
                    symbols_state: SymbolsState::Unreadable,
                    source: PathBuf::new(),
                    last_used: 0,
                })
            }
        };
        self.by_file.insert(file, id);
        self.touch(id);
        id
    }

    fn insert(&mut self, elf: ElfModule, source: PathBuf, path: &str) -> ModuleId {
        if let Some(&known) = elf.build_id.as_ref().and_then(|b| self.by_build_id.get(b)) {
            // The same binary through another file (another container's image layer).
            if self.records[known as usize].symbols_state == SymbolsState::Evicted {
                self.fill(known, elf, source);
            }
            return known;
        }
        let state = if elf.symbols_over.is_some() {
            SymbolsState::OverBudget
        } else {
            SymbolsState::Loaded
        };
        let id = self.push(ModuleRecord {
            name: path.to_string(),
            build_id: elf.build_id.as_deref().map(hex),
            segments: elf.segments.clone(),
            unwind: None,
            symbols: SymbolTable::default(),
            symbols_state: state,
            source: source.clone(),
            last_used: 0,
        });
        if let Some(build_id) = &elf.build_id {
            self.by_build_id.insert(build_id.clone(), id);
        }
        self.fill(id, elf, source);
        id
    }

    fn push(&mut self, record: ModuleRecord) -> ModuleId {
        self.records.push(record);
        (self.records.len() - 1) as ModuleId
    }

    /// Puts `elf`'s tables into record `id`, then makes room by dropping others'.
    fn fill(&mut self, id: ModuleId, elf: ElfModule, source: PathBuf) {
        let record = &mut self.records[id as usize];
        self.held -= record.held_bytes();
        record.unwind = elf.unwind;
        record.symbols = elf.symbols;
        record.source = source;
        if record.symbols_state != SymbolsState::OverBudget {
            record.symbols_state = SymbolsState::Loaded;
        }
        self.held += record.held_bytes();
        self.make_room(id);
    }

    /// Drops the tables of the least recently used modules (never `keep`'s unwind tables) until
    /// the budget holds; `keep`'s symbols go last.
    fn make_room(&mut self, keep: ModuleId) {
        while self.held > self.budget {
            let victim = self
                .records
                .iter()
                .enumerate()
                .filter(|(i, r)| *i as ModuleId != keep && r.held_bytes() > 0)
                .min_by_key(|(_, r)| r.last_used)
                .map(|(i, _)| i);
            match victim {
                Some(i) => {
                    let record = &mut self.records[i];
                    self.held -= record.held_bytes();
                    record.symbols = SymbolTable::default();
                    record.unwind = None;
                    record.symbols_state = SymbolsState::Evicted;
                    self.evictions += 1;
                }
                None => {
                    // Only `keep` is left and still too large: its symbols go, so that its
                    // frames at least unwind.
                    let record = &mut self.records[keep as usize];
                    self.held -= record.symbols.bytes();
                    record.symbols = SymbolTable::default();
                    record.symbols_state = SymbolsState::OverBudget;
                    if self.held > self.budget {
                        self.held -= record.unwind.as_ref().map_or(0, |u| u.bytes());
                        record.unwind = None;
                    }
                    return;
                }
            }
        }
    }

    fn reload_if_evicted(
        &mut self,
        id: ModuleId,
        proc_root: &Path,
        pid: u32,
        range: (u64, u64),
        path: &str,
    ) {
        if self.records[id as usize].symbols_state != SymbolsState::Evicted {
            return;
        }
        let file = FileIdentity {
            device: 0,
            inode: 0,
        };
        let source = open_mapped_file(proc_root, pid, file, range, path)
            .unwrap_or_else(|_| self.records[id as usize].source.clone());
        if let Ok(elf) = ElfModule::read(&source, self.budget) {
            self.fill(id, elf, source);
        }
    }

    /// For symbolization: reads the symbols of an evicted module again (from where it was read
    /// before, while that process lives); `false` if they stay unavailable.
    pub fn ensure_symbols(&mut self, id: ModuleId) -> bool {
        let Some(record) = self.records.get(id as usize) else {
            return false;
        };
        match record.symbols_state {
            SymbolsState::Loaded => true,
            SymbolsState::Evicted => {
                let source = record.source.clone();
                match ElfModule::read(&source, self.budget) {
                    Ok(elf) => {
                        self.touch(id);
                        self.fill(id, elf, source);
                        self.records[id as usize].symbols_state == SymbolsState::Loaded
                    }
                    Err(_) => false,
                }
            }
            SymbolsState::OverBudget | SymbolsState::Unreadable => false,
        }
    }

    /// Whether the tables of module `id` may be unwound with now.
    pub fn unwind_tables(&self, id: ModuleId) -> Option<Arc<UnwindTables>> {
        self.records.get(id as usize)?.unwind.clone()
    }
}

/// A path to read the file `pid` maps at `range`: inside its root if that is still the mapped
/// file, else the mapping itself.
fn open_mapped_file(
    proc_root: &Path,
    pid: u32,
    file: FileIdentity,
    range: (u64, u64),
    path: &str,
) -> Result<PathBuf, String> {
    let process = proc_root.join(pid.to_string());
    let deleted = path.ends_with(" (deleted)");
    if !deleted && path.starts_with('/') {
        let inside = process.join("root").join(path.trim_start_matches('/'));
        if let Ok(meta) = std::fs::metadata(&inside) {
            // The device can differ through overlayfs; the inode tells a replaced file.
            if file.inode == 0 || meta.ino() == file.inode {
                return Ok(inside);
            }
        }
    }
    let mapped = process
        .join("map_files")
        .join(format!("{:x}-{:x}", range.0, range.1));
    if std::fs::metadata(&mapped).is_ok() {
        return Ok(mapped);
    }
    Err(format!(
        "{path}: not found in process {pid}'s root, and its mapping cannot be opened"
    ))
}
