"""Checks on the chart's rendered manifests, run by scripts/test-helm.sh.

  check_manifests.py schemas FILE           every kind has a schema; ServiceMonitors and
                                            PrometheusRules match the Prometheus Operator's models
                                            exactly (no unknown field)
  check_manifests.py extract-config FILE OUT  writes the ConfigMap's config.yaml to OUT and
                                            prints the agent container's env var names (the
                                            config may use them as ${env:NAME})
  check_manifests.py invariants FILE CASE   what the chart promises (least privilege, read-only
                                            host mounts, ports from the config, RBAC, dashboards
                                            and rules equal to the generated files), with exact
                                            expectations for the named values case
  check_manifests.py crd CRD MANIFEST...    the CRD's schema accepts the manifests (and refuses a
                                            broken one), its printer columns exist, status.nodes
                                            is a list-map keyed by node

  check_manifests.py agent FILE PODSCOPE [WITHOUT_CAP] [+VERB|-VERB]...
                                            runs the agent as the DaemonSet would: the rendered
                                            config (listen addresses moved to 127.0.0.1:0), uid 0
                                            with only the container's capabilities (minus
                                            WITHOUT_CAP, to show the check can fail), no_new_privs,
                                            the service-account files only when the pod mounts
                                            the token, and an API server (the Rust fake,
                                            podscope-fake-apiserver, from $PODSCOPE_FAKE_APISERVER)
                                            that authorizes with the rendered RBAC (with VERB
                                            added to or removed from every rule, for control runs);
                                            every configured probe must attach, /healthz and
                                            /readyz must answer 200, SIGTERM must stop it cleanly,
                                            and the agent must use every grant and be refused
                                            nothing; uprobe binaries under /proc/1/root/ are
                                            looked up under $PODSCOPE_TEST_HOST_ROOT instead when
                                            it is set

Exits 1 with one line per problem.
"""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

# Kinds kubernetes-validate has schemas for (core API); anything else needs a checker here.
CORE_KINDS = {"DaemonSet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ConfigMap", "Service", "CustomResourceDefinition"}
BASE_CAPS = {"BPF", "PERFMON"}
# Values cases (see scripts/test-helm.sh) that change what the invariants expect.
UPROBE_CAPS = {"SYS_PTRACE", "DAC_READ_SEARCH", "SYS_ADMIN"}
EXTRA_CAPS = {"uprobes-netadmin": UPROBE_CAPS | {"NET_ADMIN", "SYS_RESOURCE"}, "bash-commands": UPROBE_CAPS}
PRIVILEGED_CASES = {"privileged"}
HOST_PATHS = {
    "host-mounts": {"/sys/fs/cgroup", "/sys/kernel/tracing", "/sys/kernel/debug", "/var/lib/btfhub"},
    "persistent-queue": {"/sys/fs/cgroup", "/sys/kernel/tracing", "/var/lib/podscope/file_storage"},
}
# The one host mount the agent writes (hostMounts.persistentQueue), and where.
WRITABLE_HOST_MOUNTS = {"/var/lib/podscope/file_storage": "/var/lib/podscope/file_storage"}
DEFAULT_HOST_PATHS = {"/sys/fs/cgroup", "/sys/kernel/tracing"}
# Container ports exactly, where the case fixes them (the rest are checked against the config).
ALL_PORTS = {"telemetry": 8888, "session": 7070, "metrics": 9464, "otlp-grpc": 4317, "otlp-http": 4318}
NO_SCRAPE_PORTS = {"telemetry": 8888, "session": 7070, "otlp-grpc": 4317, "otlp-http": 4318}
EXACT_PORTS = {
    "default": ALL_PORTS,
    "jaeger": ALL_PORTS,
    "prometheus-operator": ALL_PORTS,
    # `prometheus: null` in these examples removes the chart's default exporter.
    "otlp-backend": NO_SCRAPE_PORTS,
    "prometheus-remote-write": NO_SCRAPE_PORTS,
}
# Cases with hostPorts.otlp: only the OTLP ports are bound on the node.
HOST_PORT_CASES = {"jaeger"}
# What the service account may read, exactly, where the case fixes it: (resources of the
# ClusterRole, {namespace: resources of the Role there}).
EXACT_API_ACCESS = {
    "default": ({"pods"}, {}),
    "otlp-backend": ({"pods", "namespaces"}, {}),
    "k8s-namespace-node": ({"pods", "namespaces", "nodes"}, {}),
    "k8s-one-namespace": (set(), {"shop": {"pods"}}),
    "k8s-no-api": (set(), {}),
    # peers need every pod, which makes the Role for filter.namespace redundant.
    "k8s-peers": ({"pods", "services"}, {}),
    # A named extension: its settings decide, the processor reading it adds nothing.
    "k8s-extension": ({"nodes"}, {"shop": {"pods"}}),
    # Users' programs: their EbpfProgram nodeSelectors read the node (programs' own rules apart).
    "user-programs": ({"pods", "nodes"}, {}),
    # Probes for namespace owners: their rules apart.
    "tenant-probes": ({"pods"}, {}),
    # TraceSessions: their rules apart; the extension needs every namespace's pods.
    "trace-sessions": ({"pods"}, {}),
    # Exported TraceSessions: the same RBAC (export adds a receiver and pipelines, no rules).
    "trace-sessions-export": ({"pods"}, {}),
}
# Cases whose agents run users' EbpfProgram objects (the rules apart from list + watch).
PROGRAM_CASES = {"user-programs"}
PROGRAM_RULES = [
    {"apiGroups": ["podscope.dev"], "resources": ["ebpfprograms"], "verbs": ["list", "watch"]},
    {"apiGroups": ["podscope.dev"], "resources": ["ebpfprograms/status"], "verbs": ["patch"]},
]
# Cases whose agents act on namespaced Probe objects (the rules after the programs' ones).
PROBE_CASES = {"tenant-probes"}
PROBE_RULES = [
    {"apiGroups": ["podscope.dev"], "resources": ["probes"], "verbs": ["list", "watch"]},
    {"apiGroups": ["podscope.dev"], "resources": ["probes/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
PROBE_EDITOR_RULES = [
    {"apiGroups": ["podscope.dev"], "resources": ["probes"],
     "verbs": ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]},
]
# Cases whose agents run TraceSession objects (the rules after the Probes' ones): their watch,
# their status (server-side apply) and their deletion after ttlAfterFinished; never get.
SESSION_CASES = {"trace-sessions", "trace-sessions-export"}
SESSION_RULES = [
    {"apiGroups": ["podscope.dev"], "resources": ["tracesessions"], "verbs": ["list", "watch", "delete"]},
    {"apiGroups": ["podscope.dev"], "resources": ["tracesessions/status"], "verbs": ["patch"]},
]
# Namespace owners' ClusterRole for `kubectl podscope run|get|describe|delete` (bound by a
# RoleBinding in their namespace; integration/tests/kubectl_sessions.rs runs the plugin with it).
TRACESESSION_EDITOR_RULES = [
    {"apiGroups": ["podscope.dev"], "resources": ["tracesessions"], "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": ["podscope.dev"], "resources": ["tracesessions/status"], "verbs": ["get"]},
]
# `kubectl podscope` users' ClusterRole (their targets) and Role in the release's namespace (the
# agents' session endpoint), never bound by the chart (docs/kubectl.md, "Access").
KUBECTL_CLUSTER_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    {"apiGroups": ["apps"], "resources": ["deployments", "replicasets", "statefulsets", "daemonsets"], "verbs": ["get", "list"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list"]},
]
KUBECTL_ROLE_RULES = [
    {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create", "get"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
]
# Cases without the session endpoint (session.enabled=false): no port, no extension, no roles.
NO_SESSION_CASES = {"session-off"}
# Cases that turn on the dashboards' ConfigMaps and the PrometheusRule.
DASHBOARD_CASES = {"dashboards-rules"}
CHART = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The k8s_metadata extension lists and watches (kube-rs watcher); it never gets one object.
API_VERBS = ["list", "watch"]


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def one(docs, kind):
    found = [d for d in docs if d.get("kind") == kind]
    return found[0] if len(found) == 1 else None


def config_map(docs):
    """The ConfigMap holding the agent's config (the dashboards' ConfigMaps are others)."""
    found = [d for d in docs if d.get("kind") == "ConfigMap" and "config.yaml" in d.get("data", {})]
    return found[0] if len(found) == 1 else None


def config_of(docs):
    return yaml.safe_load(config_map(docs)["data"]["config.yaml"])


def unknown_keys(given, parsed, path=""):
    """Keys of `given` that the model dropped (pydantic ignores unknown fields)."""
    problems = []
    if isinstance(given, dict) and isinstance(parsed, dict):
        for key, value in given.items():
            where = f"{path}.{key}" if path else key
            if key not in parsed:
                problems.append(f"{where}: unknown field")
            else:
                problems += unknown_keys(value, parsed[key], where)
    elif isinstance(given, list) and isinstance(parsed, list):
        for i, (g, p) in enumerate(zip(given, parsed)):
            problems += unknown_keys(g, p, f"{path}[{i}]")
    return problems


def check_schemas(docs):
    problems = []
    for doc in docs:
        kind = doc.get("kind")
        if kind in CORE_KINDS:
            continue  # kubernetes-validate --strict checked it
        if kind in ("ServiceMonitor", "PrometheusRule") and doc.get("apiVersion") == "monitoring.coreos.com/v1":
            from cloudcoil.models.prometheus_operator import v1

            try:
                model = getattr(v1, kind).model_validate(doc)
            except Exception as e:  # pydantic.ValidationError, reported as is
                problems.append(f"{kind}: {e}")
                continue
            dumped = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
            problems += [f"{kind}: {p}" for p in unknown_keys(doc, dumped)]
        else:
            problems.append(f"{doc.get('apiVersion')} {kind}: no schema to validate it against")
    return problems


def port_of(endpoint):
    return int(str(endpoint).rsplit(":", 1)[1])


def first_of_type(section, type_name):
    ids = sorted(i for i in (section or {}) if i.split("/")[0] == type_name)
    return ids[0] if ids else None


def expected_ports(config):
    """Container port name -> number, derived from the podscope config independently of the chart."""
    ports = {"telemetry": port_of(config["service"]["telemetry"]["metrics"]["address"])}
    session = (config.get("extensions") or {}).get("session")
    if session is not None and "session" in ((config.get("service") or {}).get("extensions") or []):
        ports["session"] = port_of(session.get("endpoint", "127.0.0.1:7070"))
    prometheus = first_of_type(config.get("exporters"), "prometheus")
    if prometheus:
        ports["metrics"] = port_of((config["exporters"][prometheus] or {}).get("endpoint", "0.0.0.0:9464"))
    otlp = first_of_type(config.get("receivers"), "otlp")
    if otlp:
        protocols = (config["receivers"][otlp] or {}).get("protocols") or {}
        for protocol, default in (("grpc", "0.0.0.0:4317"), ("http", "0.0.0.0:4318")):
            if protocol in protocols:
                ports[f"otlp-{protocol}"] = port_of((protocols[protocol] or {}).get("endpoint", default))
    return ports


def k8s_metadata_in_use(config):
    """The k8s_metadata extensions that run, {config path: settings}: those service.extensions
    lists, and the one each k8sattributes processor a pipeline names runs for itself when it
    names no `extension` (with the processor's settings). The agent starts no other."""
    service = config.get("service") or {}
    in_use = {
        f"extensions.{ext_id}": (config.get("extensions") or {}).get(ext_id) or {}
        for ext_id in service.get("extensions") or []
        if ext_id.split("/")[0] == "k8s_metadata"
    }
    named = set()
    for pipeline in (service.get("pipelines") or {}).values():
        named.update((pipeline or {}).get("processors") or [])
    for component_id, settings in (config.get("processors") or {}).items():
        if component_id.split("/")[0] == "k8sattributes" and component_id in named and "extension" not in (settings or {}):
            in_use[f"processors.{component_id}"] = settings or {}
    return in_use


def runs_user_programs(config):
    """Whether an ebpf receiver's user_programs.extension names a running k8s_metadata
    extension that reads the API server with the service account."""
    in_use = k8s_metadata_in_use(config)
    for component_id, settings in (config.get("receivers") or {}).items():
        if component_id.split("/")[0] != "ebpf":
            continue
        extension = ((settings or {}).get("user_programs") or {}).get("extension")
        used = in_use.get(f"extensions.{extension}") if extension else None
        if used is not None and used.get("auth_type", "serviceAccount") == "serviceAccount":
            return True
    return False


def runs_tenant_probes(config):
    """Whether an ebpf receiver's tenant_probes.extension names a running k8s_metadata
    extension that reads the API server with the service account."""
    in_use = k8s_metadata_in_use(config)
    for component_id, settings in (config.get("receivers") or {}).items():
        if component_id.split("/")[0] != "ebpf":
            continue
        extension = ((settings or {}).get("tenant_probes") or {}).get("extension")
        used = in_use.get(f"extensions.{extension}") if extension else None
        if used is not None and used.get("auth_type", "serviceAccount") == "serviceAccount":
            return True
    return False


def runs_trace_sessions(config):
    """Whether the session extension's trace_sessions.extension names a running k8s_metadata
    extension that reads the API server with the service account."""
    session = ((config.get("extensions") or {}).get("session") or {})
    extension = (session.get("trace_sessions") or {}).get("extension")
    used = k8s_metadata_in_use(config).get(f"extensions.{extension}") if extension else None
    return used is not None and used.get("auth_type", "serviceAccount") == "serviceAccount"


def expected_api_access(config):
    """(cluster-wide resources, {namespace: resources}) the service account needs, from the
    k8s_metadata extensions' behaviour: auth_type serviceAccount or unset (in-cluster in a pod) reads with the
    pod's token; pods cluster-wide, or in filter.namespace; all namespaces for `from: namespace`
    rules, the node for `from: node` rules; every pod and service with peers.enabled."""
    cluster, namespaced = set(), {}
    if runs_user_programs(config):
        cluster.add("nodes")  # EbpfProgram nodeSelectors
    for settings in k8s_metadata_in_use(config).values():
        if settings.get("auth_type", "serviceAccount") != "serviceAccount":
            continue
        namespace = (settings.get("filter") or {}).get("namespace")
        if namespace:
            namespaced.setdefault(namespace, set()).add("pods")
        else:
            cluster.add("pods")
        extract = settings.get("extract") or {}
        for rule in (extract.get("labels") or []) + (extract.get("annotations") or []):
            source = (rule or {}).get("from", "pod")
            if source in ("namespace", "node"):
                cluster.add(source + "s")
        # The peer index: pod IPs and Service cluster IPs of the whole cluster.
        if (settings.get("peers") or {}).get("enabled"):
            cluster.update({"pods", "services"})
    if "pods" in cluster:
        namespaced = {}
    return cluster, namespaced


def node_name_vars(config):
    """Env vars the extensions take the node name from (none with filter.node or host mode)."""
    names = set()
    for settings in k8s_metadata_in_use(config).values():
        node_filter = settings.get("filter") or {}
        if settings.get("auth_type") != "none" and not node_filter.get("node"):
            names.add(node_filter.get("node_from_env_var", "NODE_NAME"))
    return names


def check_dashboards_and_rules(docs, case, expect):
    """Off by default; when on, one ConfigMap per dashboards/*.json with the sidecar's label and
    the file's JSON unchanged, and a PrometheusRule whose groups are rules/podscope-alerts.yaml's."""
    dashboards = {}
    for d in docs:
        if d.get("kind") == "ConfigMap" and "config.yaml" not in d.get("data", {}):
            dashboards.update({name: (d["metadata"], text) for name, text in d["data"].items()})
    rules = [d for d in docs if d.get("kind") == "PrometheusRule"]
    if case not in DASHBOARD_CASES:
        expect(not dashboards and not rules, "dashboards and the PrometheusRule are off by default")
        return
    files = sorted(os.listdir(os.path.join(CHART, "dashboards")))
    expect(sorted(dashboards) == files, f"dashboard ConfigMaps hold {sorted(dashboards)}, want {files}")
    for name, (meta, text) in dashboards.items():
        with open(os.path.join(CHART, "dashboards", name)) as f:
            expect(json.loads(text) == json.load(f), f"{name}: the ConfigMap's JSON differs from the file")
        expect(meta["labels"].get("grafana_dashboard") == "1", f"{name}: no grafana_dashboard: \"1\" label")
        expect(meta.get("annotations") == {"grafana_folder": "podscope"}, f"{name}: annotations {meta.get('annotations')}")
    with open(os.path.join(CHART, "rules", "podscope-alerts.yaml")) as f:
        want = yaml.safe_load(f)
    expect(len(rules) == 1 and rules[0]["spec"] == want, "the PrometheusRule's spec must be rules/podscope-alerts.yaml")
    expect(len(rules) == 1 and rules[0]["metadata"]["labels"].get("release") == "kube-prometheus-stack",
           "prometheusRule.labels must reach the PrometheusRule")


def check_invariants(docs, case):
    problems = []

    def expect(condition, message):
        if not condition:
            problems.append(message)

    daemonset = one(docs, "DaemonSet")
    if daemonset is None:
        return ["exactly one DaemonSet expected"]
    config = config_of(docs)
    pod = daemonset["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    security = container["securityContext"]

    expect(spec.get("hostPID") is True, "hostPID must be true")
    expect(not spec.get("hostNetwork"), "hostNetwork must be off")
    expect(security.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true")
    expect(container["args"] == ["run", "--config", "/etc/podscope/config.yaml"], f"args: {container['args']}")
    if case in PRIVILEGED_CASES:
        expect(security.get("privileged") is True, "security.privileged=true must render privileged: true")
        expect("capabilities" not in security, "privileged containers list no capabilities")
    else:
        expect(security.get("privileged") is False, "privileged must be false")
        expect(security.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
        caps = security.get("capabilities") or {}
        expect(caps.get("drop") == ["ALL"], f"capabilities.drop must be [ALL], got {caps.get('drop')}")
        want = BASE_CAPS | EXTRA_CAPS.get(case, set())
        got = caps.get("add") or []
        expect(sorted(got) == sorted(want), f"capabilities.add must be {sorted(want)}, got {got}")

    # The node name from the downward API: the k8s_metadata watch is scoped by it. NODE_NAME
    # always (the documented default), and whatever filter.node_from_env_var names.
    env = {e["name"]: e for e in container.get("env", [])}
    for name in node_name_vars(config) | {"NODE_NAME"}:
        expect(
            env.get(name, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName",
            f"{name} must come from fieldRef spec.nodeName",
        )

    # Host mounts: exactly the expected paths, every one read-only.
    host_volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    want_paths = HOST_PATHS.get(case, DEFAULT_HOST_PATHS)
    expect(set(host_volumes.values()) == want_paths, f"hostPath volumes {sorted(host_volumes.values())}, want {sorted(want_paths)}")
    for mount in container["volumeMounts"]:
        if mount["name"] in host_volumes:
            host_path = host_volumes[mount["name"]]
            if WRITABLE_HOST_MOUNTS.get(host_path) == mount["mountPath"]:
                expect(not mount.get("readOnly"), f"the persistent queue at {mount['mountPath']} must be writable")
            else:
                expect(mount.get("readOnly") is True, f"host mount {mount['mountPath']} must be readOnly")
    expect(
        any(m["mountPath"] == "/sys/fs/cgroup" and m["name"] in host_volumes for m in container["volumeMounts"]),
        "the host's cgroup tree must be mounted at /sys/fs/cgroup",
    )

    # Ports come from the config; probes hit the telemetry port.
    want_ports = expected_ports(config)
    got_ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    expect(got_ports == want_ports, f"container ports {got_ports}, config says {want_ports}")
    host_ports = {p["name"]: p["hostPort"] for p in container.get("ports", []) if "hostPort" in p}
    want_host = {n: got_ports[n] for n in ("otlp-grpc", "otlp-http") if n in got_ports} if case in HOST_PORT_CASES else {}
    expect(host_ports == want_host, f"host ports {host_ports}, want {want_host}")
    if case in EXACT_PORTS:
        expect(got_ports == EXACT_PORTS[case], f"container ports {got_ports}, want {EXACT_PORTS[case]}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        expect(get == {"path": path, "port": "telemetry"}, f"{probe}: {get}")

    annotations = pod["metadata"].get("annotations", {})
    expect("checksum/config" in annotations, "the pod template must carry checksum/config")
    if "prometheus.io/scrape" in annotations:
        expect(annotations.get("prometheus.io/port") == str(want_ports.get("metrics")), f"prometheus.io/port {annotations.get('prometheus.io/port')}")

    service = one(docs, "Service")
    if service is not None:
        for port in service["spec"]["ports"]:
            expect(port["targetPort"] in got_ports, f"Service port {port['name']} targets unknown {port['targetPort']}")
            expect(port["port"] == got_ports.get(port["targetPort"]), f"Service port {port['name']}: {port['port']} != container's")
        # Not the session port: it listens on the pod's loopback, reached by port-forward only.
        expect({p["name"] for p in service["spec"]["ports"]} == set(got_ports) - {"session"},
               "the Service exposes every container port but the session endpoint")

    check_dashboards_and_rules(docs, case, expect)

    monitor = one(docs, "ServiceMonitor")
    if monitor is not None:
        expect(service is not None, "a ServiceMonitor needs the Service")
        endpoints = sorted(e["port"] for e in monitor["spec"]["endpoints"])
        want = sorted(["telemetry"] + (["metrics"] if "metrics" in want_ports else []))
        expect(endpoints == want, f"ServiceMonitor endpoints {endpoints}, want {want}")
        expect(monitor["spec"]["selector"]["matchLabels"] == daemonset["spec"]["selector"]["matchLabels"], "ServiceMonitor selects the agents' Service")

    # RBAC: list + watch, exactly the resources the config's k8s_metadata extensions read, in
    # the narrowest scope (a Role where filter.namespace confines the extension).
    want_cluster, want_namespaced = expected_api_access(config)
    if case in EXACT_API_ACCESS:
        expect((want_cluster, want_namespaced) == EXACT_API_ACCESS[case],
               f"config reads {sorted(want_cluster)} cluster-wide and {want_namespaced} from the API server, want {EXACT_API_ACCESS[case]}")
    account = one(docs, "ServiceAccount")
    account_namespace = daemonset["metadata"]["namespace"]
    subject = {"kind": "ServiceAccount", "name": spec.get("serviceAccountName"), "namespace": account_namespace}
    expect(account is not None and account["metadata"]["name"] == spec.get("serviceAccountName")
           and account["metadata"]["namespace"] == account_namespace, "the pod runs as the chart's service account")

    programs = runs_user_programs(config)
    expect(programs == (case in PROGRAM_CASES), f"users' programs run: {programs}, expected for {sorted(PROGRAM_CASES)}")
    probes = runs_tenant_probes(config)
    expect(probes == (case in PROBE_CASES), f"Probes acted on: {probes}, expected for {sorted(PROBE_CASES)}")
    sessions = runs_trace_sessions(config)
    expect(sessions == (case in SESSION_CASES), f"TraceSessions run: {sessions}, expected for {sorted(SESSION_CASES)}")
    # Roles checked apart: the programs' Roles, the Probe and TraceSession editors' ClusterRoles.
    programs_role = lambda d: d["metadata"]["name"].endswith(("-programs", "-probe-editor", "-tracesession-editor"))
    kubectl_role = lambda d: d["metadata"]["name"].endswith("-kubectl")
    # The session endpoint on the pod's loopback only, and the plugin users' roles beside it.
    session = (config.get("extensions") or {}).get("session")
    enabled = "session" in ((config.get("service") or {}).get("extensions") or [])
    kubectl_roles = [d for d in docs if d.get("kind") in ("ClusterRole", "Role") and d["metadata"]["name"].endswith("-kubectl")]
    if case in NO_SESSION_CASES:
        expect(session is None and not enabled and not kubectl_roles,
               f"session.enabled=false: no session extension ({session}, enabled {enabled}) nor kubectl roles ({kubectl_roles})")
    else:
        expect(enabled and session is not None and str(session.get("endpoint", "")).startswith("127.0.0.1:"),
               f"the session extension, enabled, on the pod's loopback: {session}, enabled {enabled}")
        cluster_roles = [d for d in kubectl_roles if d["kind"] == "ClusterRole"]
        roles = [d for d in kubectl_roles if d["kind"] == "Role"]
        expect(len(cluster_roles) == 1 and cluster_roles[0]["rules"] == KUBECTL_CLUSTER_RULES,
               f"one kubectl users' ClusterRole with {KUBECTL_CLUSTER_RULES}, got {cluster_roles}")
        expect(len(roles) == 1 and roles[0]["rules"] == KUBECTL_ROLE_RULES
               and roles[0]["metadata"].get("namespace") == daemonset["metadata"]["namespace"],
               f"one kubectl users' Role in the agents' namespace with {KUBECTL_ROLE_RULES}, got {roles}")
        expect(not [d for d in docs if d.get("kind") in ("ClusterRoleBinding", "RoleBinding") and d["roleRef"]["name"].endswith("-kubectl")],
               "the kubectl users' roles are never bound by the chart")
    editors = [d for d in docs if d.get("kind") == "ClusterRole" and d["metadata"]["name"].endswith("-probe-editor")]
    if probes:
        labels = editors[0]["metadata"].get("labels", {}) if len(editors) == 1 else {}
        expect(len(editors) == 1 and editors[0]["rules"] == PROBE_EDITOR_RULES
               and labels.get("rbac.authorization.k8s.io/aggregate-to-admin") == "true"
               and labels.get("rbac.authorization.k8s.io/aggregate-to-edit") == "true",
               f"one probe-editor ClusterRole aggregated to admin and edit, got {editors}")
        expect(not [d for d in docs if d.get("kind") == "ClusterRoleBinding" and d["roleRef"]["name"].endswith("-probe-editor")],
               "the probe-editor ClusterRole is aggregated, never bound by the chart")
    else:
        expect(not editors, f"no probe-editor ClusterRole without Probes, got {editors}")

    session_editors = [d for d in docs if d.get("kind") == "ClusterRole" and d["metadata"]["name"].endswith("-tracesession-editor")]
    if sessions:
        expect(len(session_editors) == 1 and session_editors[0]["rules"] == TRACESESSION_EDITOR_RULES,
               f"one tracesession-editor ClusterRole with {TRACESESSION_EDITOR_RULES}, got {session_editors}")
        expect(not [d for d in docs if d.get("kind") in ("ClusterRoleBinding", "RoleBinding") and d["roleRef"]["name"].endswith("-tracesession-editor")],
               "the tracesession-editor ClusterRole is for namespace owners' RoleBindings, never bound by the chart")
    else:
        expect(not session_editors, f"no tracesession-editor ClusterRole without TraceSessions, got {session_editors}")

    def check_role(role_kind, binding_kind, namespace, resources):
        roles = [d for d in docs if d.get("kind") == role_kind and d["metadata"].get("namespace") == namespace and not programs_role(d) and not kubectl_role(d)]
        bindings = [d for d in docs if d.get("kind") == binding_kind and d["metadata"].get("namespace") == namespace and not programs_role(d)]
        where = f"{role_kind} in {namespace}" if namespace else role_kind
        if not resources:
            expect(not roles and not bindings, f"no {where} nor {binding_kind} expected, got {[d['kind'] for d in roles + bindings]}")
            return
        if len(roles) != 1 or len(bindings) != 1:
            return problems.append(f"one {where} and one {binding_kind} expected for {sorted(resources)}")
        (role,), (binding,) = roles, bindings
        extra = (PROGRAM_RULES if programs else []) + (PROBE_RULES if probes else []) + (SESSION_RULES if sessions else []) if role_kind == "ClusterRole" else []
        expect(role["rules"][1:] == extra, f"{where}: rules after the first {role['rules'][1:]}, want {extra}")
        rule = role["rules"][0]
        expect(rule["apiGroups"] == [""], f"{where}: apiGroups {rule['apiGroups']}")
        expect(rule["verbs"] == API_VERBS, f"{where}: verbs {rule['verbs']}, want {API_VERBS}")
        expect(set(rule["resources"]) == resources, f"{where}: resources {rule['resources']}, want {sorted(resources)}")
        expect("resourceNames" not in rule, f"{where}: resourceNames {rule.get('resourceNames')}")
        expect(binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role["metadata"]["name"]},
               f"{binding_kind} roleRef {binding['roleRef']}")
        expect(binding["subjects"] == [subject], f"{binding_kind} subjects {binding['subjects']}, want [{subject}]")

    check_role("ClusterRole", "ClusterRoleBinding", None, want_cluster)
    # Users' programs: get ConfigMaps in the release's namespace, create Events in default.
    want_program_roles = {}
    if programs:
        want_program_roles.setdefault(account_namespace, set()).add(("configmaps", "get"))
        want_program_roles.setdefault("default", set()).add(("events", "create"))
    got_program_roles = {}
    for role in (d for d in docs if d.get("kind") == "Role" and programs_role(d)):
        for rule in role["rules"]:
            expect(rule["apiGroups"] == [""] and len(rule["resources"]) == 1 and len(rule["verbs"]) == 1, f"programs Role rule {rule}")
            got_program_roles.setdefault(role["metadata"]["namespace"], set()).add((rule["resources"][0], rule["verbs"][0]))
        binding = [d for d in docs if d.get("kind") == "RoleBinding" and d["metadata"] == {**d["metadata"], "name": role["metadata"]["name"], "namespace": role["metadata"]["namespace"]}]
        expect(len(binding) == 1 and binding[0]["subjects"] == [subject], f"programs RoleBinding in {role['metadata']['namespace']}")
    expect(got_program_roles == want_program_roles, f"programs Roles {got_program_roles}, want {want_program_roles}")
    role_namespaces = {d["metadata"].get("namespace") for d in docs if d.get("kind") in ("Role", "RoleBinding") and not programs_role(d) and not kubectl_role(d)}
    for namespace in sorted(role_namespaces | set(want_namespaced)):
        check_role("Role", "RoleBinding", namespace, want_namespaced.get(namespace, set()))
    reads_api = bool(want_cluster or want_namespaced)
    expect(spec.get("automountServiceAccountToken") is reads_api, "the token is mounted exactly when the API server is read")
    return problems


CAP_NUMBERS = {"DAC_READ_SEARCH": 2, "NET_ADMIN": 12, "SYS_PTRACE": 19, "SYS_ADMIN": 21, "SYS_RESOURCE": 24, "PERFMON": 38, "BPF": 39}
LISTEN_KEYS = {"endpoint", "address"}


def loopback_listeners(node, path=""):
    """The config with every listen address of receivers, the prometheus exporter and telemetry
    on 127.0.0.1:0 (tests never bind fixed ports; exporters' remote endpoints are left alone)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            where = f"{path}.{key}" if path else key
            listens = where.startswith("receivers.") or where.startswith("service.telemetry.") or re.match(r"exporters\.prometheus(/[^.]*)?\.endpoint$", where)
            if key in LISTEN_KEYS and isinstance(value, str) and listens:
                out[key] = "127.0.0.1:0"
            else:
                out[key] = loopback_listeners(value, where)
        return out
    return node


def bounding_caps():
    with open("/proc/self/status") as f:
        mask = int(re.search(r"^CapBnd:\s*([0-9a-f]+)$", f.read(), re.M).group(1), 16)
    return {name for name, bit in CAP_NUMBERS.items() if mask >> bit & 1}


def downward_value(field_path, pod_name, namespace):
    """What the kubelet puts in an env var from the downward API, here on this machine."""
    return {"spec.nodeName": os.uname().nodename, "status.hostIP": "127.0.0.1",
            "metadata.name": pod_name, "metadata.namespace": namespace}.get(field_path, "stand-in-for-" + field_path)


def check_api_use(fake, node, grants, peers):
    """Problems with what the agent asked the fake API server: anything refused (the chart's
    RBAC is short), anything granted but never asked for (the RBAC is more than needed), and pod
    or node requests not confined to this node (pods are not, for the peer index: `peers`)."""
    problems = []
    used, refused = set(), set()
    for r in fake.recorded():
        what = (r["verb"], r["resource"], r["scope"])
        (used if r["status"] in (200, 201) else refused).add(what)
        if r["status"] == 401:
            problems.append(f"unauthenticated: {r}")
        fields = set((r["fieldSelector"] or "").split(","))
        if r["resource"] == "pods" and r["verb"] != "get" and not peers and f"spec.nodeName={node}" not in fields:
            problems.append(f"{r['verb']} pods not confined to this node (fieldSelector {r['fieldSelector']!r})")
        if r["resource"] == "nodes" and r["verb"] != "get" and f"metadata.name={node}" not in fields:
            problems.append(f"{r['verb']} nodes not confined to this node (fieldSelector {r['fieldSelector']!r})")
    show = lambda triples: ", ".join(f"{v} {res} ({'cluster-wide' if sc == 'cluster' else 'in ' + sc})" for v, res, sc in sorted(triples))
    if refused:
        problems.append("refused by the chart's RBAC: " + show(refused))
    used = granting(used, grants)
    if grants - used:
        problems.append("granted but never used: " + show(grants - used))
    return problems


def granting(requests, grants):
    """`requests` (verb, resource, scope) with, for each made in a namespace under a
    cluster-wide grant only (a ClusterRole's rule for namespaced objects, e.g. deleting one
    TraceSession), that grant as used too."""
    return set(requests) | {(v, res, "cluster") for v, res, sc in requests
                            if (v, res, "cluster") in grants and (v, res, sc) not in grants}


def api_settled(fake, grants):
    """Every granted request seen, and every listed resource watched since (a watcher lists,
    then watches): nothing more to wait for."""
    seen = granting({(r["verb"], r["resource"], r["scope"]) for r in fake.recorded()}, grants)
    listed = {(res, sc) for v, res, sc in seen if v == "list"}
    watched = {(res, sc) for v, res, sc in seen if v == "watch"}
    return grants <= seen and listed <= watched


def cluster_objects(node, namespaces, agent_namespace, agent_pod):
    """A node, the namespaces, and in each a running pod on the node (in the agent's namespace,
    the agent's own pod) and a Service, plus one pod on another node that a node-scoped watch
    must not get."""

    def meta(name, namespace=None):
        m = {"name": name, "uid": f"uid-{namespace or 'cluster'}-{name}",
             "creationTimestamp": "2026-01-01T00:00:00Z", "labels": {"team": "checkout"},
             "annotations": {"topology.kubernetes.io/zone": "zone-a"}}
        if namespace:
            m["namespace"] = namespace
        return m

    def pod(name, namespace, on_node):
        container_id = "containerd://" + secrets.token_hex(32)
        return {
            "apiVersion": "v1", "kind": "Pod", "metadata": meta(name, namespace),
            "spec": {"nodeName": on_node, "containers": [{"name": "main", "image": "registry.example/app:1.0"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.10", "startTime": "2026-01-01T00:00:00Z",
                       "containerStatuses": [{"name": "main", "image": "registry.example/app:1.0",
                                              "imageID": "", "containerID": container_id, "ready": True,
                                              "restartCount": 0, "started": True}]},
        }

    pods = [pod(agent_pod if ns == agent_namespace else "app", ns, node) for ns in namespaces]
    pods.append(pod("elsewhere", agent_namespace, node + "-other"))
    return {
        "pods": pods,
        "services": [{"apiVersion": "v1", "kind": "Service", "metadata": meta("app", ns),
                      "spec": {"type": "ClusterIP", "clusterIP": f"10.96.0.{i + 10}", "clusterIPs": [f"10.96.0.{i + 10}"],
                               "ports": [{"port": 80, "protocol": "TCP"}]}, "status": {}}
                     for i, ns in enumerate(namespaces)],
        "namespaces": [{"apiVersion": "v1", "kind": "Namespace", "metadata": meta(ns), "spec": {},
                        "status": {"phase": "Active"}} for ns in namespaces],
        "nodes": [{"apiVersion": "v1", "kind": "Node", "metadata": meta(node), "spec": {}, "status": {}}],
    }


class FakeApiServer:
    """The Rust fake API server (podscope-fake-apiserver) as a process: HTTPS to the pod's
    service account, the rendered RBAC enforced, `objects` served; what it grants and every
    request it answered, read back here."""

    def __init__(self, work, rbac_docs, namespace, account, objects):
        binary = os.environ.get("PODSCOPE_FAKE_APISERVER")
        if not binary or not os.access(binary, os.X_OK):
            raise RuntimeError(f"PODSCOPE_FAKE_APISERVER={binary!r} is not an executable (scripts/test-helm.sh sets it)")
        paths = {name: os.path.join(work, name) for name in ("rbac.json", "objects.json", "requests.jsonl")}
        for name, value in (("rbac.json", rbac_docs), ("objects.json", objects)):
            with open(paths[name], "w") as f:
                json.dump(value, f)
        self.secrets = os.path.join(work, "serviceaccount")
        self._log = paths["requests.jsonl"]
        self._process = subprocess.Popen(
            [binary, "--service-account", f"{namespace}/{account}", "--rbac", paths["rbac.json"],
             "--objects", paths["objects.json"], "--secrets", self.secrets, "--log", self._log],
            stdout=subprocess.PIPE, text=True)
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"podscope-fake-apiserver exited with {self._process.wait()}")
        ready = json.loads(line)
        self.port = int(ready["url"].rsplit(":", 1)[1])
        self.grants = {(g["verb"], g["resource"], g["scope"]) for g in ready["grants"]}

    def recorded(self):
        with open(self._log) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]

    def stop(self):
        self._process.send_signal(signal.SIGTERM)
        self._process.wait(timeout=30)


def run_agent(docs, podscope, without, rbac_edits):
    daemonset = one(docs, "DaemonSet")
    pod_spec = daemonset["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    caps = set((container["securityContext"].get("capabilities") or {}).get("add") or [])
    caps.discard(without)
    here = bounding_caps()
    missing = caps - here
    if missing:
        # This sandbox may withhold some (e.g. SYS_RESOURCE, which kernels >= 5.11 do not need for BPF).
        print(f"note: not available here, run without: {sorted(missing)}", file=sys.stderr)
    caps &= here
    config = loopback_listeners(config_of(docs))
    # In the pod /proc/1/root is the host's root (hostPID); here the test names the mount
    # namespace standing in for the host or a container.
    host_root = os.environ.get("PODSCOPE_TEST_HOST_ROOT")
    uprobes = (((config.get("receivers") or {}).get("ebpf") or {}).get("probes") or {}).get("uprobes") or []
    for entry in uprobes if host_root else []:
        if str(entry.get("binary", "")).startswith("/proc/1/root/"):
            entry["binary"] = host_root + entry["binary"][len("/proc/1/root"):]
    config.setdefault("service", {}).setdefault("telemetry", {}).setdefault("logs", {})["encoding"] = "json"
    probes = sorted(((config.get("receivers") or {}).get("ebpf") or {}).get("probes") or {})
    work = tempfile.mkdtemp()
    config_path = os.path.join(work, "config.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f)

    # The API server, authorizing with the rendered RBAC (verbs edited by a control run: "+get"
    # adds a verb to every rule, "-watch" removes one).
    namespace, pod_name = daemonset["metadata"]["namespace"], "podscope-test"
    rbac_docs = [d for d in docs if d.get("kind") in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
    for edit in rbac_edits:
        for doc in rbac_docs:
            for rule in doc.get("rules") or []:
                rule["verbs"] = [v for v in rule["verbs"] if v != edit[1:]] + ([edit[1:]] if edit[0] == "+" else [])
    node = os.uname().nodename
    watched_namespaces = {(s.get("filter") or {}).get("namespace") for s in k8s_metadata_in_use(config).values()}
    objects = cluster_objects(node, sorted({namespace, "default"} | watched_namespaces - {None}), namespace, pod_name)
    if runs_user_programs(config):
        # An EbpfProgram whose object (a ConfigMap of the agent's namespace) is not an object:
        # the agent reads the ConfigMap, fails the program, writes its status and an Event —
        # every grant of the programs' RBAC used.
        objects["configmaps"] = [{"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "podscope-programs", "namespace": namespace},
                                  "binaryData": {"broken.bpf.o": "bm90IGFuIG9iamVjdA=="}}]
        objects["ebpfprograms"] = [{"apiVersion": "podscope.dev/v1alpha1", "kind": "EbpfProgram",
                                    "metadata": {"name": "broken"},
                                    "spec": {"object": {"configMap": {"namespace": namespace, "name": "podscope-programs",
                                                                      "key": "broken.bpf.o"}},
                                             "metrics": {"counters": [{"name": "broken.calls", "map": "calls"}]}}}]
    if runs_trace_sessions(config):
        # A TraceSession of a pod whose container has no cgroup here: it never runs on this
        # node, ends after 2 s (the merged status written) and is deleted 1 s later — every
        # grant of the sessions' RBAC used.
        objects["tracesessions"] = [{"apiVersion": "podscope.dev/v1alpha1", "kind": "TraceSession",
                                     "metadata": {"name": "short", "namespace": "default"},
                                     "spec": {"targets": {"pods": ["app"]}, "probes": ["exec"],
                                              "duration": "2s", "ttlAfterFinished": "1s"}}]
    fake = FakeApiServer(work, rbac_docs, namespace, pod_spec["serviceAccountName"], objects)
    grants = fake.grants
    # What the kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount, only when the pod
    # spec asks for the token (the fake wrote it to its secrets directory). /run is a fresh tmpfs
    # in the agent's mount namespace: in the pod it is the image's own, not the host's.
    if not pod_spec.get("automountServiceAccountToken"):
        shutil.rmtree(fake.secrets)
    mount_run = ('mount -t tmpfs podscope-test-run /var/run && if [ -d "$1/serviceaccount" ]; then '
                 'mkdir -p /var/run/secrets/kubernetes.io && cp -r "$1/serviceaccount" /var/run/secrets/kubernetes.io/; fi && '
                 'shift && exec "$@"')

    cap_list = ",".join(["-all"] + ["+" + c.lower() for c in sorted(caps)])
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", mount_run, "sh", work,
            "setpriv", f"--inh-caps={cap_list}", f"--ambient-caps={cap_list}", f"--bounding-set={cap_list}",
            "--no-new-privs", podscope, "run", "--config", config_path]
    env = dict(os.environ)
    # The kubelet's service env vars (every pod has them) point at the fake API server.
    env.update({"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(fake.port)})
    env.pop("KUBECONFIG", None)
    for var in container.get("env", []):
        field = ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        env[var["name"]] = downward_value(field, pod_name, namespace) if field else var.get("value", "stand-in-for-" + var["name"])
    print(f"capabilities: {sorted(caps)}", file=sys.stderr)
    log_path = os.path.join(work, "agent.log")
    problems = []
    with open(log_path, "w") as log:
        agent = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        events, ready, telemetry = [], False, None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and agent.poll() is None and not ready:
            events = []
            with open(log_path) as f:
                for line in f:
                    try:
                        events.append(json.loads(line))
                    except ValueError:
                        pass
            for event in events:
                fields = event.get("fields", {})
                if fields.get("message", "").startswith("agent telemetry at"):
                    telemetry = fields.get("address")
                if fields.get("message", "").startswith("everything is ready"):
                    ready = True
            time.sleep(0.1)
        if not ready:
            problems.append(f"the agent did not become ready (exit status {agent.poll()})")
        attached = [e["fields"]["probe"] for e in events if e.get("fields", {}).get("message") == "probe attached"]
        # Each uprobe entry reports itself; the probe is attached when all of them are.
        uprobes_attached = [e["fields"]["uprobe"] for e in events if e.get("fields", {}).get("message") == "uprobe attached"]
        if uprobes and len(uprobes_attached) == len(uprobes) and "uprobes" not in attached:
            attached.append("uprobes")
        attached.sort()
        if attached != probes:
            problems.append(f"probes attached: {attached}, configured: {probes}")
        for path in ("/healthz", "/readyz") if telemetry else ():
            try:
                with urllib.request.urlopen(f"http://{telemetry}{path}", timeout=5) as response:
                    status = response.status
            except Exception as e:  # HTTPError carries the status; anything else is a failure too
                status = getattr(e, "code", repr(e))
            if status != 200:
                problems.append(f"GET {path}: {status}")
        # Ready means pods are listed; the watches and the other resources' lists follow within
        # moments. Only a grant that is never used waits for the whole deadline.
        settle = time.monotonic() + 3
        while ready and time.monotonic() < settle and not api_settled(fake, grants):
            time.sleep(0.05)
        peers = any((p.get("peers") or {}).get("enabled") for p in k8s_metadata_in_use(config).values())
        problems += check_api_use(fake, node, grants, peers)
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
        try:
            code = agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            code = "killed after 30s"
        fake.stop()
    if code != 0:
        problems.append(f"exit status after SIGTERM: {code}")
    if problems:
        problems.append("API requests:\n" + "\n".join(json.dumps(r) for r in fake.recorded()))
        with open(log_path) as f:
            problems.append("agent log:\n" + f.read()[-4000:])
    shutil.rmtree(work, ignore_errors=True)
    return problems


def check_crd(crd, manifests):
    """A CustomResourceDefinition's promises: a structural OpenAPI schema that accepts the
    example manifests (and refuses one with an unknown decoder, a Probe's sampling ratio above
    1, or a TraceSession's probe that is not a trace probe), printer columns whose paths the
    schema has, a status subresource, and status.nodes a list-map keyed by node (what each
    agent's server-side apply relies on)."""
    import jsonschema

    problems = []
    (version,) = crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft7Validator(schema)
    for doc in manifests:
        for error in validator.iter_errors(doc):
            problems.append(f"{doc['metadata']['name']}: {'.'.join(str(p) for p in error.path)}: {error.message}")
    broken = json.loads(json.dumps(manifests[0]))
    if broken["kind"] == "Probe":
        broken["spec"]["probes"]["http"] = {"samplingRatio": 2}
        if not list(validator.iter_errors(broken)):
            problems.append("the schema accepts a sampling ratio above 1")
    elif broken["kind"] == "TraceSession":
        broken["spec"]["probes"] = ["exec", "syscalls"]
        if not list(validator.iter_errors(broken)):
            problems.append("the schema accepts a probe that is not a trace probe")
    else:
        broken["spec"]["metrics"]["counters"][0]["labels"][0]["decoder"] = "hexdump"
        if not list(validator.iter_errors(broken)):
            problems.append("the schema accepts an unknown decoder")
    if version.get("subresources", {}).get("status") != {}:
        problems.append("no status subresource")
    nodes = schema["properties"]["status"]["properties"]["nodes"]
    if (nodes.get("x-kubernetes-list-type"), nodes.get("x-kubernetes-list-map-keys")) != ("map", ["node"]):
        problems.append("status.nodes must be a list-map keyed by node")
    for column in version.get("additionalPrinterColumns", []):
        node = schema
        for part in column["jsonPath"].strip(".").split("."):
            name = part.split("[")[0]
            node = (node.get("properties") or {}).get(name) or ({"type": "object"} if name == "creationTimestamp" or name == "generation" else None)
            if node is None:
                problems.append(f"printer column {column['name']}: {column['jsonPath']} is not in the schema")
                break
            if "[" in part:
                node = node.get("items") or {}
    return problems


def podman_args(docs, config_dir, without):
    """`podman run` options for the rendered DaemonSet's container, exactly: its capabilities
    (minus `without`), user, read-only root, no_new_privs, host PID, its volume mounts (host
    paths read-only, the emptyDir as a tmpfs of its size limit, the ConfigMap from
    `config_dir`) and its environment. The pod's own network namespace: none but loopback."""
    daemonset = one(docs, "DaemonSet")
    pod_spec = daemonset["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    security = container["securityContext"]
    args = ["--network", "none", "--read-only", "--read-only-tmpfs=false", "--user", str(security["runAsUser"])]
    if pod_spec.get("hostPID"):
        args += ["--pid", "host"]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    caps = security["capabilities"]
    args += ["--cap-drop", ",".join(caps["drop"])]
    added = [c for c in caps.get("add") or [] if c != without]
    if added:
        args += ["--cap-add", ",".join(added)]
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "hostPath" in volume:
            mode = "ro" if mount.get("readOnly") else "rw"
            args += ["--volume", f"{volume['hostPath']['path']}:{mount['mountPath']}:{mode}"]
        elif "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit", "64Mi").replace("Mi", "m")
            args += ["--tmpfs", f"{mount['mountPath']}:rw,size={size}"]
        elif "configMap" in volume:
            args += ["--volume", f"{config_dir}:{mount['mountPath']}:ro"]
        else:
            raise SystemExit(f"volume {mount['name']}: no podman equivalent written yet")
    for var in container.get("env", []):
        field = ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        value = downward_value(field, "podscope-image-test", daemonset["metadata"]["namespace"]) if field else var.get("value", "")
        args += ["--env", f"{var['name']}={value}"]
    return args, container["args"]


def run_container(docs, image, seccomp, without):
    """Runs `image` as the DaemonSet's container under podman (runc) with `seccomp` (a profile
    file, or `unconfined`), and checks what a user relies on: with all its capabilities every
    configured probe attaches, /healthz and /readyz answer 200 and eBPF data is at the Prometheus
    endpoint; without one (`without`), every probe reports in its log line why it was skipped,
    and podscope_ebpf_probe_skipped says 1 for it."""
    config = config_of(docs)
    config.setdefault("service", {}).setdefault("telemetry", {}).setdefault("logs", {})["encoding"] = "json"
    probes = sorted(((config.get("receivers") or {}).get("ebpf") or {}).get("probes") or {})
    work = tempfile.mkdtemp()
    with open(os.path.join(work, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    options, args = podman_args(docs, work, without)
    name = f"podscope-image-test-{os.getpid()}"
    # runc: crun refuses this machine's hybrid cgroup layout. The ulimits: at most this
    # sandbox's own, which it cannot raise (no CAP_SYS_RESOURCE).
    run = ["podman", "run", "--detach", "--name", name, "--runtime", "runc",
           "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
           "--security-opt", f"seccomp={seccomp}"] + options + [image] + args
    print("podman " + " ".join(run[1:]), file=sys.stderr)
    problems = []
    started = subprocess.run(run, capture_output=True, text=True)
    if started.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        return [f"podman run failed: {started.stderr.strip()}"]

    def events():
        logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
        found = []
        for line in (logs.stdout + logs.stderr).splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                pass
        return found

    def inside(url):
        """GET url from inside the container's network namespace (it has only loopback)."""
        pid = subprocess.run(["podman", "inspect", "--format", "{{.State.Pid}}", name], capture_output=True, text=True).stdout.strip()
        got = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "curl", "-s", "-o", "-", "-w", "\n%{http_code}", url],
                             capture_output=True, text=True)
        body, _, code = got.stdout.rpartition("\n")
        return code, body

    try:
        ready, seen = False, []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not ready:
            seen = events()
            ready = any(e.get("fields", {}).get("message", "").startswith("everything is ready") for e in seen)
            time.sleep(0.2)
        if not ready:
            problems.append("the agent did not become ready")
        attached = sorted(e["fields"]["probe"] for e in seen if e.get("fields", {}).get("message") == "probe attached")
        skipped = [e["fields"]["message"] for e in seen if e.get("fields", {}).get("message", "").endswith("; skipped")]
        telemetry_port = port_of(config["service"]["telemetry"]["metrics"]["address"])
        prometheus_port = port_of(config["exporters"]["prometheus"]["endpoint"])
        if without is None:
            if attached != probes:
                problems.append(f"probes attached: {attached}, configured: {probes}; skipped: {skipped}")
            for path in ("/healthz", "/readyz"):
                code, body = inside(f"http://127.0.0.1:{telemetry_port}{path}")
                if code != "200":
                    problems.append(f"GET {path}: {code} {body}")
            # eBPF data at the Prometheus endpoint: the process probe's exec counters (this
            # check's own nsenter and curl exec on the host; the first collection comes one
            # interval after the start).
            deadline = time.monotonic() + 30
            while True:
                code, body = inside(f"http://127.0.0.1:{prometheus_port}/metrics")
                if "podscope_process_execs_total{" in body or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            if "podscope_process_execs_total{" not in body:
                problems.append(f"no podscope_process_execs_total at the Prometheus endpoint ({code})")
        else:
            # Each probe says why it was skipped (the kernel's refusal without the capability).
            for probe in probes:
                lines = [m for m in skipped if f"probe {probe}:" in m]
                if not lines or not any("Operation not permitted" in m or "Permission denied" in m for m in lines):
                    problems.append(f"without {without}: probe {probe} did not report a refusal: {lines or skipped}")
            code, body = inside(f"http://127.0.0.1:{telemetry_port}/metrics")
            for probe in probes:
                if f'podscope_ebpf_probe_skipped{{probe="{probe}"}} 1' not in body:
                    problems.append(f"without {without}: podscope_ebpf_probe_skipped is not 1 for {probe}")
            if attached:
                problems.append(f"without {without}: probes attached anyway: {attached}")
    finally:
        subprocess.run(["podman", "stop", "--time", "30", name], capture_output=True)
        state = subprocess.run(["podman", "inspect", "--format", "{{.State.ExitCode}}", name], capture_output=True, text=True).stdout.strip()
        if problems:
            problems.append("agent log:\n" + "\n".join(json.dumps(e) for e in events())[-4000:])
        subprocess.run(["podman", "rm", "--force", name], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    if state != "0":
        problems.append(f"exit status after SIGTERM: {state}")
    return problems


def main(argv):
    command, path = argv[1], argv[2]
    docs = load(path)
    if command == "schemas":
        problems = check_schemas(docs)
    elif command == "extract-config":
        configmap = config_map(docs)
        if configmap is None:
            problems = ["exactly one ConfigMap with config.yaml expected"]
        else:
            with open(argv[3], "w") as out:
                out.write(configmap["data"]["config.yaml"])
            daemonset = one(docs, "DaemonSet")
            for container in daemonset["spec"]["template"]["spec"]["containers"] if daemonset else []:
                for var in container.get("env", []):
                    print(var["name"])
            problems = []
    elif command == "agent":
        extra = argv[4:]
        without = next((a for a in extra if a[0] not in "+-"), None)
        problems = run_agent(docs, argv[3], without, [a for a in extra if a[0] in "+-"])
    elif command == "container":
        problems = run_container(docs, argv[3], argv[4], argv[5] if len(argv) > 5 else None)
    elif command == "invariants":
        problems = check_invariants(docs, argv[3])
    elif command == "crd":
        problems = check_crd(one(docs, "CustomResourceDefinition"), [d for path in argv[3:] for d in load(path)])
    else:
        problems = [f"unknown command {command}"]
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
