#!/usr/bin/env bash
# Runs every check and test of the project: formatting, lints, unit tests, the root-only eBPF
# tests, the end-to-end tests against real backends and the Helm chart's tests. Installs what is
# missing first.
# Needs root (eBPF programs, cgroups, network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== cargo fmt --check" >&2
cargo fmt --all --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test" >&2
# Includes the fuzz corpora replayed as regression tests on stable (`fuzz_corpus_replay`: every
# file of fuzz/corpus/ and fuzz/regressions/ through its target's harness; fuzzing itself is
# scripts/fuzz.sh, on nightly) and the short variants of the fault suite (scripts/faults.sh).
cargo test --workspace --all-targets --locked
echo "== helm chart" >&2
# The chart rendered by Helm 3 and 4, validated, its config checked by the binary the tests above
# built, and (as root) the agent run as the DaemonSet would run it. See scripts/test-helm.sh.
scripts/test-helm.sh target/debug/podscope
