#!/bin/bash
# What the http probe's kernel programs cost per HTTP request, several builds of
# ebpf/src/bpf/http.bpf.c side by side in one run (issue 12 point 8). Per round and row, a fixed
# workload: nginx (one worker, keep-alive, `return 200 "ok\n"`, as benches/http_overhead.rs
# configures it) and client.c, one keep-alive connection in lockstep (REQUESTS requests, each
# one write() and its whole response read before the next). Lockstep rather than wrk: every row
# makes exactly the same requests with the same syscalls, so runs per request and the events
# userspace receives can be compared exactly between builds, and the figures do not depend on
# how fast the machine happens to be. Rows: nothing attached, then each build's object loaded by
# libbpf (loader.c: the per-syscall tracepoint programs attached, as the agent attaches them
# when tracefs is there, and the ring buffer drained as the agent drains it). Both ends of the
# connection are traced, as in the bench.
#
# Figures per row: the workload's CPU per request (client: getrusage; nginx's worker:
# /proc/PID/schedstat), and from the kernel's BPF statistics (kernel.bpf_stats_enabled=1 for
# the run, restored afterwards; they add their own two clock reads to every run) each program's
# runs per request and ns per run, summed into the programs' ns per request. The loader also
# checks what userspace gets: the events of the workload's connection by kind, direction, role,
# lengths and a hash of the captured bytes; `data` is a digest of that list, so two builds that
# send the same data show the same digest in a round (times, pids and ports are left out).
# Rows alternate within each round (the builds' order reversed every other round); the summary
# gives medians over the rounds and each round's change from the first build to each other.
# The hooks see every process of the machine: other processes' reads and writes run the
# programs too (counted in the runs, usually a few per thousand requests on an idle machine).
#
# Usage (root, from the repository): benches/http_state/cost.sh [ROUNDS] [REQUESTS] [REV...]
#   REV: a git revision whose ebpf/src/bpf is built, `.` for the working tree, the path of a
#   .bpf.c file (a variant of http.bpf.c, built with the working tree's headers), `hooks`:
#   the working tree's tracepoints with empty programs (the floor any program there pays), or
#   `no-ring`: the working tree's programs with a counter bump instead of the ring buffer.
#   Default: 5 rounds of 20000 requests, `main` against `.`. Env CPU: the CPU nginx and the
#   client run on (default the last). Needs nginx, clang-19, libbpf-dev,
#   bpftool, tracefs (mounted here if missing).
set -euo pipefail
ROUNDS=${1:-5}
REQUESTS=${2:-20000}
# nginx and the client share one CPU (env CPU, default the last): in lockstep they take turns,
# and a shared CPU spares the figures the cross-CPU wake-ups and migrations that made rounds
# differ by 20 % or more on the shared VM.
CPU=${CPU:-$(($(nproc) - 1))}
shift 2 2>/dev/null || shift $#
REVS=("$@")
[ ${#REVS[@]} -gt 0 ] || REVS=(main .)
REPO=$(git rev-parse --show-toplevel)
HERE="$REPO/benches/http_state"
PY=/usr/bin/python3
WORK=$(mktemp -d)
STATS_BEFORE=$(sysctl -n kernel.bpf_stats_enabled)
LOADER_PID=""
NGINX_PID=""
cleanup() {
    [ -n "$LOADER_PID" ] && kill "$LOADER_PID" 2>/dev/null && wait "$LOADER_PID" 2>/dev/null
    # SIGQUIT: nginx's graceful stop (the master stops its worker, then itself).
    [ -n "$NGINX_PID" ] && kill -QUIT "$NGINX_PID" 2>/dev/null && wait "$NGINX_PID" 2>/dev/null
    rm -rf "$WORK"
    sysctl -q kernel.bpf_stats_enabled="$STATS_BEFORE"
}
trap cleanup EXIT

[ -d /sys/kernel/tracing/events/syscalls ] || mount -t tracefs tracefs /sys/kernel/tracing

cc -O2 -Wall -o "$WORK/client" "$HERE/client.c"
cc -O2 -Wall -I "$REPO/ebpf/src/bpf" -o "$WORK/loader" "$HERE/loader.c" -lbpf

# One object per revision, compiled as ebpf/build.rs does.
# shellcheck source=../bpf_objects.sh
source "$REPO/benches/bpf_objects.sh"
# The programs to attach, named from the working tree's source (also writes the empty variant).
http_empty_hooks "$REPO" "$WORK/hooks.bpf.c"
PROGRAMS=("${HTTP_TRACEPOINT_PROGRAMS[@]}")
SOURCES=()
for rev in "${REVS[@]}"; do
    case $rev in
    hooks) SOURCES+=("$WORK/hooks.bpf.c") ;;
    no-ring)
        http_without_ring_buffer "$REPO" "$WORK/no-ring.bpf.c"
        SOURCES+=("$WORK/no-ring.bpf.c")
        ;;
    *) SOURCES+=("$rev") ;;
    esac
done
build_objects http "$WORK" "$REPO" "${SOURCES[@]}"
for i in "${!REVS[@]}"; do
    [ "${REVS[$i]}" != hooks ] || check_empty_programs "${OBJS[$i]}" "${PROGRAMS[@]}"
done

# nginx as benches/http_overhead.rs runs it, on a port the kernel chose free.
PORT=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$WORK/nginx"
cat > "$WORK/nginx/nginx.conf" <<CONF
user root; worker_processes 1; daemon off; master_process on; pid $WORK/nginx/nginx.pid; error_log $WORK/nginx/error.log;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 100000000; client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx;
  fastcgi_temp_path $WORK/nginx; uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
  server { listen 127.0.0.1:$PORT; location / { return 200 "ok\n"; } } }
CONF
taskset -c "$CPU" nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" < /dev/null &
NGINX_PID=$!
deadline=$((SECONDS + 10))
until WORKER=$(pgrep -P "$NGINX_PID") && $PY -c "import socket; socket.create_connection(('127.0.0.1', $PORT)).close()" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "nginx did not start" >&2; exit 1; }
    sleep 0.05
done
nginx_ns() { awk '{print $1}' /proc/"$WORKER"/schedstat; }

# One run of the workload: prints "cpu_ns_per_request requests".
workload() {
    local before after cpu made
    before=$(nginx_ns)
    read -r cpu made <<< "$(taskset -c "$CPU" "$WORK/client" "$PORT" "$REQUESTS")"
    after=$(nginx_ns)
    [ "$made" = "$REQUESTS" ] || { echo "the client made $made of $REQUESTS requests" >&2; exit 1; }
    $PY -c "print(round(($cpu * 1e9 + $after - $before) / $made), $made)"
}

sysctl -q kernel.bpf_stats_enabled=1
echo "# $REQUESTS requests per row, $ROUNDS rounds; rows: none, ${REVS[*]}"
echo "# load: $(uptime)"
echo "round row cpu_ns_per_request runs_per_request ns_per_run programs_ns_per_request events_per_request lost data"
for r in $(seq "$ROUNDS"); do
    out=$(workload)
    read -r cpu _ <<< "$out"
    echo "$r none $cpu - - - - - -"
    order=("${!OBJS[@]}")
    if [ $((r % 2)) -eq 0 ]; then
        mapfile -t order < <(printf '%s\n' "${order[@]}" | tac)
    fi
    for i in "${order[@]}"; do
        start_http_loader "$WORK/loader" "${OBJS[$i]}" "$PORT" "$WORK/loader.out" "${PROGRAMS[@]}" ||
            { echo "${REVS[$i]}: the object did not load" >&2; exit 1; }
        out=$(workload)
        read -r cpu _ <<< "$out"
        kill -TERM "$LOADER_PID"
        wait "$LOADER_PID" || { echo "${REVS[$i]}: the loader failed" >&2; exit 1; }
        LOADER_PID=""
        cp "$WORK/loader.out" "$WORK/loader.$r.$i.out"
        $PY - "$WORK/loader.out" "$r" "${REVS[$i]}" "$cpu" "$REQUESTS" <<'PY'
import hashlib, sys
path, rnd, row, cpu, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
runs = ns = events = lost = 0
shapes = []
for line in open(path):
    f = line.split()
    if f[0] == "prog":
        runs += int(f[2]); ns += int(f[3])
    elif f[0] == "lost":
        lost = int(f[1])
    elif f[0] == "shape":
        events += int(f[-1]); shapes.append(" ".join(f[1:]))
digest = hashlib.sha256("\n".join(sorted(shapes)).encode()).hexdigest()[:12]
print(rnd, row, cpu, f"{runs / n:.3f}", round(ns / max(1, runs)), round(ns / n), f"{events / n:.3f}", lost, digest)
PY
    done
done | tee "$WORK/rows"
echo "# load: $(uptime)"
# Per program, over every round: runs per request and ns per run (medians).
for i in "${!REVS[@]}"; do
    cat "$WORK"/loader.*."$i".out | grep '^prog' | sed "s|^|${REVS[$i]} |" >> "$WORK/progs"
done
$PY - "$WORK/rows" "$WORK/progs" "$REQUESTS" <<'PY'
import collections, statistics, sys
rows = collections.defaultdict(lambda: collections.defaultdict(list))
data = collections.defaultdict(set)
for line in open(sys.argv[1]):
    _, row, cpu, runs, ns, per_request, events, lost, digest = line.split()
    rows[row]["cpu"].append(float(cpu))
    if ns != "-":
        rows[row]["runs"].append(float(runs)); rows[row]["ns"].append(float(ns))
        rows[row]["per_request"].append(float(per_request)); rows[row]["events"].append(float(events))
        rows[row]["lost"].append(int(lost)); data[row].add(digest)
med = statistics.median
print("median over rounds: row, workload CPU ns per request, program runs per request, ns per run, programs' ns per request, events per request, lost, data digests")
for row, f in rows.items():
    if f["ns"]:
        print(f"  {row:<28} {med(f['cpu']):>7.0f} {med(f['runs']):>6.3f} {med(f['ns']):>6.0f} {med(f['per_request']):>6.0f}"
              f" {med(f['events']):>6.3f} {sum(f['lost']):>4} {','.join(sorted(data[row]))}"
              f"   (ns per request: {', '.join(f'{x:.0f}' for x in f['per_request'])})")
    else:
        print(f"  {row:<28} {med(f['cpu']):>7.0f}")
names = [row for row in rows if rows[row]["ns"]]
for other in names[1:]:
    a, b = rows[names[0]]["per_request"], rows[other]["per_request"]
    changes = [100 * (y / x - 1) for x, y in zip(a, b)]
    print(f"  programs' ns per request, {other} against {names[0]} in each round: median {med(changes):+.1f} % "
          f"({', '.join(f'{c:+.0f}' for c in changes)})")
print("per program (medians over rounds): row, program, runs per request, ns per run")
n = int(sys.argv[3])
progs = collections.defaultdict(lambda: ([], []))
for line in open(sys.argv[2]):
    row, _, name, runs, ns = line.split()
    if int(runs) > 0:
        progs[(row, name)][0].append(int(runs) / n); progs[(row, name)][1].append(int(ns) / int(runs))
for (row, name), (runs, ns) in sorted(progs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    if med(runs) >= 0.01:
        print(f"  {row:<28} {name:<30} {med(runs):>6.3f} {med(ns):>6.0f}")
PY
