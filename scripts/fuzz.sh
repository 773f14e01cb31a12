#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/, issue 17 point 3) for a given time each, with
# cargo-fuzz on the nightly toolchain, growing the committed corpora in fuzz/corpus/<target>/.
# Installs cargo-fuzz (crates.io) and the nightly toolchain if they are missing.
#
#   scripts/fuzz.sh [seconds per target]     default 60
#
# Environment:
#   FUZZ_TARGETS   the targets to run, space separated (default: all of `cargo fuzz list`)
#   FUZZ_CMIN=1    minimize each corpus afterwards (`cargo fuzz cmin`), as before a commit
#   FUZZ_TIMEOUT   seconds one input may take before it counts as a hang (default 10)
#
# A crash stops its target and leaves the input in fuzz/artifacts/<target>/; fix it, add the
# input to fuzz/regressions/<target>/ (the corpus replay test, `cargo test -p podscope --test
# fuzz_corpus_replay`, runs it from then on) and run again. A timeout whose input runs in time
# when replayed alone was the machine pausing the fuzzer: the target goes on (see below). Logs,
# with libFuzzer's final statistics (executions, corpus size), go to fuzz/logs/<target>.log; a
# summary table is printed (executions summed over the target's runs).
#
# Targets run without a sanitizer (`--sanitizer none`): the inputs reach safe Rust only (the one
# unsafe read of the http records is length-checked), and AddressSanitizer would halve the
# executions; overflow checks and debug assertions stay on (cargo-fuzz's default).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
seconds=${1:-60}
timeout=${FUZZ_TIMEOUT:-10}

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz

cd fuzz
targets=${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}
mkdir -p logs
# `cargo fuzz build` takes one target (or none: all of them); the first build compiles the whole
# agent, the others only link.
for target in $targets; do
  cargo +nightly fuzz build --sanitizer none "$target" >&2
done
summary=()
status=0
for target in $targets; do
  mkdir -p "corpus/$target"
  echo "== fuzz: $target for ${seconds}s" >&2
  : >"logs/$target.log"
  deadline=$((SECONDS + seconds))
  result=ok
  # One run normally. A run that ends in a timeout is checked: the input runs again alone, and
  # if it finishes within the timeout, the machine paused or starved the fuzzer (a SIGSTOP, a
  # suspended VM, a loaded host: libFuzzer's timeout is wall-clock time), not the code. That is
  # logged, the input removed, and the target goes on for the rest of its time.
  while [ $((deadline - SECONDS)) -gt 0 ]; do
    if cargo +nightly fuzz run --sanitizer none "$target" "corpus/$target" -- \
      -max_total_time=$((deadline - SECONDS)) -timeout="$timeout" -rss_limit_mb=2048 \
      -print_final_stats=1 >>"logs/$target.log" 2>&1; then
      break
    fi
    artifact=$(sed -n 's/.*Test unit written to \(.*timeout-[0-9a-f]*\)$/\1/p' "logs/$target.log" | tail -1)
    if [ -n "$artifact" ] && [ -f "$artifact" ] &&
      cargo +nightly fuzz run --sanitizer none "$target" "$artifact" -- -timeout="$timeout" \
        >>"logs/$target.log" 2>&1; then
      echo "== false timeout: $artifact ran within ${timeout}s alone; the fuzzer was paused, not hung; going on" \
        >>"logs/$target.log"
      rm -f "$artifact"
      continue
    fi
    result="CRASH (see fuzz/logs/$target.log, fuzz/artifacts/$target/)"
    status=1
    break
  done
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "logs/$target.log" | awk '{n += $1} END {print n + 0}')
  summary+=("$(printf '%-18s %6ss %12s executions  %6s corpus files  %s' "$target" "$seconds" "$runs" \
    "$(find "corpus/$target" -type f | wc -l)" "$result")")
  if [ "${FUZZ_CMIN:-}" = 1 ] && [ "$result" = ok ]; then
    cargo +nightly fuzz cmin --sanitizer none "$target" "corpus/$target" >>"logs/$target.log" 2>&1
  fi
done
printf '%s\n' "${summary[@]}"
exit $status
