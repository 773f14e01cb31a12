#!/usr/bin/env bash
# The fault suite's longer variants (issue 17 point 5), for the persistent sending queue: the
# real binary under steady OTLP load, loopback only, each case bounded. The short variants of the
# same tests run in scripts/test.sh (they are ordinary `cargo test` tests, see
# integration/tests/agent/persistent_queue.rs and docs/reliability.md).
#
#   scripts/faults.sh                 every case below, full length
#   scripts/faults.sh outage|kills|disk-full
#
# outage     the backend down for FAULTS_OUTAGE_SECS (default 600) under load, back without a
#            restart of the agent, then 1 SIGKILL: every accepted span arrives (0 lost).
# kills      FAULTS_KILLS (default 10) SIGKILLs and restarts with the backend down and a backlog
#            on disk each time: every accepted span arrives.
# disk-full  the queue on a 256 KiB tmpfs until ENOSPC: drops counted, the agent keeps running,
#            accepted = delivered + counted drops exactly.
#
# Needs root (tmpfs) and scripts/install-deps.sh's oteltest (the third-party OTLP receiver).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

run() { # run NAME TEST [ENV=VALUE...] — bounded by FAULTS_CASE_TIMEOUT (default outage + 10 min)
  local name=$1 test=$2
  shift 2
  local limit=${FAULTS_CASE_TIMEOUT:-$(( ${FAULTS_OUTAGE_SECS:-600} + 600 ))}
  echo "== fault: $name (at most ${limit}s)" >&2
  env "$@" timeout "$limit" cargo test --locked -p podscope --test agent_persistent_queue "$test" -- --exact --nocapture
}

cases=("${@:-outage kills disk-full}")
for case in ${cases[*]}; do
  case $case in
    outage) run outage nothing_acknowledged_is_lost_across_a_backend_outage_and_a_sigkill \
      PODSCOPE_FAULTS_OUTAGE_SECS="${FAULTS_OUTAGE_SECS:-600}" ;;
    kills) run kills nothing_acknowledged_is_lost_across_a_backend_outage_and_a_sigkill \
      PODSCOPE_FAULTS_KILLS="${FAULTS_KILLS:-10}" ;;
    disk-full) run disk-full a_full_disk_drops_and_counts_and_the_agent_keeps_running ;;
    *) echo "unknown fault case $case (outage, kills, disk-full)" >&2; exit 2 ;;
  esac
done
echo "== faults: all passed" >&2
