//! `kubectl podscope` end to end (root, real eBPF): the real plugin binary → the fake API server
//! (target resolution, `pods/portforward`) → a real podscope agent on this machine (its `session`
//! extension) → the kernel. Pods in the fake API carry the container ids of kubelet-style cgroups
//! (`PodCgroup`) in which the tests run their workloads.
//!
//! Each workload ends with a marker (an exec of `/bin/false`): events of one cgroup reach the
//! plugin in the order they happened, so once the marker is printed every event before it has
//! been, and the test stops the plugin there — no sleep decides when a trace is complete.
//!
//! Built and run as a test of podscope-kubectl (it needs CARGO_BIN_EXE_kubectl-podscope); the
//! agent is the `podscope` binary beside it (`cargo build --bin podscope`, which `cargo test
//! --workspace` does), or $PODSCOPE_BINARY.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use podscope_integration::agent::{free_port, AgentProcess};
use podscope_integration::fake_kube::pods::{self, running_pod as pod};
use podscope_integration::fake_kube::FakeApiServer;
use podscope_integration::lines::lines_of;
use podscope_integration::status_server;
use podscope_testkit::pod_cgroup::PodCgroup;
use serde_json::{json, Value};

const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-podscope");
/// A bound on a broken test, not a measurement.
const PATIENCE: Duration = Duration::from_secs(30);

fn agent_binary() -> PathBuf {
    podscope_integration::agent::agent_binary_beside(PLUGIN)
}

/// The fake API server, a real agent whose session endpoint the agent pods of `nodes` forward
/// to (every node's agent pod is this one agent), and a kubeconfig.
struct Live {
    server: FakeApiServer,
    _agent: AgentProcess,
    dir: tempfile::TempDir,
    /// The agent's session endpoint on 127.0.0.1 (for `--agent-address`).
    session_port: u16,
}

/// What the agent runs beside its session extension.
#[derive(Default)]
struct AgentExtras {
    bpftrace: bool,
    /// An ebpf receiver with the http probe, reporting to the session extension.
    http_probe: bool,
    /// A `k8s_metadata` extension watching the fake API server for node-a, named by the
    /// session extension.
    pod_names: bool,
}

impl Live {
    async fn start(nodes: &[&str], bpftrace: bool) -> Live {
        Live::start_with(
            nodes,
            AgentExtras {
                bpftrace,
                ..Default::default()
            },
        )
        .await
    }

    async fn start_with(nodes: &[&str], extras: AgentExtras) -> Live {
        let session_port = free_port();
        let telemetry_port = free_port();
        let grpc_port = free_port();
        let bpftrace = extras.bpftrace;
        let (k8s_extension, session_names, extensions) = if extras.pod_names {
            (
                "  k8s_metadata:\n    auth_type: kubeConfig\n    filter:\n      node: node-a\n",
                "    k8s_metadata: k8s_metadata\n",
                "[k8s_metadata, session]",
            )
        } else {
            ("", "", "[session]")
        };
        let (ebpf_receiver, metrics_receivers) = if extras.http_probe {
            (
                "  ebpf:\n    session: session\n    collection_interval: 1h\n    probes:\n      http: {}\n",
                "[otlp, ebpf]",
            )
        } else {
            ("", "[otlp]")
        };
        let config = format!(
            r#"
extensions:
{k8s_extension}  session:
    endpoint: 127.0.0.1:{session_port}
    max_sessions: 8
    node_name: node-a
    bpftrace: {{ enabled: {bpftrace}, path: bpftrace }}
{session_names}receivers:
{ebpf_receiver}  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{grpc_port}
exporters:
  debug: {{}}
service:
  extensions: {extensions}
  telemetry:
    metrics:
      address: 127.0.0.1:{telemetry_port}
  pipelines:
    metrics:
      receivers: {metrics_receivers}
      exporters: [debug]
"#
        );
        let server = FakeApiServer::start().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig);
        let agent = AgentProcess::start_with_env(
            agent_binary().to_str().expect("UTF-8 path"),
            &config,
            telemetry_port,
            &[("KUBECONFIG", kubeconfig.to_str().expect("UTF-8 path"))],
        )
        .await;
        podscope_testkit::pod_cgroup::wait_listening(session_port);
        for node in nodes {
            server.apply_pod(agent_pod(node, session_port));
        }
        Live {
            server,
            _agent: agent,
            dir,
            session_port,
        }
    }

    fn plugin(&self, args: &[&str]) -> Command {
        let kubeconfig = self.dir.path().join("kubeconfig");
        podscope_integration::kubectl_plugin::command(PLUGIN, self.dir.path(), &kubeconfig, args)
    }

    async fn run(&self, args: &[&str]) -> std::process::Output {
        podscope_integration::kubectl_plugin::output(self.plugin(args), PATIENCE).await
    }

    /// A pod in the fake API for `cgroup`'s container (one container, `app`).
    fn apply_workload_pod(&self, name: &str, node: &str, app: &str, cgroup: &PodCgroup) {
        self.server.apply_pod(pod(
            "shop",
            name,
            node,
            &[("app", app)],
            &[("app", &format!("containerd://{}", cgroup.container_id()))],
        ));
    }
}

/// The agent pod of `node` in the agents' namespace, its session port `port` reached on 127.0.0.1.
fn agent_pod(node: &str, port: u16) -> Pod {
    pods::agent_pod("observability", node, port)
}

/// A running plugin: its stdout and stderr lines as they are printed.
struct Streaming {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Streaming {
    fn start(mut command: Command) -> Streaming {
        let mut child = command.spawn().expect("start the plugin");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        Streaming {
            child,
            stdout: lines_of(stdout),
            stderr: lines_of(stderr),
        }
    }

    /// Waits for the plugin's "tracing …" line: every agent accepted and is tracing.
    fn wait_tracing(&self) -> String {
        loop {
            let line = self
                .stderr
                .recv_timeout(PATIENCE)
                .expect("the plugin said it is tracing");
            if line.starts_with("tracing ") {
                return line;
            }
            assert!(!line.starts_with("error"), "the plugin failed: {line}");
        }
    }

    /// Stdout lines until `last` holds for one (included).
    fn lines_until(&self, last: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .stdout
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the expected line never came; got {lines:#?}"));
            let done = last(&line);
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    /// `-o json` events until `last` holds for one (included).
    fn events_until(&self, last: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + PATIENCE;
        let mut events = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .stdout
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the marker event never came; got {events:#?}"));
            let event: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
            let done = last(&event);
            events.push(event);
            if done {
                return events;
            }
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_marker(pod: &str) -> impl Fn(&Value) -> bool + '_ {
    move |event: &Value| event["pod"] == pod && event["fields"]["filename"] == "/bin/false"
}

fn execs_of(events: &[Value], pod: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["pod"] == pod)
        .map(|e| e["fields"]["filename"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_pod_exec_prints_exactly_the_execs_of_that_pod() {
    let live = Live::start(&["node-a"], false).await;
    let mut traced = PodCgroup::new();
    let mut other = PodCgroup::new();
    live.apply_workload_pod("web-0", "node-a", "web", &traced);
    live.apply_workload_pod("db-0", "node-a", "db", &other);
    let plugin =
        Streaming::start(live.plugin(&["trace", "-n", "shop", "pod/web-0", "exec", "-o", "json"]));
    plugin.wait_tracing();
    // The other pod runs the same programs, before and while the traced one does.
    other.spawn_shell("/bin/true; /bin/echo other >/dev/null; /bin/false");
    traced.spawn_shell("/bin/true; /bin/echo traced >/dev/null; /bin/false");
    let events = plugin.events_until(is_marker("web-0"));
    let pods: Vec<&str> = events
        .iter()
        .map(|e| e["pod"].as_str().unwrap_or(""))
        .collect();
    assert!(
        pods.iter().all(|p| *p == "web-0"),
        "events of another pod: {events:#?}"
    );
    let execs = execs_of(&events, "web-0");
    // The shell itself (found on PATH), then what it ran.
    assert_eq!(execs.len(), 4, "{events:#?}");
    assert!(execs[0].ends_with("/sh"), "{execs:?}");
    assert_eq!(execs[1..], ["/bin/true", "/bin/echo", "/bin/false"]);
    for event in &events {
        assert_eq!(event["namespace"], "shop");
        assert_eq!(event["container"], "app");
        assert_eq!(event["node"], "node-a");
        assert_eq!(event["probe"], "exec");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_by_selector_merges_pods_on_two_nodes_in_time_order() {
    let live = Live::start(&["node-a", "node-b"], false).await;
    let mut first = PodCgroup::new();
    let mut second = PodCgroup::new();
    live.apply_workload_pod("web-a", "node-a", "web", &first);
    live.apply_workload_pod("web-b", "node-b", "web", &second);
    let plugin = Streaming::start(
        live.plugin(&["trace", "-n", "shop", "-l", "app=web", "exec", "-o", "json"]),
    );
    let said = plugin.wait_tracing();
    assert_eq!(
        said,
        "tracing exec in 2 pod(s) on 2 node(s); Ctrl-C to stop"
    );
    first.spawn_shell("/bin/true; /bin/false");
    let mut events = plugin.events_until(is_marker("web-a"));
    second.spawn_shell("/bin/echo b >/dev/null; /bin/false");
    events.extend(plugin.events_until(is_marker("web-b")));
    assert_eq!(execs_of(&events, "web-a")[1..], ["/bin/true", "/bin/false"]);
    assert_eq!(execs_of(&events, "web-b")[1..], ["/bin/echo", "/bin/false"]);
    let times: Vec<u64> = events
        .iter()
        .map(|e| e["time_unix_nano"].as_u64().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "not in time order: {times:?}"
    );
    // Both pods' sessions went through the port-forward of their node's agent pod.
    let forwarded: Vec<String> = live
        .server
        .access_log()
        .into_iter()
        .filter(|r| r.resource == "pods/portforward")
        .map(|r| format!("{} {}", r.name.unwrap_or_default(), r.status))
        .collect();
    assert_eq!(forwarded.len(), 2, "{forwarded:?}");
    assert!(
        forwarded.contains(&"podscope-node-a 101".to_string()),
        "{forwarded:?}"
    );
    assert!(
        forwarded.contains(&"podscope-node-b 101".to_string()),
        "{forwarded:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bpftrace_prints_a_count_that_matches_the_workload() {
    let live = Live::start(&["node-a"], true).await;
    let mut cgroup = PodCgroup::new();
    // A process for $container_pid; the workload runs in the same cgroup.
    cgroup.spawn_shell("exec sleep 600");
    live.apply_workload_pod("web-0", "node-a", "web", &cgroup);
    let program = concat!(
        "BEGIN { printf(\"ready\\n\"); }\n",
        "tracepoint:sched:sched_process_exec /cgroup == $container_cgroup_id && str(args->filename) == \"/bin/true\"/ { @execs = count(); }\n",
        "tracepoint:sched:sched_process_exec /cgroup == $container_cgroup_id && str(args->filename) == \"/bin/false\"/ { exit(); }\n",
    );
    let plugin =
        Streaming::start(live.plugin(&["bpftrace", "-n", "shop", "pod/web-0", "-e", program]));
    // BEGIN runs once every probe is attached.
    plugin.lines_until(|line| line == "ready");
    cgroup.spawn_shell("for i in 1 2 3 4 5 6 7; do /bin/true; done; /bin/false");
    let lines = plugin.lines_until(|line| line.starts_with("@execs:"));
    assert_eq!(
        lines.last().map(String::as_str),
        Some("@execs: 7"),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_json_has_the_pods() {
    let live = Live::start(&["node-a"], false).await;
    let mut web = PodCgroup::new();
    let mut db = PodCgroup::new();
    live.apply_workload_pod("web-0", "node-a", "web", &web);
    live.apply_workload_pod("db-0", "node-a", "db", &db);
    web.spawn_shell("sleep 60");
    db.spawn_shell("sleep 60");
    let output = live
        .run(&[
            "top",
            "pods",
            "-l",
            "app in (web,db)",
            "-n",
            "shop",
            "--once",
            "--interval",
            "1s",
            "-o",
            "json",
        ])
        .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let value: Value = serde_json::from_slice(&output.stdout).expect("one JSON document");
    assert_eq!(value["scope"], "pods");
    assert_eq!(value["nodes"], json!(["node-a"]));
    let mut pods: Vec<(String, String)> = value["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["namespace"].as_str().unwrap().to_string(),
                r["pod"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    pods.sort();
    assert_eq!(
        pods,
        [
            ("shop".to_string(), "db-0".to_string()),
            ("shop".to_string(), "web-0".to_string())
        ]
    );
    for row in value["rows"].as_array().unwrap() {
        assert_eq!(row["node"], "node-a");
        assert!(row["cpu_cores"].as_f64().is_some(), "{row}");
    }
}

/// Runs tmux on its own socket (no other tmux is touched); the server is killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn command(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux (scripts/install-deps.sh installs it)")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.command(&["capture-pane", "-p", "-t", "top"]).stdout)
            .into_owned()
    }

    /// The screen once `wanted` holds for it.
    fn wait_screen(&self, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let screen = self.screen();
            if wanted(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed it:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.command(&["kill-server"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_top_screen_refreshes_sorts_on_keys_and_quits() {
    let live = Live::start(&["node-a"], false).await;
    let mut busy = PodCgroup::new();
    let mut idle = PodCgroup::new();
    live.apply_workload_pod("busy-0", "node-a", "web", &busy);
    live.apply_workload_pod("idle-0", "node-a", "web", &idle);
    busy.spawn_shell("while :; do :; done");
    idle.spawn_shell("sleep 60");
    let tmux = Tmux {
        socket: format!("podscope-top-{}", std::process::id()),
    };
    let command = format!(
        "{PLUGIN} --kubeconfig {} top pods -n shop -l app=web --interval 1s",
        live.dir.path().join("kubeconfig").display()
    );
    let started = tmux.command(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "30",
        &command,
    ]);
    assert!(
        started.status.success(),
        "tmux: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    let screen = tokio::task::spawn_blocking(move || {
        let by_cpu = tmux.wait_screen(|s| {
            s.contains("sorted by CPU") && s.contains("busy-0") && s.contains("idle-0")
        });
        // Sorted by CPU: the spinning pod first.
        let busy_line = by_cpu.lines().position(|l| l.contains("busy-0")).unwrap();
        let idle_line = by_cpu.lines().position(|l| l.contains("idle-0")).unwrap();
        assert!(busy_line < idle_line, "{by_cpu}");
        tmux.command(&["send-keys", "-t", "top", "n"]);
        let by_name = tmux.wait_screen(|s| s.contains("sorted by NAME"));
        tmux.command(&["send-keys", "-t", "top", "q"]);
        // The plugin quits, so the session (its only window) closes.
        let deadline = Instant::now() + PATIENCE;
        while tmux.command(&["has-session", "-t", "top"]).status.success() {
            assert!(Instant::now() < deadline, "q did not quit the top view");
            std::thread::sleep(Duration::from_millis(100));
        }
        (by_cpu, by_name)
    })
    .await
    .expect("join");
    let (by_cpu, by_name) = screen;
    assert!(
        by_cpu.starts_with("podscope top pods — 1 node(s) — sorted by CPU"),
        "{by_cpu}"
    );
    assert!(by_cpu.contains("NODE    NAMESPACE  POD"), "{by_cpu}");
    assert!(
        by_name.contains("busy-0") && by_name.contains("idle-0"),
        "{by_name}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_the_agent_with_its_version_and_probes() {
    let live = Live::start(&["node-a"], false).await;
    let output = live.run(&["status", "-o", "json"]).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(status["node"], "node-a");
    assert_eq!(status["agent"], "observability/podscope-node-a");
    assert_eq!(status["agent_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["bpftrace_enabled"], false);
    let output = live.run(&["status"]).await;
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0],
        "NODE    AGENT                          VERSION  PROTOCOL  READY  PROBES  BPFTRACE",
        "{table}"
    );
    assert_eq!(
        lines[1],
        format!(
            "node-a  observability/podscope-node-a  {}    1         yes    9/10    disabled",
            env!("CARGO_PKG_VERSION")
        ),
        "{table}"
    );
    // What cannot be used is said, with why.
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[2].starts_with("node-a: probe trace/http: skipped: "),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bpftrace_disabled_in_the_agent_exits_8() {
    let live = Live::start(&["node-a"], false).await;
    let output = live
        .run(&["bpftrace", "node/node-a", "-e", "BEGIN { exit(); }"])
        .await;
    assert_eq!(
        output.status.code(),
        Some(8),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        stderr.starts_with("error: agent on node node-a: "),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_writes_a_flame_graph_folded_stacks_and_pprof() {
    let live = Live::start(&["node-a"], false).await;
    let mut busy = PodCgroup::new();
    live.apply_workload_pod("busy-0", "node-a", "web", &busy);
    busy.spawn_shell("while :; do :; done");
    let out = tempfile::tempdir().expect("output dir");
    let path = |name: &str| out.path().join(name).to_str().expect("UTF-8").to_string();
    for name in ["profile.folded", "flame.svg", "profile.pb.gz"] {
        let file = path(name);
        let output = live
            .run(&[
                "profile",
                "-n",
                "shop",
                "pod/busy-0",
                "--duration",
                "2s",
                "-o",
                &file,
            ])
            .await;
        assert!(
            output.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let bytes = std::fs::read(&file).expect("the profile was written");
        match name {
            "profile.folded" => {
                // `frame;frame count` lines; the busy shell's samples are there.
                let text = String::from_utf8(bytes).expect("text");
                let samples: u64 = text
                    .lines()
                    .map(|line| {
                        let (stack, count) = line.rsplit_once(' ').expect("`stack count`");
                        assert!(!stack.is_empty(), "{line}");
                        count.parse::<u64>().expect("a count")
                    })
                    .sum();
                assert!(samples > 0, "{text}");
            }
            "flame.svg" => {
                let text = String::from_utf8(bytes).expect("text");
                assert!(text.starts_with("<?xml"), "{}", &text[..text.len().min(80)]);
                assert!(
                    text.contains("kubectl podscope profile"),
                    "the flame graph's title"
                );
            }
            _ => assert_eq!(bytes[..2], [0x1f, 0x8b], "gzip-compressed pprof"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_the_agent_cannot_run_exits_7_with_its_reason() {
    let live = Live::start(&["node-a"], false).await;
    let pod_cgroup = PodCgroup::new();
    live.apply_workload_pod("web-0", "node-a", "web", &pod_cgroup);
    let output = live
        .run(&["trace", "-n", "shop", "pod/web-0", "http"])
        .await;
    assert_eq!(
        output.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        stderr.starts_with(
            "error: agent on node node-a: probe http is not available on node node-a: no ebpf receiver with the http probe reports to this session extension; enable the ebpf receiver's `http` probe"
        ),
        "{stderr}"
    );
}

/// Runs `sh -c script` in `pod` and waits for it (at most 60 s); its exit status.
fn run_in(pod: &mut PodCgroup, script: &str) -> i32 {
    let marker = std::env::temp_dir().join(format!(
        "podscope-kubectl-{}",
        podscope_testkit::pod_cgroup::unique_ids().1
    ));
    pod.spawn_shell(&format!("{script}; echo $? > {}", marker.display()));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(status) = std::fs::read_to_string(&marker) {
            if status.ends_with('\n') {
                let _ = std::fs::remove_file(&marker);
                return status.trim().parse().expect("an exit status");
            }
        }
        assert!(Instant::now() < deadline, "{script} did not finish in 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_pod_http_prints_that_pods_exchanges_and_filters_on_status() {
    let live = Live::start_with(
        &["node-a"],
        AgentExtras {
            http_probe: true,
            ..Default::default()
        },
    )
    .await;
    let mut web = PodCgroup::new();
    let mut db = PodCgroup::new();
    let mut client = PodCgroup::new();
    live.apply_workload_pod("web-0", "node-a", "web", &web);
    live.apply_workload_pod("db-0", "node-a", "db", &db);
    let web_port = status_server::start_in(&mut web);
    let db_port = status_server::start_in(&mut db);
    let all =
        Streaming::start(live.plugin(&["trace", "-n", "shop", "pod/web-0", "http", "-o", "json"]));
    all.wait_tracing();
    let errors = Streaming::start(live.plugin(&[
        "trace",
        "-n",
        "shop",
        "pod/web-0",
        "http",
        "-o",
        "json",
        "--filter",
        "status>=400",
    ]));
    errors.wait_tracing();
    let get = |port: u16, path: &str| format!("curl -s -o /dev/null http://127.0.0.1:{port}{path}");
    let script = [
        get(web_port, "/ok"),
        get(web_port, "/ok"),
        get(web_port, "/status/404"),
        get(db_port, "/status/500"),
        get(web_port, "/status/503/end"),
    ];
    assert_eq!(run_in(&mut client, &script.join(" && ")), 0);
    let is_end = |e: &Value| e["fields"]["path"] == "/status/503/end";
    let summary = |events: Vec<Value>| -> Vec<String> {
        events
            .iter()
            .map(|e| {
                format!(
                    "{} {}/{}/{} {} {} {} {}",
                    e["node"].as_str().unwrap_or(""),
                    e["namespace"].as_str().unwrap_or(""),
                    e["pod"].as_str().unwrap_or(""),
                    e["container"].as_str().unwrap_or(""),
                    e["fields"]["role"].as_str().unwrap_or(""),
                    e["fields"]["method"].as_str().unwrap_or(""),
                    e["fields"]["path"].as_str().unwrap_or(""),
                    e["fields"]["status"].as_str().unwrap_or(""),
                )
            })
            .collect()
    };
    assert_eq!(
        summary(all.events_until(is_end)),
        [
            "node-a shop/web-0/app server GET /ok 200",
            "node-a shop/web-0/app server GET /ok 200",
            "node-a shop/web-0/app server GET /status/404 404",
            "node-a shop/web-0/app server GET /status/503/end 503",
        ]
    );
    assert_eq!(
        summary(errors.events_until(is_end)),
        [
            "node-a shop/web-0/app server GET /status/404 404",
            "node-a shop/web-0/app server GET /status/503/end 503",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_node_top_names_pods_from_the_agents_k8s_metadata() {
    let live = Live::start_with(
        &["node-a"],
        AgentExtras {
            pod_names: true,
            ..Default::default()
        },
    )
    .await;
    let (uid, container) = podscope_testkit::pod_cgroup::unique_ids();
    let mut web = PodCgroup::with_ids(&uid, &container);
    web.spawn_shell("while :; do sleep 0.05; done");
    let mut pod = pod(
        "shop",
        "web-0",
        "node-a",
        &[("app", "web")],
        &[("app", &format!("containerd://{container}"))],
    );
    pod.metadata.uid = Some(uid.clone());
    live.server.apply_pod(pod);
    let address = format!("127.0.0.1:{}", live.session_port);
    // Without a target, through --agent-address: the agent labels every container of its node
    // itself. Its pod cache learns of web-0 through its watch: asked again until it has.
    let deadline = Instant::now() + PATIENCE;
    let row = loop {
        let output = live
            .run(&[
                "top",
                "containers",
                "--once",
                "--interval",
                "200ms",
                "-o",
                "json",
                "--agent-address",
                &address,
            ])
            .await;
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let table: Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
        let named = table["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .find(|row| row["pod"] == "web-0")
            .cloned();
        if let Some(row) = named {
            break row;
        }
        assert!(Instant::now() < deadline, "no row named web-0 in {table:#}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        (&row["namespace"], &row["pod"], &row["container"]),
        (&json!("shop"), &json!("web-0"), &json!("app"))
    );
    // A pod the cache does not know keeps its UID and short container id.
    let (stranger_uid, stranger_container) = podscope_testkit::pod_cgroup::unique_ids();
    let _stranger = PodCgroup::with_ids(&stranger_uid, &stranger_container);
    let output = live
        .run(&[
            "top",
            "containers",
            "--once",
            "--interval",
            "200ms",
            "-o",
            "json",
            "--agent-address",
            &address,
        ])
        .await;
    let table: Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    let stranger = table["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|row| row["pod"] == stranger_uid.as_str())
        .unwrap_or_else(|| panic!("no row for the unknown pod in {table:#}"));
    assert_eq!(stranger["namespace"], "");
    assert_eq!(stranger["container"], stranger_container[..12]);
}
