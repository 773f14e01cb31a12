//! podscope's kernel side: the C eBPF programs in `src/bpf/*.bpf.c` (CO-RE, compiled by
//! `build.rs` with clang and embedded here), and [`abi`], the Rust mirror of the structs in
//! `src/bpf/podscope.h` that cross the kernel boundary.
//!
//! This crate only carries the programs; loading and attaching them is the eBPF receiver's work.

pub mod abi;

/// One embedded eBPF object per probe.
pub mod objects {
    macro_rules! object {
        ($name:literal) => {
            aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/", $name, ".bpf.o"))
        };
    }

    pub static PROCESS: &[u8] = object!("process");
    pub static SYSCALLS: &[u8] = object!("syscalls");
    pub static FILES: &[u8] = object!("files");
    pub static SCHED: &[u8] = object!("sched");
    pub static BLOCK_IO: &[u8] = object!("block_io");
    pub static UPROBES: &[u8] = object!("uprobes");
    pub static TCP: &[u8] = object!("tcp");
    /// A do-nothing raw_tp program on sys_enter: the cost floor in benchmarks.
    pub static BENCH_NOOP: &[u8] = object!("bench_noop");
}
