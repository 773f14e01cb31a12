//! The profiled processes: each one's executable mappings (from `/proc/<pid>/maps`, read again
//! when a sample shows code outside them: a library loaded since) and its unwinder, which walks a
//! copied user stack through the mapped binaries' `.eh_frame` (framehop), and frame pointers
//! where no unwind table covers the code (JIT code).
//!
//! It must not aggregate samples or name functions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, Module, Unwinder as _};

use super::modules::{FileIdentity, ModuleCache, ModuleId};
use super::stacks::Frame;

/// Frames of one user stack at most (a deeper stack is cut and counted as truncated).
pub const MAX_USER_FRAMES: usize = 128;

/// How soon a process's maps are read again when a sample lands outside them (a library
/// loaded since, JIT code).
const MAPS_REREAD_AFTER: Duration = Duration::from_millis(100);

/// What one executable mapping holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Module(ModuleId),
    /// Anonymous executable memory: JIT code, named by the process's perf map.
    Anonymous,
    /// `[vdso]` and the like.
    Special,
}

#[derive(Debug, Clone)]
struct Mapping {
    start: u64,
    end: u64,
    file_offset: u64,
    target: Target,
}

/// A copied user stack: the bytes from `sp` up, stored as the kernel's ring over pages.
pub struct StackCopy<'a> {
    pub sp: u64,
    pub len: u64,
    /// `PODSCOPE_PROFILE_USTACK_BYTES` bytes; the byte at address `a` is at
    /// `(a - (sp & !4095)) % bytes.len()`.
    pub bytes: &'a [u8],
}

impl StackCopy<'_> {
    fn read_u64(&self, address: u64) -> Option<u64> {
        if address < self.sp || address.checked_add(8)? > self.sp + self.len {
            return None;
        }
        let size = self.bytes.len() as u64;
        let base = self.sp & !4095;
        let mut word = [0u8; 8];
        for (i, byte) in word.iter_mut().enumerate() {
            *byte = self.bytes[((address + i as u64 - base) % size) as usize];
        }
        Some(u64::from_le_bytes(word))
    }
}

/// What the unwinder found.
pub struct Unwound {
    /// Leaf first.
    pub frames: Vec<Frame>,
    /// The walk stopped before the stack's root (copy too short, code without unwind info).
    pub truncated: bool,
}

struct ProcessState {
    exec_id: u64,
    mappings: Vec<Mapping>,
    unwinder: UnwinderX86_64<Arc<[u8]>>,
    maps_read: Instant,
}

/// The processes samples came from, with their mappings and unwinders.
pub struct Processes {
    proc_root: PathBuf,
    states: HashMap<u32, ProcessState>,
    cache: CacheX86_64,
}

impl Processes {
    pub fn new(proc_root: PathBuf) -> Processes {
        Processes {
            proc_root,
            states: HashMap::new(),
            cache: CacheX86_64::new(),
        }
    }

    /// Unwinds the user stack of `pid` (in its `exec_id`-th program: the kernel's
    /// `self_exec_id`) from registers `ip`, `sp`, `bp` through `stack`.
    pub fn unwind(
        &mut self,
        modules: &mut ModuleCache,
        (pid, exec_id): (u32, u64),
        (ip, sp, bp): (u64, u64, u64),
        stack: &StackCopy<'_>,
    ) -> Unwound {
        let proc_root = self.proc_root.clone();
        let state = self
            .states
            .entry(pid)
            .or_insert_with(|| ProcessState::read(&proc_root, pid, exec_id, modules));
        // After an exec every mapping is new: read them at once, or the samples right after it
        // would be unwound through the old program's.
        let stale = state.exec_id != exec_id
            || (state.mapping(ip).is_none() && state.maps_read.elapsed() >= MAPS_REREAD_AFTER);
        if stale {
            *state = ProcessState::read(&proc_root, pid, exec_id, modules);
        }
        let mut read_stack = |address: u64| stack.read_u64(address).ok_or(());
        let mut frames = state.unwinder.iter_frames(
            ip,
            UnwindRegsX86_64::new(ip, sp, bp),
            &mut self.cache,
            &mut read_stack,
        );
        let mut addresses = Vec::new();
        let truncated = loop {
            if addresses.len() >= MAX_USER_FRAMES {
                break true;
            }
            match frames.next() {
                Ok(Some(frame)) => addresses.push(frame.address_for_lookup()),
                Ok(None) => break false,
                Err(_) => break true,
            }
        };
        let frames = addresses
            .into_iter()
            .map(|address| match state.mapping(address) {
                Some(m) => match &m.target {
                    Target::Module(module) => {
                        modules.touch(*module);
                        Frame::User {
                            module: *module,
                            offset: address - m.start + m.file_offset,
                        }
                    }
                    Target::Anonymous => Frame::Jit { pid, address },
                    Target::Special => Frame::Unknown { address },
                },
                None => Frame::Unknown { address },
            })
            .collect();
        Unwound { frames, truncated }
    }

    /// Forgets processes that are gone.
    pub fn prune(&mut self) {
        let root = self.proc_root.clone();
        self.states
            .retain(|pid, _| root.join(pid.to_string()).exists());
    }
}

impl ProcessState {
    fn read(proc_root: &Path, pid: u32, exec_id: u64, modules: &mut ModuleCache) -> ProcessState {
        let maps = std::fs::read_to_string(proc_root.join(pid.to_string()).join("maps"))
            .unwrap_or_default();
        let mut mappings = Vec::new();
        let mut unwinder = UnwinderX86_64::new();
        for line in maps.lines() {
            let Some(entry) = MapsLine::parse(line) else {
                continue;
            };
            if !entry.executable {
                continue;
            }
            let target = if entry.inode != 0 && entry.path.starts_with('/') {
                let module = modules.module_for(
                    proc_root,
                    pid,
                    FileIdentity {
                        device: entry.device,
                        inode: entry.inode,
                    },
                    (entry.start, entry.end),
                    entry.path,
                );
                if let (Some(record), Some(tables)) =
                    (modules.get(module), modules.unwind_tables(module))
                {
                    if let Some(svma) = super::elf::mapping_svma(&record.segments, entry.offset) {
                        unwinder.add_module(Module::new(
                            record.name.clone(),
                            entry.start..entry.end,
                            entry.start.wrapping_sub(svma),
                            section_info(&tables),
                        ));
                    }
                }
                Target::Module(module)
            } else if entry.path.is_empty() {
                Target::Anonymous
            } else {
                Target::Special
            };
            mappings.push(Mapping {
                start: entry.start,
                end: entry.end,
                file_offset: entry.offset,
                target,
            });
        }
        mappings.sort_by_key(|m| m.start);
        ProcessState {
            exec_id,
            mappings,
            unwinder,
            maps_read: Instant::now(),
        }
    }

    fn mapping(&self, address: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.start <= address);
        self.mappings
            .get(i.checked_sub(1)?)
            .filter(|m| address < m.end)
    }
}

fn section_info(tables: &super::elf::UnwindTables) -> ExplicitModuleSectionInfo<Arc<[u8]>> {
    ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma: tables.text_svma.clone(),
        got_svma: tables.got_svma.clone(),
        eh_frame_svma: Some(tables.eh_frame_svma.clone()),
        eh_frame: Some(tables.eh_frame.clone()),
        eh_frame_hdr_svma: tables.eh_frame_hdr_svma.clone(),
        eh_frame_hdr: tables.eh_frame_hdr.clone(),
        ..Default::default()
    }
}

/// One line of `/proc/<pid>/maps`.
#[derive(Debug, PartialEq, Eq)]
pub struct MapsLine<'a> {
    pub start: u64,
    pub end: u64,
    pub executable: bool,
    pub offset: u64,
    pub device: u64,
    pub inode: u64,
    /// Empty for anonymous memory; may end in ` (deleted)`.
    pub path: &'a str,
}

impl<'a> MapsLine<'a> {
    pub fn parse(line: &'a str) -> Option<MapsLine<'a>> {
        let mut rest = line;
        let mut field = || {
            let trimmed = rest.trim_start();
            let end = trimmed.find(' ').unwrap_or(trimmed.len());
            let (value, tail) = trimmed.split_at(end);
            rest = tail;
            value
        };
        let (start, end) = field().split_once('-')?;
        let perms = field();
        let offset = field();
        let (major, minor) = field().split_once(':')?;
        let inode = field();
        let path = rest.trim_start();
        let major = u64::from_str_radix(major, 16).ok()?;
        let minor = u64::from_str_radix(minor, 16).ok()?;
        Some(MapsLine {
            start: u64::from_str_radix(start, 16).ok()?,
            end: u64::from_str_radix(end, 16).ok()?,
            executable: perms.as_bytes().get(2) == Some(&b'x'),
            offset: u64::from_str_radix(offset, 16).ok()?,
            device: (major << 20) | minor,
            inode: inode.parse().ok()?,
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines() {
        let line = MapsLine::parse(
            "7f1c2a028000-7f1c2a1bd000 r-xp 00028000 fd:01 1054 /usr/lib/x86_64-linux-gnu/libc.so.6",
        )
        .unwrap();
        assert_eq!(
            line,
            MapsLine {
                start: 0x7f1c2a028000,
                end: 0x7f1c2a1bd000,
                executable: true,
                offset: 0x28000,
                device: (0xfd << 20) | 1,
                inode: 1054,
                path: "/usr/lib/x86_64-linux-gnu/libc.so.6",
            }
        );
        let anon = MapsLine::parse("7f0000000000-7f0000001000 rwxp 00000000 00:00 0 ").unwrap();
        assert_eq!((anon.path, anon.inode, anon.executable), ("", 0, true));
        let deleted =
            MapsLine::parse("555555554000-555555555000 r-xp 00001000 08:02 77 /tmp/a b (deleted)")
                .unwrap();
        assert_eq!(deleted.path, "/tmp/a b (deleted)");
        assert!(MapsLine::parse("garbage").is_none());
    }

    #[test]
    fn stack_copies_are_read_through_the_page_ring() {
        // sp in the middle of a page: the ring's first bytes hold the copy's last ones.
        let sp = 0x7ffd_0000_0ff0u64;
        let mut bytes = vec![0u8; 16384];
        let base = sp & !4095;
        for address in sp..sp + 16384 {
            bytes[((address - base) % 16384) as usize] = (address % 251) as u8;
        }
        let copy = StackCopy {
            sp,
            len: 16384,
            bytes: &bytes,
        };
        let expected = |a: u64| u64::from_le_bytes(std::array::from_fn(|i| ((a + i as u64) % 251) as u8));
        assert_eq!(copy.read_u64(sp), Some(expected(sp)));
        let last = sp + 16384 - 8;
        assert_eq!(copy.read_u64(last), Some(expected(last)));
        assert_eq!(copy.read_u64(last + 1), None);
        assert_eq!(copy.read_u64(sp - 8), None);
    }
}
