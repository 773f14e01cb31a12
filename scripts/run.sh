#!/usr/bin/env bash
# Quick start: installs what is missing, builds podscope and runs it with the embedded default
# config (or pass your own arguments, e.g. `scripts/run.sh run --config configs/debug.yaml`).
# eBPF needs root: run as root or with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --bin podscope
if [ $# -eq 0 ]; then set -- run; fi
if [ "$(id -u)" -ne 0 ]; then exec sudo target/release/podscope "$@"; fi
exec target/release/podscope "$@"
