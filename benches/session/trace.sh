#!/bin/bash
# `kubectl podscope trace` end to end, and the trace eBPF object's own cost (issue 15 point 8).
#
# Path measured: the kernel (the session's trace object, `open` probe, filtered to one pod
# cgroup) → the agent (`podscope run` with the `session` extension) → a port-forward through the
# fake API server (`podscope-fake-apiserver`, the websocket channel protocol the API server and
# kubelet relay) → the plugin (`kubectl-podscope trace pod/… open -o json`) → a line counter on
# its stdout. The plugin authenticates as a service account bound to get/list pods and create
# pods/portforward only. The workload (opener.c) opens and closes a file in a kubelet-style pod
# cgroup, paced at each RATE (calls/s; 0: as fast as it can); every call is one event.
#
# Sections (each prints a table; `# ` lines are context):
#   steps   per RATE and round, paired: the workload alone ("none"), then traced ("trace"):
#           calls/s made, events/s delivered to the plugin's stdout (lines counted up to the
#           end marker, over the time from the workload's start to the marker), events the
#           session reported lost (the plugin's `warning: … events lost` lines), agent, plugin
#           and fake API server CPU (utime+stime from /proc over the same window) as % of a core
#           and the agent's per 10 k events/s delivered, and the workload's CPU ns per call.
#   first   time from spawning the plugin to its first event on stdout, RUNS times, the
#           workload running at 10 k calls/s (each run loads the trace object anew: the agent
#           unloads it when no session is left).
#   kmem    bytes_memlock of the maps and programs the agent holds (its /proc/PID/fdinfo:
#           other engineers' programs have the same names) while a session runs, per map with
#           what docs/metrics.md's formula gives, and again once the session ended.
#   stats   bpf_stats (run_time_ns / run_cnt) of the trace programs while the workload runs at
#           STATS_RATE, and of the no-op floor (bench_noop.bpf.o: raw_tp sys_enter, tp_btf
#           sys_exit, loaded with libbpf) under the same workload: ns per run, and every
#           program's ns over the step per workload call. The statistics are on while a helper
#           holds a BPF_ENABLE_STATS descriptor (counted by the kernel, so the sysctl other
#           engineers' benches may set is never written here).
#
# Usage (root, from the repository root, after
#   cargo build --release -p podscope -p podscope-kubectl -p podscope-integration \
#       --bin podscope --bin kubectl-podscope --bin podscope-fake-apiserver):
#   benches/session/trace.sh [BIN_DIR]           (default target/release)
# Knobs (environment): RATES="10000 50000 100000 0"  STEP_SECONDS=8  ROUNDS=2  FIRST_RUNS=5
#   STATS_RATE=50000  SECTIONS=steps,first,kmem,stats
# Needs: cc, libbpf-dev (the floor's loader), bpftool, python3, ss. About 4 minutes with the
# defaults. Leaves nothing behind (agent, fake API server, plugin, cgroups, temp files).
set -euo pipefail
[ -n "${1:-}" ] && BIN_DIR=$(realpath "$1")
cd "$(dirname "$0")/../.."
BIN_DIR=${BIN_DIR:-$(realpath target/release)}
RATES=${RATES:-10000 50000 100000 0}
STEP_SECONDS=${STEP_SECONDS:-8}
ROUNDS=${ROUNDS:-2}
FIRST_RUNS=${FIRST_RUNS:-5}
STATS_RATE=${STATS_RATE:-50000}
SECTIONS=${SECTIONS:-steps,first,kmem,stats}
PY=/usr/bin/python3
want() { [[ ",$SECTIONS," == *",$1,"* ]]; }
for binary in podscope kubectl-podscope podscope-fake-apiserver; do
    [ -x "$BIN_DIR/$binary" ] || { echo "$BIN_DIR/$binary is missing: build it (see the usage above)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "run as root (cgroups, eBPF)" >&2; exit 1; }

WORK=$(mktemp -d)
CGROUP_DIRS=()
# The processes this script started and has not stopped yet (each unset once stopped, so that
# no recycled pid is ever signalled).
AGENT="" APISERVER="" PLUGIN="" NOOP="" BACKGROUND="" STATS_ON=""
cleanup() {
    local pid
    for pid in $PLUGIN $NOOP $BACKGROUND $STATS_ON $APISERVER $AGENT; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    # Leaf first; the shared parents only when empty (other tests may use them).
    local i
    for ((i = ${#CGROUP_DIRS[@]} - 1; i >= 0; i--)); do rmdir "${CGROUP_DIRS[$i]}" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cc -O2 -Wall -o "$WORK/opener" benches/session/opener.c
cc -O2 -Wall -o "$WORK/count_lines" benches/session/count_lines.c
echo "bench" > "$WORK/file"
MARKER="$WORK/end-marker"

free_port() { $PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_listening() {
    local deadline=$((SECONDS + 60))
    until ss -Hltn "sport = :$1" | grep -q LISTEN; do
        [ $SECONDS -lt $deadline ] || { echo "nothing listens on port $1" >&2; exit 1; }
        sleep 0.05
    done
}
# utime+stime of process $1 in seconds.
cpu_of() { awk -v tck="$(getconf CLK_TCK)" '{print ($14 + $15) / tck}' "/proc/$1/stat"; }
# The ids of the maps (or programs: $2 = prog) process $1 holds.
held_ids() {
    local kind=${2:-map} info
    for info in /proc/"$1"/fdinfo/*; do sed -n "s/^${kind}_id:\s*//p" "$info" 2>/dev/null; done | sort -un | tr '\n' ' '
}

# --- a pod cgroup, as the kubelet makes one (systemd layout, BestEffort) ---------------------
CG_ROOT=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)
[ -n "$CG_ROOT" ] || { echo "no cgroup2 mount" >&2; exit 1; }
UNIQUE=$(printf '%016x%08x' "$(date +%s%N)" $$)
POD_UID="${UNIQUE:0:8}-${UNIQUE:8:4}-${UNIQUE:12:4}-${UNIQUE:16:4}-0000000000b5"
CONTAINER_ID=$(printf '%s%s%s' "$UNIQUE" "$UNIQUE" "$UNIQUE" | cut -c1-64)
POD_SLICE="kubepods-besteffort-pod${POD_UID//-/_}.slice"
for dir in kubepods.slice kubepods.slice/kubepods-besteffort.slice \
    "kubepods.slice/kubepods-besteffort.slice/$POD_SLICE" \
    "kubepods.slice/kubepods-besteffort.slice/$POD_SLICE/cri-containerd-$CONTAINER_ID.scope"; do
    [ -d "$CG_ROOT/$dir" ] || { mkdir "$CG_ROOT/$dir" && CGROUP_DIRS+=("$CG_ROOT/$dir"); }
done
PROCS="$CG_ROOT/kubepods.slice/kubepods-besteffort.slice/$POD_SLICE/cri-containerd-$CONTAINER_ID.scope/cgroup.procs"

# Runs the workload in the pod cgroup at rate $1 for $2 s; prints opener's line. (exec: a
# background `workload &` is the opener itself, so its pid is the one to kill.)
workload() {
    exec sh -c 'echo $$ > "$1"; shift; exec "$@"' sh "$PROCS" "$WORK/opener" "$1" "$2" "$WORK/file" "$MARKER"
}

# --- the agent ---------------------------------------------------------------------------
SESSION_PORT=$(free_port)
cat > "$WORK/agent.yaml" <<YAML
extensions:
  session:
    endpoint: 127.0.0.1:$SESSION_PORT
    max_sessions: 8
    node_name: node-a
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:$(free_port)
exporters:
  debug: {}
service:
  extensions: [session]
  telemetry:
    metrics:
      address: 127.0.0.1:$(free_port)
  pipelines:
    metrics:
      receivers: [otlp]
      exporters: [debug]
YAML
"$BIN_DIR/podscope" run --config "$WORK/agent.yaml" > "$WORK/agent.log" 2>&1 &
AGENT=$!
wait_listening "$SESSION_PORT"

# --- the fake API server: the agent pod (its session port), the workload's pod, RBAC -------
cat > "$WORK/rbac.json" <<JSON
[{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "trace-bench"},
  "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
            {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create", "get"]}]},
 {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "trace-bench"},
  "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "trace-bench"},
  "subjects": [{"kind": "ServiceAccount", "name": "plugin", "namespace": "bench"}]}]
JSON
pod_json() { # namespace name labels-json container port-json
    cat <<JSON
{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "$2", "namespace": "$1", "labels": $3},
 "spec": {"nodeName": "node-a", "containers": [{"name": "$4", "image": "registry.example/app:1", "ports": $6}]},
 "status": {"phase": "Running", "podIP": "127.0.0.1", "containerStatuses": [{"name": "$4",
   "containerID": "$5", "ready": true, "restartCount": 0, "image": "registry.example/app:1", "imageID": "",
   "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}}
JSON
}
cat > "$WORK/objects.json" <<JSON
{"pods": [
$(pod_json observability podscope-node-a '{"app.kubernetes.io/name": "podscope", "app.kubernetes.io/component": "agent"}' \
    agent containerd://agent "[{\"name\": \"session\", \"containerPort\": $SESSION_PORT, \"protocol\": \"TCP\"}]"),
$(pod_json shop opener-0 '{"app": "opener"}' app "containerd://$CONTAINER_ID" '[]')
]}
JSON
mkfifo "$WORK/apiserver.out"
"$BIN_DIR/podscope-fake-apiserver" --service-account bench/plugin --rbac "$WORK/rbac.json" \
    --objects "$WORK/objects.json" --secrets "$WORK/secrets" --log "$WORK/requests.jsonl" \
    > "$WORK/apiserver.out" 2> "$WORK/apiserver.log" &
APISERVER=$!
read -r READY < "$WORK/apiserver.out" || { cat "$WORK/apiserver.log" >&2; exit 1; }
API_URL=$($PY -c 'import json, sys; print(json.loads(sys.argv[1])["url"])' "$READY")
cat > "$WORK/kubeconfig" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: $API_URL
    certificate-authority: $WORK/secrets/ca.crt
users:
- name: fake
  user:
    token: $(cat "$WORK/secrets/token")
contexts:
- name: fake
  context: {cluster: fake, user: fake, namespace: shop}
current-context: fake
YAML

# Starts the plugin tracing the workload's pod; its stdout into the fifo $1, stderr to $2.
start_plugin() {
    HOME=$WORK "$BIN_DIR/kubectl-podscope" --kubeconfig "$WORK/kubeconfig" trace pod/opener-0 open -o json \
        > "$1" 2> "$2" &
    PLUGIN=$!
}
wait_tracing() {
    local deadline=$((SECONDS + 60))
    until grep -q '^tracing ' "$1"; do
        kill -0 "$PLUGIN" 2>/dev/null || { cat "$1" >&2; exit 1; }
        [ $SECONDS -lt $deadline ] || { echo "the plugin did not start tracing" >&2; exit 1; }
        sleep 0.02
    done
}
stop_plugin() {
    kill "$PLUGIN" 2>/dev/null || true
    wait "$PLUGIN" 2>/dev/null || true
    PLUGIN=""
}
# Waits until the agent holds no map: the session ended and the trace object is unloaded.
wait_unloaded() {
    local deadline=$((SECONDS + 30))
    until [ -z "$(held_ids "$AGENT")" ]; do
        [ $SECONDS -lt $deadline ] || { echo "the agent still holds maps $(held_ids "$AGENT")" >&2; exit 1; }
        sleep 0.05
    done
}
[ -z "$(held_ids "$AGENT")" ] || { echo "the agent holds maps before any session" >&2; exit 1; }

echo "# $(date -u '+%F %H:%M UTC'); binaries $BIN_DIR; CPUs online $(nproc), possible $(cat /sys/devices/system/cpu/possible); kernel $(uname -r)"

# --- steps -------------------------------------------------------------------------------
# One traced step at rate $1: prints the row's figures after "trace". The script holds the
# plugin's stdout fifo open too (fd 8), so the plugin neither dies of SIGPIPE nor exits when the
# counter stops reading: its CPU is read while it still runs, then it is stopped.
traced_step() {
    local rate=$1 out="$WORK/plugin.out" err="$WORK/plugin.err"
    rm -f "$out"
    mkfifo "$out"
    exec 8<> "$out"
    : > "$err"
    start_plugin "$out" "$err"
    "$WORK/count_lines" "$MARKER" 3 < "$out" > "$WORK/count" &
    local counter=$!
    wait_tracing "$err"
    local agent0 plugin0 api0
    agent0=$(cpu_of "$AGENT") plugin0=$(cpu_of "$PLUGIN") api0=$(cpu_of "$APISERVER")
    local made
    made=$(workload "$rate" "$STEP_SECONDS")
    wait "$counter"
    local agent1 plugin1 api1
    agent1=$(cpu_of "$AGENT") plugin1=$(cpu_of "$PLUGIN") api1=$(cpu_of "$APISERVER")
    if [ -n "${KMEM_HOOK:-}" ]; then "$KMEM_HOOK"; fi
    stop_plugin
    exec 8>&-
    rm -f "$out"
    wait_unloaded
    $PY - "$made" "$(cat "$WORK/count")" "$agent0 $agent1 $plugin0 $plugin1 $api0 $api1" "$err" <<'PY'
import re, sys
calls, start, end, cpu = sys.argv[1].split()
lines, first, last, found = sys.argv[2].split()
a0, a1, p0, p1, s0, s1 = map(float, sys.argv[3].split())
calls, start, end, cpu, lines, last = int(calls), float(start), float(end), float(cpu), int(lines), float(last)
lost = sum(int(m.group(1)) for m in re.finditer(r"(\d+) events lost", open(sys.argv[4]).read()))
window = last - start
delivered = lines / window
pct = lambda a, b: (b - a) / window * 100
agent = pct(a0, a1)
per10k = agent * 10000 / delivered if delivered else float("nan")
print(f"{calls / (end - start):.0f} {delivered:.0f} {lines} {lost} {'yes' if found == '1' else 'NO'} "
      f"{agent:.1f} {per10k:.1f} {pct(p0, p1):.1f} {pct(s0, s1):.1f} {cpu / calls * 1e9:.0f}")
PY
}

if want steps; then
    echo "## steps: ${STEP_SECONDS} s per row, rounds $ROUNDS; cpu columns: % of one core over the window (workload start → end marker printed)"
    echo "# load: $(uptime)"
    echo "round rate row calls_per_s events_per_s_delivered events_delivered events_lost marker_seen agent_cpu_pct agent_cpu_pct_per_10k_events_per_s plugin_cpu_pct apiserver_cpu_pct workload_cpu_ns_per_call"
    for r in $(seq "$ROUNDS"); do
        for rate in $RATES; do
            read -r calls start end cpu <<< "$(workload "$rate" "$STEP_SECONDS")"
            echo "$r $rate none $($PY -c "print(f'{$calls / ($end - $start):.0f}')") - - - - - - - - $($PY -c "print(f'{$cpu / $calls * 1e9:.0f}')")"
            printf '%s %s trace ' "$r" "$rate"
            traced_step "$rate"
        done
    done
    echo "# load: $(uptime)"
fi

# --- first -------------------------------------------------------------------------------
if want first; then
    echo "## first: seconds from spawning the plugin to its first event line, workload at 10000 calls/s"
    echo "# load: $(uptime)"
    workload 10000 $((FIRST_RUNS * 10 + 20)) > /dev/null &
    BACKGROUND=$!
    times=()
    for r in $(seq "$FIRST_RUNS"); do
        rm -f "$WORK/plugin.out"
        mkfifo "$WORK/plugin.out"
        exec 8<> "$WORK/plugin.out"
        "$WORK/count_lines" first < "$WORK/plugin.out" > "$WORK/first" &
        counter=$!
        spawned=$EPOCHREALTIME
        start_plugin "$WORK/plugin.out" "$WORK/plugin.err"
        wait "$counter"
        stop_plugin
        exec 8>&-
        wait_unloaded
        times+=("$($PY -c "print(f'{$(cat "$WORK/first") - $spawned:.3f}')")")
    done
    kill "$BACKGROUND" 2>/dev/null || true
    wait "$BACKGROUND" 2>/dev/null || true
    BACKGROUND=""
    echo "runs ${times[*]} median $(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR] = $1} END {print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2)}')"
fi

# --- kmem --------------------------------------------------------------------------------
# While the session runs (called by traced_step before it stops the plugin).
kmem_snapshot() {
    bpftool map show -j > "$WORK/maps.json"
    bpftool prog show -j > "$WORK/progs.json"
    $PY - "$(held_ids "$AGENT")" "$(held_ids "$AGENT" prog)" "$(cat /sys/devices/system/cpu/possible)" \
        "$WORK/maps.json" "$WORK/progs.json" > "$WORK/kmem" <<'PY'
import json, subprocess, sys
maps, progs = set(sys.argv[1].split()), set(sys.argv[2].split())
lo, _, hi = sys.argv[3].partition("-")
cpus = int(hi or lo) + 1
up8 = lambda n: (n + 7) // 8 * 8
def pow2(n):
    p = 1
    while p < n: p *= 2
    return p
# docs/metrics.md's formula (receiver/src/ebpf/kernel_memory.rs) for the entries a map holds
# now (hash maps are not preallocated: 56 bytes of element header and list node per entry besides
# key and value; the map's struct has 32 bytes of lock counters per possible CPU).
def entries(m):
    if m["type"] != "hash": return 0
    out = subprocess.run(["bpftool", "map", "dump", "id", str(m["id"]), "-j"], capture_output=True, text=True)
    return len(json.loads(out.stdout or "[]"))
def formula(m, n_entries):
    t, k, v, n = m["type"], up8(m.get("bytes_key", 0)), up8(m.get("bytes_value", 0)), m["max_entries"]
    if t == "hash": return 896 + 32 * cpus + 16 * pow2(n) + n_entries * (56 + k + v)
    if t == "array": return 312 + n * v
    if t == "percpu_array": return 312 + n * (8 + v * cpus)
    if t == "ringbuf":
        pages = n // 4096
        return 304 + (3 + pages) * 4096 + (3 + 2 * pages) * 8
    return None
print("kind name type max_entries key+value entries bytes_memlock formula")
total = 0
for m in sorted(json.load(open(sys.argv[4])), key=lambda m: m.get("name", "")):
    if str(m["id"]) not in maps: continue
    total += m.get("bytes_memlock", 0)
    held = entries(m)
    print(f"map {m.get('name')} {m['type']} {m['max_entries']} {m.get('bytes_key')}+{m.get('bytes_value')} {held} {m.get('bytes_memlock')} {formula(m, held)}")
ptotal = 0
for p in sorted(json.load(open(sys.argv[5])), key=lambda p: p.get("name", "")):
    if str(p["id"]) not in progs: continue
    ptotal += p.get("bytes_memlock", 0)
    print(f"prog {p.get('name')} {p['type']} - - - {p.get('bytes_memlock')} -")
print(f"total maps {total} programs {ptotal} all {total + ptotal} ({(total + ptotal) / 1048576:.2f} MiB)")
PY
}
if want kmem; then
    echo "## kmem: what the agent holds while one trace session (open) runs; possible CPUs $(cat /sys/devices/system/cpu/possible)"
    KMEM_HOOK=kmem_snapshot traced_step 10000 > /dev/null
    cat "$WORK/kmem"
    echo "after the session ended: maps held $(held_ids "$AGENT" | wc -w), programs held $(held_ids "$AGENT" prog | wc -w)"
fi

# --- stats -------------------------------------------------------------------------------
# "name runs ns" per program process $1 holds.
prog_stats() {
    bpftool prog show -j | $PY -c '
import json, sys
ids = set(sys.argv[1].split())
for p in json.load(sys.stdin):
    if str(p["id"]) in ids:
        print(p.get("name"), p.get("run_cnt", 0), p.get("run_time_ns", 0))' "$(held_ids "$1" prog)"
}
# Prints each program's ns per run and ns per workload call between snapshots $1 and $2.
stats_rows() {
    $PY - "$1" "$2" "$3" "$4" <<'PY'
import sys
def parse(text):
    return {l.split()[0]: (int(l.split()[1]), int(l.split()[2])) for l in text.splitlines() if l.strip()}
before, after, calls, row = parse(sys.argv[1]), parse(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
for name, (runs, ns) in sorted(after.items()):
    r0, n0 = before.get(name, (0, 0))
    runs, ns = runs - r0, ns - n0
    if runs:
        print(f"{row} {name} {runs} {ns / runs:.1f} {ns / calls:.1f}")
PY
}
if want stats; then
    NOOP_OBJ=$(ls -t target/*/build/podscope-ebpf-*/out/bench_noop.bpf.o 2>/dev/null | head -1)
    [ -n "$NOOP_OBJ" ] || { echo "no bench_noop.bpf.o under target/: build podscope-ebpf first" >&2; exit 1; }
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
    cat > "$WORK/stats_on.c" <<'C'
#include <bpf/bpf.h>
#include <stdio.h>
#include <unistd.h>
/* Keeps the kernel's BPF run statistics on while it lives (BPF_ENABLE_STATS). */
int main(void) {
    int fd = bpf_enable_stats(BPF_STATS_RUN_TIME);
    if (fd < 0) { perror("BPF_ENABLE_STATS"); return 1; }
    printf("ready\n");
    fflush(stdout);
    pause();
    return 0;
}
C
    cc -O2 -o "$WORK/stats_on" "$WORK/stats_on.c" -lbpf
    "$WORK/stats_on" > "$WORK/stats_on.out" &
    STATS_ON=$!
    deadline=$((SECONDS + 30))
    until grep -q ready "$WORK/stats_on.out" 2>/dev/null; do
        kill -0 "$STATS_ON" 2>/dev/null || { echo "BPF_ENABLE_STATS failed" >&2; exit 1; }
        [ $SECONDS -lt $deadline ] || { echo "stats_on did not start" >&2; exit 1; }
        sleep 0.05
    done
    echo "## stats: bpf_stats over a ${STEP_SECONDS} s workload at $STATS_RATE calls/s (open+close each); sys_enter/sys_exit run for every syscall of the machine"
    echo "# load: $(uptime)"
    echo "row program runs ns_per_run program_ns_per_workload_call"
    # The trace programs, in the agent (read before the plugin stops: the object unloads then).
    out="$WORK/plugin.out" err="$WORK/plugin.err"
    rm -f "$out"
    mkfifo "$out"
    exec 8<> "$out"
    : > "$err"
    start_plugin "$out" "$err"
    "$WORK/count_lines" "$MARKER" 3 < "$out" > /dev/null &
    counter=$!
    wait_tracing "$err"
    before=$(prog_stats "$AGENT")
    read -r calls _ <<< "$(workload "$STATS_RATE" "$STEP_SECONDS")"
    wait "$counter"
    after=$(prog_stats "$AGENT")
    stop_plugin
    exec 8>&-
    wait_unloaded
    stats_rows "$before" "$after" "$calls" trace
    # The floor: no-op programs on the same hooks.
    "$WORK/noop_loader" "$NOOP_OBJ" podscope_bench_noop podscope_bench_noop_btf > "$WORK/noop.out" &
    NOOP=$!
    deadline=$((SECONDS + 30))
    until grep -q ready "$WORK/noop.out" 2>/dev/null; do
        kill -0 "$NOOP" 2>/dev/null || { echo "the no-op loader failed" >&2; exit 1; }
        [ $SECONDS -lt $deadline ] || { echo "the no-op loader did not attach" >&2; exit 1; }
        sleep 0.05
    done
    before=$(prog_stats "$NOOP")
    read -r calls _ <<< "$(workload "$STATS_RATE" "$STEP_SECONDS")"
    after=$(prog_stats "$NOOP")
    kill "$NOOP"
    wait "$NOOP" 2>/dev/null || true
    NOOP=""
    stats_rows "$before" "$after" "$calls" floor
    kill "$STATS_ON"
    wait "$STATS_ON" 2>/dev/null || true
    STATS_ON=""
    echo "# load: $(uptime)"
fi
