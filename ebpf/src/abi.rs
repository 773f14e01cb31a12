//! The structs of `src/bpf/podscope.h`, as Rust sees them. `#[repr(C)]`, fixed-size fields,
//! explicit padding: the test below checks size and every field offset against what the C
//! compiler reported for the header at build time, so the two sides cannot drift.

/// Log2 distribution: slot 0 holds the value 1, slot k ≥ 1 holds (2^(k-1), 2^k]; slot k is the
/// OTLP exponential-histogram (scale 0) bucket index k − 1. Zeros are counted apart.
pub const HIST_SLOTS: usize = 48;
pub const PATH_LEN: usize = 128;

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hist {
    pub zero_count: u64,
    pub sum: u64,
    pub slots: [u64; HIST_SLOTS],
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            zero_count: 0,
            sum: 0,
            slots: [0; HIST_SLOTS],
        }
    }
}

impl Hist {
    pub fn count(&self) -> u64 {
        self.zero_count + self.slots.iter().sum::<u64>()
    }

    /// Adds `other`'s counts (per-CPU values are summed this way).
    pub fn merge(&mut self, other: &Hist) {
        self.zero_count += other.zero_count;
        self.sum += other.sum;
        for (a, b) in self.slots.iter_mut().zip(other.slots.iter()) {
            *a += b;
        }
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SyscallKey {
    pub cgroup_id: u64,
    pub nr: u32,
    pub _pad: u32,
}

/// Syscall numbers a per-cgroup count array covers (x86_64 and arm64 stay well below).
pub const SYSCALL_SLOTS: usize = 512;

/// Per cgroup: counts and errors indexed by syscall number.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyscallCounts {
    pub count: [u64; SYSCALL_SLOTS],
    pub errors: [u64; SYSCALL_SLOTS],
}

impl Default for SyscallCounts {
    fn default() -> Self {
        SyscallCounts {
            count: [0; SYSCALL_SLOTS],
            errors: [0; SYSCALL_SLOTS],
        }
    }
}

impl SyscallCounts {
    /// Adds `other` (per-CPU values are summed this way).
    pub fn merge(&mut self, other: &SyscallCounts) {
        for (a, b) in self.count.iter_mut().zip(other.count.iter()) {
            *a += b;
        }
        for (a, b) in self.errors.iter_mut().zip(other.errors.iter()) {
            *a += b;
        }
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct OpenKey {
    pub cgroup_id: u64,
    /// 0 for success, else the errno.
    pub err: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OpenPathKey {
    pub cgroup_id: u64,
    pub path: [u8; PATH_LEN],
}

pub const PROCESS_EXEC: u32 = 1;
pub const PROCESS_FORK: u32 = 2;
pub const PROCESS_EXIT: u32 = 3;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ProcessKey {
    pub cgroup_id: u64,
    pub kind: u32,
    pub exit_code: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessEvent {
    pub cgroup_id: u64,
    pub timestamp_ns: u64,
    pub lifetime_ns: u64,
    pub kind: u32,
    pub pid: u32,
    pub ppid: u32,
    pub exit_code: i32,
    pub comm: [u8; 16],
}

impl ProcessEvent {
    /// Decodes an event from ring-buffer bytes; `None` if too short (never trust the length).
    pub fn from_bytes(bytes: &[u8]) -> Option<ProcessEvent> {
        if bytes.len() < std::mem::size_of::<ProcessEvent>() {
            return None;
        }
        // SAFETY: the length is checked; ProcessEvent is repr(C), made of integers and bytes,
        // valid for any bit pattern; read_unaligned copes with any alignment.
        Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ProcessEvent>()) })
    }

    pub fn comm(&self) -> String {
        let end = self
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.comm.len());
        String::from_utf8_lossy(&self.comm[..end]).into_owned()
    }
}

pub const SWITCH_VOLUNTARY: u32 = 1;
pub const SWITCH_INVOLUNTARY: u32 = 2;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SwitchKey {
    pub cgroup_id: u64,
    pub kind: u32,
    pub _pad: u32,
}

pub const UPROBE_VALUE_LEN: usize = 256;

/// A uprobe hit's key: cgroup, process, captured value (string bytes, or an integer's 8 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UprobeKey {
    pub cgroup_id: u64,
    pub pid: u32,
    pub value_len: u32,
    pub value: [u8; UPROBE_VALUE_LEN],
}

impl UprobeKey {
    /// The captured bytes (never longer than the buffer, whatever `value_len` says).
    pub fn value_bytes(&self) -> &[u8] {
        &self.value[..(self.value_len as usize).min(UPROBE_VALUE_LEN)]
    }
}

pub const TCP_ROLE_CLIENT: u8 = 1;
pub const TCP_ROLE_SERVER: u8 = 2;

/// A TCP connection's aggregation key: the socket's cgroup, the peer, the server port, the role.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TcpKey {
    pub cgroup_id: u64,
    /// IPv4 in the first 4 bytes (network order).
    pub peer: [u8; 16],
    pub server_port: u16,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u8,
    pub role: u8,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpStats {
    pub opened: u64,
    pub closed: u64,
    pub failed_refused: u64,
    pub failed_timeout: u64,
    pub failed_reset: u64,
    pub failed_other: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub retransmits: u64,
    pub duration_ns: Hist,
    pub srtt_ns: Hist,
}

impl TcpStats {
    /// Adds `other` (folding several peers into one `other` series).
    pub fn merge(&mut self, other: &TcpStats) {
        self.opened += other.opened;
        self.closed += other.closed;
        self.failed_refused += other.failed_refused;
        self.failed_timeout += other.failed_timeout;
        self.failed_reset += other.failed_reset;
        self.failed_other += other.failed_other;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.retransmits += other.retransmits;
        self.duration_ns.merge(&other.duration_ns);
        self.srtt_ns.merge(&other.srtt_ns);
    }
}

pub const BLOCK_READ: u32 = 0;
pub const BLOCK_WRITE: u32 = 1;
pub const BLOCK_FLUSH: u32 = 2;
pub const BLOCK_DISCARD: u32 = 3;
pub const BLOCK_OTHER: u32 = 4;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BlockKey {
    /// The kernel's dev_t: major << 20 | minor.
    pub dev: u32,
    pub op: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub bytes: u64,
    pub latency_ns: Hist,
}

// SAFETY: each type is repr(C), has no padding (checked by the layout test) and is valid for any
// bit pattern, which is what aya::Pod requires of map keys and values.
unsafe impl aya::Pod for Hist {}
unsafe impl aya::Pod for SyscallKey {}
unsafe impl aya::Pod for SyscallCounts {}
unsafe impl aya::Pod for OpenKey {}
unsafe impl aya::Pod for OpenPathKey {}
unsafe impl aya::Pod for ProcessKey {}
unsafe impl aya::Pod for ProcessEvent {}
unsafe impl aya::Pod for SwitchKey {}
unsafe impl aya::Pod for BlockKey {}
unsafe impl aya::Pod for UprobeKey {}
unsafe impl aya::Pod for TcpKey {}
unsafe impl aya::Pod for TcpStats {}
unsafe impl aya::Pod for BlockStats {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::mem::{offset_of, size_of};

    /// (struct, field) → (offset, size) as the C compiler saw podscope.h.
    fn c_layout() -> BTreeMap<(String, String), (usize, usize)> {
        include_str!(concat!(env!("OUT_DIR"), "/abi_layout.txt"))
            .lines()
            .map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                (
                    (f[0].to_string(), f[1].to_string()),
                    (f[2].parse().unwrap(), f[3].parse().unwrap()),
                )
            })
            .collect()
    }

    macro_rules! rust_layout {
        ($map:ident, $c:literal, $t:ty, [$($f:ident),*]) => {
            $map.insert(($c.to_string(), "-".to_string()), (0, size_of::<$t>()));
            $(
                let size = {
                    let v = std::mem::MaybeUninit::<$t>::uninit();
                    // SAFETY: only the field's address is taken, nothing is read.
                    let p = unsafe { std::ptr::addr_of!((*v.as_ptr()).$f) };
                    fn size_of_pointee<T>(_: *const T) -> usize { size_of::<T>() }
                    size_of_pointee(p)
                };
                $map.insert(($c.to_string(), stringify!($f).to_string()), (offset_of!($t, $f), size));
            )*
        };
    }

    #[test]
    fn rust_structs_match_the_c_header_field_by_field() {
        let mut rust = BTreeMap::new();
        rust_layout!(rust, "podscope_hist", Hist, [zero_count, sum, slots]);
        rust_layout!(rust, "syscall_key", SyscallKey, [cgroup_id, nr, _pad]);
        rust_layout!(rust, "syscall_counts", SyscallCounts, [count, errors]);
        rust_layout!(rust, "open_key", OpenKey, [cgroup_id, err, _pad]);
        rust_layout!(rust, "open_path_key", OpenPathKey, [cgroup_id, path]);
        rust_layout!(
            rust,
            "process_key",
            ProcessKey,
            [cgroup_id, kind, exit_code]
        );
        rust_layout!(
            rust,
            "process_event",
            ProcessEvent,
            [
                cgroup_id,
                timestamp_ns,
                lifetime_ns,
                kind,
                pid,
                ppid,
                exit_code,
                comm
            ]
        );
        rust_layout!(rust, "switch_key", SwitchKey, [cgroup_id, kind, _pad]);
        rust_layout!(rust, "block_key", BlockKey, [dev, op]);
        rust_layout!(
            rust,
            "podscope_tcp_key",
            TcpKey,
            [cgroup_id, peer, server_port, family, role, _pad]
        );
        rust_layout!(
            rust,
            "podscope_tcp_stats",
            TcpStats,
            [
                opened,
                closed,
                failed_refused,
                failed_timeout,
                failed_reset,
                failed_other,
                bytes_sent,
                bytes_received,
                retransmits,
                duration_ns,
                srtt_ns
            ]
        );
        rust_layout!(
            rust,
            "uprobe_key",
            UprobeKey,
            [cgroup_id, pid, value_len, value]
        );
        rust_layout!(rust, "block_stats", BlockStats, [bytes, latency_ns]);
        assert_eq!(rust, c_layout());
    }

    #[test]
    fn events_decode_from_bytes_and_short_input_is_refused() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&42u64.to_ne_bytes()); // cgroup_id
        bytes.extend_from_slice(&7u64.to_ne_bytes()); // timestamp_ns
        bytes.extend_from_slice(&1_000u64.to_ne_bytes()); // lifetime_ns
        bytes.extend_from_slice(&PROCESS_EXIT.to_ne_bytes());
        bytes.extend_from_slice(&1234u32.to_ne_bytes()); // pid
        bytes.extend_from_slice(&1u32.to_ne_bytes()); // ppid
        bytes.extend_from_slice(&3i32.to_ne_bytes()); // exit_code
        bytes.extend_from_slice(b"bash\0\0\0\0\0\0\0\0\0\0\0\0");
        let e = ProcessEvent::from_bytes(&bytes).unwrap();
        assert_eq!(
            (e.cgroup_id, e.kind, e.pid, e.ppid, e.exit_code),
            (42, PROCESS_EXIT, 1234, 1, 3)
        );
        assert_eq!(e.lifetime_ns, 1_000);
        assert_eq!(e.comm(), "bash");
        assert!(ProcessEvent::from_bytes(&bytes[..bytes.len() - 1]).is_none());
    }
}
