//! A `TraceSession`'s events read back with `kubectl podscope attach` and `logs` (root): the
//! real plugin → the fake API server (the session's status, `pods/portforward`) → a real agent
//! running the session through the kernel trace object (its session extension watching the
//! fake API server). The workload's execs run in a kubelet-style cgroup (`PodCgroup`) that the
//! session's pod names.
//!
//! What a user relies on: the agent gives the session an attach token in its status; the
//! plugin's `attach` prints each exec as it happens; killed, then started again as `logs`, it
//! prints every exec the session recorded meanwhile too, exactly; after the session Completed
//! `logs` still works; once its `ttlAfterFinished` passed the session and its events are gone.
//! A reader with another token is refused; a reader right after two agents raced to write the
//! token is not (the plugin retries). A profile session's stacks come back as a folded file
//! (`logs --folded`).
//!
//! Built and run as a test of podscope-kubectl (it needs CARGO_BIN_EXE_kubectl-podscope); the
//! agent is the `podscope` binary beside it, or $PODSCOPE_BINARY.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use podscope_core::session::{
    read_line, write_line, ErrorCode, Hello, Request, Welcome, PROTOCOL_VERSION,
};
use podscope_integration::agent::{free_port, AgentProcess};
use podscope_integration::fake_kube::pods;
use podscope_integration::fake_kube::FakeApiServer;
use podscope_integration::lines::lines_of;
use podscope_testkit::pod_cgroup::{unique_ids, PodCgroup};
use serde_json::{json, Value};

const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-podscope");
const NODE: &str = "node-logs";
/// A bound on a broken test, not a measurement.
const PATIENCE: Duration = Duration::from_secs(60);

fn agent_binary() -> PathBuf {
    podscope_integration::agent::agent_binary_beside(PLUGIN)
}

/// Waits (at most [`PATIENCE`]) for `condition` to hold, returning its value.
async fn until<T>(what: &str, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `program args…` `n` times from inside `pod`, one exec each, each exiting 0.
fn execs(pod: &PodCgroup, program: &str, args: &[&str], n: usize) {
    assert!(
        pod.exec_times(program, args, n),
        "an exec of {program} failed"
    );
}

/// The plugin with the test's kubeconfig.
fn plugin(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(PLUGIN);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .arg("--kubeconfig")
        .arg(dir.join("kubeconfig"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

async fn run_plugin(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut command = plugin(dir, args);
    tokio::time::timeout(
        PATIENCE,
        tokio::task::spawn_blocking(move || command.output()),
    )
    .await
    .expect("the plugin finished in time")
    .expect("join")
    .expect("run the plugin")
}

/// The `filename` of each JSON event line.
fn filenames(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|line| {
            let event: Value = serde_json::from_str(line).expect("a JSON event");
            assert_eq!(
                (&event["node"], &event["namespace"], &event["pod"]),
                (&json!(NODE), &json!("team-a"), &json!("web-0")),
                "{line}"
            );
            event["fields"]["filename"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

/// A pod `name` of team-a (label app=web) on `node`, its container in a cgroup of its own.
fn workload_pod(api: &FakeApiServer, name: &str, node: &str) -> PodCgroup {
    let (pod_uid, container_id) = unique_ids();
    let cgroup = PodCgroup::with_ids(&pod_uid, &container_id);
    let mut pod = serde_json::to_value(pods::running_pod(
        "team-a",
        name,
        node,
        &[("app", "web")],
        &[("app", &format!("containerd://{container_id}"))],
    ))
    .unwrap();
    pod["metadata"]["uid"] = json!(pod_uid);
    api.apply_pod(serde_json::from_value(pod).unwrap());
    cgroup
}

/// A real agent for `node` running its TraceSessions from `api`, and its agent pod in the
/// fake API (the plugin port-forwards to it); returns it with its session port.
async fn start_agent(api: &FakeApiServer, dir: &Path, node: &str) -> (AgentProcess, u16) {
    let session_port = free_port();
    let telemetry_port = free_port();
    let grpc_port = free_port();
    let config = format!(
        r#"
extensions:
  k8s_metadata:
    auth_type: kubeConfig
    filter: {{ node: {node} }}
  session:
    endpoint: 127.0.0.1:{session_port}
    node_name: {node}
    trace_sessions: {{ extension: k8s_metadata, log_per_session_mib: 1, log_total_mib: 4 }}
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{grpc_port}
exporters:
  nop: {{}}
service:
  extensions: [k8s_metadata, session]
  telemetry: {{ metrics: {{ address: "127.0.0.1:{telemetry_port}" }} }}
  pipelines:
    metrics: {{ receivers: [otlp], exporters: [nop] }}
"#
    );
    let kubeconfig = dir.join("kubeconfig");
    let agent = AgentProcess::start_with_env(
        agent_binary().to_str().unwrap(),
        &config,
        telemetry_port,
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .await;
    podscope_testkit::pod_cgroup::wait_listening(session_port);
    api.apply_pod(pods::agent_pod("observability", node, session_port));
    (agent, session_port)
}

/// What the agent answers a `session_log` request for team-a/execs with `token`.
async fn welcome_for(session_port: u16, token: &str) -> Welcome {
    welcome_of(session_port, "execs", token).await
}

/// What the agent answers a `session_log` request for team-a/`name` with `token`.
async fn welcome_of(session_port: u16, name: &str, token: &str) -> Welcome {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", session_port))
        .await
        .expect("connect to the session endpoint");
    let (read, mut write) = stream.into_split();
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        client_version: "test".into(),
        request: Request::SessionLog {
            namespace: "team-a".into(),
            name: name.into(),
            token: token.into(),
            from: Some(1),
            follow: false,
        },
    };
    write_line(&mut write, &hello).await.expect("send hello");
    let mut reader = tokio::io::BufReader::new(read);
    let mut buffer = Vec::new();
    read_line(&mut reader, &mut buffer)
        .await
        .expect("read the welcome")
        .expect("a welcome")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_execs_are_read_by_attach_then_logs_after_a_restart_until_its_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start().await;
    api.write_kubeconfig(&dir.path().join("kubeconfig"));
    let web = workload_pod(&api, "web-0", NODE);

    let (_agent, session_port) = start_agent(&api, dir.path(), NODE).await;

    api.apply_custom(json!({
        "apiVersion": "podscope.dev/v1alpha1",
        "kind": "TraceSession",
        "metadata": {"name": "execs", "namespace": "team-a"},
        "spec": {"targets": {"pods": ["web-0"]}, "probes": ["exec"], "duration": "25s", "ttlAfterFinished": "5s"},
    }));
    let status = until("the session runs here with an attach token", || {
        let status = api.custom("TraceSession", "team-a", "execs")?["status"].clone();
        let running = status["nodes"][0]["phase"] == "Running";
        (running && status["attachToken"].is_string()).then_some(status)
    })
    .await;
    let token = status["attachToken"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 32, "128 bits in hex: {token}");
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()), "{token}");

    // Another token is refused, naming where the right one is.
    let wrong = "0".repeat(32);
    // (This agent wrote the token, so its log knew it first.)
    let Welcome::Refused(error) = welcome_for(session_port, &wrong).await else {
        panic!("a wrong token was accepted");
    };
    assert_eq!(error.code, ErrorCode::Forbidden);
    assert_eq!(
        error.message,
        "the attach token given for TraceSession team-a/execs is not the session's: it is in the session's status.attachToken, readable by whoever may get the session"
    );

    // attach follows from now: the three execs that follow, as they happen.
    let mut attached = plugin(
        dir.path(),
        &["-n", "team-a", "attach", "execs", "-o", "json"],
    )
    .spawn()
    .expect("start the plugin");
    let (stdout, stderr) = (
        attached.stdout.take().unwrap(),
        attached.stderr.take().unwrap(),
    );
    let lines = lines_of(stdout);
    let mut stderr = BufReader::new(stderr);
    let mut said = String::new();
    stderr.read_line(&mut said).expect("the plugin's stderr");
    assert_eq!(
        said.trim_end(),
        "attached to TraceSession team-a/execs on 1 node(s); Ctrl-C to stop"
    );
    execs(&web, "/bin/true", &[], 3);
    let printed: Vec<String> = (0..3)
        .map(|_| lines.recv_timeout(PATIENCE).expect("an exec printed"))
        .collect();
    assert_eq!(filenames(&printed.join("\n")), ["/bin/true"; 3]);
    // The plugin dies (a laptop closed); the session goes on without it.
    attached.kill().unwrap();
    attached.wait().unwrap();
    execs(&web, "/bin/sleep", &["0"], 2);
    until("5 execs counted", || {
        let status = api.custom("TraceSession", "team-a", "execs")?["status"].clone();
        (status["nodes"][0]["events"]["exec"] == 5).then_some(())
    })
    .await;

    // Started again, `logs` prints everything recorded, the execs it missed too, exactly.
    let logs = run_plugin(dir.path(), &["-n", "team-a", "logs", "execs", "-o", "json"]).await;
    assert!(
        logs.status.success(),
        "{}",
        String::from_utf8_lossy(&logs.stderr)
    );
    assert_eq!(
        filenames(&String::from_utf8_lossy(&logs.stdout)),
        [
            "/bin/true",
            "/bin/true",
            "/bin/true",
            "/bin/sleep",
            "/bin/sleep"
        ]
    );

    // Completed at its duration: the events are still there, as a table with a NODE column.
    let completed = until("the session Completed", || {
        let status = api.custom("TraceSession", "team-a", "execs")?["status"].clone();
        (status["phase"] == "Completed").then_some(status)
    })
    .await;
    assert_eq!(completed["nodes"][0]["events"], json!({"exec": 5}));
    assert_eq!(completed["nodes"][0]["logDropped"], 0);
    assert_eq!(completed["attachToken"], json!(token), "never rewritten");
    let table = run_plugin(dir.path(), &["-n", "team-a", "logs", "execs"]).await;
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 6, "a header and 5 rows:\n{table}");
    assert!(rows[0].starts_with("NODE "), "{table}");
    assert!(rows[1..].iter().all(|row| row.starts_with(NODE)), "{table}");
    assert_eq!(
        rows.iter().filter(|row| row.contains("/bin/sleep")).count(),
        2,
        "{table}"
    );

    // Its TTL passed: the agent deleted it and freed its events.
    until("the session deleted after its ttlAfterFinished", || {
        api.custom("TraceSession", "team-a", "execs")
            .is_none()
            .then_some(())
    })
    .await;
    let gone = run_plugin(dir.path(), &["-n", "team-a", "logs", "execs"]).await;
    assert_eq!(gone.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&gone.stderr).trim_end(),
        "error: TraceSession \"execs\" in namespace \"team-a\" not found"
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        match welcome_for(session_port, &token).await {
            Welcome::Refused(error) if error.code == ErrorCode::TargetNotFound => break,
            other => assert!(
                Instant::now() < deadline,
                "the agent still serves the deleted session's events: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(web);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_racing_share_one_token_and_logs_merges_their_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start().await;
    api.write_kubeconfig(&dir.path().join("kubeconfig"));
    let (node_a, node_b) = ("node-race-a", "node-race-b");
    let web_a = workload_pod(&api, "web-a", node_a);
    let web_b = workload_pod(&api, "web-b", node_b);
    let (_agent_a, port_a) = start_agent(&api, dir.path(), node_a).await;
    let (_agent_b, port_b) = start_agent(&api, dir.path(), node_b).await;

    // Both agents see it at once and neither finds a token: they race to write one.
    api.apply_custom(json!({
        "apiVersion": "podscope.dev/v1alpha1",
        "kind": "TraceSession",
        "metadata": {"name": "both", "namespace": "team-a"},
        "spec": {"targets": {"podSelector": {"matchLabels": {"app": "web"}}}, "probes": ["exec"], "duration": "20s"},
    }));
    let status = until("both nodes run it, with a token", || {
        let status = api.custom("TraceSession", "team-a", "both")?["status"].clone();
        let running = status["nodes"]
            .as_array()?
            .iter()
            .filter(|e| e["phase"] == "Running")
            .count();
        (running == 2 && status["attachToken"].is_string()).then_some(status)
    })
    .await;
    let token = status["attachToken"].as_str().unwrap().to_string();
    // The plugin at once, as a user would: the agent whose token write lost may not know the
    // winner's yet (its watch brings it about a second later) and answer forbidden; the plugin
    // reads the token again and retries rather than exit 5. Nothing was recorded yet.
    let early = run_plugin(dir.path(), &["-n", "team-a", "logs", "both", "-o", "json"]).await;
    assert!(
        early.status.success(),
        "{}",
        String::from_utf8_lossy(&early.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&early.stdout), "");
    // Each agent reads the session's log with that one token (the loser took the winner's).
    for port in [port_a, port_b] {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match welcome_of(port, "both", &token).await {
                Welcome::Accepted { .. } => break,
                Welcome::Refused(error) => assert!(
                    Instant::now() < deadline,
                    "the agent at port {port} refuses the session's token: {}",
                    error.message
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    execs(&web_a, "/bin/true", &[], 2);
    execs(&web_b, "/bin/sleep", &["0"], 3);
    until("5 execs counted on the two nodes", || {
        let status = api.custom("TraceSession", "team-a", "both")?["status"].clone();
        (status["summary"]["events"]["exec"] == 5).then_some(())
    })
    .await;
    let logs = run_plugin(dir.path(), &["-n", "team-a", "logs", "both", "-o", "json"]).await;
    assert!(
        logs.status.success(),
        "{}",
        String::from_utf8_lossy(&logs.stderr)
    );
    let events: Vec<Value> = String::from_utf8_lossy(&logs.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON event"))
        .collect();
    let by_node = |node: &str| -> Vec<&str> {
        events
            .iter()
            .filter(|e| e["node"] == node)
            .map(|e| e["fields"]["filename"].as_str().unwrap_or(""))
            .collect()
    };
    assert_eq!(by_node(node_a), ["/bin/true"; 2]);
    assert_eq!(by_node(node_b), ["/bin/sleep"; 3]);
    assert_eq!(events.len(), 5);
    let times: Vec<u64> = events
        .iter()
        .map(|e| e["time_unix_nano"].as_u64().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "merged by time: {times:?}"
    );
    drop((web_a, web_b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_watch_creates_the_session_and_prints_its_events_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start().await;
    api.write_kubeconfig(&dir.path().join("kubeconfig"));
    let node = "node-watch";
    let web = workload_pod(&api, "web-0", node);
    let (_agent, _) = start_agent(&api, dir.path(), node).await;

    let mut watching = plugin(
        dir.path(),
        &[
            "-n",
            "team-a",
            "run",
            "watched",
            "pod/web-0",
            "exec",
            "--duration",
            "12s",
            "--watch",
            "-o",
            "json",
        ],
    )
    .spawn()
    .expect("start the plugin");
    let (stdout, stderr) = (
        watching.stdout.take().unwrap(),
        watching.stderr.take().unwrap(),
    );
    let lines = lines_of(stdout);
    // What it says on stderr until it is attached: the object created, then (maybe) waiting
    // for an agent to run it.
    let mut stderr = BufReader::new(stderr);
    let mut said = Vec::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).expect("the plugin's stderr") > 0,
            "the plugin ended before attaching: {said:?}"
        );
        let attached = line.starts_with("attached to TraceSession team-a/watched");
        said.push(line.trim_end().to_string());
        if attached {
            break;
        }
    }
    assert_eq!(said[0], "tracesession.podscope.dev/watched created");
    let spec = api
        .custom("TraceSession", "team-a", "watched")
        .expect("created")["spec"]
        .clone();
    assert_eq!(
        spec,
        json!({"targets": {"pods": ["web-0"]}, "probes": ["exec"], "duration": "12s"})
    );

    execs(&web, "/bin/true", &[], 2);
    let printed: Vec<String> = (0..2)
        .map(|_| lines.recv_timeout(PATIENCE).expect("an exec printed"))
        .collect();
    let events: Vec<Value> = printed
        .iter()
        .map(|line| serde_json::from_str(line).expect("a JSON event"))
        .collect();
    assert!(events
        .iter()
        .all(|e| e["node"] == node && e["pod"] == "web-0"));
    assert!(events
        .iter()
        .all(|e| e["fields"]["filename"] == "/bin/true"));

    // The session ends at its duration, and so does the plugin, having printed nothing more.
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = watching.try_wait().expect("the plugin's state") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "run --watch did not end with the session"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.success(), "{status:?}");
    assert_eq!(lines.recv_timeout(Duration::from_secs(5)).ok(), None);
    drop(web);
}

/// A `profile` session's stacks, read back with `logs --folded` once it ended: folded lines
/// under the pod's name, the process's hot function as a leaf, their samples summing to the
/// status's count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_folded_prints_a_profile_sessions_stacks_as_a_folded_file() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start().await;
    api.write_kubeconfig(&dir.path().join("kubeconfig"));
    let node = "node-folded";
    let mut busy = workload_pod(&api, "busy-0", node);
    let burn = podscope_integration::test_programs::compile_burn(dir.path());
    busy.spawn_shell(&format!("exec {} 600", burn.display()));
    let (_agent, _) = start_agent(&api, dir.path(), node).await;
    let created = run_plugin(
        dir.path(),
        &[
            "-n",
            "team-a",
            "run",
            "cpu",
            "pod/busy-0",
            "profile",
            "--duration",
            "6s",
        ],
    )
    .await;
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let status = until("the profile session Completed", || {
        let status = api.custom("TraceSession", "team-a", "cpu")?["status"].clone();
        (status["phase"] == "Completed").then_some(status)
    })
    .await;
    let samples = status["summary"]["events"]["profile"].as_u64().unwrap();
    assert!(samples > 0, "{status}");

    let folded = run_plugin(dir.path(), &["-n", "team-a", "logs", "cpu", "--folded"]).await;
    assert!(
        folded.status.success(),
        "{}",
        String::from_utf8_lossy(&folded.stderr)
    );
    let text = String::from_utf8(folded.stdout).unwrap();
    let mut summed = 0;
    let mut leaves = Vec::new();
    for line in text.lines() {
        let (stack, count) = line.rsplit_once(' ').expect("`stack samples`");
        assert!(stack.starts_with("busy-0;"), "{line}");
        summed += count.parse::<u64>().expect("a count");
        leaves.push(stack.rsplit(';').next().unwrap().to_string());
    }
    assert_eq!(summed, samples, "{text}");
    assert!(leaves.iter().any(|leaf| leaf == "burn_leaf"), "{text}");
    drop(busy);
}
