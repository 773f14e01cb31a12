//! eBPF objects for tests, built as a user builds one: C compiled with clang
//! (`clang -g -O2 -target bpf`), against the repository's `vmlinux.h` and libbpf's headers.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What every test program starts with: kernel types, libbpf's helpers and a license the
/// kernel accepts GPL-only helpers under.
pub const PREAMBLE: &str = r#"
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
char LICENSE[] SEC("license") = "Dual BSD/GPL";
"#;

/// Compiles `source` into `dir/<name>.bpf.o` and returns its path; fails the test with clang's
/// message if it does not compile.
pub fn compile(dir: &Path, name: &str, source: &str) -> PathBuf {
    let clang = ["clang-19", "clang-18", "clang-17", "clang-16", "clang"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("clang (scripts/install-deps.sh installs clang-19)");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf/include/x86_64");
    let c = dir.join(format!("{name}.bpf.c"));
    let object = dir.join(format!("{name}.bpf.o"));
    std::fs::write(&c, source).expect("write the C source");
    let output = Command::new(clang)
        .args([
            "-g",
            "-O2",
            "-target",
            "bpf",
            "-D__TARGET_ARCH_x86",
            "-Wall",
            "-I",
        ])
        .arg(&include)
        .arg("-c")
        .arg(&c)
        .arg("-o")
        .arg(&object)
        .output()
        .expect("run clang");
    assert!(
        output.status.success(),
        "clang {name}.bpf.c: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    object
}
