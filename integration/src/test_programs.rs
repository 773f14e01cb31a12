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
