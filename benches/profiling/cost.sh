#!/bin/bash
# The profiling probe's cost to the profiled program, measured in CPU time (meaningful on a
# loaded machine, unlike wall time): a C program does a fixed amount of work (BURN_C's chain,
# N calls) and reports the CPU seconds it used; runs without a profiler and under
# `podscope profile --pid` at 19 and 99 Hz are interleaved, ROUNDS each. The kernel's own cost
# per sample comes from bpf_stats (run_time_ns of this profiler's perf_event program over the
# samples it recorded).
#
# Usage (root): benches/profiling/cost.sh [PODSCOPE_BINARY] [ROUNDS] [CALLS]
# Prints one line per run: hz, the program's CPU seconds, samples, kernel ns per sample, runs.
set -euo pipefail
BIN=${1:-target/release/podscope}
ROUNDS=${2:-5}
CALLS=${3:-4000}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"; sysctl -q kernel.bpf_stats_enabled=0' EXIT
cat > "$WORK/work.c" <<'C'
#include <stdio.h>
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
int main(int argc, char **argv) {
    long calls = atol(argv[1]);
    unsigned long n = 0;
    for (long i = 0; i < calls; i++) n += outer_loop(n);
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    printf("%.6f\n", t.tv_sec + t.tv_nsec / 1e9);
    return (int)(n & 1) * 0;
}
C
cc -O2 -fomit-frame-pointer -o "$WORK/work" "$WORK/work.c"
sysctl -q kernel.bpf_stats_enabled=1

# One run: prints "cpu_seconds samples kernel_ns_per_sample" (samples and ns empty without a profiler).
run() {
    local hz=$1
    if [ "$hz" = 0 ]; then
        echo "$("$WORK/work" "$CALLS")"
        return
    fi
    # The program waits a moment (same pid after exec) so the profiler is attached before it works.
    # The perf_event programs loaded before this profiler (other agents'): not counted.
    local before
    before=$(bpftool prog show -j 2>/dev/null | python3 -c '
import json, sys
print(" ".join(str(p["id"]) for p in json.load(sys.stdin) if p.get("type") == "perf_event"))')
    sh -c "sleep 1; exec $WORK/work $CALLS > $WORK/out" &
    local pid=$!
    "$BIN" profile --pid "$pid" --frequency "$hz" --duration 600s -o "$WORK/p.folded" \
        > "$WORK/summary" 2> "$WORK/progress" &
    local prof=$!
    local stats=""
    while kill -0 "$pid" 2>/dev/null; do
        # This profiler's perf_event program only: the one loaded since it started.
        stats=$(bpftool prog show -j 2>/dev/null | python3 -c '
import json, sys
before = set(sys.argv[1].split())
for p in json.load(sys.stdin):
    if p.get("type") == "perf_event" and p.get("name", "").startswith("podscope_profil") and str(p["id"]) not in before:
        print(p.get("run_time_ns", 0), p.get("run_cnt", 0))
' "$before" || true)
        sleep 0.2
    done
    wait "$pid" || true
    wait "$prof"
    local cpu samples
    cpu=$(cat "$WORK/out")
    samples=$(awk '{s += $NF} END {print s}' "$WORK/p.folded")
    read -r ns cnt <<< "${stats:-0 0}"
    # Kernel time per recorded sample: every run of the program (also the ones that skip a
    # thread outside the target) divided by the samples it recorded.
    local per=""
    [ "${samples:-0}" -gt 0 ] && per=$((ns / samples))
    echo "$cpu $samples $per $cnt"
}

echo "# load: $(uptime)"
echo "# rounds=$ROUNDS calls=$CALLS binary=$BIN"
echo "hz cpu_seconds samples kernel_ns_per_sample program_runs"
for r in $(seq "$ROUNDS"); do
    for hz in 0 19 99; do
        echo "$hz $(run $hz)"
    done
done
echo "# load: $(uptime)"
