//! The http probe's syscall hooks as the real agent chooses them, in a mount namespace of the
//! test's own (root only): tracefs missing is mounted by the agent and the per-syscall
//! tracepoints are used; tracefs that cannot be mounted gives the raw sys_enter/sys_exit hooks.
//! The start-up line says which.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use podscope_integration::agent::free_port;

/// Runs the agent with the http probe under `sh -c "<prepare>; exec podscope …"` in a new
/// mount namespace, and returns its `hooks=` start-up line (or panics with its output).
fn hooks_line(prepare: &str, btf_path: &str) -> String {
    let mut config = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    write!(
        config,
        "receivers:\n  ebpf:\n    btf_path: {btf_path}\n    cgroup_filter:\n      include: [\"/kubepods.slice/**\"]\n    probes:\n      http:\n        tls:\n          enabled: false\n\
         exporters:\n  nop:\n\
         service:\n  telemetry:\n    metrics:\n      address: 127.0.0.1:{}\n  pipelines:\n    traces:\n      receivers: [ebpf]\n      exporters: [nop]\n",
        free_port()
    )
    .unwrap();
    let script = format!(
        "{prepare}; exec {} run --config {} 2>&1",
        env!("CARGO_BIN_EXE_podscope"),
        config.path().display()
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare (util-linux)");
    let stdout = child.stdout.take().unwrap();
    let lines = podscope_integration::lines::lines_of(stdout);
    let mut seen = Vec::new();
    let found = loop {
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains("hooks=") => break Some(line),
            Ok(line) => seen.push(line),
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    found.unwrap_or_else(|| panic!("no hooks line in the agent's output:\n{}", seen.join("\n")))
}

#[test]
fn a_missing_tracefs_is_mounted_and_the_per_syscall_tracepoints_are_used() {
    let line = hooks_line(
        "umount -l /sys/kernel/tracing 2>/dev/null; umount -l /sys/kernel/debug/tracing 2>/dev/null; \
         test ! -d /sys/kernel/tracing/events || exit 3",
        "/sys/kernel/btf/vmlinux",
    );
    assert!(
        line.contains(
            "hooks=per-syscall tracepoints (tracefs mounted by podscope at /sys/kernel/tracing)"
        ),
        "{line}"
    );
}

#[test]
fn a_tracefs_that_cannot_be_mounted_gives_the_raw_syscall_hooks() {
    // The kernel's BTF is hidden with the rest of /sys/kernel: the agent reads a copy.
    let btf = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy("/sys/kernel/btf/vmlinux", btf.path()).unwrap();
    let line = hooks_line(
        "mount -t tmpfs none /sys/kernel",
        &btf.path().display().to_string(),
    );
    assert!(
        line.contains("hooks=raw sys_enter/sys_exit (every syscall runs the probe's number check; tracefs is not mounted and mounting it at /sys/kernel/tracing failed"),
        "{line}"
    );
}
