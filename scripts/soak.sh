#!/usr/bin/env bash
# The soak (issue 17 point 6): the agent with the default config's probes and pipelines
# (configs/default.yaml, its listeners moved to free loopback ports) under steady OTLP load, for
# a while, with its resident memory (anonymous and file-backed apart), kernel map memory, open fds
# and threads sampled every 10 s into a CSV with the machine's load average and the
# memory_limiter's heap trims (count, bytes given back, seconds spent); at the end the slope of
# each after warm-up (the first fifth of the run, at least 2 minutes) and the trims' cost are
# printed. The target is flat after warm-up.
#
#   scripts/soak.sh [minutes]          default 30
#
# Environment:
#   PODSCOPE_BIN        the agent to run (default: target/debug/podscope, built if missing;
#                       SOAK_RELEASE=1 builds and runs target/release/podscope instead)
#   SOAK_RATE           OTLP requests per second per signal (default 20)
#   SOAK_ITEMS          spans / data points per request (default 50)
#   SOAK_OUT            where the CSV, the agent's log and the summary go (default
#                       target/soak-<UTC time>)
#
# Kernel map memory is `bytes_memlock` of `bpftool map show`, summed over the maps whose fds the
# agent holds (their ids from /proc/<pid>/fdinfo). Loopback only. Needs root (eBPF) and
# scripts/install-deps.sh (bpftool, the oteltest venv whose grpcio and opentelemetry-proto make
# the load, scripts/otlp_load.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
minutes=${1:-30}
rate=${SOAK_RATE:-20}
items=${SOAK_ITEMS:-50}
out=${SOAK_OUT:-target/soak-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
out=$(cd "$out" && pwd)

if [ -n "${PODSCOPE_BIN:-}" ]; then
  bin=$PODSCOPE_BIN
elif [ -n "${SOAK_RELEASE:-}" ]; then
  cargo build --locked --release -p podscope --bin podscope
  bin=target/release/podscope
else
  [ -x target/debug/podscope ] || cargo build --locked -p podscope --bin podscope
  bin=target/debug/podscope
fi
python=.cache/oteltest/bin/python
[ -x "$python" ] || { echo "soak: $python is missing: run scripts/install-deps.sh" >&2; exit 2; }
command -v bpftool >/dev/null || { echo "soak: bpftool is missing: run scripts/install-deps.sh" >&2; exit 2; }

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc_port=$(free_port); http_port=$(free_port); prom_port=$(free_port); telemetry_port=$(free_port)
# The default config as shipped, listening on loopback ports of its own.
sed -e "s/0\.0\.0\.0:4317/127.0.0.1:$grpc_port/" -e "s/0\.0\.0\.0:4318/127.0.0.1:$http_port/" \
  -e "s/0\.0\.0\.0:9464/127.0.0.1:$prom_port/" -e "s/127\.0\.0\.1:8888/127.0.0.1:$telemetry_port/" \
  configs/default.yaml >"$out/config.yaml"
if grep -q '0\.0\.0\.0' "$out/config.yaml"; then
  echo "soak: configs/default.yaml listens somewhere this script does not move to loopback:" >&2
  grep -n '0\.0\.0\.0' "$out/config.yaml" >&2
  exit 2
fi

agent_pid=; load_pid=
cleanup() {
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null && wait "$load_pid" 2>/dev/null || true
  [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null || true
}
trap cleanup EXIT

"$bin" run --config "$out/config.yaml" >"$out/agent.log" 2>&1 &
agent_pid=$!
for _ in $(seq 600); do
  curl -fsS "http://127.0.0.1:$telemetry_port/readyz" >/dev/null 2>&1 && break
  kill -0 "$agent_pid" 2>/dev/null || { echo "soak: the agent exited at start; $out/agent.log:" >&2; tail -20 "$out/agent.log" >&2; exit 1; }
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$telemetry_port/readyz" >/dev/null || { echo "soak: the agent is not ready after 60 s" >&2; exit 1; }

"$python" scripts/otlp_load.py "$grpc_port" "$rate" "$items" >"$out/load.jsonl" 2>"$out/load.err" &
load_pid=$!

map_memlock() { # bytes_memlock summed over the agent's maps
  local ids
  ids=$(grep -h '^map_id:' /proc/"$agent_pid"/fdinfo/* 2>/dev/null | awk '{print $2}' | sort -un | paste -sd, -)
  [ -n "$ids" ] || { echo 0; return; }
  bpftool -j map show | /usr/bin/python3 -c '
import json, sys
ids = {int(i) for i in sys.argv[1].split(",")}
print(sum(m.get("bytes_memlock", 0) for m in json.load(sys.stdin) if m["id"] in ids))' "$ids"
}
telemetry() { # OTLP items accepted, and the memory_limiter's heap trims, bytes and seconds so far
  curl -fsS "http://127.0.0.1:$telemetry_port/metrics" | awk '
    /^podscope_receiver_accepted_items_total\{component="otlp"/ {a += $2}
    /^podscope_memory_limiter_heap_trims_total\{/ {t += $2}
    /^podscope_memory_limiter_heap_trimmed_bytes_total\{/ {b += $2}
    /^podscope_memory_limiter_heap_trim_seconds_total\{/ {s += $2}
    END {printf "%d,%d,%d,%.6f", a, t, b, s}'
}

echo "elapsed_s,rss_kib,rss_anon_kib,rss_file_kib,map_memlock_bytes,fds,tasks,otlp_accepted_items,heap_trims,heap_trimmed_bytes,heap_trim_seconds,load_1m" >"$out/samples.csv"
echo "soak: $minutes min, agent pid $agent_pid ($bin), load $rate req/s x $items items per signal, samples in $out/samples.csv" >&2
start=$(date +%s)
end=$((start + minutes * 60))
while :; do
  now=$(date +%s)
  kill -0 "$agent_pid" 2>/dev/null || { echo "soak: the agent died after $((now - start)) s; $out/agent.log:" >&2; tail -20 "$out/agent.log" >&2; exit 1; }
  kill -0 "$load_pid" 2>/dev/null || { echo "soak: the load generator died; $out/load.err:" >&2; tail -20 "$out/load.err" >&2; exit 1; }
  # Resident memory, and its anonymous (heap, stacks) and file-backed (the binary's pages as
  # code paths are first run) parts: a step in the second is not a leak.
  rss=$(awk '/^VmRSS:/ {r = $2} /^RssAnon:/ {a = $2} /^RssFile:/ {f = $2} END {print r "," a "," f}' /proc/"$agent_pid"/status)
  fds=$(find /proc/"$agent_pid"/fd -mindepth 1 -maxdepth 1 | wc -l)
  tasks=$(find /proc/"$agent_pid"/task -mindepth 1 -maxdepth 1 | wc -l)
  # A Prometheus-style scrape of the agent's exporter each sample, as a server would.
  curl -fsS -o /dev/null "http://127.0.0.1:$prom_port/metrics" || true
  echo "$((now - start)),$rss,$(map_memlock),$fds,$tasks,$(telemetry),$(cut -d' ' -f1 /proc/loadavg)" >>"$out/samples.csv"
  # Every 5 minutes the agent's mappings in full, to tell which one grew (the heap's arenas, a
  # thread's stack, the binary's pages).
  [ $(( (now - start) % 300 )) -lt 10 ] && cp /proc/"$agent_pid"/smaps "$out/smaps-$(printf '%05d' $((now - start)))s.txt"
  [ "$now" -ge "$end" ] && break
  sleep $((10 - ($(date +%s) - now) % 10))
done

kill "$load_pid"; wait "$load_pid" || true; load_pid=
/usr/bin/python3 - "$out/samples.csv" "$out/load.jsonl" <<'EOF' | tee "$out/summary.txt"
import csv, json, sys
rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(sys.argv[1]))]
load = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
duration = rows[-1]["elapsed_s"]
warmup = max(120.0, duration / 5)
after = [r for r in rows if r["elapsed_s"] >= warmup]
print(f"soak: {duration / 60:.1f} min, {len(rows)} samples, warm-up {warmup / 60:.1f} min, slope over the {len(after)} samples after it")
def slope(column):
    xs = [r["elapsed_s"] / 3600 for r in after]
    ys = [r[column] for r in after]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return (sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0), min(ys), max(ys)
for column, unit, scale in [("rss_kib", "MiB", 1024), ("rss_anon_kib", "MiB", 1024), ("rss_file_kib", "MiB", 1024), ("map_memlock_bytes", "MiB", 1 << 20), ("fds", "fds", 1), ("tasks", "tasks", 1)]:
    if len(after) < 3:
        print("  too few samples after warm-up for a slope")
        break
    s, lo, hi = slope(column)
    print(f"  {column:18} after warm-up {lo / scale:10.2f} .. {hi / scale:10.2f} {unit}, slope {s / scale:+.3f} {unit}/hour")
accepted = rows[-1]["otlp_accepted_items"]
loads = [r["load_1m"] for r in rows]
print(f"  load average (1 min) over the run: {min(loads):.2f} .. {max(loads):.2f}, mean {sum(loads) / len(loads):.2f}")
trims = rows[-1]["heap_trims"]
if trims:
    print(f"  memory_limiter heap trims: {int(trims)}, {rows[-1]['heap_trimmed_bytes'] / (1 << 20):.2f} MiB given back, "
          f"{rows[-1]['heap_trim_seconds'] * 1e6 / trims:.0f} us per trim")
else:
    print("  memory_limiter heap trims: none")
print(f"  OTLP items accepted {int(accepted)} ({accepted / duration:.0f}/s); load generator: {load[-1] if load else 'no totals'}")
EOF
echo "soak: done, $out" >&2
