//! Compiles every `src/bpf/*.bpf.c` with clang into OUT_DIR (BTF kept, DWARF stripped), and
//! records the layout of the structs in `podscope.h` as the C compiler sees it, so a test can
//! check the Rust mirror in `src/abi.rs` field by field.

use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALL_HINT: &str =
    "apt-get install -y clang-19 llvm-19 libbpf-dev (or run scripts/install-deps.sh)";

fn find_tool(env_var: &str, candidates: &[&str]) -> Option<String> {
    if let Ok(explicit) = std::env::var(env_var) {
        return Some(explicit);
    }
    candidates
        .iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|c| c.to_string())
}

fn run(command: &mut Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("podscope-ebpf: cannot run {what}: {e}"));
    if !output.status.success() {
        panic!(
            "podscope-ebpf: {what} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let bpf_dir = manifest.join("src/bpf");
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86",
        Ok("aarch64") => "arm64",
        Ok(other) => {
            panic!("podscope-ebpf: no vmlinux.h for target arch {other} (see ebpf/README.md)")
        }
        Err(_) => "x86",
    };
    let vmlinux_dir = manifest.join(match arch {
        "x86" => "include/x86_64",
        _ => "include/aarch64",
    });

    let Some(clang) = find_tool(
        "CLANG",
        &[
            "clang-19", "clang-18", "clang-17", "clang-16", "clang-15", "clang-14", "clang",
        ],
    ) else {
        panic!("podscope-ebpf: clang not found; install it: {INSTALL_HINT}");
    };
    let Some(strip) = find_tool(
        "LLVM_STRIP",
        &[
            "llvm-strip-19",
            "llvm-strip-18",
            "llvm-strip-17",
            "llvm-strip-16",
            "llvm-strip-15",
            "llvm-strip-14",
            "llvm-strip",
        ],
    ) else {
        panic!("podscope-ebpf: llvm-strip not found; install it: {INSTALL_HINT}");
    };
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists()
        && std::env::var("LIBBPF_INCLUDE").is_err()
    {
        panic!("podscope-ebpf: libbpf headers (bpf/bpf_helpers.h) not found; install them: {INSTALL_HINT}");
    }

    println!("cargo:rerun-if-changed=src/bpf");
    println!("cargo:rerun-if-changed={}", vmlinux_dir.display());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=LLVM_STRIP");

    let mut sources: Vec<PathBuf> = std::fs::read_dir(&bpf_dir)
        .expect("src/bpf")
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    sources.sort();
    for source in &sources {
        let name = source
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace(".bpf.c", ".bpf.o");
        let object = out.join(&name);
        let mut compile = Command::new(&clang);
        compile
            .args(["-g", "-O2", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-D__TARGET_ARCH_{arch}"))
            .arg("-I")
            .arg(&vmlinux_dir)
            .arg("-I")
            .arg(&bpf_dir);
        if let Ok(extra) = std::env::var("LIBBPF_INCLUDE") {
            compile.arg("-I").arg(extra);
        }
        compile.arg("-c").arg(source).arg("-o").arg(&object);
        run(&mut compile, &format!("clang on {}", source.display()));
        // Keeps BTF (needed for CO-RE and maps), drops DWARF (most of the size).
        run(
            Command::new(&strip).arg("-g").arg(&object),
            &format!("llvm-strip on {name}"),
        );
    }

    // The C compiler's view of the ABI structs: compile a host program against the header and
    // run it. Host and BPF agree on these layouts (fixed-size fields, no implicit padding).
    let layout_c = out.join("abi_layout.c");
    std::fs::write(&layout_c, LAYOUT_PROGRAM).unwrap();
    let layout_bin = out.join("abi_layout");
    run(
        Command::new(&clang)
            .arg("-I")
            .arg(&bpf_dir)
            .arg(&layout_c)
            .arg("-o")
            .arg(&layout_bin),
        "clang on the ABI layout program",
    );
    let printed = Command::new(&layout_bin).output().expect("run abi_layout");
    std::fs::write(out.join("abi_layout.txt"), printed.stdout).unwrap();
}

/// Prints `struct field offset size` for every field, and `struct - 0 sizeof` for every struct.
const LAYOUT_PROGRAM: &str = r#"
#include <stddef.h>
#include <stdio.h>
#include <linux/types.h>
#include "podscope.h"
#define S(s) printf("%s - 0 %zu\n", #s, sizeof(struct s))
#define F(s, f) printf("%s %s %zu %zu\n", #s, #f, offsetof(struct s, f), sizeof(((struct s *)0)->f))
int main(void) {
    S(podscope_hist); F(podscope_hist, zero_count); F(podscope_hist, sum); F(podscope_hist, slots);
    S(syscall_key); F(syscall_key, cgroup_id); F(syscall_key, nr); F(syscall_key, _pad);
    S(syscall_counts); F(syscall_counts, count); F(syscall_counts, errors);
    S(open_key); F(open_key, cgroup_id); F(open_key, err); F(open_key, _pad);
    S(open_path_key); F(open_path_key, cgroup_id); F(open_path_key, path);
    S(process_key); F(process_key, cgroup_id); F(process_key, kind); F(process_key, exit_code);
    S(process_event); F(process_event, cgroup_id); F(process_event, timestamp_ns); F(process_event, lifetime_ns);
    F(process_event, kind); F(process_event, pid); F(process_event, ppid); F(process_event, exit_code); F(process_event, comm);
    S(switch_key); F(switch_key, cgroup_id); F(switch_key, kind); F(switch_key, _pad);
    S(block_key); F(block_key, dev); F(block_key, op);
    S(block_stats); F(block_stats, bytes); F(block_stats, latency_ns);
    S(podscope_tcp_key); F(podscope_tcp_key, cgroup_id); F(podscope_tcp_key, peer); F(podscope_tcp_key, server_port);
    F(podscope_tcp_key, family); F(podscope_tcp_key, role); F(podscope_tcp_key, _pad);
    S(podscope_tcp_stats); F(podscope_tcp_stats, opened); F(podscope_tcp_stats, closed); F(podscope_tcp_stats, failed_refused);
    F(podscope_tcp_stats, failed_timeout); F(podscope_tcp_stats, failed_reset); F(podscope_tcp_stats, failed_other);
    F(podscope_tcp_stats, bytes_sent); F(podscope_tcp_stats, bytes_received); F(podscope_tcp_stats, retransmits);
    F(podscope_tcp_stats, duration_ns); F(podscope_tcp_stats, srtt_ns);
    S(uprobe_key); F(uprobe_key, cgroup_id); F(uprobe_key, pid); F(uprobe_key, value_len); F(uprobe_key, value);
    return 0;
}
"#;
