//! A user program's maps read as bytes: keys and values of whatever size the object declares,
//! per-CPU values split by CPU. aya's map handles are typed at compile time; a user's layout is
//! only known from its BTF at run time, so the lookups are the `bpf(2)` commands themselves.
//!
//! It must not interpret the bytes: that is `metrics.rs`'s work, with the BTF layouts.

use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};

use aya::maps::{Map, MapData};

/// `BPF_MAP_TYPE_*` of the map kinds user metrics read.
pub const HASH: u32 = 1;
pub const ARRAY: u32 = 2;
pub const PERCPU_HASH: u32 = 5;
pub const PERCPU_ARRAY: u32 = 6;
pub const LRU_HASH: u32 = 9;
pub const LRU_PERCPU_HASH: u32 = 10;

/// The kinds a metric may read, with their names for messages.
pub fn readable_kind(map_type: u32) -> Option<&'static str> {
    Some(match map_type {
        HASH => "hash",
        ARRAY => "array",
        PERCPU_HASH => "per-CPU hash",
        PERCPU_ARRAY => "per-CPU array",
        LRU_HASH => "LRU hash",
        LRU_PERCPU_HASH => "LRU per-CPU hash",
        _ => return None,
    })
}

pub fn per_cpu(map_type: u32) -> bool {
    matches!(map_type, PERCPU_HASH | PERCPU_ARRAY | LRU_PERCPU_HASH)
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The `bpf_attr` of the map element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

/// One map of a loaded user program, readable as bytes.
pub struct RawMap {
    pub name: String,
    pub map_type: u32,
    pub key_size: usize,
    pub value_size: usize,
    /// CPUs a per-CPU value has a slot for (1 for other maps).
    cpus: usize,
    data: MapData,
}

/// One entry: the key, and the value of each CPU (one value for maps that are not per-CPU).
pub struct Entry {
    pub key: Vec<u8>,
    pub values: Vec<Vec<u8>>,
}

impl RawMap {
    /// `map` taken from its loaded object, with its sizes from the object.
    pub fn new(
        name: &str,
        map: Map,
        map_type: u32,
        key_size: usize,
        value_size: usize,
    ) -> Result<RawMap, String> {
        let data = match map {
            Map::Array(m)
            | Map::HashMap(m)
            | Map::LruHashMap(m)
            | Map::PerCpuArray(m)
            | Map::PerCpuHashMap(m)
            | Map::PerCpuLruHashMap(m)
            | Map::Unsupported(m) => m,
            _ => return Err(format!("map {name}: not a kind metrics can read")),
        };
        let cpus = if per_cpu(map_type) {
            aya::util::nr_cpus().map_err(|(path, e)| format!("{path}: {e}"))?
        } else {
            1
        };
        Ok(RawMap {
            name: name.to_string(),
            map_type,
            key_size,
            value_size,
            cpus,
            data,
        })
    }

    fn fd(&self) -> RawFd {
        self.data.fd().as_fd().as_raw_fd()
    }

    /// A per-CPU value holds each CPU's copy at an 8-byte stride.
    fn stride(&self) -> usize {
        if per_cpu(self.map_type) {
            self.value_size.div_ceil(8) * 8
        } else {
            self.value_size
        }
    }

    fn command(&self, cmd: libc::c_long, key: *const u8, value: *mut u8, flags: u64) -> bool {
        let attr = ElemAttr {
            map_fd: self.fd() as u32,
            key: key as u64,
            value_or_next_key: value as u64,
            flags,
            ..ElemAttr::default()
        };
        // SAFETY: `attr` is a valid bpf_attr for the map element commands; `key` points at
        // `key_size` readable bytes (or is null for the first key) and `value` at a buffer of the
        // size the command writes (the next key, or every CPU's value), both alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &attr as *const ElemAttr,
                std::mem::size_of::<ElemAttr>(),
            )
        };
        rc == 0
    }

    /// Every entry now (entries deleted while walking are skipped; an array has all of its).
    pub fn entries(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut key: Option<Vec<u8>> = None;
        let mut next = vec![0u8; self.key_size];
        let mut value = vec![0u8; self.stride() * self.cpus];
        loop {
            let current = key.as_ref().map_or(std::ptr::null(), |k| k.as_ptr());
            if !self.command(BPF_MAP_GET_NEXT_KEY, current, next.as_mut_ptr(), 0) {
                return out;
            }
            if self.command(BPF_MAP_LOOKUP_ELEM, next.as_ptr(), value.as_mut_ptr(), 0) {
                out.push(Entry {
                    key: next.clone(),
                    values: value
                        .chunks(self.stride())
                        .map(|v| v[..self.value_size].to_vec())
                        .collect(),
                });
            }
            key = Some(next.clone());
        }
    }

    /// Removes one entry (of a removed cgroup); false if it was not there.
    pub fn remove(&self, key: &[u8]) -> bool {
        key.len() == self.key_size
            && self.command(BPF_MAP_DELETE_ELEM, key.as_ptr(), std::ptr::null_mut(), 0)
    }

    /// Sets `key` to `value` (one CPU's value; not for per-CPU maps).
    pub fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), String> {
        if key.len() != self.key_size || value.len() != self.value_size || per_cpu(self.map_type) {
            return Err(format!("map {}: key or value of the wrong size", self.name));
        }
        if self.command(
            BPF_MAP_UPDATE_ELEM,
            key.as_ptr(),
            value.as_ptr().cast_mut(),
            0,
        ) {
            Ok(())
        } else {
            Err(format!(
                "map {}: {}",
                self.name,
                std::io::Error::last_os_error()
            ))
        }
    }

    /// The map's kernel id and memory (see [`fdinfo`]).
    pub fn kernel_memory(&self) -> Option<(u32, u64)> {
        fdinfo(self.fd())
    }
}

/// The kernel id and `memlock:` (what bpftool shows as `bytes_memlock`) of a map descriptor.
fn fdinfo(fd: RawFd) -> Option<(u32, u64)> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    let field = |key: &str| -> Option<u64> {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
    };
    Some((field("map_id:")? as u32, field("memlock:")?))
}

fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::PerCpuHashMap(m)
        | Map::PerCpuLruHashMap(m)
        | Map::RingBuf(m)
        | Map::PerfEventArray(m)
        | Map::StackTraceMap(m)
        | Map::Queue(m)
        | Map::Stack(m)
        | Map::BloomFilter(m)
        | Map::LpmTrie(m)
        | Map::Unsupported(m) => Some(m),
        _ => None,
    }
}

/// The kernel id and memory of a map still in its loaded object.
pub fn kernel_identity(map: &Map) -> Option<(u32, u64)> {
    fdinfo(map_data(map)?.fd().as_fd().as_raw_fd())
}
