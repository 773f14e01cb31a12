//! `kubectl podscope run|get|describe|delete|promote`: TraceSession objects written and read by
//! the real plugin binary through the fake API server (real Kubernetes JSON, server-side apply
//! of the status as the agents write it, RBAC from the chart's tracesession-editor role).
//!
//! Built and run as a test of podscope-kubectl (it needs CARGO_BIN_EXE_kubectl-podscope).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, SystemTime};

use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use podscope_integration::fake_kube::{FakeApiServer, ServiceAccount};
use podscope_integration::kubectl_plugin;
use podscope_testkit::yaml::document_as_json;
use serde_json::{json, Value};

/// How long any single plugin run may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(30);

const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-podscope");

fn chart_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../helm/podscope")
        .join(path)
}

/// A cluster as the plugin sees it: the fake API server and a kubeconfig for it.
struct Cluster {
    server: FakeApiServer,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        Self::with(FakeApiServer::start().await)
    }

    fn with(server: FakeApiServer) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        server.write_kubeconfig(&dir.path().join("kubeconfig"));
        Cluster { server, dir }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Runs the plugin to completion (clean environment, this cluster's kubeconfig) off the
    /// runtime the fake server runs on.
    async fn run(&self, args: &[&str]) -> Output {
        let command = kubectl_plugin::command(PLUGIN, self.dir.path(), &self.kubeconfig(), args);
        kubectl_plugin::output(command, PATIENCE).await
    }

    /// Writes a session's status as the agents do: each node's entry under its own field
    /// manager, the merged fields under the shared one (server-side apply, forced).
    async fn write_status(&self, namespace: &str, name: &str, nodes: &[Value], merged: Value) {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig()).expect("kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("kube config");
        let client = kube::Client::try_from(config).expect("client");
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("podscope.dev", "v1alpha1", "TraceSession"),
            "tracesessions",
        );
        let api: kube::Api<DynamicObject> =
            kube::Api::namespaced_with(client, namespace, &resource);
        let apply = |status: Value| {
            json!({"apiVersion": "podscope.dev/v1alpha1", "kind": "TraceSession",
                   "metadata": {"name": name, "namespace": namespace}, "status": status})
        };
        for node in nodes {
            let manager = format!("podscope/{}", node["node"].as_str().expect("node"));
            api.patch_status(
                name,
                &PatchParams::apply(&manager).force(),
                &Patch::Apply(&apply(json!({"nodes": [node]}))),
            )
            .await
            .expect("a node's status entry");
        }
        api.patch_status(
            name,
            &PatchParams::apply("podscope/merged").force(),
            &Patch::Apply(&apply(merged)),
        )
        .await
        .expect("the merged status");
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts the exit code, with the plugin's stderr when it differs.
fn exits(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// RFC 3339 of `ago` before now, in whole seconds as the API server writes times.
fn time_ago(ago: Duration) -> String {
    let at = SystemTime::now() - ago;
    humantime::format_rfc3339_seconds(at).to_string()
}

fn session(namespace: &str, name: &str, created: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "podscope.dev/v1alpha1", "kind": "TraceSession",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created},
        "spec": spec
    })
}

// ---------------------------------------------------------------------------------------------
// run

#[tokio::test]
async fn run_creates_the_session_of_the_charts_example() {
    let cluster = Cluster::start().await;
    let output = cluster
        .run(&[
            "run",
            "web-execs",
            "-n",
            "shop",
            "-l",
            "app=web",
            "exec",
            "tcp-connect",
            "--duration",
            "10m",
            "--ttl",
            "1h",
        ])
        .await;
    exits(&output, 0);
    assert_eq!(
        text(&output.stdout),
        "tracesession.podscope.dev/web-execs created\n"
    );
    // Exactly the spec of helm/podscope/examples/trace-session/web-execs.yaml, which the
    // agent's own tests run.
    let example = document_as_json(
        &std::fs::read_to_string(chart_file("examples/trace-session/web-execs.yaml"))
            .expect("the chart's example"),
    );
    let created = cluster
        .server
        .custom("TraceSession", "shop", "web-execs")
        .expect("the session was created");
    assert_eq!(created["spec"], example["spec"]);
    assert_eq!(created["metadata"]["namespace"], "shop");

    // The name is taken now: exit 1, as kubectl, naming it.
    let output = cluster
        .run(&["run", "web-execs", "-n", "shop", "pod/web-0", "exec"])
        .await;
    exits(&output, 1);
    assert_eq!(
        text(&output.stderr),
        "error: tracesessions.podscope.dev \"web-execs\" already exists in namespace \"shop\"\n"
    );
}

#[tokio::test]
async fn run_turns_each_kind_of_target_into_the_sessions_targets() {
    let cluster = Cluster::start().await;
    let selector = json!({
        "matchLabels": {"app": "web"},
        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]
    });
    cluster.server.apply_workload(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"selector": selector, "template": {}}
    }));
    cluster.server.apply_workload(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "db"}}, "serviceName": "db", "template": {}}
    }));
    let cases: [(&[&str], Value); 6] = [
        (
            &[
                "run",
                "s1",
                "-n",
                "shop",
                "deploy/web",
                "open",
                "--duration",
                "90s",
            ],
            json!({"targets": {"podSelector": selector}, "probes": ["open"], "duration": "1m 30s"}),
        ),
        (
            &[
                "run",
                "s2",
                "-n",
                "shop",
                "sts/db",
                "tcp_close",
                "tcp-close",
                "exit",
            ],
            json!({"targets": {"podSelector": {"matchLabels": {"app": "db"}}},
                   "probes": ["tcp_close", "exit"], "duration": "5m"}),
        ),
        (
            &[
                "run",
                "s3",
                "-n",
                "shop",
                "pod/web-0",
                "exec",
                "--deadline",
                "2099-01-01T00:00:00Z",
            ],
            json!({"targets": {"pods": ["web-0"]}, "probes": ["exec"],
                   "deadline": "2099-01-01T00:00:00Z"}),
        ),
        // namespace/name of the session's own namespace, as the CRD's pods accept it.
        (
            &[
                "run",
                "s4",
                "-n",
                "shop",
                "pod/shop/web-1",
                "signal",
                "--schedule",
                "*/5 * * * *",
                "--export",
            ],
            json!({"targets": {"pods": ["web-1"]}, "probes": ["signal"], "duration": "5m",
                   "schedule": "*/5 * * * *", "export": true}),
        ),
        (
            &[
                "run",
                "s5",
                "-n",
                "shop",
                "-l",
                "app=web,tier!=db,canary",
                "oom-kill",
            ],
            json!({"targets": {"podSelector": {
                      "matchLabels": {"app": "web"},
                      "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]},
                                           {"key": "canary", "operator": "Exists"}]}},
                   "probes": ["oom_kill"], "duration": "5m"}),
        ),
        // The probes only a session runs, beside a trace probe.
        (
            &[
                "run",
                "s6",
                "-n",
                "shop",
                "pod/web-0",
                "top",
                "profile",
                "http",
            ],
            json!({"targets": {"pods": ["web-0"]}, "probes": ["top", "profile", "http"],
                   "duration": "5m"}),
        ),
    ];
    for (args, spec) in cases {
        let output = cluster.run(args).await;
        exits(&output, 0);
        let name = args[1];
        assert_eq!(
            text(&output.stdout),
            format!("tracesession.podscope.dev/{name} created\n")
        );
        let created = cluster
            .server
            .custom("TraceSession", "shop", name)
            .unwrap_or_else(|| panic!("{name} was not created"));
        assert_eq!(created["spec"], spec, "{args:?}");
    }

    // --dry-run=client prints the object and creates nothing.
    let output = cluster
        .run(&[
            "run",
            "dry",
            "-n",
            "shop",
            "pod/web-0",
            "exec",
            "--duration",
            "30s",
            "--dry-run=client",
            "-o",
            "yaml",
        ])
        .await;
    exits(&output, 0);
    assert_eq!(
        text(&output.stdout),
        "---\napiVersion: podscope.dev/v1alpha1\nkind: TraceSession\nmetadata:\n  name: dry\n  \
         namespace: shop\nspec:\n  duration: 30s\n  probes:\n    - exec\n  targets:\n    pods:\n      \
         - web-0\n"
    );
    assert_eq!(cluster.server.custom("TraceSession", "shop", "dry"), None);
}

#[tokio::test]
async fn targets_outside_the_sessions_namespace_are_refused_before_anything_is_created() {
    let cluster = Cluster::start().await;
    let cases: [(&[&str], i32, &str); 7] = [
        (
            &["run", "x", "-n", "shop", "pod/prod/web-0", "exec"],
            2,
            "error: TARGET pod/prod/web-0 is in namespace \"prod\", but the session is in namespace \
             \"shop\": a TraceSession traces pods of its own namespace only (run it with -n prod)\n",
        ),
        (
            &["run", "x", "-A", "-l", "app=web", "exec"],
            2,
            "error: -A: a TraceSession traces pods of its own namespace only; name it with -n (now \"default\")\n",
        ),
        (
            &["run", "x", "-n", "shop", "node/worker-1", "exec"],
            2,
            "error: TARGET node/worker-1: a TraceSession traces pods of its namespace, not a node \
             (use `kubectl podscope trace node/worker-1`)\n",
        ),
        (
            &["run", "x", "-n", "shop", "deploy/web", "exec"],
            3,
            "error: deployment \"web\" in namespace \"shop\" not found\n",
        ),
        (
            &["run", "x", "-n", "shop", "pod/web-0", "kprobe"],
            2,
            "error: unknown probe \"kprobe\": one of exec, exit, open, tcp-connect, tcp-accept, \
             tcp-close, tcp-retransmit, http, oom-kill, signal; or, for a session, top or \
             profile\n",
        ),
        (
            &["run", "x", "-n", "shop", "pod/web-0", "exec", "--deadline", "2001-01-01T00:00:00Z"],
            2,
            "error: --deadline 2001-01-01T00:00:00Z has passed already\n",
        ),
        (
            &[
                "run", "x", "-n", "shop", "pod/web-0", "exec", "--schedule", "0 * * * *",
                "--deadline", "2099-01-01T00:00:00Z",
            ],
            2,
            "error: --schedule runs the session for --duration at each firing: give --duration, \
             not --deadline\n",
        ),
    ];
    for (args, code, stderr) in cases {
        let output = cluster.run(args).await;
        exits(&output, code);
        assert_eq!(text(&output.stderr), stderr, "{args:?}");
    }
    for namespace in ["shop", "prod", "default"] {
        assert_eq!(cluster.server.custom("TraceSession", namespace, "x"), None);
    }
}

// ---------------------------------------------------------------------------------------------
// get, describe, delete

/// Two sessions in shop (one traced on two nodes, one not yet seen by an agent) and one in dev.
async fn cluster_with_sessions() -> Cluster {
    let cluster = Cluster::start().await;
    cluster.server.apply_custom(session(
        "shop",
        "web-execs",
        &time_ago(Duration::from_secs(3 * 3600 + 10 * 60)),
        json!({"targets": {"podSelector": {"matchLabels": {"app": "web"}}},
               "probes": ["exec", "tcp_connect"], "duration": "10m", "ttlAfterFinished": "1h"}),
    ));
    cluster.server.apply_custom(session(
        "shop",
        "db-opens",
        &time_ago(Duration::from_secs(2 * 86400 + 3 * 3600)),
        json!({"targets": {"pods": ["db-0"]}, "probes": ["open"],
               "deadline": "2099-01-01T00:00:00Z"}),
    ));
    cluster.server.apply_custom(session(
        "dev",
        "api-signals",
        &time_ago(Duration::from_secs(20 * 3600)),
        json!({"targets": {"pods": ["api-0"]}, "probes": ["signal"], "duration": "1h"}),
    ));
    let node_a = json!({"node": "node-a", "phase": "Running", "pods": ["web-0"],
                        "events": {"exec": 12, "tcp_connect": 3}, "lost": 0,
                        "startTime": "2026-12-03T05:00:01Z"});
    let node_b = json!({"node": "node-b", "phase": "Running", "pods": ["web-1", "web-2"],
                        "events": {"exec": 5, "tcp_connect": 0}, "lost": 2,
                        "startTime": "2026-12-03T05:00:02Z"});
    cluster
        .write_status(
            "shop",
            "web-execs",
            &[node_a, node_b],
            json!({"phase": "Running", "reason": "Tracing", "message": "tracing on 2 node(s)",
                   "startTime": "2026-12-03T05:00:00Z", "endTime": "2026-12-03T05:10:00Z",
                   "summary": {"nodes": 2, "events": {"exec": 17, "tcp_connect": 3}, "lost": 2}}),
        )
        .await;
    cluster
}

#[tokio::test]
async fn get_prints_the_crds_columns_like_kubectl() {
    let cluster = cluster_with_sessions().await;
    let output = cluster.run(&["get", "-n", "shop"]).await;
    exits(&output, 0);
    assert_eq!(
        text(&output.stdout),
        "NAME       PHASE    PROBES            NODES          EVENTS  AGE\n\
         db-opens   <none>   open              <none>         <none>  2d3h\n\
         web-execs  Running  exec,tcp_connect  node-a,node-b  20      3h10m\n"
    );
    let output = cluster
        .run(&["get", "-n", "shop", "web-execs", "-o", "wide"])
        .await;
    exits(&output, 0);
    assert_eq!(
        text(&output.stdout),
        "NAME       PHASE    PROBES            NODES          EVENTS  AGE    REASON   LOST  END                   MESSAGE\n\
         web-execs  Running  exec,tcp_connect  node-a,node-b  20      3h10m  Tracing  2     2026-12-03T05:10:00Z  tracing on 2 node(s)\n"
    );
    let output = cluster.run(&["get", "-A"]).await;
    exits(&output, 0);
    assert_eq!(
        text(&output.stdout),
        "NAMESPACE  NAME         PHASE    PROBES            NODES          EVENTS  AGE\n\
         dev        api-signals  <none>   signal            <none>         <none>  20h\n\
         shop       db-opens     <none>   open              <none>         <none>  2d3h\n\
         shop       web-execs    Running  exec,tcp_connect  node-a,node-b  20      3h10m\n"
    );
    let output = cluster.run(&["get", "-n", "shop", "-o", "name"]).await;
    exits(&output, 0);
    assert_eq!(
        text(&output.stdout),
        "tracesession.podscope.dev/db-opens\ntracesession.podscope.dev/web-execs\n"
    );
    // -o json: the object as the server holds it; several as a List.
    let output = cluster
        .run(&["get", "-n", "shop", "web-execs", "-o", "json"])
        .await;
    exits(&output, 0);
    let printed: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(
        Some(printed),
        cluster.server.custom("TraceSession", "shop", "web-execs")
    );
    let output = cluster.run(&["get", "-n", "dev", "-o", "yaml"]).await;
    exits(&output, 0);
    let listed = document_as_json(&text(&output.stdout));
    assert_eq!(listed["kind"], "List");
    assert_eq!(
        listed["items"],
        json!([cluster
            .server
            .custom("TraceSession", "dev", "api-signals")
            .unwrap()])
    );

    let output = cluster.run(&["get", "-n", "empty"]).await;
    exits(&output, 0);
    assert_eq!(text(&output.stdout), "");
    assert_eq!(
        text(&output.stderr),
        "No resources found in empty namespace.\n"
    );
    let output = cluster.run(&["get", "-n", "shop", "nope"]).await;
    exits(&output, 3);
    assert_eq!(
        text(&output.stderr),
        "error: tracesession \"nope\" in namespace \"shop\" not found\n"
    );
}

#[tokio::test]
async fn describe_shows_the_spec_the_merged_status_and_each_node() {
    let cluster = cluster_with_sessions().await;
    let created = cluster
        .server
        .custom("TraceSession", "shop", "web-execs")
        .unwrap()["metadata"]["creationTimestamp"]
        .as_str()
        .unwrap()
        .to_string();
    let output = cluster.run(&["describe", "-n", "shop", "web-execs"]).await;
    exits(&output, 0);
    assert_eq!(
        text(&output.stdout),
        format!(
            "Name:                 web-execs\n\
             Namespace:            shop\n\
             Created:              {created}\n\
             Targets:\n\
            \x20 Pod Selector:       app=web\n\
             Probes:               exec, tcp_connect\n\
             Duration:             10m\n\
             TTL After Finished:   1h\n\
             Phase:                Running\n\
             Reason:               Tracing\n\
             Message:              tracing on 2 node(s)\n\
             Start Time:           2026-12-03T05:00:00Z\n\
             End Time:             2026-12-03T05:10:00Z\n\
             Summary:\n\
            \x20 Nodes:              2\n\
            \x20 Lost:               2\n\
            \x20 Events:\n\
            \x20   exec:             17\n\
            \x20   tcp_connect:      3\n\
             Nodes:\n\
            \x20 NODE    PHASE    PODS         EXEC  TCP_CONNECT  LOST  MESSAGE\n\
            \x20 node-a  Running  web-0        12    3            0\n\
            \x20 node-b  Running  web-1,web-2  5     0            2\n"
        )
    );
    // A session no agent has written to yet says so.
    let output = cluster.run(&["describe", "-n", "shop", "db-opens"]).await;
    exits(&output, 0);
    let described = text(&output.stdout);
    assert!(
        described.contains(
            "Targets:\n  Pods:               db-0\nProbes:               open\n\
             Deadline:             2099-01-01T00:00:00Z\nPhase:                <none>\n"
        ),
        "{described}"
    );
    assert!(
        described.ends_with("Nodes:                <none>\n"),
        "{described}"
    );
    let output = cluster.run(&["describe", "-n", "dev", "web-execs"]).await;
    exits(&output, 3);
    assert_eq!(
        text(&output.stderr),
        "error: tracesession \"web-execs\" in namespace \"dev\" not found\n"
    );
}

#[tokio::test]
async fn delete_removes_the_session_and_a_missing_one_exits_3() {
    let cluster = cluster_with_sessions().await;
    let output = cluster
        .run(&["delete", "-n", "shop", "web-execs", "db-opens"])
        .await;
    exits(&output, 0);
    assert_eq!(
        text(&output.stdout),
        "tracesession.podscope.dev \"web-execs\" deleted\ntracesession.podscope.dev \"db-opens\" deleted\n"
    );
    assert_eq!(
        cluster.server.custom("TraceSession", "shop", "web-execs"),
        None
    );
    assert_eq!(
        cluster.server.custom("TraceSession", "shop", "db-opens"),
        None
    );
    assert!(cluster
        .server
        .custom("TraceSession", "dev", "api-signals")
        .is_some());
    let output = cluster.run(&["delete", "-n", "shop", "web-execs"]).await;
    exits(&output, 3);
    assert_eq!(
        text(&output.stderr),
        "error: tracesession \"web-execs\" in namespace \"shop\" not found\n"
    );
}

// ---------------------------------------------------------------------------------------------
// promote

#[tokio::test]
async fn promote_creates_exactly_the_probe_the_session_stands_for() {
    let cluster = Cluster::start().await;
    let selector = json!({"matchLabels": {"app": "web"},
                          "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]});
    cluster.server.apply_custom(session(
        "shop",
        "web-net",
        &time_ago(Duration::from_secs(60)),
        json!({"targets": {"podSelector": selector},
               "probes": ["tcp_connect", "tcp_retransmit", "open", "http"], "duration": "10m"}),
    ));
    let output = cluster
        .run(&["promote", "session/web-net", "-n", "shop", "--name", "web"])
        .await;
    exits(&output, 0);
    assert_eq!(text(&output.stdout), "probe.podscope.dev/web created\n");
    let probe = cluster
        .server
        .custom("Probe", "shop", "web")
        .expect("the Probe was created");
    assert_eq!(
        probe["spec"],
        json!({"podSelector": selector, "probes": {"tcp": {}, "files": {}, "http": {}}})
    );
    assert_eq!(
        probe["metadata"]["annotations"],
        json!({"podscope.dev/promoted-from": "tracesession/web-net"})
    );
    // The chart's Probe schema takes it (tcp, files and http are among its probes).
    let crd = document_as_json(
        &std::fs::read_to_string(chart_file("crds/probes.podscope.dev.yaml")).expect("the CRD"),
    );
    let probes_schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
        ["spec"]["properties"]["probes"]["properties"];
    for name in ["tcp", "files", "http"] {
        assert!(
            probes_schema[name].is_object(),
            "the Probe CRD has no {name}"
        );
    }

    // The same name again: exit 1, saying how to choose another.
    let output = cluster
        .run(&["promote", "session/web-net", "-n", "shop", "--name", "web"])
        .await;
    exits(&output, 1);
    assert_eq!(
        text(&output.stderr),
        "error: probes.podscope.dev \"web\" already exists in namespace \"shop\" (--name gives the Probe another name)\n"
    );

    // --dry-run=client: printed, not created; the default name is the session's.
    let output = cluster
        .run(&[
            "promote",
            "tsess/web-net",
            "-n",
            "shop",
            "--dry-run=client",
            "-o",
            "json",
        ])
        .await;
    exits(&output, 0);
    let printed: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(printed["metadata"]["name"], "web-net");
    assert_eq!(printed["spec"], probe["spec"]);
    assert_eq!(cluster.server.custom("Probe", "shop", "web-net"), None);
}

#[tokio::test]
async fn promote_refuses_what_a_probe_cannot_take_naming_it() {
    let cluster = Cluster::start().await;
    cluster.server.apply_custom(session(
        "shop",
        "web-execs",
        &time_ago(Duration::from_secs(60)),
        json!({"targets": {"podSelector": {"matchLabels": {"app": "web"}}},
               "probes": ["exec", "tcp_connect"], "duration": "10m"}),
    ));
    cluster.server.apply_custom(session(
        "shop",
        "one-pod",
        &time_ago(Duration::from_secs(60)),
        json!({"targets": {"pods": ["web-0"]}, "probes": ["open"], "duration": "10m"}),
    ));
    let cases: [(&[&str], i32, &str); 4] = [
        (
            &["promote", "session/web-execs", "-n", "shop"],
            2,
            "error: tracesession \"web-execs\" in namespace \"shop\" cannot become a Probe: \
             spec.probes[0] exec: execs and exits are counted by the agent's own process probe, \
             which a Probe cannot enable (a Probe takes tcp_connect, tcp_accept, tcp_close, \
             tcp_retransmit, open, http and profile)\n",
        ),
        (
            &["promote", "session/one-pod", "-n", "shop"],
            2,
            "error: tracesession \"one-pod\" in namespace \"shop\" cannot become a Probe: \
             spec.targets.pods (web-0): a Probe selects pods by label only (its podSelector); \
             run the session with -l SELECTOR or deploy/NAME to promote it\n",
        ),
        (
            &["promote", "session/nope", "-n", "shop"],
            3,
            "error: tracesession \"nope\" in namespace \"shop\" not found\n",
        ),
        (
            &["promote", "pod/web-0", "-n", "shop"],
            2,
            "error: promote takes session/NAME (a TraceSession of the namespace), not \"pod/web-0\"\n",
        ),
    ];
    for (args, code, stderr) in cases {
        let output = cluster.run(args).await;
        exits(&output, code);
        assert_eq!(text(&output.stderr), stderr, "{args:?}");
    }
    for name in ["web-execs", "one-pod", "nope"] {
        assert_eq!(cluster.server.custom("Probe", "shop", name), None);
    }
}

// ---------------------------------------------------------------------------------------------
// RBAC: the chart's tracesession-editor ClusterRole, bound in one namespace

/// The chart's `<fullname>-tracesession-editor` ClusterRole as `helm template` renders it for
/// release `podscope` (its template lines are the name and labels only; scripts/test-helm.sh
/// checks the rendered rules).
fn chart_tracesession_editor() -> Value {
    let template =
        std::fs::read_to_string(chart_file("templates/clusterrole-tracesession-editor.yaml"))
            .expect("the chart's tracesession-editor template");
    let rendered: String = template
        .lines()
        .filter(|line| !line.trim_start().starts_with("{{"))
        .map(|line| line.replace("{{ include \"podscope.fullname\" . }}", "podscope"))
        .collect::<Vec<_>>()
        .join("\n");
    let role = document_as_json(&rendered);
    assert_eq!(role["metadata"]["name"], "podscope-tracesession-editor");
    role
}

#[tokio::test]
async fn the_tracesession_editor_role_bound_in_a_namespace_runs_sessions_there_only() {
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "alice-sessions", "namespace": "shop"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "podscope-tracesession-editor"},
        "subjects": [{"kind": "ServiceAccount", "name": "alice", "namespace": "dev"}]
    });
    let server = FakeApiServer::start_for(&ServiceAccount {
        namespace: "dev".into(),
        name: "alice".into(),
        rbac: vec![chart_tracesession_editor(), binding],
    })
    .await
    .expect("fake API server with RBAC");
    let cluster = Cluster::with(server);
    let output = cluster
        .run(&["run", "web-execs", "-n", "shop", "-l", "app=web", "exec"])
        .await;
    exits(&output, 0);
    for args in [
        &["get", "-n", "shop"][..],
        &["get", "-n", "shop", "web-execs", "-o", "yaml"],
        &["describe", "-n", "shop", "web-execs"],
        &["delete", "-n", "shop", "web-execs"],
    ] {
        let output = cluster.run(args).await;
        exits(&output, 0);
    }
    assert_eq!(
        cluster.server.custom("TraceSession", "shop", "web-execs"),
        None
    );

    // Another namespace: exit 5, naming what was refused and the role that grants it.
    let output = cluster
        .run(&["run", "web-execs", "-n", "prod", "-l", "app=web", "exec"])
        .await;
    exits(&output, 5);
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with(
            "error: RBAC denied: you may not create tracesessions in namespace prod. The API \
             server said: "
        ),
        "{stderr}"
    );
    assert!(
        stderr.ends_with(
            "The chart's ClusterRole podscope-tracesession-editor, bound with a RoleBinding in \
             the namespace, grants what sessions need (docs/kubectl.md, \"Trace sessions\").\n"
        ),
        "{stderr}"
    );
    // Promoting needs Probes, which the role does not grant.
    cluster.server.apply_custom(session(
        "shop",
        "web-net",
        &time_ago(Duration::from_secs(60)),
        json!({"targets": {"podSelector": {"matchLabels": {"app": "web"}}},
               "probes": ["tcp_connect"], "duration": "10m"}),
    ));
    let output = cluster
        .run(&["promote", "session/web-net", "-n", "shop"])
        .await;
    exits(&output, 5);
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with("error: RBAC denied: you may not create probes in namespace shop."),
        "{stderr}"
    );
    // Exactly the role's verbs were used, in shop only, plus the refused ones.
    let used: std::collections::BTreeSet<(String, String, String, u16)> = cluster
        .server
        .access_log()
        .into_iter()
        .map(|r| (r.verb, r.resource, r.scope, r.status))
        .collect();
    let want: std::collections::BTreeSet<(String, String, String, u16)> = [
        ("create", "tracesessions", "shop", 201),
        ("list", "tracesessions", "shop", 200),
        ("get", "tracesessions", "shop", 200),
        ("delete", "tracesessions", "shop", 200),
        ("create", "tracesessions", "prod", 403),
        ("create", "probes", "shop", 403),
    ]
    .into_iter()
    .map(|(v, r, s, c)| (v.to_string(), r.to_string(), s.to_string(), c))
    .collect();
    assert_eq!(used, want);
}
