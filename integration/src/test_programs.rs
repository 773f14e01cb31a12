//! Programs the profiling tests build from source, with what they are known to do.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A C program whose only hot code is one known call chain: main → outer_loop → middle_step →
/// inner_work → burn_leaf, each a real call (no inlining, no tail calls), until it used argv[1]
/// seconds of CPU (CPU time, not wall time: on a shared machine it gets the same number of
/// samples however busy the machine is).
pub const BURN_C: &str = r#"
#include <stdlib.h>
#include <time.h>
static volatile unsigned long sink;
__attribute__((noinline)) unsigned long burn_leaf(unsigned long n) {
    unsigned long x = n;
    for (unsigned long i = 0; i < 2000000; i++) x = x * 6364136223846793005UL + i;
    sink = x;
    return x;
}
__attribute__((noinline)) unsigned long inner_work(unsigned long n) { return burn_leaf(n) ^ n; }
__attribute__((noinline)) unsigned long middle_step(unsigned long n) { return inner_work(n + 1) + 3; }
__attribute__((noinline)) unsigned long outer_loop(unsigned long n) { return middle_step(n * 2) - 5; }
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 3;
    double start = now();
    unsigned long n = 0;
    while (now() - start < seconds) n += outer_loop(n);
    return (int)(n & 1) * 0;
}
"#;

/// `BURN_C`'s chain, leaf first.
pub const BURN_CHAIN: [&str; 5] = [
    "burn_leaf",
    "inner_work",
    "middle_step",
    "outer_loop",
    "main",
];

/// Compiles C `source` with `flags` into `dir/name` (with the system's `cc`).
pub fn compile_c(dir: &Path, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let out = dir.join(name);
    let status = Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc runs");
    assert!(status.success(), "cc failed on {name}.c");
    out
}

/// [`BURN_C`] built as distributions build (optimized, no frame pointers) into `dir/burn`.
pub fn compile_burn(dir: &Path) -> PathBuf {
    compile_c(dir, "burn", BURN_C, &["-O2", "-fomit-frame-pointer"])
}

/// Blocks in a known chain — main → wait_outer → wait_in_sleep → nanosleep — for argv[1]
/// sleeps of argv[2] ms each, and burns no CPU.
pub const SLEEPER_C: &str = r#"
#include <stdlib.h>
#include <time.h>
__attribute__((noinline)) int wait_in_sleep(long ms) {
    struct timespec t = { ms / 1000, (ms % 1000) * 1000000L };
    int r = nanosleep(&t, 0);
    return r + 1;
}
__attribute__((noinline)) int wait_outer(long ms) { return wait_in_sleep(ms) * 2; }
int main(int argc, char **argv) {
    int sleeps = atoi(argv[1]);
    long ms = atol(argv[2]);
    int sum = 0;
    for (int i = 0; i < sleeps; i++) sum += wait_outer(ms);
    return sum == 0;
}
"#;

/// Whether process `pid` has ended (gone, or a zombie nobody waited for yet).
pub fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

/// CPU time process `pid` used (user + system; a zombie still has it).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the process's stat");
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    // utime and stime are fields 14 and 15 of stat, in clock ticks.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Runs `program args`, failing the test with its stderr if it fails; returns its stdout.
fn run(program: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A copy of `binary` at `out` made as Fedora's `find-debuginfo` makes MiniDebugInfo: all
/// symbol tables stripped, then the function symbols that `.dynsym` lacks kept in an ELF of
/// their own (only symbols, no debug sections), xz-compressed into a `.gnu_debugdata` section.
pub fn with_mini_debug_info(binary: &Path, out: &Path) {
    let dir = out
        .parent()
        .expect("a directory for the intermediate files");
    let names = |args: &[&str]| -> std::collections::BTreeSet<String> {
        let mut all: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        all.push(binary.as_os_str());
        run("nm", &all)
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let name = fields.next()?;
                let kind = fields.next()?;
                matches!(kind, "T" | "t").then(|| name.to_string())
            })
            .collect()
    };
    let dynamic = names(&["-D", "--format=posix", "--defined-only"]);
    let functions = names(&["--format=posix", "--defined-only"]);
    let keep = dir.join("keep_symbols");
    let kept: Vec<String> = functions.difference(&dynamic).cloned().collect();
    std::fs::write(&keep, kept.join("\n") + "\n").unwrap();
    let debug = dir.join("debug");
    let mini = dir.join("mini_debuginfo");
    let os = |p: &Path| p.as_os_str().to_owned();
    let arg = std::ffi::OsStr::new;
    run(
        "objcopy",
        &[arg("--only-keep-debug"), binary.as_os_str(), &os(&debug)],
    );
    let mut keep_arg = std::ffi::OsString::from("--keep-symbols=");
    keep_arg.push(&keep);
    run(
        "objcopy",
        &[
            arg("-S"),
            arg("--remove-section"),
            arg(".gdb_index"),
            arg("--remove-section"),
            arg(".comment"),
            &keep_arg,
            &os(&debug),
            &os(&mini),
        ],
    );
    run("xz", &[arg("-f"), &os(&mini)]);
    let mut xz = mini.into_os_string();
    xz.push(".xz");
    run(
        "strip",
        &[
            arg("--strip-all"),
            arg("-R"),
            arg(".comment"),
            arg("-o"),
            &os(out),
            binary.as_os_str(),
        ],
    );
    let mut section = std::ffi::OsString::from(".gnu_debugdata=");
    section.push(&xz);
    run("objcopy", &[arg("--add-section"), &section, &os(out)]);
}
