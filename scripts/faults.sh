#!/usr/bin/env bash
# The fault suite's longer variants (issue 17 point 5), for the persistent sending queue: the
# real binary under steady OTLP load, loopback only, each case bounded. The short variants of the
# same tests run in scripts/test.sh (they are ordinary `cargo test` tests, see
# integration/tests/agent/persistent_queue.rs and docs/reliability.md).
#
#   scripts/faults.sh                 every case below, full length
#   scripts/faults.sh outage|kills|disk-full|backend|api-outage|uprobe|container-uprobe
#
# outage     the backend down for FAULTS_OUTAGE_SECS (default 600) under load, back without a
#            restart of the agent, then 1 SIGKILL: every accepted span arrives (0 lost).
# kills      FAULTS_KILLS (default 10) SIGKILLs and restarts with the backend down and a backlog
#            on disk each time: every accepted span arrives.
# disk-full  the queue on a 256 KiB tmpfs until ENOSPC: drops counted, the agent keeps running,
#            accepted = delivered + counted drops exactly.
# backend    the otlphttp exporter's backend answering slower than the timeout, 502/503/504, 429
#            with Retry-After (FAULTS_RETRY_AFTER_SECS, default 30) and 400: retry timing seen at
#            the backend, nothing lost where retryable, dropped and counted once where permanent
#            (integration/tests/agent/faults.rs).
# api-outage the Kubernetes API server (the fake one) stopped and started again under data:
#            still enriched, /readyz says why it is not ready, ready again after
#            (integration/tests/agent/k8s_enrichment.rs).
# uprobe     a uprobe's binary deleted while attached, its process exiting and its cgroup
#            removed: still counted, the agent runs on and stops cleanly; restarted without the
#            binary, the entry is skipped and counted (integration/tests/agent/faults.rs).
# container-uprobe
#            a `container:` uprobe entry on a real container (podman + runc, an image built here
#            FROM scratch, no network): the binary deleted inside the running container, then the
#            container killed: counts exact, detached and counted, attached again to the next
#            container of the image, the agent runs on (integration/tests/agent/faults.rs).
#
# Needs root (tmpfs, podman) and scripts/install-deps.sh's oteltest (the third-party OTLP receiver).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

run_in() { # run_in TEST_TARGET NAME TEST [ENV=VALUE...] — bounded by FAULTS_CASE_TIMEOUT (default outage + 10 min)
  local target=$1 name=$2 test=$3
  shift 3
  local limit=${FAULTS_CASE_TIMEOUT:-$(( ${FAULTS_OUTAGE_SECS:-600} + 600 ))}
  echo "== fault: $name (at most ${limit}s)" >&2
  env "$@" timeout "$limit" cargo test --locked -p podscope --test "$target" "$test" -- --exact --nocapture
}
run() { run_in agent_persistent_queue "$@"; }

cases=("${@:-outage kills disk-full backend api-outage uprobe container-uprobe}")
for case in ${cases[*]}; do
  case $case in
    outage) run outage nothing_acknowledged_is_lost_across_a_backend_outage_and_a_sigkill \
      PODSCOPE_FAULTS_OUTAGE_SECS="${FAULTS_OUTAGE_SECS:-600}" ;;
    kills) run kills nothing_acknowledged_is_lost_across_a_backend_outage_and_a_sigkill \
      PODSCOPE_FAULTS_KILLS="${FAULTS_KILLS:-10}" ;;
    disk-full) run disk-full a_full_disk_drops_and_counts_and_the_agent_keeps_running ;;
    backend)
      for test in a_429_with_retry_after_is_retried_no_sooner_than_the_backend_asks \
        answers_5xx_are_retried_with_growing_backoff_until_the_backend_recovers \
        a_permanent_4xx_is_dropped_and_counted_and_never_retried \
        a_backend_slower_than_the_timeout_is_given_up_on_and_retried; do
        run_in agent_faults "backend: $test" "$test" \
          PODSCOPE_FAULTS_RETRY_AFTER_SECS="${FAULTS_RETRY_AFTER_SECS:-30}"
      done ;;
    api-outage) run_in agent_k8s_enrichment api-outage \
      a_pods_data_is_enriched_through_an_api_outage_and_after_the_pod_is_deleted ;;
    uprobe) run_in agent_faults uprobe \
      a_uprobe_target_deleted_and_its_container_exiting_leave_the_agent_running ;;
    container-uprobe) run_in agent_faults container-uprobe \
      a_container_uprobe_target_deleted_in_the_container_and_the_container_killed_leave_the_agent_running ;;
    *) echo "unknown fault case $case (outage, kills, disk-full, backend, api-outage, uprobe, container-uprobe)" >&2; exit 2 ;;
  esac
done
echo "== faults: all passed" >&2
