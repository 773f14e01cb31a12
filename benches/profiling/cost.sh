#!/bin/bash
# The profiling probe's costs, paired in one run (issue 13 points 2 and 7). Figures are CPU time
# (getrusage of the process: what contention disturbs least) and bpf_stats (run_time_ns /
# run_cnt per program, with kernel.bpf_stats_enabled=1 restored afterwards), rows interleaved
# round by round, so a loaded machine shifts every row alike.
#
# Sections (each prints its own table; `# ` lines are context):
#   oncpu   a C program does a fixed amount of work (BURN_C's chain, CALLS calls) and reports the
#           CPU seconds it used: without a profiler, under `podscope profile --pid` at 19 and 99
#           Hz, and under bpftrace `profile:hz:19 /pid == P/ { @[ustack, kstack] = count(); }`
#           (the peer). Per row also: samples, kernel ns per recorded sample (bpf_stats of the
#           row's perf_event program over the samples it recorded), the profiler's own CPU
#           seconds and peak RSS (GNU time). The agent's CPU per sample is the 99 Hz row minus
#           the 19 Hz row of the same round, over their difference in samples (start-up cancels).
#   depth   a recursion of known frame size to depths 32..1024, profiled at 99 Hz: the frames
#           unwound and whether `main` was reached (the 16 KiB stack copy limit).
#   large   clang-19 (129 MB libLLVM) compiling a generated file, profiled 4 s at 99 Hz while it
#           runs: the profiler's peak RSS against the same for the small program
#           (symbol_cache_bytes, 64 MiB), and how many frames got no name.
#   kmem    the kernel memory of one profiler's maps (bytes_memlock), on-CPU and with --off-cpu,
#           against docs/metrics.md's formula.
#   offcpu  two processes ping-pong a byte over pipes (every round trip two context switches
#           and four syscalls): without anything, with no-op tp_btf programs on sched_switch and
#           sys_exit (the floor, loaded with libbpf from bench_noop.bpf.o), and under
#           `podscope profile --off-cpu --pid` (one end observed, the other not): ns per round
#           trip (CPU time of both ends), ns per run of each program (bpf_stats).
#
# Usage (root): benches/profiling/cost.sh [PODSCOPE_BINARY] [ROUNDS] [CALLS] [SECTIONS]
#   SECTIONS: comma-separated, default oncpu,depth,large,kmem,offcpu
set -euo pipefail
BIN=$(realpath "${1:-target/release/podscope}")
ROUNDS=${2:-3}
CALLS=${3:-2000}
SECTIONS=${4:-oncpu,depth,large,kmem,offcpu}
PY=/usr/bin/python3
WORK=$(mktemp -d)
STATS_BEFORE=$(sysctl -n kernel.bpf_stats_enabled)
cleanup() {
    [ -n "${NOOP_PID:-}" ] && kill "$NOOP_PID" 2>/dev/null || true
    rm -rf "$WORK"
    sysctl -q kernel.bpf_stats_enabled="$STATS_BEFORE"
}
trap cleanup EXIT
sysctl -q kernel.bpf_stats_enabled=1
want() { [[ ",$SECTIONS," == *",$1,"* ]]; }

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

# Ids of the loaded programs of `type` (to tell the ones a run loads from those before it).
prog_ids() {
    bpftool prog show -j 2>/dev/null | $PY -c '
import json, sys
print(" ".join(str(p["id"]) for p in json.load(sys.stdin) if p.get("type") == sys.argv[1]))' "$1"
}

# "run_time_ns run_cnt" summed over the programs process $1 holds (its fds: other engineers'
# programs of the same name are not counted) whose name starts with $2 (any when empty).
owned_stats() {
    local ids=""
    for info in /proc/"$1"/fdinfo/*; do
        ids="$ids $(sed -n 's/^prog_id:\s*//p' "$info" 2>/dev/null)"
    done
    bpftool prog show -j 2>/dev/null | $PY -c '
import json, sys
ids = set(sys.argv[1].split())
ns = cnt = 0
for p in json.load(sys.stdin):
    if str(p["id"]) in ids and p.get("name", "").startswith(sys.argv[2]):
        ns += p.get("run_time_ns", 0)
        cnt += p.get("run_cnt", 0)
print(ns, cnt)' "$ids" "${2:-}"
}

# Polls owned_stats of process $1 for each name prefix $3... every 0.2 s while process $2
# lives; prints the last reading ("ns cnt" per prefix), as the holder may exit right after.
stats_until_exit() {
    local holder=$1 target=$2
    shift 2
    local last="" now prefix
    while :; do
        now=""
        for prefix in "$@"; do now="$now $(owned_stats "$holder" "$prefix")"; done
        [[ "$now" == *[1-9]* ]] && last=$now
        kill -0 "$target" 2>/dev/null && [ "$(cut -d' ' -f3 /proc/"$target"/stat 2>/dev/null)" != Z ] || break
        sleep 0.2
    done
    echo "${last:-$(for prefix in "$@"; do printf '0 0 '; done)}"
}

# Waits until process $1 has exec'd into $2 (its /proc/P/exe).
wait_exec() {
    local deadline=$((SECONDS + 30))
    until [ "$(readlink "/proc/$1/exe" 2>/dev/null)" = "$2" ]; do
        [ $SECONDS -lt $deadline ] || { echo "process $1 did not exec $2" >&2; exit 1; }
        sleep 0.01
    done
}

# Starts `podscope profile` on pid $1 at $2 Hz (extra args after), output $WORK/p.folded, under
# GNU time (CPU and peak RSS in $WORK/time); returns once it is attached (its first progress
# line: `podscope profile` prints it after its programs are attached).
start_profiler() {
    local pid=$1 hz=$2
    shift 2
    : > "$WORK/progress"
    /usr/bin/time -o "$WORK/time" -f "%U %S %M" \
        "$BIN" profile --pid "$pid" --frequency "$hz" --duration 600s "$@" -o "$WORK/p.folded" \
        > "$WORK/summary" 2> "$WORK/progress" &
    PROF=$!
    local deadline=$((SECONDS + 60))
    until grep -q recording "$WORK/progress"; do
        kill -0 "$PROF" 2>/dev/null || { cat "$WORK/progress" >&2; exit 1; }
        [ $SECONDS -lt $deadline ] || { echo "the profiler did not start" >&2; exit 1; }
        sleep 0.05
    done
}

# --- oncpu -------------------------------------------------------------------------------
# One run: prints "cpu_seconds samples kernel_ns_per_sample program_runs agent_cpu agent_rss_kb".
oncpu_run() {
    local hz=$1
    if [ "$hz" = 0 ]; then
        echo "$("$WORK/work" "$CALLS") - - - - -"
        return
    fi
    # The program waits on a fifo (same pid after exec) until the profiler is attached.
    rm -f "$WORK/go"
    mkfifo "$WORK/go"
    sh -c "read x < $WORK/go; exec $WORK/work $CALLS > $WORK/out" &
    local pid=$!
    local stats samples
    if [ "$hz" = bt19 ]; then
        local before
        before=$(prog_ids perf_event)
        /usr/bin/time -o "$WORK/time" -f "%U %S %M" \
            bpftrace -q -o "$WORK/bt.out" -e "profile:hz:19 /pid == $pid/ { @[ustack, kstack] = count(); }" \
            > /dev/null 2>&1 &
        local timer=$!
        local deadline=$((SECONDS + 60))
        # Attached once its program has run (loaded is not enough).
        until [ "$(bpftool prog show -j 2>/dev/null | $PY -c '
import json, sys
before = set(sys.argv[1].split())
print(sum(p.get("run_cnt", 0) for p in json.load(sys.stdin)
          if p.get("type") == "perf_event" and str(p["id"]) not in before))' "$before")" -gt 0 ]; do
            [ $SECONDS -lt $deadline ] || { echo "bpftrace did not attach" >&2; exit 1; }
            sleep 0.05
        done
        local tracer
        tracer=$(pgrep -P "$timer" bpftrace)
        echo go > "$WORK/go"
        # bpftrace's programs: its profile program (and none other here).
        stats=$(stats_until_exit "$tracer" "$pid" "")
        wait "$pid" || true
        kill -INT "$tracer" 2>/dev/null || true
        wait "$timer" || true
        # Samples: the counts of every stack in @.
        samples=$($PY -c '
import re, sys
total = 0
for line in open(sys.argv[1]):
    m = re.search(r"\]:\s*(\d+)$", line.strip())
    if m: total += int(m.group(1))
print(total)' "$WORK/bt.out")
    else
        start_profiler "$pid" "$hz"
        echo go > "$WORK/go"
        stats=$(stats_until_exit "$(pgrep -P "$PROF")" "$pid" podscope_profile_cpu)
        wait "$pid" || true
        wait "$PROF"
        samples=$(awk '{s += $NF} END {print s + 0}' "$WORK/p.folded")
    fi
    local ns cnt per=""
    read -r ns cnt <<< "${stats:-0 0}"
    [ "${samples:-0}" -gt 0 ] && per=$((ns / samples))
    local user sys rss
    read -r user sys rss < "$WORK/time"
    echo "$(cat "$WORK/out") $samples ${per:--} $cnt $($PY -c "print(round($user + $sys, 2))") $rss"
}

if want oncpu; then
    echo "## oncpu: rounds=$ROUNDS calls=$CALLS binary=$BIN"
    echo "# load: $(uptime)"
    echo "round row program_cpu_s samples kernel_ns_per_sample program_runs profiler_cpu_s profiler_peak_rss_kb"
    for r in $(seq "$ROUNDS"); do
        for hz in 0 19 99 999 bt19; do
            echo "$r $hz $(oncpu_run $hz)"
        done
    done
    echo "# load: $(uptime)"
fi

# --- depth -------------------------------------------------------------------------------
if want depth; then
    cat > "$WORK/deep.c" <<'C'
#include <stdlib.h>
static volatile unsigned long sink;
/* 256 bytes of frame per level (the array), so depth × 256 B of stack above the leaf. */
__attribute__((noinline)) unsigned long deep_leaf(unsigned long n) {
    unsigned long x = n;
    for (unsigned long i = 0; i < 600000000UL; i++) x = x * 6364136223846793005UL + i;
    return x;
}
__attribute__((noinline)) unsigned long recurse(int depth, unsigned long n) {
    volatile unsigned char pad[240];
    pad[depth & 7] = (unsigned char)n;
    unsigned long r = depth ? recurse(depth - 1, n + pad[depth & 7]) : deep_leaf(n);
    sink = r;
    return r + pad[0];
}
int main(int argc, char **argv) { return (int)(recurse(atoi(argv[1]), 1) & 0); }
C
    cc -O2 -fomit-frame-pointer -o "$WORK/deep" "$WORK/deep.c"
    echo "## depth: frames of recurse() unwound per sample vs depth (16 KiB stack copy)"
    echo "depth stack_bytes_above_leaf samples recurse_frames_min recurse_frames_max samples_reaching_main"
    for depth in 16 32 48 56 64 128 512; do
        rm -f "$WORK/go"
        mkfifo "$WORK/go"
        sh -c "read x < $WORK/go; exec $WORK/deep $depth" &
        pid=$!
        start_profiler "$pid" 99
        echo go > "$WORK/go"
        wait "$pid" || true
        wait "$PROF"
        # Only the samples in the leaf: their stack is the whole recursion.
        $PY - "$WORK/p.folded" "$depth" <<'PY'
import sys
frames = []
reaching = total = 0
for line in open(sys.argv[1]):
    stack, count = line.rsplit(" ", 1)
    names = stack.split(";")
    if names[-1] != "deep_leaf":
        continue
    count = int(count)
    total += count
    frames.append(names.count("recurse"))
    if "main" in names:
        reaching += count
depth = int(sys.argv[2])
print(depth, (depth + 1) * 256, total, min(frames or [0]), max(frames or [0]), reaching)
PY
    done
fi

# --- large -------------------------------------------------------------------------------
if want large; then
    # A file clang-19 takes well over 4 s on at -O2: its time goes to libLLVM and libclang-cpp.
    $PY - > "$WORK/big.c" <<'PY'
for i in range(4500):
    print(f"int f{i}(int *a, int n) {{ int s = 0; for (int j = 0; j < n; j++) s += a[j] * {i} + (a[j] >> 3); return s; }}")
PY
    echo "## large: profiler peak RSS profiling clang-19 (libLLVM.so.19.1 $(stat -c %s /usr/lib/x86_64-linux-gnu/libLLVM.so.19.1) bytes) vs the small program, 4 s at 99 Hz each, the target running before and after"
    echo "target samples distinct_stacks frames frames_unnamed profiler_cpu_s profiler_peak_rss_kb"
    for target in small clang small clang; do
        if [ $target = small ]; then
            "$WORK/work" 100000 > /dev/null &
        else
            clang-19 -O2 -c -o "$WORK/big.o" "$WORK/big.c" &
        fi
        pid=$!
        /usr/bin/time -o "$WORK/time" -f "%U %S %M" \
            "$BIN" profile --pid "$pid" --frequency 99 --duration 4s -o "$WORK/p.folded" \
            > /dev/null 2>&1
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        read -r user sys rss < "$WORK/time"
        stats=$($PY - "$WORK/p.folded" <<'PY'
import re, sys
samples = stacks = frames = unnamed = 0
for line in open(sys.argv[1]):
    stack, count = line.rsplit(" ", 1)
    samples += int(count); stacks += 1
    names = stack.split(";")[1:]
    frames += len(names)
    unnamed += sum(1 for f in names if re.search(r"\+0x[0-9a-f]+$", f))
print(samples, stacks, frames, unnamed)
PY
)
        echo "$target $stats $($PY -c "print(round($user + $sys, 2))") $rss"
    done
fi

# --- kmem --------------------------------------------------------------------------------
if want kmem; then
    CPUS=$($PY -c 'import os; print(len(os.sched_getaffinity(0)))')
    POSSIBLE=$(cat /sys/devices/system/cpu/possible)
    echo "## kmem: one profiler's maps (bytes_memlock) vs docs/metrics.md's formula; possible CPUs $POSSIBLE"
    for mode in on_cpu off_cpu; do
        sleep_pid=""
        sh -c "exec sleep 30" &
        sleep_pid=$!
        before_maps=$(bpftool map show -j | $PY -c 'import json,sys; print(" ".join(str(m["id"]) for m in json.load(sys.stdin)))')
        extra=()
        [ $mode = off_cpu ] && extra=(--off-cpu)
        start_profiler "$sleep_pid" 19 "${extra[@]}"
        bpftool map show -j > "$WORK/maps.json"
        $PY - "$before_maps" "$POSSIBLE" "$mode" "$WORK/maps.json" <<'PY'
import json, sys
before = set(sys.argv[1].split())
lo, _, hi = sys.argv[2].partition("-")
cpus = int(hi or lo) + 1
def up8(n): return (n + 7) // 8 * 8
def pow2(n):
    p = 1
    while p < n: p *= 2
    return p
def formula(m):
    t, k, v, n = m["type"], up8(m.get("bytes_key", 0)), up8(m.get("bytes_value", 0)), m["max_entries"]
    if t == "hash": return 960 + 16 * pow2(n)           # empty (not preallocated)
    if t == "array": return 312 + n * v
    if t == "percpu_array": return 312 + n * (8 + v * cpus)
    if t == "ringbuf":
        pages = n // 4096
        return 304 + (3 + pages) * 4096 + (3 + 2 * pages) * 8
    if t == "task_storage": return 480 + 16 * max(2, pow2(cpus))
    return None
total = total_f = 0
print(f"# {sys.argv[3]}: map type max_entries bytes_memlock formula")
for m in json.load(open(sys.argv[4])):
    if str(m["id"]) in before: continue
    f = formula(m)
    total += m.get("bytes_memlock", 0); total_f += f or 0
    print(f"{m.get('name')} {m['type']} {m['max_entries']} {m.get('bytes_memlock')} {f}")
print(f"total {total} formula {total_f}")
PY
        kill "$sleep_pid" 2>/dev/null || true
        wait "$sleep_pid" 2>/dev/null || true
        wait "$PROF" || true
    done
fi

# --- offcpu ------------------------------------------------------------------------------
if want offcpu; then
    cat > "$WORK/pingpong.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
/* Parent and child bounce one byte N times; prints the CPU seconds of both (getrusage). */
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    int ping[2], pong[2];
    char b = 0;
    if (pipe(ping) || pipe(pong)) return 1;
    /* Waits for a line on stdin so that a profiler can attach first (same pid). */
    if (getchar() == EOF) return 1;
    pid_t child = fork();
    if (child == 0) {
        for (long i = 0; i < n; i++) {
            if (read(ping[0], &b, 1) != 1 || write(pong[1], &b, 1) != 1) _exit(1);
        }
        _exit(0);
    }
    for (long i = 0; i < n; i++) {
        if (write(ping[1], &b, 1) != 1 || read(pong[0], &b, 1) != 1) return 1;
    }
    waitpid(child, 0, 0);
    struct rusage self, kids;
    getrusage(RUSAGE_SELF, &self);
    getrusage(RUSAGE_CHILDREN, &kids);
    double s = self.ru_utime.tv_sec + self.ru_stime.tv_sec + kids.ru_utime.tv_sec + kids.ru_stime.tv_sec
        + (self.ru_utime.tv_usec + self.ru_stime.tv_usec + kids.ru_utime.tv_usec + kids.ru_stime.tv_usec) / 1e6;
    printf("%.6f\n", s);
    return 0;
}
C
    cc -O2 -o "$WORK/pingpong" "$WORK/pingpong.c"
    cat > "$WORK/noop_loader.c" <<'C'
#include <bpf/libbpf.h>
#include <stdio.h>
#include <unistd.h>
/* Loads argv[1] and attaches the programs named after it; prints "ready"; waits to be killed. */
int main(int argc, char **argv) {
    struct bpf_object *obj = bpf_object__open_file(argv[1], NULL);
    if (!obj || bpf_object__load(obj)) return 1;
    for (int i = 2; i < argc; i++) {
        struct bpf_program *p = bpf_object__find_program_by_name(obj, argv[i]);
        if (!p || !bpf_program__attach(p)) { fprintf(stderr, "cannot attach %s\n", argv[i]); return 2; }
    }
    printf("ready\n");
    fflush(stdout);
    pause();
    return 0;
}
C
    cc -O2 -o "$WORK/noop_loader" "$WORK/noop_loader.c" -lbpf
    NOOP_OBJ=$(ls -t target/*/build/podscope-ebpf-*/out/bench_noop.bpf.o 2>/dev/null | head -1)
    [ -n "$NOOP_OBJ" ] || { echo "no bench_noop.bpf.o under target/: build podscope-ebpf first" >&2; exit 1; }
    TRIPS=${TRIPS:-200000}
    echo "## offcpu: $TRIPS round trips (2 context switches, 4 syscalls each); off_cpu_min_block 1ms (default)"
    echo "# load: $(uptime)"
    echo "round row cpu_ns_per_round_trip switch_ns_per_run switch_runs sys_exit_ns_per_run sys_exit_runs"
    for r in $(seq "$ROUNDS"); do
        for row in none noop offcpu; do
            rm -f "$WORK/go"
            mkfifo "$WORK/go"
            sh -c "exec $WORK/pingpong $TRIPS < $WORK/go > $WORK/out" &
            pid=$!
            # Keep the fifo's write end open until the go line is written.
            exec 7<> "$WORK/go"
            wait_exec "$pid" "$WORK/pingpong"
            sw="- -" se="- -"
            case $row in
            none)
                echo go >&7; exec 7>&-
                wait "$pid"
                ;;
            noop)
                "$WORK/noop_loader" "$NOOP_OBJ" podscope_bench_noop_switch podscope_bench_noop_btf > "$WORK/noop.out" &
                NOOP_PID=$!
                until grep -q ready "$WORK/noop.out" 2>/dev/null; do
                    kill -0 "$NOOP_PID" || { echo "the no-op loader failed" >&2; exit 1; }
                    sleep 0.05
                done
                echo go >&7; exec 7>&-
                wait "$pid"
                sw=$(owned_stats "$NOOP_PID" podscope_bench_noop_switch)
                se=$(owned_stats "$NOOP_PID" podscope_bench_noop_btf)
                kill "$NOOP_PID"; wait "$NOOP_PID" 2>/dev/null || true
                NOOP_PID=""
                ;;
            offcpu)
                start_profiler "$pid" 19 --off-cpu
                echo go >&7; exec 7>&-
                # Read at the end while the profiler still holds its programs: the ping-pong's
                # parent waits for its child, so poll until it is gone.
                read -r a b c d <<< "$(stats_until_exit "$(pgrep -P "$PROF")" "$pid" \
                    podscope_profile_switch podscope_profile_sys_exit)"
                sw="$a $b" se="$c $d"
                wait "$pid"
                wait "$PROF" || true
                ;;
            esac
            $PY - "$r" "$row" "$(cat "$WORK/out")" "$TRIPS" $sw $se <<'PY'
import sys
r, row, cpu, trips = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
rest = sys.argv[5:]
def per(ns, cnt):
    return "-" if ns == "-" or int(cnt) == 0 else f"{int(ns) / int(cnt):.0f}"
print(r, row, f"{cpu / trips * 1e9:.0f}", per(rest[0], rest[1]), rest[1], per(rest[2], rest[3]), rest[3])
PY
        done
    done
    echo "# load: $(uptime)"
fi
