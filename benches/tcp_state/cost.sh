#!/bin/bash
# What the tcp probe's state-change program costs per loopback connection, two builds of
# ebpf/src/bpf/tcp.bpf.c side by side in one run (issue 11 point 5). Per round and row: N
# connections in lockstep (the client connects and waits; the server thread accepts and resets
# the connection with SO_LINGER 0, so no TIME_WAIT is left), with nothing attached and with each
# build's object loaded by libbpf and its tp_btf programs attached. Figures: the workload's CPU
# time per connection (getrusage, both threads: the programs run in their context) and, from the
# kernel's BPF statistics (kernel.bpf_stats_enabled=1 for the run, restored afterwards; they add
# their own two clock reads, ~33 ns, to every run), podscope_tcp_state's runs per connection
# and ns per run. Rows alternate within each round (the builds' order reversed every other
# round), so a loaded machine shifts every row alike; the summary gives medians over the rounds
# and the median of each round's change from the first build to the second.
#
# Usage (root, from the repository): benches/tcp_state/cost.sh [ROUNDS] [N] [REV...]
#   REV: a git revision whose ebpf/src/bpf is built, `.` for the working tree, or the path of a
#   .bpf.c file (a variant of tcp.bpf.c, built with the working tree's headers).
#   Default: 5 rounds of 20000 connections, `main` against `.`.
set -euo pipefail
ROUNDS=${1:-5}
N=${2:-20000}
shift 2 2>/dev/null || shift $#
REVS=("$@")
[ ${#REVS[@]} -gt 0 ] || REVS=(main .)
REPO=$(git rev-parse --show-toplevel)
PY=/usr/bin/python3
WORK=$(mktemp -d)
STATS_BEFORE=$(sysctl -n kernel.bpf_stats_enabled)
LOADER_PID=""
cleanup() {
    [ -n "$LOADER_PID" ] && kill "$LOADER_PID" 2>/dev/null || true
    rm -rf "$WORK"
    sysctl -q kernel.bpf_stats_enabled="$STATS_BEFORE"
}
trap cleanup EXIT

cat > "$WORK/conn.c" <<'C'
/* N loopback TCP connections in lockstep; prints the CPU seconds of both threads and the
 * connections made. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
static int listener;
static void *serve(void *arg) {
    struct linger reset = {1, 0};
    for (;;) {
        int fd = accept(listener, 0, 0);
        if (fd < 0) continue;
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
        close(fd);
    }
    return arg;
}
int main(int argc, char **argv) {
    long n = atol(argv[1]), made = 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    listener = socket(AF_INET, SOCK_STREAM, 0);
    if (bind(listener, (void *)&a, sizeof a) || listen(listener, 128) || getsockname(listener, (void *)&a, &len)) return 1;
    pthread_t server;
    pthread_create(&server, 0, serve, 0);
    char byte;
    for (long i = 0; i < n; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, (void *)&a, sizeof a) == 0) {
            made++;
            (void)!read(fd, &byte, 1); /* returns at the server's reset */
        }
        close(fd);
    }
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    printf("%.6f %ld\n", r.ru_utime.tv_sec + r.ru_stime.tv_sec + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6, made);
    return 0;
}
C
cc -O2 -pthread -o "$WORK/conn" "$WORK/conn.c"
cat > "$WORK/loader.c" <<'C'
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
cc -O2 -o "$WORK/loader" "$WORK/loader.c" -lbpf

# One object per revision, compiled as ebpf/build.rs does.
# shellcheck source=../bpf_objects.sh
source "$REPO/benches/bpf_objects.sh"
build_objects tcp "$WORK" "$REPO" "${REVS[@]}"

# podscope_tcp_state's runs and run time, of the programs `pid` holds.
state_stats() {
    local ids
    ids=$(grep -h '^prog_id:' /proc/"$1"/fdinfo/* 2>/dev/null | awk '{print $2}' | sort -u | tr '\n' ' ')
    bpftool prog show -j | $PY -c '
import json, sys
ids = {int(x) for x in sys.argv[1].split()}
runs = ns = 0
for p in json.load(sys.stdin):
    if p["id"] in ids and p.get("name", "").startswith("podscope_tcp_st"):
        runs += p.get("run_cnt", 0); ns += p.get("run_time_ns", 0)
print(runs, ns)' "$ids"
}

sysctl -q kernel.bpf_stats_enabled=1
echo "# $N connections per run, $ROUNDS rounds; rows: none, ${REVS[*]}"
echo "# load: $(uptime)"
echo "round row cpu_ns_per_connection state_runs_per_connection ns_per_run"
for r in $(seq "$ROUNDS"); do
    read -r cpu made <<< "$("$WORK/conn" "$N")"
    $PY -c "print($r, 'none', round($cpu / $made * 1e9), '-', '-')"
    # The builds' order alternates round by round (ABBA...), so a load that drifts within a round
    # favours neither.
    order=("${!OBJS[@]}")
    if [ $((r % 2)) -eq 0 ]; then
        mapfile -t order < <(printf '%s\n' "${order[@]}" | tac)
    fi
    for i in "${order[@]}"; do
        "$WORK/loader" "${OBJS[$i]}" podscope_tcp_state podscope_tcp_retransmit > "$WORK/loader.out" &
        LOADER_PID=$!
        until grep -q ready "$WORK/loader.out" 2>/dev/null; do
            kill -0 "$LOADER_PID" || { echo "${REVS[$i]}: the object did not load" >&2; exit 1; }
            sleep 0.05
        done
        read -r runs0 ns0 <<< "$(state_stats "$LOADER_PID")"
        read -r cpu made <<< "$("$WORK/conn" "$N")"
        read -r runs1 ns1 <<< "$(state_stats "$LOADER_PID")"
        kill "$LOADER_PID"
        wait "$LOADER_PID" 2>/dev/null || true
        LOADER_PID=""
        $PY -c "print($r, '${REVS[$i]}', round($cpu / $made * 1e9), f'{($runs1 - $runs0) / $made:.2f}', round(($ns1 - $ns0) / max(1, $runs1 - $runs0)))"
    done
done | tee "$WORK/rows"
echo "# load: $(uptime)"
$PY - "$WORK/rows" <<'PY'
import collections, statistics, sys
rows = collections.defaultdict(lambda: ([], [], []))
for line in open(sys.argv[1]):
    _, row, cpu, runs, ns = line.split()
    rows[row][0].append(float(cpu))
    if ns != "-":
        rows[row][1].append(float(runs)); rows[row][2].append(float(ns))
print("median over rounds: row, CPU ns per connection, state-change runs per connection, ns per run, program ns per connection")
for row, (cpu, runs, ns) in rows.items():
    if ns:
        r, n = statistics.median(runs), statistics.median(ns)
        print(f"  {row:<8} {statistics.median(cpu):>8.0f} {r:>6.2f} {n:>6.0f} {r * n:>7.0f}   (ns per run: {', '.join(f'{x:.0f}' for x in ns)})")
    else:
        print(f"  {row:<8} {statistics.median(cpu):>8.0f}")
names = [row for row in rows if rows[row][2]]
if len(names) >= 2:
    a, b = rows[names[0]][2], rows[names[1]][2]
    changes = [100 * (y / x - 1) for x, y in zip(a, b)]
    print(f"  ns per run, {names[1]} against {names[0]} in each round: median {statistics.median(changes):+.1f} % "
          f"({', '.join(f'{c:+.0f}' for c in changes)})")
PY
