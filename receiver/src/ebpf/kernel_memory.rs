//! What the receiver's maps cost the kernel — `bytes_memlock`, as bpftool shows it, charged to
//! the agent's memory cgroup — computed the way the kernel accounts it, so a node's cost is known
//! before running there: a function of each map's shape, the node's possible CPUs and the entries
//! a map holds. The struct sizes are the kernel's on 6.18 x86_64; a root test
//! (`receiver/tests/ebpf_core.rs`) checks every map of the default config against what the kernel
//! reports here.
//!
//! With each probe's [`Typical`] entries (on its `MapDef`s), [`Node`] figures give a probe's cost
//! on a node of a given size; `docs/metrics.md` lists them.

use std::fmt;

/// A node to size for: possible CPUs (per-CPU maps hold a value for each) and cgroups with data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    pub cpus: u64,
    pub cgroups: u64,
}

/// How many entries a map holds on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Typical {
    /// So many per cgroup with data (keys of a cgroup: its syscall groups, exit codes, …).
    PerCgroup(u32),
    /// So many for the whole node, whatever its cgroups (sockets open, requests in flight).
    PerNode(u32),
    /// All of `max_entries`: arrays, ring buffers, preallocated maps (whatever they hold).
    Full,
}

impl Typical {
    pub fn entries(self, node: Node, max_entries: u32) -> u64 {
        let entries = match self {
            Typical::PerCgroup(n) => n as u64 * node.cgroups,
            Typical::PerNode(n) => n as u64,
            Typical::Full => max_entries as u64,
        };
        entries.min(max_entries as u64)
    }
}

impl fmt::Display for Typical {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Typical::PerCgroup(n) => write!(f, "{n} per cgroup"),
            Typical::PerNode(n) => write!(f, "{n}"),
            Typical::Full => write!(f, "all"),
        }
    }
}

/// The kernel's map types podscope's objects use (`enum bpf_map_type`).
pub const HASH: u32 = 1;
pub const ARRAY: u32 = 2;
pub const PERCPU_HASH: u32 = 5;
pub const PERCPU_ARRAY: u32 = 6;
pub const LRU_HASH: u32 = 9;
pub const RINGBUF: u32 = 27;
pub const TASK_STORAGE: u32 = 29;

const BPF_F_NO_PREALLOC: u32 = 1;
const PAGE: u64 = 4096;
/// `sizeof` of the kernel's structs (6.18, x86_64).
const HTAB: u64 = 960; // struct bpf_htab
const HTAB_BUCKET: u64 = 16; // struct bucket
const HTAB_ELEM: u64 = 48; // struct htab_elem, before its key
const LLIST_NODE: u64 = 8; // each element of a map that is not preallocated
const ARRAY_MAP: u64 = 312; // struct bpf_array
const RINGBUF_MAP: u64 = 304; // struct bpf_ringbuf_map
const RINGBUF_META_PAGES: u64 = 3;
const LOCAL_STORAGE_MAP: u64 = 480; // struct bpf_local_storage_map
const LOCAL_STORAGE_BUCKET: u64 = 16;

/// A map as the kernel created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

fn round8(n: u32) -> u64 {
    (n as u64).div_ceil(8) * 8
}

impl MapShape {
    /// `bytes_memlock` with `cpus` possible CPUs and `entries` held (hash maps not preallocated
    /// cost what they hold; the others their size). `None` for a kind podscope does not use
    /// (a preallocated hash other than LRU, say).
    pub fn bytes(&self, cpus: u64, entries: u64) -> Option<u64> {
        let (key, value) = (round8(self.key_size), round8(self.value_size));
        let max = self.max_entries as u64;
        let buckets = HTAB + HTAB_BUCKET * max.next_power_of_two();
        let preallocated = self.flags & BPF_F_NO_PREALLOC == 0;
        Some(match self.map_type {
            HASH if !preallocated => buckets + entries * (HTAB_ELEM + key + value + LLIST_NODE),
            PERCPU_HASH if !preallocated => {
                // The element holds a pointer to the per-CPU values, kept apart.
                buckets
                    + entries * (HTAB_ELEM + key + 8 + LLIST_NODE + LLIST_NODE + 8 + value * cpus)
            }
            LRU_HASH => buckets + max * (HTAB_ELEM + key + value),
            ARRAY => ARRAY_MAP + max * value,
            PERCPU_ARRAY => ARRAY_MAP + max * 8 + max * value * cpus,
            RINGBUF => {
                let pages = max / PAGE;
                RINGBUF_MAP
                    + (RINGBUF_META_PAGES + pages) * PAGE
                    + (RINGBUF_META_PAGES + 2 * pages) * 8
            }
            // The map and its buckets; each thread's element is charged apart (not in memlock).
            TASK_STORAGE => {
                LOCAL_STORAGE_MAP + LOCAL_STORAGE_BUCKET * cpus.next_power_of_two().max(2)
            }
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Figures the kernel reported for maps made with bpftool on this machine (2 CPUs).
    #[test]
    fn the_formula_gives_what_the_kernel_reported_for_maps_of_each_kind() {
        let shape = |map_type, key_size, value_size, max_entries, flags| MapShape {
            map_type,
            key_size,
            value_size,
            max_entries,
            flags,
        };
        let cases = [
            (shape(HASH, 8, 8, 1024, 1), 0, 17_344),
            (shape(HASH, 8, 8, 1024, 1), 3, 17_560),
            (shape(HASH, 8, 8, 1000, 1), 0, 17_344),
            (shape(PERCPU_HASH, 8, 8, 1024, 1), 3, 17_656),
            (shape(LRU_HASH, 8, 8, 1024, 0), 0, 82_880),
            (shape(ARRAY, 4, 400, 1, 0), 0, 712),
            (shape(PERCPU_ARRAY, 4, 8, 8, 0), 0, 504),
            (shape(RINGBUF, 0, 0, 1 << 20, 0), 0, 1_065_288),
            (shape(RINGBUF, 0, 0, 4096, 0), 0, 16_728),
            (shape(TASK_STORAGE, 4, 8, 0, 1), 0, 512),
        ];
        for (shape, entries, kernel) in cases {
            assert_eq!(shape.bytes(2, entries), Some(kernel), "{shape:?}");
        }
    }

    #[test]
    fn typical_entries_never_exceed_the_maps_size() {
        let node = Node {
            cpus: 64,
            cgroups: 1000,
        };
        assert_eq!(Typical::PerCgroup(8).entries(node, 16384), 8000);
        assert_eq!(Typical::PerCgroup(20).entries(node, 16384), 16384);
        assert_eq!(Typical::PerNode(50).entries(node, 4096), 50);
        assert_eq!(Typical::Full.entries(node, 256), 256);
    }
}
