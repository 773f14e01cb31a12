//! `kubectl podscope` as a user runs it: the real plugin binary, found by the real kubectl,
//! against the fake API server (which port-forwards like a real one, checked here with the real
//! `kubectl port-forward` and with kube-rs) and the agents behind it.
//!
//! Built and run as a test of podscope-kubectl (it needs CARGO_BIN_EXE_kubectl-podscope).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use podscope_integration::fake_kube::pods::{self, running_pod as pod};
use podscope_integration::fake_kube::{FakeApiServer, ServiceAccount};
use podscope_integration::kubectl_plugin;
use serde_json::{json, Value};

/// How long any single expected thing may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(30);

const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-podscope");

fn kubectl_binary() -> PathBuf {
    ["/usr/bin/kubectl", "/usr/local/bin/kubectl"]
        .map(PathBuf::from)
        .into_iter()
        .find(|path| path.exists())
        .expect("kubectl is not installed: run scripts/install-deps.sh")
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

    /// The plugin with this cluster's kubeconfig and a clean environment.
    fn plugin(&self, args: &[&str]) -> Command {
        kubectl_plugin::command(PLUGIN, self.dir.path(), &self.kubeconfig(), args)
    }

    /// Runs the plugin to completion off the runtime the fake server runs on.
    async fn run(&self, args: &[&str]) -> Output {
        kubectl_plugin::output(self.plugin(args), PATIENCE).await
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The agent pod of `node` in the agents' namespace, its session port `port` reached on 127.0.0.1.
fn agent_pod(node: &str, port: u16) -> Pod {
    pods::agent_pod("observability", node, port)
}

/// An echo server on a free loopback port: what a forwarded port reaches in the transport tests.
async fn echo_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    });
    port
}

// ---------------------------------------------------------------------------------------------
// Installation

#[test]
fn kubectl_plugin_list_finds_the_binary_on_path() {
    // A directory with the plugin alone (cargo's own output directory holds `.d` files named
    // like plugins, which kubectl warns about).
    let bin = tempfile::tempdir().expect("bin dir");
    std::os::unix::fs::symlink(PLUGIN, bin.path().join("kubectl-podscope"))
        .expect("link the plugin");
    let dir = bin.path();
    let home = tempfile::tempdir().expect("home");
    let output = Command::new(kubectl_binary())
        .env_clear()
        .env("HOME", home.path())
        .env("PATH", format!("{}:/usr/bin:/bin", dir.display()))
        .args(["plugin", "list"])
        .output()
        .expect("run kubectl plugin list");
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "kubectl plugin list failed: {}",
        text(&output.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|line| line == format!("{}/kubectl-podscope", dir.display())),
        "kubectl plugin list did not list the plugin: {stdout}"
    );
    // And kubectl runs it as `kubectl podscope`.
    let output = Command::new(kubectl_binary())
        .env_clear()
        .env("HOME", home.path())
        .env("PATH", format!("{}:/usr/bin:/bin", dir.display()))
        .args(["podscope", "--version"])
        .output()
        .expect("run kubectl podscope");
    assert_eq!(
        text(&output.stdout),
        format!("kubectl podscope {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_krew_manifest_is_a_valid_plugin_for_this_version() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("krew/podscope.yaml");
    let text = std::fs::read_to_string(&path).expect("read the krew manifest");
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).expect("the krew manifest is YAML");
    let manifest = &docs[0];
    assert_eq!(
        manifest["apiVersion"].as_str(),
        Some("krew.googlecontainertools.github.com/v1alpha2")
    );
    assert_eq!(manifest["kind"].as_str(), Some("Plugin"));
    assert_eq!(manifest["metadata"]["name"].as_str(), Some("podscope"));
    let spec = &manifest["spec"];
    assert_eq!(
        spec["version"].as_str(),
        Some(format!("v{}", env!("CARGO_PKG_VERSION")).as_str())
    );
    for field in ["shortDescription", "description", "homepage"] {
        assert!(
            spec[field].as_str().is_some_and(|v| !v.is_empty()),
            "spec.{field} is missing"
        );
    }
    let platforms = spec["platforms"].as_vec().expect("spec.platforms");
    assert!(!platforms.is_empty());
    for platform in platforms {
        assert_eq!(platform["bin"].as_str(), Some("kubectl-podscope"));
        let uri = platform["uri"].as_str().expect("platforms[].uri");
        assert!(uri.starts_with("https://"), "{uri}");
        let sha = platform["sha256"].as_str().expect("platforms[].sha256");
        assert_eq!(sha.len(), 64, "sha256 {sha}");
        assert!(sha.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            platform["selector"]["matchLabels"]["os"].as_str(),
            Some("linux")
        );
        let files = platform["files"].as_vec().expect("platforms[].files");
        assert!(files.iter().any(
            |f| f["to"].as_str() == Some(".") && f["from"].as_str() == Some("kubectl-podscope")
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// The fake API server's pods/portforward, checked with the real clients

#[tokio::test]
async fn kube_rs_port_forwards_through_the_fake_api_server() {
    let cluster = Cluster::start().await;
    let port = echo_server().await;
    cluster.server.apply_pod(agent_pod("node-a", port));
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(cluster.kubeconfig()).expect("kubeconfig"),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("config");
    let client = kube::Client::try_from(config).expect("client");
    let pods: kube::Api<Pod> = kube::Api::namespaced(client, "observability");
    let mut forwarder = pods
        .portforward("podscope-node-a", &[port])
        .await
        .expect("port-forward");
    let mut stream = forwarder.take_stream(port).expect("stream");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"through the API server\n")
        .await
        .expect("write");
    let mut echoed = vec![0u8; 23];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(echoed, b"through the API server\n");
    let request = cluster
        .server
        .access_log()
        .into_iter()
        .find(|r| r.resource == "pods/portforward")
        .expect("the port-forward request was logged");
    assert_eq!(
        (
            request.verb.as_str(),
            request.scope.as_str(),
            request.status
        ),
        ("create", "observability", 101)
    );
}

#[tokio::test]
async fn a_closed_pod_port_is_reported_on_the_error_channel() {
    let cluster = Cluster::start().await;
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    cluster.server.apply_pod(agent_pod("node-a", port));
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(cluster.kubeconfig()).expect("kubeconfig"),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("config");
    let pods: kube::Api<Pod> =
        kube::Api::namespaced(kube::Client::try_from(config).unwrap(), "observability");
    let mut forwarder = pods
        .portforward("podscope-node-a", &[port])
        .await
        .expect("port-forward");
    let error = tokio::time::timeout(PATIENCE, forwarder.take_error(port).expect("error future"))
        .await
        .expect("error in time")
        .expect("an error message");
    assert!(
        error.starts_with(&format!(
            "error forwarding port {port} to pod podscope-node-a, uid "
        )),
        "{error}"
    );
    assert!(error.contains("Connection refused"), "{error}");
}

/// `kubectl port-forward` to the echo server through the fake API server; `websockets` picks
/// the transport kubectl uses (SPDY tunnelled in a websocket, or SPDY on its own).
async fn kubectl_port_forward_echoes(websockets: bool) {
    let cluster = Cluster::start().await;
    let port = echo_server().await;
    cluster.server.apply_pod(agent_pod("node-a", port));
    let mut child = Command::new(kubectl_binary())
        .env_clear()
        .env("HOME", cluster.dir.path())
        .env(
            "KUBECTL_PORT_FORWARD_WEBSOCKETS",
            if websockets { "true" } else { "false" },
        )
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .args([
            "port-forward",
            "-n",
            "observability",
            "pod/podscope-node-a",
            &format!(":{port}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl port-forward");
    let mut guard = KillOnDrop(Some(child.id()));
    let stdout = child.stdout.take();
    let result = tokio::task::spawn_blocking(move || -> Result<String, String> {
        // "Forwarding from 127.0.0.1:PORT -> REMOTE"
        let stdout = stdout.ok_or("no stdout")?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|e| e.to_string())?;
        // kubectl goes on printing ("Handling connection for …"): keep its stdout open.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let local: u16 = line
            .split_once("127.0.0.1:")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("kubectl port-forward printed {line:?}"))?;
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", local)).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(PATIENCE))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"via kubectl\n")
            .map_err(|e| e.to_string())?;
        let mut echoed = [0u8; 12];
        stream.read_exact(&mut echoed).map_err(|e| e.to_string())?;
        Ok(text(&echoed))
    })
    .await
    .expect("join");
    let _ = child.kill();
    guard.0 = None;
    let output = child.wait_with_output().expect("wait");
    assert_eq!(
        result.as_deref(),
        Ok("via kubectl\n"),
        "kubectl port-forward (websockets={websockets}) stderr: {}",
        text(&output.stderr)
    );
    let logged: Vec<(String, u16)> = cluster
        .server
        .access_log()
        .into_iter()
        .filter(|r| r.resource == "pods/portforward")
        .map(|r| (r.verb, r.status))
        .collect();
    assert_eq!(logged, [("create".to_string(), 101)]);
}

/// Kills a spawned process when a test ends early.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: signals our own child.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }
}

#[tokio::test]
async fn kubectl_port_forward_over_websockets_reaches_the_pod_port() {
    kubectl_port_forward_echoes(true).await;
}

#[tokio::test]
async fn kubectl_port_forward_over_spdy_reaches_the_pod_port() {
    kubectl_port_forward_echoes(false).await;
}

// ---------------------------------------------------------------------------------------------
// Errors, each with its message and exit code

#[tokio::test]
async fn a_missing_target_exits_3_and_names_it() {
    let cluster = Cluster::start().await;
    let output = cluster
        .run(&["trace", "-n", "shop", "pod/nope", "exec"])
        .await;
    assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stderr),
        "error: pod \"nope\" in namespace \"shop\" not found\n"
    );
    let output = cluster
        .run(&["trace", "-n", "shop", "deploy/web", "exec"])
        .await;
    assert_eq!(output.status.code(), Some(3));
    assert_eq!(
        text(&output.stderr),
        "error: deployment \"web\" in namespace \"shop\" not found\n"
    );
}

#[tokio::test]
async fn a_node_without_an_agent_exits_4() {
    let cluster = Cluster::start().await;
    cluster.server.apply_pod(pod(
        "shop",
        "web-0",
        "node-b",
        &[("app", "web")],
        &[("app", "containerd://0a")],
    ));
    let output = cluster
        .run(&["trace", "-n", "shop", "pod/web-0", "exec"])
        .await;
    assert_eq!(output.status.code(), Some(4), "{}", text(&output.stderr));
    assert!(
        text(&output.stderr).starts_with(
            "error: no podscope agent runs on node node-b: no running pod labelled \
             app.kubernetes.io/name=podscope,app.kubernetes.io/component=agent in namespace observability"
        ),
        "{}",
        text(&output.stderr)
    );
}

#[tokio::test]
async fn rbac_without_portforward_exits_5_naming_verb_and_resource() {
    // A user who may read pods but not port-forward into them.
    let reader = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
    });
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "alice-reads-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "alice", "namespace": "dev"}]
    });
    let server = FakeApiServer::start_for(&ServiceAccount {
        namespace: "dev".into(),
        name: "alice".into(),
        rbac: vec![reader, binding],
    })
    .await
    .expect("fake API server with RBAC");
    let cluster = Cluster::with(server);
    let port = echo_server().await;
    cluster.server.apply_pod(agent_pod("node-a", port));
    let output = cluster.run(&["status"]).await;
    assert_eq!(output.status.code(), Some(5), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with(
            "error: RBAC denied: you may not create pods/portforward in namespace observability. \
             The API server said: pods/portforward \"podscope-node-a\" is forbidden: User \
             \"system:serviceaccount:dev:alice\" cannot create resource \"pods/portforward\""
        ),
        "{stderr}"
    );
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let cluster = Cluster::start().await;
    let output = cluster.run(&["trace", "pod/web-0", "kprobe"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).starts_with("error: unknown probe \"kprobe\""),
        "{}",
        text(&output.stderr)
    );
    let output = cluster.run(&["trace", "web-0", "exec"]).await;
    assert_eq!(output.status.code(), Some(2));
    let output = cluster
        .run(&["profile", "node/n1", "-o", "flame.png"])
        .await;
    assert_eq!(output.status.code(), Some(2));
}

#[tokio::test]
async fn a_protocol_mismatch_exits_6_and_says_which_side_to_upgrade() {
    let cluster = Cluster::start().await;
    let newer = podscope_core::session::PROTOCOL_VERSION + 1;
    let (port, _) = refusing_agent(move |hello| {
        json!({"code": "protocol_mismatch",
               "message": format!("this agent speaks protocol {newer}, the client {}", hello["protocol"]),
               "protocol": newer, "agent_version": "9.0.0"})
    })
    .await;
    let address = format!("127.0.0.1:{port}");
    let output = cluster
        .run(&["--agent-address", &address, "trace", "node/node-a", "exec"])
        .await;
    assert_eq!(output.status.code(), Some(6), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stderr),
        format!(
            "error: protocol mismatch with the agent on node node-a: kubectl-podscope {} speaks session protocol {}, the agent 9.0.0 speaks {}: upgrade kubectl-podscope\n",
            env!("CARGO_PKG_VERSION"),
            podscope_core::session::PROTOCOL_VERSION,
            podscope_core::session::PROTOCOL_VERSION + 1
        )
    );
}

#[tokio::test]
async fn an_agent_that_is_not_listening_exits_10() {
    let cluster = Cluster::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    cluster.server.apply_pod(agent_pod("node-a", port));
    let output = cluster.run(&["status"]).await;
    assert_eq!(output.status.code(), Some(10), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "error: cannot reach the podscope agent pod observability/podscope-node-a (port-forward to port {port}): error forwarding port {port} to pod podscope-node-a"
        )),
        "{stderr}"
    );
}

/// A stand-in agent that reads the plugin's hello, hands it to the test and answers with
/// `refusal(hello)` (a `Welcome::Refused`): what the plugin resolved a target to, observed where
/// an agent reads it, and how it reports each refusal. The end-to-end tests use the real agent;
/// this one stands for agents in states the test cannot put the real one in (another protocol
/// version, all sessions taken).
async fn refusing_agent(
    refusal: impl Fn(&Value) -> Value + Send + 'static,
) -> (u16, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (reader, mut writer) = stream.into_split();
            let mut line = String::new();
            let _ = tokio::io::BufReader::new(reader).read_line(&mut line).await;
            let hello: Value = serde_json::from_str(&line).expect("the plugin's hello is JSON");
            let answer = json!({ "refused": refusal(&hello) });
            let _ = sender.send(hello);
            let _ = writer.write_all(format!("{answer}\n").as_bytes()).await;
        }
    });
    (port, receiver)
}

/// An agent refusing as busy (all its sessions taken).
async fn recording_busy_agent() -> (u16, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    refusing_agent(|_| {
        json!({"code": "busy", "message": "8 sessions already run on this agent (max_sessions)",
               "protocol": podscope_core::session::PROTOCOL_VERSION, "agent_version": "0.1.0"})
    })
    .await
}

fn owned(mut object: Value, kind: &str, name: &str, uid: &str) -> Value {
    object["metadata"]["ownerReferences"] = json!([{
        "apiVersion": if kind == "Job" { "batch/v1" } else { "apps/v1" },
        "kind": kind, "name": name, "uid": uid, "controller": true
    }]);
    object
}

#[tokio::test]
async fn workloads_resolve_through_their_owners_to_running_pods() {
    let cluster = Cluster::start().await;
    let (port, mut hellos) = recording_busy_agent().await;
    let address = format!("127.0.0.1:{port}");
    let selector = json!({"matchLabels": {"app": "web"}});
    cluster.server.apply_workload(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop", "uid": "d-web"},
        "spec": {"selector": selector, "template": {}}
    }));
    cluster.server.apply_workload(owned(json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": "web-5d9c", "namespace": "shop", "uid": "rs-web", "labels": {"app": "web"}},
        "spec": {"selector": selector}
    }), "Deployment", "web", "d-web"));
    let web_pod = |name: &str, node: &str, id: &str| {
        owned(
            serde_json::to_value(pod("shop", name, node, &[("app", "web")], &[("app", id)]))
                .unwrap(),
            "ReplicaSet",
            "web-5d9c",
            "rs-web",
        )
    };
    cluster.server.apply_pod(
        serde_json::from_value(web_pod("web-5d9c-a", "node-a", "containerd://aa")).unwrap(),
    );
    cluster.server.apply_pod(
        serde_json::from_value(web_pod("web-5d9c-b", "node-b", "containerd://bb")).unwrap(),
    );
    // Same labels, another owner: not the deployment's.
    cluster.server.apply_pod(pod(
        "shop",
        "web-debug",
        "node-a",
        &[("app", "web")],
        &[("app", "containerd://cc")],
    ));
    let output = cluster
        .run(&[
            "--agent-address",
            &address,
            "trace",
            "-n",
            "shop",
            "deploy/web",
            "exec",
        ])
        .await;
    assert_eq!(output.status.code(), Some(9), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stderr),
        "error: agent on node node-a,node-b: 8 sessions already run on this agent (max_sessions)\n"
    );
    let hello = hellos.recv().await.expect("a hello");
    assert_eq!(hello["protocol"], podscope_core::session::PROTOCOL_VERSION);
    assert_eq!(hello["request"]["kind"], "trace");
    assert_eq!(hello["request"]["probe"], "exec");
    let targets: Vec<(String, String)> = hello["request"]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["pod"].as_str().unwrap().to_string(),
                t["containers"][0]["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        targets,
        [
            ("web-5d9c-a".to_string(), "containerd://aa".to_string()),
            ("web-5d9c-b".to_string(), "containerd://bb".to_string())
        ]
    );

    // A StatefulSet's, a DaemonSet's and a Job's pods are those they own.
    for (kind, short, group) in [
        ("StatefulSet", "sts", "apps/v1"),
        ("DaemonSet", "ds", "apps/v1"),
        ("Job", "job", "batch/v1"),
    ] {
        let uid = format!("uid-{short}");
        cluster.server.apply_workload(json!({
            "apiVersion": group, "kind": kind,
            "metadata": {"name": "w", "namespace": "shop", "uid": uid},
            "spec": {"selector": {"matchLabels": {"w": short}}, "template": {}}
        }));
        let owned_pod = owned(
            serde_json::to_value(pod(
                "shop",
                &format!("{short}-0"),
                "node-c",
                &[("w", short)],
                &[("main", &format!("containerd://{short}"))],
            ))
            .unwrap(),
            kind,
            "w",
            &uid,
        );
        cluster
            .server
            .apply_pod(serde_json::from_value(owned_pod).unwrap());
        let target = format!("{short}/w");
        let output = cluster
            .run(&[
                "--agent-address",
                &address,
                "trace",
                "-n",
                "shop",
                &target,
                "open",
            ])
            .await;
        assert_eq!(
            output.status.code(),
            Some(9),
            "{target}: {}",
            text(&output.stderr)
        );
        let hello = hellos.recv().await.expect("a hello");
        let pods: Vec<&str> = hello["request"]["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["pod"].as_str().unwrap())
            .collect();
        assert_eq!(pods, [format!("{short}-0")], "{target}");
    }
}

#[tokio::test]
async fn a_container_is_selected_with_c() {
    let cluster = Cluster::start().await;
    let (port, mut hellos) = recording_busy_agent().await;
    let address = format!("127.0.0.1:{port}");
    cluster.server.apply_pod(pod(
        "shop",
        "web-0",
        "node-a",
        &[("app", "web")],
        &[("app", "containerd://a1"), ("sidecar", "containerd://s1")],
    ));
    let output = cluster
        .run(&[
            "--agent-address",
            &address,
            "trace",
            "-n",
            "shop",
            "pod/web-0",
            "-c",
            "sidecar",
            "exec",
        ])
        .await;
    assert_eq!(output.status.code(), Some(9));
    let hello = hellos.recv().await.expect("a hello");
    assert_eq!(
        hello["request"]["targets"][0]["containers"],
        json!([{"name": "sidecar", "id": "containerd://s1"}])
    );
    let output = cluster
        .run(&[
            "--agent-address",
            &address,
            "trace",
            "-n",
            "shop",
            "pod/web-0",
            "-c",
            "db",
            "exec",
        ])
        .await;
    assert_eq!(output.status.code(), Some(3));
    assert_eq!(
        text(&output.stderr),
        "error: container \"db\" not found in pod shop/web-0 (its containers: app, sidecar)\n"
    );
}
