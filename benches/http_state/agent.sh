#!/bin/bash
# What the http probe costs end to end, with the release agent as users run it: wrk -t1 -c8
# against nginx (one worker, keep-alive, `return 200 "ok\n"`, as benches/http_overhead.rs),
# rows alternating over short rounds: nothing attached, then `podscope run` with only the http
# probe (its spans and RED metrics through a batch processor to the nop exporter), started for
# the row (and warmed up by one second of the same load) and stopped after it. Each agent row is compared with the mean of the two baselines
# around it. Figures: throughput loss; CPU per request of the workload (wrk + nginx's worker:
# the probe's programs run in their time) and of the agent (/proc/PID/stat), medians and
# quartiles over the rounds. With HOOKS=1, each round also has a row with the probe's hooks and
# nothing in them: its per-syscall tracepoints attached with programs that return at once (this
# tree's http.bpf.c with the programs' bodies removed, loaded by loader.c), i.e. what any probe on
# these hooks pays before it does any work: the floor under the agent row.
#
# Usage (root, from the repository, after `cargo build --release --bin podscope`):
#   benches/http_state/agent.sh [SCOPE] [SAMPLING] [ROUNDS] [SECONDS]
#   SCOPE     both (default): every process traced, so wrk's requests and nginx's exchanges;
#             server: nginx in a kubelet-style pod cgroup and `cgroup_filter` on kubepods (as
#             configs/http-spans.yaml), wrk outside: a node serving clients that run elsewhere
#   SAMPLING  spans.sampling_ratio (default 1); RED metrics count every request regardless
#   ROUNDS    default 15;  SECONDS per row, default 2
#   env HOOKS=1 adds the empty-hooks row (needs clang-19, libbpf-dev; tracefs, mounted if missing)
# Leaves no process, cgroup or eBPF program behind.
set -euo pipefail
SCOPE=${1:-both}
SAMPLING=${2:-1}
ROUNDS=${3:-15}
SECONDS_PER_ROW=${4:-2}
REPO=$(git rev-parse --show-toplevel)
BIN=${PODSCOPE_BIN:-$REPO/target/release/podscope}
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release --bin podscope" >&2; exit 1; }
WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
CGROUP=""
MASTER=""
AGENT=""
LOADER_PID=""
cleanup() {
    [ -n "$AGENT" ] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null
    [ -n "$LOADER_PID" ] && kill "$LOADER_PID" 2>/dev/null && wait "$LOADER_PID" 2>/dev/null
    [ -n "$MASTER" ] && kill -QUIT "$MASTER" 2>/dev/null && wait "$MASTER" 2>/dev/null
    if [ -n "$CGROUP" ] && [ -d "$CGROUP" ]; then
        echo 1 > "$CGROUP/cgroup.kill" 2>/dev/null || true
        for _ in $(seq 50); do grep -q "populated 0" "$CGROUP/cgroup.events" && break; sleep 0.1; done
        rmdir "$CGROUP" "$(dirname "$CGROUP")" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

filter=""
if [ "$SCOPE" = server ]; then
    uid=$(printf '%08x_bench_%04x' $$ $RANDOM)
    CGROUP=/sys/fs/cgroup/unified/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod$uid.slice/cri-containerd-$(printf '%064x' $$).scope
    mkdir -p "$CGROUP"
    filter='    cgroup_filter: {include: ["/kubepods.slice/**"]}'
elif [ "$SCOPE" != both ]; then
    echo "SCOPE $SCOPE: expected both or server" >&2; exit 2
fi
cat > "$WORK/agent.yaml" <<YAML
receivers:
  ebpf:
    collection_interval: 1h
$filter
    probes:
      http: {spans: {sampling_ratio: $SAMPLING}}
processors:
  batch: {}
exporters:
  nop: {}
service:
  telemetry: {metrics: {address: 127.0.0.1:0}}
  pipelines:
    traces: {receivers: [ebpf], processors: [batch], exporters: [nop]}
    metrics: {receivers: [ebpf], processors: [batch], exporters: [nop]}
YAML
if [ "${HOOKS:-0}" = 1 ]; then
    [ -d /sys/kernel/tracing/events/syscalls ] || mount -t tracefs tracefs /sys/kernel/tracing
    # shellcheck source=../bpf_objects.sh
    source "$REPO/benches/bpf_objects.sh"
    http_empty_hooks "$REPO" "$WORK/http.bpf.c"
    PROGRAMS=("${HTTP_TRACEPOINT_PROGRAMS[@]}")
    build_objects http "$WORK" "$REPO" "$WORK/http.bpf.c" 2> /dev/null
    HOOKS_OBJECT=${OBJS[0]}
    check_empty_programs "$HOOKS_OBJECT" "${PROGRAMS[@]}"
    cc -O2 -Wall -I "$REPO/ebpf/src/bpf" -o "$WORK/loader" "$REPO/benches/http_state/loader.c" -lbpf
fi
cat > "$WORK/nginx.conf" <<CONF
user root; worker_processes 1; daemon off; master_process on; pid $WORK/nginx.pid; error_log $WORK/error.log;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000; client_body_temp_path $WORK; proxy_temp_path $WORK; fastcgi_temp_path $WORK; uwsgi_temp_path $WORK; scgi_temp_path $WORK;
  server { listen 127.0.0.1:$PORT; location / { return 200 "ok\n"; } } }
CONF
if [ -n "$CGROUP" ]; then
    # The shell joins the pod's cgroup, then becomes nginx: master and worker are the pod's.
    sh -c "echo \$\$ > $CGROUP/cgroup.procs; exec nginx -p $WORK -c $WORK/nginx.conf" &
else
    nginx -p "$WORK" -c "$WORK/nginx.conf" &
fi
MASTER=$!
until curl -s "127.0.0.1:$PORT/" > /dev/null; do sleep 0.05; done
WORKER=$(pgrep -P "$MASTER")
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

# One row: "label rps requests workload_us_per_request agent_us_per_request".
row() {
    local label=$1 agent=${2:-} w0 w1 a0=0 a1=0 out
    w0=$(ticks "$WORKER"); [ -n "$agent" ] && a0=$(ticks "$agent")
    # `times` after wrk: the subshell's children's CPU, i.e. wrk's.
    out=$( (wrk -t1 -c8 -d"${SECONDS_PER_ROW}s" "http://127.0.0.1:$PORT/"; times) 2>&1)
    w1=$(ticks "$WORKER"); [ -n "$agent" ] && a1=$(ticks "$agent")
    echo "$out" | awk -v label="$label" -v nginx=$((w1 - w0)) -v agent=$((a1 - a0)) -v hz="$HZ" '
        /requests in/ { requests = $1 }
        /Requests\/sec/ { rps = $2 }
        END {
            split(last, t, " "); cpu = 0
            for (i = 1; i <= 2; i++) { split(t[i], ms, "m"); sub("s", "", ms[2]); cpu += ms[1] * 60 + ms[2] }
            printf "%s %s %d %.3f %.3f\n", label, rps, requests, (cpu + nginx / hz) * 1e6 / requests, agent / hz * 1e6 / requests
        }
        { last = $0 }'
}

row warmup > /dev/null
{
    for _ in $(seq "$ROUNDS"); do
        row base
        if [ "${HOOKS:-0}" = 1 ]; then
            start_http_loader "$WORK/loader" "$HOOKS_OBJECT" "$PORT" "$WORK/loader.out" "${PROGRAMS[@]}" || exit 1
            row hooks
            kill -TERM "$LOADER_PID"; wait "$LOADER_PID" || true; LOADER_PID=""
            row base
        fi
        "$BIN" run --config "$WORK/agent.yaml" > "$WORK/agent.log" 2>&1 &
        AGENT=$!
        until grep -q "everything is ready" "$WORK/agent.log"; do
            kill -0 "$AGENT" 2> /dev/null || { cat "$WORK/agent.log" >&2; exit 1; }
            sleep 0.1
        done
        # The agent's first second (its start-up work, the first batches) is not the steady state.
        wrk -t1 -c8 -d1s "http://127.0.0.1:$PORT/" > /dev/null
        row agent "$AGENT"
        kill -TERM "$AGENT"; wait "$AGENT" || true; AGENT=""
        while [ "$(bpftool prog show | grep -c podscope_http || true)" -gt 0 ]; do sleep 0.1; done
    done
    row base
} > "$WORK/rows"
cat "$WORK/rows"
python3 - "$WORK/rows" "$SCOPE" "$SAMPLING" <<'PY'
import collections, statistics as st, sys
rows = [line.split() for line in open(sys.argv[1])]
base = [float(r[3]) for r in rows if r[0] == "base"]
# Each measured row against the mean of the baselines on either side of it.
loss, workload, agent = (collections.defaultdict(list) for _ in range(3))
for i, r in enumerate(rows):
    if r[0] != "base":
        before, after = rows[i - 1], rows[i + 1]
        b_rps = (float(before[1]) + float(after[1])) / 2
        b_cpu = (float(before[3]) + float(after[3])) / 2
        loss[r[0]].append((b_rps - float(r[1])) / b_rps * 100)
        workload[r[0]].append(float(r[3]) - b_cpu)
        agent[r[0]].append(float(r[4]))
q = lambda v: "median %.2f (quartiles %.2f to %.2f)" % (st.median(v), *st.quantiles(v, n=4)[::2])
print(f"http probe end to end, scope {sys.argv[2]}, spans.sampling_ratio {sys.argv[3]}, {len(loss['agent'])} rounds;")
print(f"  workload CPU per request without anything attached: median {st.median(base):.2f} us")
titles = {"hooks": "the probe's hooks, empty programs", "agent": "the agent (http probe)"}
for kind in ("hooks", "agent"):
    if loss[kind]:
        print(f"  {titles[kind]}:")
        print(f"    throughput loss %: {q(loss[kind])}  (target <= 5 %)")
        print(f"    workload CPU added per request: {q(workload[kind])} us")
        if kind == "agent":
            print(f"    agent CPU per request: {q(agent[kind])} us")
        added = st.median(workload[kind]) + st.median(agent[kind])
        print(f"    CPU added per request, workload + agent: {added / st.median(base) * 100:.1f} % of the workload's")
PY
