//! `podscope program check` through the real binary (root: it loads the object): a good object
//! with a spec lists its programs, maps with their BTF layouts and globals, attaches, and prints
//! the exact count its spec makes of a known workload; a bad one fails with the exact error.

use std::process::{Command, Output};

use podscope_integration::bpf::{compile, PREAMBLE};

const COUNTER: &str = r#"
const volatile __u32 watched_tgid = 0;
struct call_key {
    __u32 tgid;
    char comm[16];
};
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, struct call_key);
    __type(value, __u64);
} calls SEC(".maps");

SEC("tracepoint/syscalls/sys_enter_getppid")
int count_getppid(void *ctx)
{
    struct call_key key = { .tgid = bpf_get_current_pid_tgid() >> 32 };
    if (key.tgid != watched_tgid)
        return 0;
    bpf_get_current_comm(&key.comm, sizeof(key.comm));
    __u64 one = 1, *count = bpf_map_lookup_elem(&calls, &key);
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        bpf_map_update_elem(&calls, &key, &one, BPF_NOEXIST);
    return 0;
}
"#;

fn check(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_podscope"))
        .args(["program", "check"])
        .args(args)
        .output()
        .expect("run podscope program check")
}

#[test]
fn check_lists_a_good_object_and_prints_what_its_spec_counts() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "loading eBPF programs needs root"
    );
    let dir = tempfile::tempdir().unwrap();
    let object = compile(dir.path(), "counter", &format!("{PREAMBLE}{COUNTER}"));
    let spec = dir.path().join("program.yaml");
    std::fs::write(
        &spec,
        format!(
            "apiVersion: podscope.dev/v1alpha1\nkind: EbpfProgram\nmetadata: {{name: counter}}\nspec:\n  object: {{configMap: {{namespace: x, name: y, key: z}}}}\n  globals: {{watched_tgid: {}}}\n  metrics:\n    counters:\n      - name: test.getppid\n        map: calls\n        labels:\n          - {{name: process.pid, field: tgid}}\n          - {{name: process.command, field: comm, decoder: string}}\n",
            std::process::id()
        ),
    )
    .unwrap();
    // This test process is the one counted: it calls getppid 5 times while the check waits.
    let caller = std::thread::Builder::new()
        .name("getppid-caller".into())
        .spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            for _ in 0..5 {
                // SAFETY: getppid has no arguments.
                unsafe { libc::syscall(libc::SYS_getppid) };
            }
        })
        .unwrap();
    let output = check(&[
        object.as_os_str(),
        "--spec".as_ref(),
        spec.as_os_str(),
        "--wait".as_ref(),
        "4s".as_ref(),
    ]);
    caller.join().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "  count_getppid  tracepoint/syscalls/sys_enter_getppid  (tracepoint)",
        "  calls  hash  max_entries 64",
        "    key:   struct call_key (20 bytes) { __u32 tgid @0; char[16] comm @4 }",
        "    value: __u64",
        "  watched_tgid (4 bytes)",
        "verified and attached:\n  tracepoint/syscalls/sys_enter_getppid (count_getppid)",
        "  test.getppid (counter of map calls; labels: process.pid (uint), process.command (string))",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing from:\n{stdout}");
    }
    // The thread's name is its comm; the host's cgroup is the resource.
    let points: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("test.getppid{"))
        .collect();
    assert_eq!(
        points,
        [format!(
            "  test.getppid{{process.pid=\"{}\",process.command=\"getppid-caller\"}} 5",
            std::process::id()
        )],
        "{stdout}"
    );
}

#[test]
fn check_gives_the_exact_error_for_a_bad_object() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.o");
    std::fs::write(&garbage, b"\x7fELF but not really").unwrap();
    let output = check(&[garbage.as_os_str()]);
    assert!(!output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "error: not an ELF object: Unknown file magic\n"
    );
    let unknown = compile(
        dir.path(),
        "unknown",
        &format!("{PREAMBLE}SEC(\"kprobe/do_sys_open\") int open(void *ctx) {{ return 0; }}\n"),
    );
    let output = check(&[unknown.as_os_str()]);
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout, "",
        "nothing is listed for an object that cannot be read"
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "error: program open: section \"kprobe/do_sys_open\" is a kprobe program, which podscope does not run for users\n"
    );
}
