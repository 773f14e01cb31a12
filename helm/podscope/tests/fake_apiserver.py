"""A stand-in for the Kubernetes API server in check_manifests.py's agent runs, which authorizes
every request with the chart's rendered RBAC objects, as the real one would.

It serves over HTTPS (a throw-away CA that the agent trusts through its service-account files)
the core/v1 endpoints the k8sattributes processor reads: list and watch of pods and services
(cluster-wide or in a namespace), namespaces and nodes, with field and label selectors; `get` of one object too,
so that a client asking for more than the chart grants is seen and refused. A request without
the service account's token gets 401, one the RBAC does not allow gets 403 with a Status body.
Every request is recorded (verb, resource, scope, selectors, status) for the caller to compare
with what the RBAC grants.

It must not grow into an API server: GET only, a fixed set of objects, no events on watches
(nothing changes during a check; a watch stays open until its timeoutSeconds or the end).
integration/src/fake_kube.rs is the full fake the processor's own tests use.
"""

import json
import os
import secrets
import ssl
import subprocess
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RESOURCE_VERSION = "1000"
# Resources the fake serves: name -> (kind, namespaced).
RESOURCES = {"pods": ("Pod", True), "services": ("Service", True), "namespaces": ("Namespace", False), "nodes": ("Node", False)}
# Field selectors the real API server supports on these resources.
FIELDS = {
    "pods": {"metadata.name", "metadata.namespace", "spec.nodeName"},
    "services": {"metadata.name", "metadata.namespace"},
    "namespaces": {"metadata.name"},
    "nodes": {"metadata.name"},
}


def make_tls(work):
    """A CA and a server certificate for 127.0.0.1 signed by it (rustls refuses a CA
    certificate as the server's own). Returns (ca.crt, server.crt, server.key) paths."""
    ca_key, ca_crt = os.path.join(work, "ca.key"), os.path.join(work, "ca.crt")
    key, csr, crt = (os.path.join(work, n) for n in ("server.key", "server.csr", "server.crt"))
    ext = os.path.join(work, "server.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for argv in (
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_crt, "-days", "1", "-subj", "/CN=podscope-test-ca"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=kubernetes"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
         "-out", crt, "-days", "1", "-extfile", ext],
    ):
        subprocess.run(argv, check=True, capture_output=True)
    return ca_crt, crt, key


class Rbac:
    """What the rendered (Cluster)Roles and bindings allow one service account: Kubernetes' RBAC
    rules (apiGroups, resources, verbs, `*`), ClusterRoleBindings cluster-wide, RoleBindings in
    their namespace."""

    def __init__(self, docs, namespace, account):
        self.user = f"system:serviceaccount:{namespace}:{account}"
        subject = {"kind": "ServiceAccount", "name": account, "namespace": namespace}
        roles = {}
        for doc in docs:
            if doc.get("kind") in ("ClusterRole", "Role"):
                scope = doc["metadata"].get("namespace") if doc["kind"] == "Role" else None
                roles[(doc["kind"], scope, doc["metadata"]["name"])] = doc.get("rules") or []
        # scope (None: cluster-wide, else a namespace) -> rules
        self.rules = {}
        for doc in docs:
            if doc.get("kind") not in ("ClusterRoleBinding", "RoleBinding"):
                continue
            if subject not in [{k: s.get(k) for k in subject} for s in doc.get("subjects") or []]:
                continue
            ref = doc["roleRef"]
            scope = doc["metadata"].get("namespace") if doc["kind"] == "RoleBinding" else None
            role_scope = scope if ref["kind"] == "Role" else None
            self.rules.setdefault(scope, []).extend(roles.get((ref["kind"], role_scope, ref["name"]), []))

    @staticmethod
    def _matches(rule, verb, resource):
        return (
            any(g in ("", "*") for g in rule.get("apiGroups") or [])
            and any(r in (resource, "*") for r in rule.get("resources") or [])
            and any(v in (verb, "*") for v in rule.get("verbs") or [])
            and not rule.get("resourceNames")  # never needed: treated as not granting
        )

    def allows(self, verb, resource, namespace):
        scopes = [None] + ([namespace] if namespace else [])
        return any(self._matches(rule, verb, resource) for s in scopes for rule in self.rules.get(s, []))

    def grants(self):
        """(verb, resource, scope) triples, scope "cluster" or a namespace; `*` stays `*`."""
        out = set()
        for scope, rules in self.rules.items():
            for rule in rules:
                for verb in rule.get("verbs") or []:
                    for resource in rule.get("resources") or []:
                        out.add((verb, resource, scope or "cluster"))
        return out


class BadRequest(Exception):
    pass


def _field_terms(resource, selector):
    """(key, op, value) of a field selector; BadRequest for a field the real server refuses."""
    terms = []
    for term in filter(None, (selector or "").split(",")):
        op = next((op for op in ("!=", "==", "=") if op in term), None)
        if op is None:
            raise BadRequest(f"invalid field selector {term!r}")
        key, value = term.split(op, 1)
        if key not in FIELDS[resource]:
            raise BadRequest(f'"{key}" is not a known field selector for {resource}')
        terms.append((key, op, value))
    return terms


def _fields_match(terms, obj):
    fields = {
        "metadata.name": obj["metadata"]["name"],
        "metadata.namespace": obj["metadata"].get("namespace", ""),
        "spec.nodeName": (obj.get("spec") or {}).get("nodeName", ""),
    }
    return all((fields[key] == value) == (op != "!=") for key, op, value in terms)


def _labels_match(selector, labels):
    for term in filter(None, (selector or "").split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            ok = labels.get(key) != value
        elif "=" in term:
            key, value = term.split("==", 1) if "==" in term else term.split("=", 1)
            ok = labels.get(key) == value
        elif term.startswith("!"):
            ok = term[1:] not in labels
        else:
            ok = term in labels
        if not ok:
            return False
    return True


class FakeApiServer:
    """Serves `objects` (resource -> list of objects) to requests allowed by `rbac`."""

    def __init__(self, work, rbac, objects):
        self.rbac = rbac
        self.objects = objects
        self.token = secrets.token_hex(16)
        self.ca, crt, key = make_tls(work)
        self.requests = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(crt, key)
        tls.set_alpn_protocols(["http/1.1"])
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                # The TLS handshake happens here, in the connection's thread, not in accept().
                self.request.do_handshake()
                super().setup()

            def do_GET(self):
                fake._handle(self)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):
                sock, addr = super().get_request()
                return tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

            def handle_error(self, request, client_address):
                pass  # a client that hangs up mid-watch is not an error here

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def service_account_files(self, directory, namespace):
        """Writes what the kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount."""
        os.makedirs(directory)
        with open(os.path.join(directory, "token"), "w") as f:
            f.write(self.token)
        with open(self.ca) as src, open(os.path.join(directory, "ca.crt"), "w") as dst:
            dst.write(src.read())
        with open(os.path.join(directory, "namespace"), "w") as f:
            f.write(namespace)

    def stop(self):
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def recorded(self):
        with self._lock:
            return list(self.requests)

    def _reply(self, handler, status, body):
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _status(self, handler, code, reason, message):
        self._reply(handler, code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                    "message": message, "reason": reason, "code": code})

    def _handle(self, handler):
        url = urllib.parse.urlsplit(handler.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = url.path.strip("/").split("/")
        namespace = name = None
        if parts[:2] == ["api", "v1"] and len(parts) in (5, 6) and parts[2] == "namespaces":
            namespace, resource = parts[3], parts[4]
            name = parts[5] if len(parts) == 6 else None
        elif parts[:2] == ["api", "v1"] and len(parts) in (3, 4):
            resource = parts[2]
            name = parts[3] if len(parts) == 4 else None
        else:
            resource = None
        if resource not in RESOURCES or (namespace and not RESOURCES[resource][1]):
            return self._status(handler, 404, "NotFound", f"the server could not find {url.path}")
        verb = "get" if name else ("watch" if query.get("watch") in ("true", "1") else "list")
        record = {"verb": verb, "resource": resource, "scope": namespace or "cluster", "name": name,
                  "fieldSelector": query.get("fieldSelector"), "labelSelector": query.get("labelSelector")}
        if handler.headers.get("Authorization") != f"Bearer {self.token}":
            status = 401
        elif not self.rbac.allows(verb, resource, namespace):
            status = 403
        else:
            status = 200
        record["status"] = status
        with self._lock:
            self.requests.append(record)
        if status == 401:
            return self._status(handler, 401, "Unauthorized", "Unauthorized")
        if status == 403:
            where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            return self._status(handler, 403, "Forbidden",
                                f'{resource} is forbidden: User "{self.rbac.user}" cannot {verb} resource "{resource}" in API group "" {where}')
        kind = RESOURCES[resource][0]
        try:
            terms = _field_terms(resource, query.get("fieldSelector"))
        except BadRequest as e:
            return self._status(handler, 400, "BadRequest", str(e))
        items = [
            o for o in self.objects.get(resource, [])
            if (namespace is None or o["metadata"].get("namespace") == namespace)
            and (name is None or o["metadata"]["name"] == name)
            and _fields_match(terms, o)
            and _labels_match(query.get("labelSelector"), o["metadata"].get("labels") or {})
        ]
        if verb == "get":
            if not items:
                return self._status(handler, 404, "NotFound", f'{resource} "{name}" not found')
            return self._reply(handler, 200, items[0])
        if verb == "list":
            return self._reply(handler, 200, {"kind": f"{kind}List", "apiVersion": "v1",
                                              "metadata": {"resourceVersion": RESOURCE_VERSION}, "items": items})
        # watch: nothing changes, so no events; held open like the real server until
        # timeoutSeconds, then closed cleanly (the client watches again).
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.wfile.flush()
        self._stopping.wait(float(query.get("timeoutSeconds") or 1800))
        try:
            handler.wfile.write(b"0\r\n\r\n")
            handler.wfile.flush()
        except OSError:
            pass
        handler.close_connection = True


def cluster_objects(node, namespaces, agent_namespace, agent_pod):
    """A node, the namespaces, and in each a running pod on the node (in the agent's namespace,
    the agent's own pod) and a Service, plus one pod on another node that a node-scoped watch
    must not get."""

    def meta(name, namespace=None, **extra):
        m = {"name": name, "uid": f"uid-{namespace or 'cluster'}-{name}", "resourceVersion": RESOURCE_VERSION,
             "creationTimestamp": "2026-01-01T00:00:00Z", "labels": {"team": "checkout"},
             "annotations": {"topology.kubernetes.io/zone": "zone-a"}, **extra}
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
