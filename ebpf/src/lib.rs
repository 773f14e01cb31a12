//! podscope's kernel side: C eBPF programs (`*.bpf.c`, CO-RE) compiled by `build.rs` and embedded
//! in the binary, and the Rust view of the structs they share with userspace.
//!
//! The programs arrive with the eBPF receiver; until then this crate only holds its place in the
//! workspace.
