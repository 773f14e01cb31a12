//! Compiles every `src/bpf/*.bpf.c` with clang into OUT_DIR (BTF kept, DWARF stripped) and lists
//! them in `objects.rs` (one embedded object per C file), and generates the Rust types of
//! `src/bpf/podscope.h` with bindgen into `abi.rs`: structs, `#define` constants and enum
//! constants, so the header is the only place they are written.

use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALL_HINT: &str =
    "apt-get install -y clang-19 llvm-19 libbpf-dev libclang-19-dev (or run scripts/install-deps.sh)";

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
    // Only x86_64 has what the programs need: a vmlinux.h, and the syscall-argument register
    // access (`PODSCOPE_SYSCALL_*` in podscope.h) written for its `struct pt_regs`.
    let target_arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap();
    if target_arch != "x86_64" {
        panic!(
            "podscope-ebpf: target arch {target_arch} is not supported yet: it needs ebpf/include/{target_arch}/vmlinux.h and the syscall-argument register access (PODSCOPE_SYSCALL_* in ebpf/src/bpf/podscope.h) for {target_arch}"
        );
    }
    let vmlinux_dir = manifest.join("include/x86_64");

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
    println!("cargo:rerun-if-env-changed=LIBBPF_INCLUDE");

    let mut sources: Vec<PathBuf> = std::fs::read_dir(&bpf_dir)
        .expect("src/bpf")
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    sources.sort();
    let mut objects = String::new();
    for source in &sources {
        let stem = source
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".bpf.c")
            .to_string();
        let object = out.join(format!("{stem}.bpf.o"));
        let mut compile = Command::new(&clang);
        compile
            .args(["-g", "-O2", "-target", "bpf", "-Wall", "-Werror"])
            .arg("-D__TARGET_ARCH_x86")
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
            &format!("llvm-strip on {stem}.bpf.o"),
        );
        objects.push_str(&format!(
            "/// `src/bpf/{stem}.bpf.c`, compiled.\npub static {}: &[u8] = aya::include_bytes_aligned!(concat!(env!(\"OUT_DIR\"), \"/{stem}.bpf.o\"));\n",
            stem.to_uppercase()
        ));
    }
    std::fs::write(out.join("objects.rs"), objects).unwrap();

    // The header as the host compiler sees it (`__BPF__` unset, so only the shared types): the
    // same layouts as for the BPF target, as both are 64-bit little-endian with the same
    // alignment rules, and the header has fixed-size fields and no implicit padding.
    let bindings = bindgen::Builder::default()
        .header_contents(
            "podscope_abi.h",
            "#include <linux/types.h>\n#include \"podscope.h\"\n",
        )
        .clang_arg(format!("-I{}", bpf_dir.display()))
        .allowlist_file(".*/podscope\\.h")
        .prepend_enum_name(false)
        .derive_default(true)
        .derive_eq(true)
        .derive_hash(true)
        .generate()
        .unwrap_or_else(|e| panic!("podscope-ebpf: bindgen on src/bpf/podscope.h failed: {e}"));
    bindings
        .write_to_file(out.join("abi.rs"))
        .expect("write abi.rs");
}
