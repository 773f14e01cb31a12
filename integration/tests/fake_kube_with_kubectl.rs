//! Checks the fake Kubernetes API server against real clients: kubectl (which does discovery,
//! chunked lists, selectors and watches the way client-go does) and plain HTTP, so the fake keeps
//! behaving like a real API server for the processors' tests that rely on it.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta, Status, WatchEvent};
use podscope_integration::fake_kube::FakeApiServer;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};

/// How long any single expected thing may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(20);

fn pod(namespace: &str, name: &str, node: &str, app: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            labels: Some(BTreeMap::from([("app".to_string(), app.to_string())])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            ..PodSpec::default()
        }),
        status: None,
    }
}

fn namespace(name: &str) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

// ---------------------------------------------------------------------------------------------
// kubectl

/// kubectl pointed at one fake server, with its own kubeconfig, HOME and discovery cache so
/// nothing from the machine's real configuration leaks in or gets written.
struct Kubectl {
    binary: PathBuf,
    dir: tempfile::TempDir,
}

impl Kubectl {
    fn new(server: &FakeApiServer) -> Kubectl {
        // PODSCOPE_KUBECTL picks another kubectl (to check the fake against an older client).
        let binary = std::env::var_os("PODSCOPE_KUBECTL")
            .map(PathBuf::from)
            .into_iter()
            .chain(["/usr/bin/kubectl", "/usr/local/bin/kubectl"].map(PathBuf::from))
            .find(|path| path.exists())
            .unwrap_or_else(|| {
                panic!(
                    "kubectl is not installed: these tests check the fake Kubernetes API against \
                     the real client. Run scripts/install-deps.sh (Debian package kubernetes-client)."
                )
            });
        let dir = tempfile::tempdir().expect("temp dir");
        server.write_kubeconfig(&dir.path().join("kubeconfig"));
        Kubectl { binary, dir }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .arg("--kubeconfig")
            .arg(self.dir.path().join("kubeconfig"))
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .arg("--request-timeout=15s")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// Runs kubectl to completion off the async runtime (the fake server runs on it) and
    /// returns (success, stdout, stderr).
    async fn run(&self, args: &[&str]) -> (bool, String, String) {
        let mut command = self.command(args);
        let what = format!("kubectl {}", args.join(" "));
        let output = tokio::time::timeout(
            PATIENCE,
            tokio::task::spawn_blocking(move || command.output()),
        )
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {PATIENCE:?}"))
        .expect("join kubectl")
        .expect("run kubectl");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    async fn ok(&self, args: &[&str]) -> String {
        let (success, stdout, stderr) = self.run(args).await;
        assert!(success, "kubectl {} failed: {stderr}", args.join(" "));
        stdout
    }

    async fn json(&self, args: &[&str]) -> Value {
        let stdout = self.ok(args).await;
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("kubectl output is not JSON ({e}): {stdout}"))
    }

    /// Starts a long-running kubectl whose stdout is a sequence of JSON documents; they arrive
    /// on the returned channel as kubectl prints them.
    fn spawn_json_stream(&self, args: &[&str]) -> (KillOnDrop, mpsc::UnboundedReceiver<Value>) {
        let mut child = self.command(args).spawn().expect("spawn kubectl");
        let stdout = child.stdout.take().expect("kubectl stdout");
        let mut stderr = child.stderr.take().expect("kubectl stderr");
        let (sender, receiver) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for document in serde_json::Deserializer::from_reader(stdout).into_iter::<Value>() {
                match document {
                    Ok(value) => {
                        if sender.send(value).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        // Drained so kubectl never blocks on a full stderr pipe; shown only if a test fails.
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            if !text.trim().is_empty() {
                eprintln!("kubectl stderr: {text}");
            }
        });
        (KillOnDrop(child), receiver)
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn item_names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|item| {
            format!(
                "{}/{}",
                item["metadata"]["namespace"].as_str().unwrap_or(""),
                item["metadata"]["name"].as_str().unwrap_or("")
            )
        })
        .collect();
    names.sort();
    names
}

fn three_pods(server: &FakeApiServer) {
    server.apply_namespace(namespace("default"));
    server.apply_namespace(namespace("shop"));
    server.apply_pod(pod("default", "web-1", "node-a", "web"));
    server.apply_pod(pod("shop", "cart-1", "node-a", "cart"));
    server.apply_pod(pod("shop", "cart-2", "node-b", "cart"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_lists_gets_and_filters_like_on_a_real_cluster() {
    let server = FakeApiServer::start().await;
    three_pods(&server);
    let mut known = pod("shop", "checkout", "node-b", "cart");
    known.metadata.uid = Some("4b4d1f1e-6c1c-4f7e-9a53-0d6f3c1b2a10".into());
    server.apply_pod(known);
    let kubectl = Kubectl::new(&server);

    let all = kubectl.json(&["get", "pods", "-A", "-o", "json"]).await;
    assert_eq!(
        item_names(&all),
        [
            "default/web-1",
            "shop/cart-1",
            "shop/cart-2",
            "shop/checkout"
        ]
    );

    let on_a = kubectl
        .json(&[
            "get",
            "pods",
            "-A",
            "--field-selector",
            "spec.nodeName=node-a",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(item_names(&on_a), ["default/web-1", "shop/cart-1"]);
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/pods?")
                && r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "kubectl's field selector reached the server: {:?}",
        server.requests()
    );

    let not_on_a = kubectl
        .json(&[
            "get",
            "pods",
            "-A",
            "--field-selector",
            "spec.nodeName!=node-a",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(item_names(&not_on_a), ["shop/cart-2", "shop/checkout"]);

    let carts = kubectl
        .json(&["get", "pods", "-n", "shop", "-l", "app=cart", "-o", "json"])
        .await;
    assert_eq!(
        item_names(&carts),
        ["shop/cart-1", "shop/cart-2", "shop/checkout"]
    );
    let carts_on_b = kubectl
        .json(&[
            "get",
            "pods",
            "-A",
            "-l",
            "app in (cart,db),app!=web",
            "--field-selector",
            "spec.nodeName=node-b,metadata.name!=checkout",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(item_names(&carts_on_b), ["shop/cart-2"]);

    let uid = kubectl
        .ok(&[
            "get",
            "pod",
            "checkout",
            "-n",
            "shop",
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .await;
    assert_eq!(uid, "4b4d1f1e-6c1c-4f7e-9a53-0d6f3c1b2a10");

    // kubectl turns the Status body into its usual message, so the body's shape is right.
    let (success, _, stderr) = kubectl.run(&["get", "pod", "nope", "-n", "shop"]).await;
    assert!(!success);
    assert!(
        stderr.contains("Error from server (NotFound): pods \"nope\" not found"),
        "{stderr}"
    );
    let (success, _, stderr) = kubectl
        .run(&["get", "pods", "-A", "--field-selector", "spec.hostname=x"])
        .await;
    assert!(!success);
    assert!(
        stderr.contains("BadRequest")
            && stderr.contains("field label not supported: spec.hostname"),
        "{stderr}"
    );

    // Chunked lists follow `continue` tokens until the last page.
    let chunked = kubectl
        .json(&["get", "pods", "-A", "--chunk-size=1", "-o", "json"])
        .await;
    assert_eq!(item_names(&chunked), item_names(&all));
    let continued = server
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && r.contains("continue="))
        .count();
    assert_eq!(
        continued,
        3,
        "three follow-up pages for four pods: {:?}",
        server.requests()
    );

    let namespaces = kubectl.ok(&["get", "namespaces", "-o", "name"]).await;
    assert_eq!(namespaces, "namespace/default\nnamespace/shop\n");
    server.apply_node(Node {
        metadata: ObjectMeta {
            name: Some("node-a".into()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    });
    let nodes = kubectl.ok(&["get", "nodes", "-o", "name"]).await;
    assert_eq!(nodes, "node/node-a\n");

    // Human-readable output asks for a server-side Table; the fake answers with a plain list and
    // kubectl must still print it.
    let table = kubectl.ok(&["get", "pods", "-n", "shop"]).await;
    let names: Vec<&str> = table
        .lines()
        .map(|line| line.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(names, ["NAME", "cart-1", "cart-2", "checkout"], "{table}");
}

/// The cluster's RBAC as a chart renders it: pods read cluster-wide, services in `shop` only,
/// for service account observability/podscope (another account's binding grants it nothing).
fn rbac() -> Vec<Value> {
    let subject = |name: &str| serde_json::json!([{"kind": "ServiceAccount", "name": name, "namespace": "observability"}]);
    vec![
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]}),
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "pod-reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "pod-reader"},
            "subjects": subject("podscope")}),
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "service-reader", "namespace": "shop"},
            "rules": [{"apiGroups": [""], "resources": ["services"], "verbs": ["list"]}]}),
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "service-reader", "namespace": "shop"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "service-reader"},
            "subjects": subject("podscope")}),
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "someone-else"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": subject("other")}),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_over_https_gets_exactly_what_rbac_grants() {
    use podscope_integration::fake_kube::{Grant, ServiceAccount};
    let server = FakeApiServer::start_for(&ServiceAccount {
        namespace: "observability".into(),
        name: "podscope".into(),
        rbac: rbac(),
    })
    .await
    .unwrap();
    assert!(server.url().starts_with("https://127.0.0.1:"));
    three_pods(&server);
    let grant = |verb: &str, resource: &str, scope: &str| Grant {
        verb: verb.into(),
        resource: resource.into(),
        scope: scope.into(),
    };
    assert_eq!(
        server.grants().unwrap().into_iter().collect::<Vec<_>>(),
        vec![
            grant("list", "pods", "cluster"),
            grant("list", "services", "shop"),
            grant("watch", "pods", "cluster"),
        ]
    );
    let kubectl = Kubectl::new(&server);
    let pods = kubectl.json(&["get", "pods", "-A", "-o", "json"]).await;
    assert_eq!(
        item_names(&pods),
        vec!["default/web-1", "shop/cart-1", "shop/cart-2"]
    );
    kubectl.ok(&["get", "services", "-n", "shop"]).await;
    let forbidden = |what: &str, scope: &str| {
        format!("Error from server (Forbidden): {what} is forbidden: User \"system:serviceaccount:observability:podscope\" cannot {scope}")
    };
    for (args, message) in [
        (
            vec!["get", "pod", "cart-1", "-n", "shop"],
            forbidden(
                "pods \"cart-1\"",
                "get resource \"pods\" in API group \"\" in the namespace \"shop\"",
            ),
        ),
        (
            vec!["get", "services", "-A"],
            forbidden(
                "services",
                "list resource \"services\" in API group \"\" at the cluster scope",
            ),
        ),
    ] {
        let (success, _, stderr) = kubectl.run(&args).await;
        assert!(
            !success && stderr.contains(&message),
            "kubectl {args:?}: {stderr}"
        );
    }
    // No token, or another: 401, before any RBAC.
    let ca = reqwest::Certificate::from_pem(
        &std::fs::read(kubectl.dir.path().join("kubeconfig.ca.crt")).unwrap(),
    )
    .unwrap();
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .timeout(PATIENCE)
        .build()
        .unwrap();
    for token in [None, Some("guess")] {
        let mut request = https.get(format!("{}/api/v1/pods", server.url()));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "token {token:?}");
        let status: Status = response.json().await.unwrap();
        assert_eq!(status.reason.as_deref(), Some("Unauthorized"));
    }
    let log: Vec<(String, String, String, Option<String>, u16)> = server
        .access_log()
        .into_iter()
        .map(|r| (r.verb, r.resource, r.scope, r.name, r.status))
        .collect();
    let entry = |verb: &str, resource: &str, scope: &str, name: Option<&str>, status| {
        (
            verb.to_string(),
            resource.to_string(),
            scope.to_string(),
            name.map(str::to_string),
            status,
        )
    };
    assert_eq!(
        log,
        vec![
            entry("list", "pods", "cluster", None, 200),
            entry("list", "services", "shop", None, 200),
            entry("get", "pods", "shop", Some("cart-1"), 403),
            entry("list", "services", "cluster", None, 403),
            entry("list", "pods", "cluster", None, 401),
            entry("list", "pods", "cluster", None, 401),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_watch_sees_added_modified_deleted() {
    let server = FakeApiServer::start().await;
    three_pods(&server);
    let kubectl = Kubectl::new(&server);
    let (_child, mut events) = kubectl.spawn_json_stream(&[
        "get",
        "pods",
        "-n",
        "shop",
        "--watch",
        "--output-watch-events",
        "-o",
        "json",
    ]);
    let deadline = Instant::now() + PATIENCE;
    let mut next = async || {
        timeout_at(deadline, events.recv())
            .await
            .expect("kubectl printed the next watch event in time")
            .expect("kubectl still running")
    };

    // The initial list comes out as ADDED events.
    let mut initial = Vec::new();
    for _ in 0..2 {
        let event = next().await;
        assert_eq!(event["type"], "ADDED", "{event}");
        initial.push(
            event["object"]["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
    }
    initial.sort();
    assert_eq!(initial, ["cart-1", "cart-2"]);

    // Made before or after kubectl's watch request lands: either way it resumes from the list's
    // resourceVersion, so it must see exactly these, in this order.
    server.apply_pod(pod("shop", "cart-3", "node-a", "cart"));
    server.apply_pod(pod("shop", "cart-3", "node-b", "cart"));
    server.apply_pod(pod("default", "elsewhere", "node-b", "web"));
    assert!(server.delete_pod("shop", "cart-3"));

    let added = next().await;
    assert_eq!(added["type"], "ADDED", "{added}");
    assert_eq!(added["object"]["metadata"]["name"], "cart-3");
    assert_eq!(added["object"]["spec"]["nodeName"], "node-a");
    let modified = next().await;
    assert_eq!(modified["type"], "MODIFIED", "{modified}");
    assert_eq!(modified["object"]["spec"]["nodeName"], "node-b");
    let deleted = next().await;
    assert_eq!(deleted["type"], "DELETED", "{deleted}");
    assert_eq!(deleted["object"]["metadata"]["name"], "cart-3");
    assert_eq!(
        deleted["object"]["metadata"]["resourceVersion"],
        server.resource_version().to_string()
    );
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces/shop/pods?") && r.contains("watch=true")),
        "{:?}",
        server.requests()
    );
}

// ---------------------------------------------------------------------------------------------
// Plain HTTP

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("http client")
}

async fn get(server: &FakeApiServer, path: &str) -> reqwest::Response {
    http()
        .get(format!("{}{path}", server.url()))
        .bearer_auth(server.token())
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

async fn get_json(server: &FakeApiServer, path: &str) -> Value {
    let response = get(server, path).await;
    assert_eq!(response.status(), 200, "GET {path}");
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.expect("JSON body")
}

/// Reads a watch response line by line, as watch clients do.
struct WatchStream {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl WatchStream {
    async fn open(server: &FakeApiServer, path: &str) -> WatchStream {
        // No overall timeout: a watch legitimately stays open; each read has a deadline instead.
        let response = reqwest::Client::new()
            .get(format!("{}{path}", server.url()))
            .bearer_auth(server.token())
            .send()
            .await
            .unwrap_or_else(|e| panic!("watch {path}: {e}"));
        assert_eq!(response.status(), 200, "watch {path}");
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(response.headers()["transfer-encoding"], "chunked");
        WatchStream {
            response,
            buffer: Vec::new(),
        }
    }

    /// The next event, or `None` once the server ended the stream.
    async fn next(&mut self) -> Option<Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let event: Value = serde_json::from_slice(&line).expect("one JSON event per line");
                // Every line must also parse as the typed event Rust clients decode.
                if let Err(e) = serde_json::from_value::<WatchEvent<Pod>>(event.clone()) {
                    panic!("not a WatchEvent<Pod> ({e}): {event}");
                }
                return Some(event);
            }
            match timeout_at(deadline, self.response.chunk()).await {
                Err(_) => panic!("no watch event within {PATIENCE:?}"),
                Ok(Ok(Some(chunk))) => self.buffer.extend_from_slice(&chunk),
                Ok(Ok(None)) | Ok(Err(_)) => {
                    assert!(self.buffer.is_empty(), "stream ended mid-line");
                    return None;
                }
            }
        }
    }

    async fn expect(&mut self, event_type: &str, name: &str) -> Value {
        let event = self.next().await.expect("the watch is still open");
        assert_eq!(event["type"], event_type, "{event}");
        assert_eq!(event["object"]["metadata"]["name"], name, "{event}");
        event
    }
}

fn resource_version(event: &Value) -> u64 {
    event["object"]["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion: {event}"))
}

/// The shape kube-rs decodes lists into (kube's `ObjectList`).
#[derive(serde::Deserialize)]
struct TypedList {
    metadata: ListMeta,
    items: Vec<Pod>,
}

#[tokio::test]
async fn list_then_watch_from_its_resource_version_gets_exactly_the_later_events() {
    let server = FakeApiServer::start().await;
    server.apply_pod(pod("shop", "cart-1", "node-a", "cart"));
    let list = get_json(&server, "/api/v1/namespaces/shop/pods").await;
    assert_eq!(list["kind"], "PodList");
    assert_eq!(list["apiVersion"], "v1");
    let typed: TypedList = serde_json::from_value(list.clone()).expect("typed list");
    assert_eq!(typed.items.len(), 1);
    let listed_at = typed
        .metadata
        .resource_version
        .expect("list resourceVersion");
    assert_eq!(listed_at, server.resource_version().to_string());
    assert_eq!(
        typed.items[0].metadata.resource_version.as_deref(),
        Some(listed_at.as_str())
    );

    server.apply_pod(pod("shop", "cart-2", "node-a", "cart"));
    server.apply_pod(pod("other", "ignored", "node-a", "cart"));
    server.apply_pod(pod("shop", "cart-1", "node-b", "cart"));
    assert!(server.delete_pod("shop", "cart-2"));

    let mut watch = WatchStream::open(
        &server,
        &format!("/api/v1/namespaces/shop/pods?watch=true&resourceVersion={listed_at}"),
    )
    .await;
    let added = watch.expect("ADDED", "cart-2").await;
    let modified = watch.expect("MODIFIED", "cart-1").await;
    assert_eq!(modified["object"]["spec"]["nodeName"], "node-b");
    let deleted = watch.expect("DELETED", "cart-2").await;
    let versions = [&added, &modified, &deleted].map(resource_version);
    assert!(
        versions[0] < versions[1] && versions[1] < versions[2],
        "{versions:?}"
    );
    assert_eq!(versions[2], server.resource_version());
    assert_eq!(
        added["object"]["kind"], "Pod",
        "watch objects carry their kind"
    );

    // Then live events, after the replay.
    server.apply_pod(pod("shop", "cart-3", "node-a", "cart"));
    let live = watch.expect("ADDED", "cart-3").await;
    assert_eq!(resource_version(&live), server.resource_version());
}

#[tokio::test]
async fn watch_without_resource_version_starts_with_the_current_state() {
    let server = FakeApiServer::start().await;
    server.apply_pod(pod("shop", "cart-1", "node-a", "cart"));
    server.apply_pod(pod("shop", "cart-2", "node-b", "cart"));
    for start in ["", "&resourceVersion=0"] {
        let mut watch = WatchStream::open(
            &server,
            &format!("/api/v1/pods?watch=1&fieldSelector=spec.nodeName%3Dnode-a{start}"),
        )
        .await;
        watch.expect("ADDED", "cart-1").await;
        server.apply_pod(pod("shop", "cart-9", "node-a", "cart"));
        watch.expect("ADDED", "cart-9").await;
        assert!(server.delete_pod("shop", "cart-9"));
        watch.expect("DELETED", "cart-9").await;
    }
}

#[tokio::test]
async fn selected_watch_sees_objects_enter_and_leave_the_selection() {
    let server = FakeApiServer::start().await;
    server.apply_pod(pod("shop", "mover", "node-b", "cart"));
    let from = server.resource_version();
    let mut watch = WatchStream::open(
        &server,
        &format!("/api/v1/pods?watch=true&resourceVersion={from}&fieldSelector=spec.nodeName%3Dnode-a&labelSelector=app%3Dcart"),
    )
    .await;
    server.apply_pod(pod("shop", "mover", "node-a", "cart"));
    server.apply_pod(pod("shop", "mover", "node-a", "db"));
    server.apply_pod(pod("shop", "mover", "node-a", "cart"));
    server.apply_pod(pod("shop", "mover", "node-b", "cart"));
    server.apply_pod(pod("shop", "mover", "node-c", "cart"));
    server.apply_pod(pod("shop", "mover", "node-a", "cart"));
    watch.expect("ADDED", "mover").await;
    let left = watch.expect("DELETED", "mover").await;
    // The last state that matched, stamped with the change that made it stop matching.
    assert_eq!(left["object"]["metadata"]["labels"]["app"], "cart");
    assert_eq!(resource_version(&left), from + 2);
    watch.expect("ADDED", "mover").await;
    watch.expect("DELETED", "mover").await;
    // Node-b → node-c never matched: nothing. Back on node-a: ADDED again.
    let back = watch.expect("ADDED", "mover").await;
    assert_eq!(resource_version(&back), server.resource_version());
}

#[tokio::test]
async fn bookmarks_and_timeout() {
    let server = FakeApiServer::start().await;
    server.apply_pod(pod("shop", "cart-1", "node-a", "cart"));
    server.apply_pod(pod("shop", "cart-2", "node-b", "cart"));
    let now = server.resource_version();
    let mut watch = WatchStream::open(
        &server,
        &format!("/api/v1/pods?watch=true&resourceVersion={now}&allowWatchBookmarks=true&timeoutSeconds=3&fieldSelector=spec.nodeName%3Dnode-a"),
    )
    .await;
    // A change to an object outside the selection still moves this watcher's bookmark.
    server.apply_pod(pod("shop", "cart-2", "node-b", "db"));
    let bookmark = watch.next().await.expect("a bookmark");
    assert_eq!(bookmark["type"], "BOOKMARK", "{bookmark}");
    assert_eq!(bookmark["object"]["kind"], "Pod");
    assert_eq!(resource_version(&bookmark), now + 1);
    // timeoutSeconds=3 ends the stream cleanly; bookmarks keep coming until then.
    while let Some(event) = watch.next().await {
        assert_eq!(event["type"], "BOOKMARK", "{event}");
    }

    // Streaming lists (sendInitialEvents): current state, then the marked bookmark.
    let mut watch = WatchStream::open(
        &server,
        "/api/v1/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true",
    )
    .await;
    watch.expect("ADDED", "cart-1").await;
    watch.expect("ADDED", "cart-2").await;
    let end = watch.next().await.expect("initial-events-end bookmark");
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    assert_eq!(resource_version(&end), server.resource_version());
}

#[tokio::test]
async fn expired_history_answers_410_and_ends_open_watches() {
    let server = FakeApiServer::start().await;
    server.apply_pod(pod("shop", "cart-1", "node-a", "cart"));
    let old = server.resource_version();
    let mut open = WatchStream::open(
        &server,
        &format!("/api/v1/pods?watch=true&resourceVersion={old}"),
    )
    .await;
    server.apply_pod(pod("shop", "cart-2", "node-a", "cart"));
    open.expect("ADDED", "cart-2").await;

    let paged = get_json(&server, "/api/v1/pods?limit=1").await;
    let token = paged["metadata"]["continue"]
        .as_str()
        .expect("continue token")
        .to_string();
    assert_eq!(paged["metadata"]["remainingItemCount"], 1);
    // Compaction keeps the latest revision readable, so something must come after the token.
    server.apply_pod(pod("shop", "cart-3", "node-a", "cart"));
    open.expect("ADDED", "cart-3").await;

    server.expire_history();

    // The open watch is told, then closed.
    let error = open.next().await.expect("an ERROR event");
    assert_eq!(error["type"], "ERROR", "{error}");
    let status: Status = serde_json::from_value(error["object"].clone()).expect("a Status");
    assert_eq!(status.code, Some(410));
    assert_eq!(status.reason.as_deref(), Some("Expired"));
    assert_eq!(status.status.as_deref(), Some("Failure"));
    assert!(open.next().await.is_none(), "watch closed after the ERROR");

    // A new watch from before the compaction: ERROR 410 in the stream, then the end.
    let mut stale = WatchStream::open(
        &server,
        &format!("/api/v1/pods?watch=true&resourceVersion={old}"),
    )
    .await;
    let error = stale.next().await.expect("an ERROR event");
    assert_eq!(error["type"], "ERROR");
    assert_eq!(error["object"]["code"], 410);
    assert_eq!(error["object"]["reason"], "Expired");
    assert!(
        error["object"]["message"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("too old resource version: {old} (")),
        "{error}"
    );
    assert!(stale.next().await.is_none());

    // A continue token from before the compaction is gone too.
    let response = get(&server, &format!("/api/v1/pods?limit=1&continue={token}")).await;
    assert_eq!(response.status(), 410);
    let status: Status = response.json().await.expect("a Status body");
    assert_eq!(status.reason.as_deref(), Some("Expired"));

    // Relisting and watching from the new resourceVersion works again.
    let list = get_json(&server, "/api/v1/pods").await;
    let now = list["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    let mut fresh = WatchStream::open(
        &server,
        &format!("/api/v1/pods?watch=true&resourceVersion={now}"),
    )
    .await;
    assert!(server.delete_pod("shop", "cart-1"));
    fresh.expect("DELETED", "cart-1").await;
}

#[tokio::test]
async fn pages_are_a_consistent_snapshot() {
    let server = FakeApiServer::start().await;
    for name in ["a", "b", "c", "d", "e"] {
        server.apply_pod(pod("shop", name, "node-a", "cart"));
    }
    let first = get_json(&server, "/api/v1/pods?limit=2").await;
    let snapshot = first["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    // Changes between pages must not show up in later pages of the same list.
    assert!(server.delete_pod("shop", "c"));
    server.apply_pod(pod("shop", "bb", "node-a", "cart"));
    server.apply_pod(pod("shop", "d", "node-z", "cart"));

    let mut names: Vec<String> = Vec::new();
    let mut page = first;
    loop {
        assert_eq!(page["metadata"]["resourceVersion"], snapshot.as_str());
        for item in page["items"].as_array().expect("items") {
            assert!(
                item.get("kind").is_none(),
                "list items carry no kind, as on the real server"
            );
            names.push(item["metadata"]["name"].as_str().expect("name").to_string());
            if item["metadata"]["name"] == "d" {
                assert_eq!(item["spec"]["nodeName"], "node-a");
            }
        }
        let Some(token) = page["metadata"]["continue"].as_str() else {
            break;
        };
        page = get_json(&server, &format!("/api/v1/pods?limit=2&continue={token}")).await;
    }
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
}

#[tokio::test]
async fn errors_carry_status_bodies() {
    let server = FakeApiServer::start().await;
    server.apply_pod(pod("shop", "cart-1", "node-a", "cart"));

    server.fail_next(1, 503);
    let response = get(&server, "/api/v1/pods").await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["content-type"], "application/json");
    let status: Value = response.json().await.expect("Status body");
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["apiVersion"], "v1");
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["reason"], "ServiceUnavailable");
    assert_eq!(status["code"], 503);
    // Only the next one fails.
    get_json(&server, "/api/v1/pods").await;

    server.fail_next(2, 500);
    for _ in 0..2 {
        let response = get(&server, "/api/v1/namespaces/shop/pods/cart-1").await;
        assert_eq!(response.status(), 500);
        let status: Status = response.json().await.expect("Status body");
        assert_eq!(status.reason.as_deref(), Some("InternalError"));
    }
    let pod = get_json(&server, "/api/v1/namespaces/shop/pods/cart-1").await;
    assert_eq!(pod["kind"], "Pod");
    assert_eq!(pod["metadata"]["name"], "cart-1");

    let response = get(&server, "/api/v1/namespaces/shop/pods/nope").await;
    assert_eq!(response.status(), 404);
    let status: Status = response.json().await.expect("Status body");
    assert_eq!(status.reason.as_deref(), Some("NotFound"));
    assert_eq!(status.message.as_deref(), Some("pods \"nope\" not found"));

    let response = get(&server, "/api/v1/pods?fieldSelector=spec.hostname%3Dx").await;
    assert_eq!(response.status(), 400);
    // Label selectors are read by the agent's own parser.
    let response = get(&server, "/api/v1/pods?labelSelector=a%20b%3Dc").await;
    assert_eq!(response.status(), 400);
    let status: Status = response.json().await.expect("Status body");
    assert_eq!(
        status.message.as_deref(),
        Some("unable to parse requirement: \"a b\" is not a valid label key")
    );
    let response = get(&server, "/api/v1/secrets").await;
    assert_eq!(response.status(), 404);

    // A wrong credential is refused; none at all is how kubectl talks to a plain-HTTP server.
    let wrong = http()
        .get(format!("{}/api/v1/pods", server.url()))
        .bearer_auth("not-the-token")
        .send()
        .await
        .expect("send");
    assert_eq!(wrong.status(), 401);
    let status: Status = wrong.json().await.expect("Status body");
    assert_eq!(status.reason.as_deref(), Some("Unauthorized"));
    let version = http()
        .get(format!("{}/version", server.url()))
        .send()
        .await
        .expect("send");
    assert_eq!(version.status(), 200);
}

#[tokio::test]
async fn stop_refuses_connections_and_restart_serves_the_same_state_on_the_same_port() {
    let server = FakeApiServer::start().await;
    server.apply_pod(pod("shop", "cart-1", "node-a", "cart"));
    let url = server.url();
    let before = server.resource_version();
    let mut open = WatchStream::open(
        &server,
        &format!("/api/v1/pods?watch=true&resourceVersion={before}"),
    )
    .await;

    server.stop().await;
    assert!(open.next().await.is_none(), "open watches are cut by stop");
    let refused = http()
        .get(format!("{url}/version"))
        .send()
        .await
        .expect_err("nothing listening");
    assert!(refused.is_connect(), "{refused:?}");

    // Changes while down are kept and replayed after the restart.
    server.apply_pod(pod("shop", "cart-2", "node-a", "cart"));
    server.restart().await;
    assert_eq!(server.url(), url);
    let list = get_json(&server, "/api/v1/pods").await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(2));
    let mut resumed = WatchStream::open(
        &server,
        &format!("/api/v1/pods?watch=true&resourceVersion={before}"),
    )
    .await;
    resumed.expect("ADDED", "cart-2").await;
}

#[tokio::test]
async fn discovery_documents() {
    let server = FakeApiServer::start().await;
    let version = get_json(&server, "/version").await;
    assert_eq!(version["major"], "1");
    assert!(version["gitVersion"]
        .as_str()
        .unwrap_or("")
        .starts_with("v1."));
    let api = get_json(&server, "/api").await;
    assert_eq!(api["kind"], "APIVersions");
    assert_eq!(api["versions"], serde_json::json!(["v1"]));
    let apis = get_json(&server, "/apis").await;
    assert_eq!(apis["kind"], "APIGroupList");
    let v1 = get_json(&server, "/api/v1").await;
    assert_eq!(v1["kind"], "APIResourceList");
    let pods = v1["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .find(|r| r["name"] == "pods")
        .expect("pods resource");
    assert_eq!(pods["kind"], "Pod");
    assert_eq!(pods["namespaced"], true);
    assert_eq!(pods["verbs"], serde_json::json!(["get", "list", "watch"]));
}

// ---------------------------------------------------------------------------------------------
// kube-rs, the client the Kubernetes processor uses

/// A kube-rs client built from the fake's kubeconfig file (not KUBECONFIG: tests run in
/// parallel and the environment is process-wide).
async fn kube_client(server: &FakeApiServer, dir: &tempfile::TempDir) -> kube::Client {
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path);
    let kubeconfig =
        kube::config::Kubeconfig::read_from(&path).expect("kube-rs reads the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("kube-rs accepts the kubeconfig");
    kube::Client::try_from(config).expect("kube client")
}

/// Names seen in one watcher (re)start: everything from `Init` to `InitDone`.
async fn next_init<S>(events: &mut S) -> Vec<String>
where
    S: futures::Stream<
            Item = Result<kube::runtime::watcher::Event<Pod>, kube::runtime::watcher::Error>,
        > + Unpin,
{
    use futures::StreamExt as _;
    use kube::runtime::watcher::Event;
    let deadline = Instant::now() + PATIENCE;
    let mut names = Vec::new();
    let mut started = false;
    loop {
        let event = timeout_at(deadline, events.next())
            .await
            .expect("watcher event in time")
            .expect("watcher stream open");
        match event {
            Ok(Event::Init) => {
                started = true;
                names.clear();
            }
            Ok(Event::InitApply(pod)) if started => {
                names.push(pod.metadata.name.unwrap_or_default())
            }
            Ok(Event::InitDone) if started => {
                names.sort();
                return names;
            }
            // Errors (the injected 503) are retried by the backoff; nothing else is expected.
            Err(_) => {}
            Ok(other) => panic!("unexpected watcher event before a relist: {other:?}"),
        }
    }
}

async fn next_change<S>(events: &mut S) -> kube::runtime::watcher::Event<Pod>
where
    S: futures::Stream<
            Item = Result<kube::runtime::watcher::Event<Pod>, kube::runtime::watcher::Error>,
        > + Unpin,
{
    use futures::StreamExt as _;
    timeout_at(Instant::now() + PATIENCE, events.next())
        .await
        .expect("watcher event in time")
        .expect("watcher stream open")
        .expect("no watcher error")
}

#[tokio::test]
async fn kube_rs_watcher_lists_watches_and_recovers_from_410_and_outages() {
    use kube::runtime::watcher::{self, Event};
    use kube::runtime::WatchStreamExt as _;

    for streaming in [false, true] {
        let server = FakeApiServer::start().await;
        server.apply_pod(pod("shop", "cart-1", "node-a", "cart"));
        server.apply_pod(pod("shop", "cart-2", "node-b", "cart"));
        server.apply_pod(pod("default", "web-1", "node-a", "web"));
        let dir = tempfile::tempdir().expect("temp dir");
        let client = kube_client(&server, &dir).await;
        // Page size 1 makes the list follow continue tokens, as a big node would.
        let mut config = watcher::Config::default()
            .fields("spec.nodeName=node-a")
            .page_size(1);
        if streaming {
            config = config.streaming_lists();
        }
        let mut events =
            Box::pin(watcher::watcher(kube::Api::<Pod>::all(client), config).default_backoff());

        assert_eq!(
            next_init(&mut events).await,
            ["cart-1", "web-1"],
            "streaming={streaming}"
        );
        server.apply_pod(pod("shop", "cart-2", "node-a", "cart"));
        match next_change(&mut events).await {
            Event::Apply(pod) => assert_eq!(pod.metadata.name.as_deref(), Some("cart-2")),
            other => panic!("expected Apply, got {other:?}"),
        }
        server.apply_pod(pod("shop", "cart-1", "node-b", "cart"));
        match next_change(&mut events).await {
            Event::Delete(pod) => assert_eq!(pod.metadata.name.as_deref(), Some("cart-1")),
            other => panic!("expected Delete, got {other:?}"),
        }

        // Compaction: the open watch ends with 410 and the watcher relists from scratch.
        server.expire_history();
        assert_eq!(
            next_init(&mut events).await,
            ["cart-2", "web-1"],
            "streaming={streaming}"
        );

        // An outage with a change in the middle, then a 503 on the way back: a fresh state.
        server.stop().await;
        assert!(server.delete_pod("default", "web-1"));
        server.expire_history();
        server.fail_next(1, 503);
        server.restart().await;
        assert_eq!(
            next_init(&mut events).await,
            ["cart-2"],
            "streaming={streaming}"
        );

        let requests = server.requests();
        assert!(
            requests.iter().all(|r| !r.starts_with("GET /api/v1/pods")
                || r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
            "every pod request carries the node's field selector: {requests:?}"
        );
        let expected = if streaming {
            "sendInitialEvents=true"
        } else {
            "continue="
        };
        assert!(
            requests.iter().any(|r| r.contains(expected)),
            "{expected} in {requests:?}"
        );
    }
}

/// podscope's custom resources as kubectl meets them: discovery of `podscope.dev`, server-side
/// apply of an `EbpfProgram` (generation moves with the spec), and of its status by one field
/// manager per node — each owns its own `status.nodes` entry, another's entry is a conflict
/// unless forced, and an apply without an entry removes that manager's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_ebpf_programs_and_their_status_per_node_server_side() {
    let server = FakeApiServer::start().await;
    let kubectl = Kubectl::new(&server);
    let write = |name: &str, text: &str| {
        let path = kubectl.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let program = |global: u32| {
        format!(
            "apiVersion: podscope.dev/v1alpha1\nkind: EbpfProgram\nmetadata:\n  name: syscount\nspec:\n  object: {{configMap: {{namespace: obs, name: programs, key: syscount.o}}}}\n  globals: {{min_ns: {global}}}\n  metrics: {{counters: [{{name: syscalls, map: counts}}]}}\n"
        )
    };
    let manifest = write("program.yaml", &program(1));
    kubectl
        .ok(&[
            "apply",
            "--server-side",
            "--validate=false",
            "-f",
            &manifest,
        ])
        .await;
    let object = kubectl
        .json(&["get", "ebpfprogram", "syscount", "-o", "json"])
        .await;
    assert_eq!(object["spec"]["globals"]["min_ns"], 1);
    assert_eq!(object["metadata"]["generation"], 1);
    assert_eq!(
        kubectl.ok(&["get", "ebpfprograms", "-o", "name"]).await,
        "ebpfprogram.podscope.dev/syscount\n"
    );
    let manifest = write("program.yaml", &program(2));
    kubectl
        .ok(&[
            "apply",
            "--server-side",
            "--validate=false",
            "-f",
            &manifest,
        ])
        .await;
    let object = kubectl
        .json(&["get", "ebpfprogram", "syscount", "-o", "json"])
        .await;
    assert_eq!(object["metadata"]["generation"], 2, "the spec changed");

    let status = |node: &str, phase: &str| {
        write(
            &format!("status-{node}.yaml"),
            &format!(
                "apiVersion: podscope.dev/v1alpha1\nkind: EbpfProgram\nmetadata:\n  name: syscount\nstatus:\n  nodes:\n  - node: {node}\n    phase: {phase}\n"
            ),
        )
    };
    let apply_status = |manager: &str, file: String, force: bool| {
        let mut args = vec![
            "apply".to_string(),
            "--server-side".into(),
            "--validate=false".into(),
            "--subresource=status".into(),
            format!("--field-manager={manager}"),
            "-f".into(),
            file,
        ];
        if force {
            args.push("--force-conflicts".into());
        }
        args
    };
    for (manager, node) in [("podscope/node-a", "node-a"), ("podscope/node-b", "node-b")] {
        let args = apply_status(manager, status(node, "Loaded"), false);
        kubectl
            .ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .await;
    }
    let object = kubectl
        .json(&[
            "get",
            "ebpfprogram",
            "syscount",
            "-o",
            "json",
            "--show-managed-fields",
        ])
        .await;
    let nodes: Vec<(String, String)> = object["status"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["node"].as_str().unwrap().into(),
                e["phase"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        nodes,
        [
            ("node-a".to_string(), "Loaded".to_string()),
            ("node-b".into(), "Loaded".into())
        ]
    );
    assert_eq!(
        object["metadata"]["generation"], 2,
        "status leaves the generation"
    );
    let owners: Vec<(String, Value)> = object["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["subresource"] == "status")
        .map(|m| {
            (
                m["manager"].as_str().unwrap().to_string(),
                m["fieldsV1"]["f:status"]["f:nodes"].clone(),
            )
        })
        .collect();
    assert_eq!(owners.len(), 2);
    assert_eq!(owners[0].0, "podscope/node-a");
    assert!(
        owners[0].1.get("k:{\"node\":\"node-a\"}").is_some(),
        "{owners:?}"
    );

    // node-b writing node-a's entry is a conflict kubectl reports, unless forced.
    let args = apply_status("podscope/node-b", status("node-a", "Failed"), false);
    let (success, _, stderr) = kubectl
        .run(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    assert!(!success);
    assert!(
        stderr.contains("conflict with \"podscope/node-a\"")
            && stderr.contains(".status.nodes[node=\"node-a\"]"),
        "{stderr}"
    );
    // An apply with no entry removes the manager's own: node-a's program is gone from node-a.
    let empty = write(
        "status-empty.yaml",
        "apiVersion: podscope.dev/v1alpha1\nkind: EbpfProgram\nmetadata:\n  name: syscount\nstatus:\n  nodes: []\n",
    );
    let args = apply_status("podscope/node-a", empty, false);
    kubectl
        .ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    let object = kubectl
        .json(&["get", "ebpfprogram", "syscount", "-o", "json"])
        .await;
    let nodes: Vec<&str> = object["status"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["node-b"]);
}
