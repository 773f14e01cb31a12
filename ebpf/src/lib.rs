//! podscope's kernel side: the C eBPF programs in `src/bpf/*.bpf.c` (CO-RE, compiled by
//! `build.rs` with clang and embedded here), and [`abi`], the Rust types generated from
//! `src/bpf/podscope.h`, the one header for everything that crosses the kernel boundary.
//!
//! This crate only carries the programs; loading and attaching them is the eBPF receiver's work.

pub mod abi;

/// One embedded eBPF object per C file, named after it (`process.bpf.c` → `PROCESS`;
/// `BENCH_NOOP` holds do-nothing programs, the cost floors of the benchmarks).
pub mod objects {
    include!(concat!(env!("OUT_DIR"), "/objects.rs"));
}
