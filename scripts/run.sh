#!/usr/bin/env bash
# Quick start: installs what is missing, builds podscope and the kubectl plugin
# (kubectl-podscope, installed into /usr/local/bin) and runs podscope with the embedded default
# config (or pass your own arguments, e.g. `scripts/run.sh run --config configs/debug.yaml`).
# eBPF needs root: run as root or with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --bin podscope
# `kubectl podscope` (docs/kubectl.md): built beside the agent and put on PATH, where kubectl
# finds plugins.
cargo build --release -p podscope-kubectl
plugin_dir=/usr/local/bin
if [ "$(id -u)" -ne 0 ]; then sudo install -m 0755 "${CARGO_TARGET_DIR:-target}"/release/kubectl-podscope "$plugin_dir/"
else install -m 0755 "${CARGO_TARGET_DIR:-target}"/release/kubectl-podscope "$plugin_dir/"; fi
if [ $# -eq 0 ]; then set -- run; fi
if [ "$(id -u)" -ne 0 ]; then exec sudo "${CARGO_TARGET_DIR:-target}"/release/podscope "$@"; fi
exec "${CARGO_TARGET_DIR:-target}"/release/podscope "$@"
