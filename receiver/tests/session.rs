//! The `session` extension through a raw client over TCP (one `Hello` line written, lines read),
//! as `kubectl podscope` talks to it, with real eBPF (root): traces of workloads run in
//! kubelet-style pod cgroups with exact expectations, the kernel programs gone when the session
//! ends, bpftrace, top, status and each refusal.
//!
//! Each workload ends with a marker event of its own (an exec of `/bin/false`, an exit with
//! code 99, an open of a path that does not exist…): the kernel's ring buffer keeps events in the
//! order they happened, so once the marker is read every event before it has been, and the test
//! reads no further — no sleep decides when a trace is complete.

use std::ffi::CString;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use podscope_core::config::parse_component_config;
use podscope_core::session::{
    ContainerRef, ErrorCode, Event, Hello, Message, Request, Target, TopRow, TopScope, TraceProbe,
    Welcome, PROTOCOL_VERSION,
};
use podscope_core::{BuildContext, Component as _, ComponentId, ReceiverConsumers};
use podscope_receiver::ebpf::{EbpfReceiver, EbpfReceiverConfig};
use podscope_receiver::session::{SessionConfig, SessionExtension};
use podscope_testkit::pod_cgroup::PodCgroup;
use podscope_testkit::{BuildContextForTests as _, Recorder};

struct Agent {
    runtime: tokio::runtime::Runtime,
    extension: Arc<SessionExtension>,
    address: SocketAddr,
}

impl Agent {
    fn start(configure: impl FnOnce(&mut SessionConfig)) -> Agent {
        let mut config = SessionConfig {
            endpoint: "127.0.0.1:0".to_string(),
            node_name: Some("node-under-test".to_string()),
            ..Default::default()
        };
        configure(&mut config);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let ctx = BuildContext::for_tests("session");
        let extension = Arc::new(SessionExtension::new(config, &ctx));
        runtime.block_on(extension.start()).unwrap();
        let address = extension.local_addr().unwrap();
        Agent {
            runtime,
            extension,
            address,
        }
    }

    fn connect(&self) -> Client {
        let stream = TcpStream::connect(self.address).unwrap();
        // A bound on a broken test, not a measurement: events arrive within milliseconds.
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    /// Waits until no trace session holds the kernel object (the server saw the client go).
    fn wait_sessions_gone(&self) {
        let kernel = self.extension.trace_kernel();
        let deadline = Instant::now() + Duration::from_secs(30);
        while kernel.sessions() != 0 {
            assert!(Instant::now() < deadline, "the trace session never ended");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.runtime.block_on(self.extension.shutdown()).unwrap();
    }
}

struct Client {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl Client {
    fn send_line(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).unwrap();
        self.stream.write_all(b"\n").unwrap();
    }

    fn hello(&mut self, request: Request) -> Welcome {
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            client_version: "test".to_string(),
            request,
        };
        self.send_line(&serde_json::to_string(&hello).unwrap());
        self.welcome()
    }

    fn welcome(&mut self) -> Welcome {
        let line = self.line().expect("a Welcome line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line),
            Err(e) => panic!("reading a session line: {e}"),
        }
    }

    fn message(&mut self) -> Option<Message> {
        let line = self.line()?;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}")))
    }

    /// Events until (and with) the first one `is_marker` accepts; `Lost` messages fail the test.
    fn events_until(&mut self, is_marker: impl Fn(&Event) -> bool) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            match self.message() {
                Some(Message::Event(event)) => {
                    let done = is_marker(&event);
                    events.push(event);
                    if done {
                        return events;
                    }
                }
                other => panic!("expected events until the marker, got {other:?} after {events:?}"),
            }
        }
    }
}

fn target(pod: &PodCgroup, name: &str) -> Target {
    Target {
        namespace: "shop".to_string(),
        pod: name.to_string(),
        pod_uid: "uid-".to_string() + name,
        containers: vec![ContainerRef {
            name: "app".to_string(),
            id: format!("containerd://{}", pod.container_id()),
        }],
    }
}

fn trace(probe: TraceProbe, targets: Vec<Target>) -> Request {
    Request::Trace {
        probe,
        targets,
        filters: Vec::new(),
        duration: None,
    }
}

fn accepted(welcome: &Welcome) {
    assert!(
        matches!(welcome, Welcome::Accepted { protocol, node, .. } if *protocol == PROTOCOL_VERSION && node == "node-under-test"),
        "{welcome:?}"
    );
}

fn refused(welcome: Welcome, code: ErrorCode) -> String {
    match welcome {
        Welcome::Refused(error) => {
            assert_eq!(error.code, code, "{}", error.message);
            assert_eq!(error.protocol, PROTOCOL_VERSION);
            error.message
        }
        other => panic!("expected a refusal {code:?}, got {other:?}"),
    }
}

fn c(text: &str) -> CString {
    CString::new(text).unwrap()
}

/// Forks and execs `path` `times` times, waiting for each (raw syscalls: runs in a forked child).
fn exec_times(path: &CString, times: usize) {
    let argv = [path.as_ptr(), std::ptr::null()];
    for _ in 0..times {
        // SAFETY: fork/execv/_exit/waitpid only, on memory prepared before the fork.
        unsafe {
            let pid = libc::fork();
            if pid == 0 {
                libc::execv(path.as_ptr(), argv.as_ptr());
                libc::_exit(127);
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
        }
    }
}

#[test]
fn trace_exec_streams_exactly_the_pods_execs_and_detaches_when_the_client_goes() {
    let agent = Agent::start(|_| {});
    let web = PodCgroup::new();
    let other = PodCgroup::new();
    let mut client = agent.connect();
    accepted(&client.hello(trace(TraceProbe::Exec, vec![target(&web, "web-0")])));
    let kernel = agent.extension.trace_kernel();
    assert_eq!(kernel.attached(), ["podscope_trace_exec"]);
    let program_ids = kernel.attached_program_ids();
    assert_eq!(program_ids.len(), 1);

    let (true_path, false_path) = (c("/bin/true"), c("/bin/false"));
    // The other pod's execs first: were they let through, they would come before the marker.
    assert_eq!(
        other.run(|| {
            exec_times(&true_path, 3);
            0
        }),
        0
    );
    assert_eq!(
        web.run(|| {
            exec_times(&true_path, 5);
            exec_times(&false_path, 1);
            0
        }),
        0
    );
    let events = client.events_until(|e| e.fields["filename"] == "/bin/false");
    let execs: Vec<(&str, &str, &str, &str, &str, &str)> = events
        .iter()
        .map(|e| {
            (
                e.node.as_str(),
                e.namespace.as_str(),
                e.pod.as_str(),
                e.container.as_str(),
                e.fields["filename"].as_str(),
                e.comm.as_str(),
            )
        })
        .collect();
    let true_exec = (
        "node-under-test",
        "shop",
        "web-0",
        "app",
        "/bin/true",
        "true",
    );
    let mut expected = vec![true_exec; 5];
    expected.push((
        "node-under-test",
        "shop",
        "web-0",
        "app",
        "/bin/false",
        "false",
    ));
    assert_eq!(execs, expected);
    assert!(events.iter().all(|e| e.probe == TraceProbe::Exec
        && e.fields["argv0"] == e.fields["filename"]
        && e.pid != 0
        && e.time_unix_nano > 1_600_000_000_000_000_000));
    // In time order, as the plugin merges nodes by it.
    assert!(events
        .windows(2)
        .all(|w| w[0].time_unix_nano <= w[1].time_unix_nano));

    // The client goes: the session ends and its program leaves the kernel.
    drop(client);
    agent.wait_sessions_gone();
    assert_eq!(kernel.attached(), Vec::<&str>::new());
    // The kernel frees a program once its last reference is gone, a moment after the close.
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in program_ids {
        loop {
            let shown = std::process::Command::new("bpftool")
                .args(["prog", "show", "id", &id.to_string()])
                .output()
                .unwrap();
            if !shown.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "program {id} is still loaded: {}",
                String::from_utf8_lossy(&shown.stdout)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn trace_exit_reports_exit_codes_and_killing_signals() {
    let agent = Agent::start(|_| {});
    let pod = PodCgroup::new();
    let mut client = agent.connect();
    accepted(&client.hello(trace(TraceProbe::Exit, vec![target(&pod, "batch-0")])));
    assert_eq!(
        pod.run(|| {
            // SAFETY: fork/_exit/kill/waitpid only.
            unsafe {
                for code in [0, 3] {
                    let pid = libc::fork();
                    if pid == 0 {
                        libc::_exit(code);
                    }
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
                let pid = libc::fork();
                if pid == 0 {
                    libc::pause();
                    libc::_exit(0);
                }
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            99
        }),
        99
    );
    let events = client.events_until(|e| e.fields["exit_code"] == "99");
    let codes: Vec<(&str, Option<&str>)> = events
        .iter()
        .map(|e| {
            (
                e.fields["exit_code"].as_str(),
                e.fields.get("signal").map(String::as_str),
            )
        })
        .collect();
    assert_eq!(
        codes,
        [
            ("0", None),
            ("3", None),
            ("137", Some("SIGKILL")),
            ("99", None)
        ]
    );
}

#[test]
fn trace_open_reports_paths_flags_and_results_filtered_in_the_agent() {
    let agent = Agent::start(|_| {});
    let pod = PodCgroup::new();
    let mut client = agent.connect();
    let request = Request::Trace {
        probe: TraceProbe::Open,
        targets: vec![target(&pod, "files-0")],
        // Only the test's own paths: the forked child opens nothing else, but say so anyway.
        filters: vec!["comm!=nothing-else".to_string()],
        duration: None,
    };
    accepted(&client.hello(request));
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("present");
    std::fs::write(&existing, "x").unwrap();
    let (present, missing, marker) = (
        c(existing.to_str().unwrap()),
        c(dir.path().join("absent").to_str().unwrap()),
        c("/nonexistent/podscope-marker"),
    );
    assert_eq!(
        pod.run(|| {
            // SAFETY: openat/close only, on paths prepared before the fork.
            unsafe {
                for _ in 0..3 {
                    let fd = libc::openat(
                        libc::AT_FDCWD,
                        present.as_ptr(),
                        libc::O_RDONLY | libc::O_CLOEXEC,
                    );
                    libc::close(fd);
                }
                libc::openat(libc::AT_FDCWD, missing.as_ptr(), libc::O_RDONLY);
                libc::openat(
                    libc::AT_FDCWD,
                    marker.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT,
                    0o600,
                );
            }
            0
        }),
        0
    );
    let events = client.events_until(|e| e.fields["path"] == "/nonexistent/podscope-marker");
    let opens: Vec<(String, &str, Option<&str>)> = events
        .iter()
        .map(|e| {
            (
                e.fields["path"].clone(),
                e.fields["flags"].as_str(),
                e.fields.get("error").map(String::as_str),
            )
        })
        .collect();
    let present = existing.display().to_string();
    let absent = dir.path().join("absent").display().to_string();
    assert_eq!(
        opens,
        [
            (present.clone(), "O_RDONLY|O_CLOEXEC", None),
            (present.clone(), "O_RDONLY|O_CLOEXEC", None),
            (present, "O_RDONLY|O_CLOEXEC", None),
            (absent, "O_RDONLY", Some("ENOENT")),
            (
                "/nonexistent/podscope-marker".to_string(),
                "O_WRONLY|O_CREAT",
                Some("ENOENT")
            ),
        ]
    );
    assert!(events[..3]
        .iter()
        .all(|e| e.fields["result"].parse::<i64>().unwrap() >= 0));
}

#[test]
fn trace_signal_names_signal_sender_and_target() {
    let agent = Agent::start(|_| {});
    let pod = PodCgroup::new();
    let mut client = agent.connect();
    accepted(&client.hello(trace(TraceProbe::Signal, vec![target(&pod, "sig-0")])));
    assert_eq!(
        pod.run(|| {
            // SAFETY: signal/getpid/kill only.
            unsafe {
                libc::signal(libc::SIGUSR1, libc::SIG_IGN);
                libc::signal(libc::SIGWINCH, libc::SIG_IGN);
                let me = libc::getpid();
                libc::kill(me, libc::SIGUSR1);
                libc::kill(me, libc::SIGUSR1);
                libc::kill(me, libc::SIGWINCH);
            }
            0
        }),
        0
    );
    let events = client.events_until(|e| e.fields["signal"] == "SIGWINCH");
    let signals: Vec<&str> = events.iter().map(|e| e.fields["signal"].as_str()).collect();
    assert_eq!(signals, ["SIGUSR1", "SIGUSR1", "SIGWINCH"]);
    assert!(events
        .iter()
        .all(|e| e.fields["sender_pid"] == e.pid.to_string() && e.pod == "sig-0"));
}

#[test]
fn trace_tcp_connect_names_both_ends() {
    let agent = Agent::start(|_| {});
    let pod = PodCgroup::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut client = agent.connect();
    accepted(&client.hello(trace(
        TraceProbe::TcpConnect,
        vec![target(&pod, "client-0")],
    )));
    let connect = |port: u16| {
        // SAFETY: socket/connect/close on a stack address.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            let address = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
                },
                sin_zero: [0; 8],
            };
            libc::connect(
                fd,
                (&address as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            libc::close(fd);
        }
    };
    assert_eq!(
        pod.run(|| {
            connect(port);
            connect(port);
            0
        }),
        0
    );
    // Two connects, two events: the second is the marker.
    let seen = std::cell::Cell::new(0);
    let events = client.events_until(|_| {
        seen.set(seen.get() + 1);
        seen.get() == 2
    });
    for event in &events {
        assert_eq!(event.fields["daddr"], "127.0.0.1");
        assert_eq!(event.fields["dport"], port.to_string());
        assert_eq!(event.fields["saddr"], "127.0.0.1");
        assert_eq!(event.pod, "client-0");
        assert_eq!(event.fields["result"], "0");
        assert!(event.pid != 0 && event.fields["sport"] != "0", "{event:?}");
    }
    drop(listener);
}

#[test]
fn a_protocol_mismatch_names_both_versions() {
    let agent = Agent::start(|_| {});
    let mut client = agent.connect();
    client.send_line(r#"{"protocol":99,"client_version":"9.9.9","request":{"kind":"status"}}"#);
    let message = refused(client.welcome(), ErrorCode::ProtocolMismatch);
    assert!(
        message
            .contains("speaks session protocol 1, the plugin (9.9.9) speaks 99: upgrade the agent"),
        "{message}"
    );
    // A future request kind this agent cannot read is a mismatch too, not a bad request.
    let mut client = agent.connect();
    client.send_line(r#"{"protocol":2,"client_version":"2.0.0","request":{"kind":"flamegraph"}}"#);
    let message = refused(client.welcome(), ErrorCode::ProtocolMismatch);
    assert!(
        message.contains("the plugin speaks 2: upgrade the agent"),
        "{message}"
    );
    // Garbage is a bad request; the agent keeps serving.
    let mut client = agent.connect();
    client.send_line("GET / HTTP/1.1");
    refused(client.welcome(), ErrorCode::BadRequest);
    let mut client = agent.connect();
    accepted(&client.hello(Request::Status));
}

#[test]
fn a_target_without_a_cgroup_on_this_node_is_not_found() {
    let agent = Agent::start(|_| {});
    let mut client = agent.connect();
    let missing = Target {
        namespace: "shop".to_string(),
        pod: "gone-0".to_string(),
        pod_uid: "x".to_string(),
        containers: vec![ContainerRef {
            name: "app".to_string(),
            id: format!("containerd://{}", "e".repeat(64)),
        }],
    };
    let message = refused(
        client.hello(trace(TraceProbe::Exec, vec![missing])),
        ErrorCode::TargetNotFound,
    );
    assert!(
        message.starts_with("pod shop/gone-0: none of its containers (containerd://eeee"),
        "{message}"
    );
    assert!(
        message
            .ends_with(") has a cgroup on node node-under-test (not running, or on another node)"),
        "{message}"
    );
    assert_eq!(agent.extension.trace_kernel().sessions(), 0);
}

#[test]
fn max_sessions_refuses_one_more_as_busy() {
    let agent = Agent::start(|config| config.max_sessions = 1);
    let pod = PodCgroup::new();
    let mut first = agent.connect();
    accepted(&first.hello(trace(TraceProbe::Exec, vec![target(&pod, "web-0")])));
    let mut second = agent.connect();
    let message = refused(second.hello(Request::Status), ErrorCode::Busy);
    assert!(
        message.contains("already serves 1 sessions (extensions.session.max_sessions)"),
        "{message}"
    );
    drop(first);
    agent.wait_sessions_gone();
    // The permit is back once the first session's connection is done with.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut third = agent.connect();
        match third.hello(Request::Status) {
            Welcome::Accepted { .. } => break,
            Welcome::Refused(e) if e.code == ErrorCode::Busy && Instant::now() < deadline => {
                std::thread::yield_now()
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn status_says_version_probes_and_bpftrace() {
    let agent = Agent::start(|_| {});
    let mut client = agent.connect();
    accepted(&client.hello(Request::Status));
    let Some(Message::Status(status)) = client.message() else {
        panic!("expected a status");
    };
    assert_eq!(status.node, "node-under-test");
    assert_eq!(status.protocol, PROTOCOL_VERSION);
    assert_eq!(status.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(!status.bpftrace_enabled);
    // Kernel 6.x with BTF has every hook of the trace object.
    assert_eq!(
        status.trace_probes,
        [
            TraceProbe::Exec,
            TraceProbe::Exit,
            TraceProbe::Open,
            TraceProbe::TcpConnect,
            TraceProbe::TcpAccept,
            TraceProbe::TcpClose,
            TraceProbe::TcpRetransmit,
            TraceProbe::OomKill,
            TraceProbe::Signal,
        ]
    );
    assert!(status.probes["trace/http"].starts_with("skipped: "));
    assert!(matches!(client.message(), Some(Message::End { .. })));
    assert_eq!(client.message(), None);
}

#[test]
fn bpftrace_is_refused_while_disabled() {
    let agent = Agent::start(|_| {});
    let mut client = agent.connect();
    let message = refused(
        client.hello(Request::Bpftrace {
            program: "BEGIN { exit(); }".to_string(),
            target: None,
            duration: None,
        }),
        ErrorCode::BpftraceDisabled,
    );
    assert!(
        message.contains("extensions.session.bpftrace.enabled: true"),
        "{message}"
    );
}

#[test]
fn bpftrace_counts_the_target_containers_execs() {
    let agent = Agent::start(|config| config.bpftrace.enabled = true);
    let mut pod = PodCgroup::new();
    // A process for $container_pid; the workload runs in the same cgroup.
    pod.spawn_shell("exec sleep 600");
    let mut client = agent.connect();
    let program = concat!(
        "BEGIN { printf(\"ready\\n\"); }\n",
        "tracepoint:sched:sched_process_exec /cgroup == $container_cgroup_id && str(args->filename) == \"/bin/true\"/ { @execs = count(); }\n",
        "tracepoint:sched:sched_process_exec /cgroup == $container_cgroup_id && str(args->filename) == \"/bin/false\"/ { exit(); }\n",
    );
    let welcome = client.hello(Request::Bpftrace {
        program: program.to_string(),
        target: Some(target(&pod, "web-0")),
        duration: None,
    });
    accepted(&welcome);
    // BEGIN runs once every probe is attached.
    loop {
        match client.message().expect("bpftrace's output") {
            Message::Output { stream, text } if stream == "stdout" && text == "ready\n" => break,
            Message::Output { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    let (true_path, false_path) = (c("/bin/true"), c("/bin/false"));
    assert_eq!(
        pod.run(|| {
            exec_times(&true_path, 7);
            exec_times(&false_path, 1);
            0
        }),
        0
    );
    let mut stdout = String::new();
    let end = loop {
        match client.message().expect("bpftrace's output and end") {
            Message::Output { stream, text } if stream == "stdout" => stdout.push_str(&text),
            Message::Output { .. } => {}
            end @ Message::End { .. } => break end,
            other => panic!("{other:?}"),
        }
    };
    assert!(
        matches!(
            end,
            Message::End {
                reason: podscope_core::session::EndReason::Exited,
                error: None
            }
        ),
        "{end:?}"
    );
    // The 7 runs of /bin/true in the container (the /bin/false ended the program).
    assert!(stdout.contains("@execs: 7\n"), "{stdout}");
}

#[test]
fn top_once_has_the_target_containers_cpu() {
    let agent = Agent::start(|_| {});
    let mut busy = PodCgroup::new();
    busy.spawn_shell("while :; do :; done");
    let mut client = agent.connect();
    accepted(&client.hello(Request::Top {
        scope: TopScope::Containers,
        targets: vec![target(&busy, "busy-0")],
        interval: Duration::from_millis(500),
        once: true,
    }));
    let Some(Message::Top(table)) = client.message() else {
        panic!("expected a table");
    };
    assert_eq!(table.node, "node-under-test");
    assert_eq!(table.rows.len(), 1);
    let row = &table.rows[0];
    assert_eq!(
        (
            row.namespace.as_str(),
            row.pod.as_str(),
            row.container.as_str()
        ),
        ("shop", "busy-0", "app")
    );
    // A spinning shell uses CPU; how much depends on the machine's load.
    assert!(row.cpu_cores.is_some_and(|cores| cores > 0.0), "{row:?}");
    assert_eq!(row.kernel.syscalls_per_second, None);
    assert!(matches!(client.message(), Some(Message::End { .. })));
}

/// An ebpf receiver with `probes`, reporting to the agent's session extension, collecting only
/// when asked (`collection_interval: 1h`), its data points recorded.
fn start_receiver(agent: &Agent, id: &str, probes: serde_json::Value) -> EbpfReceiver {
    let config: EbpfReceiverConfig = parse_component_config(serde_json::json!({
        "collection_interval": "1h",
        "session": "session",
        "probes": probes,
    }))
    .unwrap();
    let mut ctx = BuildContext::for_tests(id);
    ctx.extensions.insert(
        ComponentId::parse("session").unwrap(),
        agent.extension.clone(),
    );
    let receiver = EbpfReceiver::new(
        config,
        ctx,
        ReceiverConsumers {
            metrics: Some(Arc::new(Recorder::default())),
            traces: None,
            profiles: None,
            logs: None,
        },
    )
    .unwrap();
    agent.runtime.block_on(receiver.start()).unwrap();
    assert!(
        receiver.skipped_probes().is_empty(),
        "{:?}",
        receiver.skipped_probes()
    );
    receiver
}

/// Opens (and closes) `/etc/hostname` `opens` times in the pod's cgroup, sleeping 1 ms after
/// every tenth so the process waits runnable after each wakeup; returns the bounds of the time
/// between the collection before it and the one after it: (shortest, longest) in seconds.
fn open_between_collections(
    agent: &Agent,
    receiver: &EbpfReceiver,
    pod: &PodCgroup,
    opens: usize,
) -> (f64, f64) {
    let path = c("/etc/hostname");
    let before_first = Instant::now();
    agent.runtime.block_on(receiver.collect_now()).unwrap();
    let after_first = Instant::now();
    let code = pod.run(|| {
        let pause = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        for i in 0..opens {
            // SAFETY: a valid path; raw syscalls only, as `run` requires.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
            if fd < 0 {
                return 1;
            }
            unsafe {
                libc::close(fd);
                if i % 10 == 0 {
                    libc::nanosleep(&pause, std::ptr::null_mut());
                }
            }
        }
        0
    });
    assert_eq!(code, 0, "an open of /etc/hostname failed");
    let before_second = Instant::now();
    agent.runtime.block_on(receiver.collect_now()).unwrap();
    let after_second = Instant::now();
    (
        (before_second - after_first).as_secs_f64(),
        (after_second - before_first).as_secs_f64(),
    )
}

fn top_once(agent: &Agent, pod: &PodCgroup) -> TopRow {
    let mut client = agent.connect();
    accepted(&client.hello(Request::Top {
        scope: TopScope::Containers,
        targets: vec![target(pod, "io-0")],
        interval: Duration::from_millis(200),
        once: true,
    }));
    let Some(Message::Top(mut table)) = client.message() else {
        panic!("expected a table");
    };
    assert_eq!(table.rows.len(), 1, "{table:?}");
    assert!(matches!(client.message(), Some(Message::End { .. })));
    table.rows.remove(0)
}

/// `count` events over an interval known to lie within `(shortest, longest)` seconds: the rate
/// lies within `count / longest` and `count / shortest` (1 % either side for the receiver's
/// wall clock against the test's monotonic one).
fn assert_rate_within(
    rate: Option<f64>,
    counts: std::ops::RangeInclusive<f64>,
    (shortest, longest): (f64, f64),
) {
    let rate = rate.expect("a rate");
    let (low, high) = (
        counts.start() / longest * 0.99,
        counts.end() / shortest * 1.01,
    );
    assert!(
        (low..=high).contains(&rate),
        "{rate}/s is not within {low}..={high}/s"
    );
}

#[test]
fn top_kernel_columns_are_the_pods_opens_syscalls_and_run_queue_latency() {
    const OPENS: usize = 500;
    let agent = Agent::start(|_| {});
    let pod = PodCgroup::new();
    let receiver = start_receiver(
        &agent,
        "ebpf",
        serde_json::json!({"sched": {}, "syscalls": {}, "files": {}, "tcp": {}}),
    );
    let interval = open_between_collections(&agent, &receiver, &pod, OPENS);
    let row = top_once(&agent, &pod);
    // Exactly OPENS opens; an open and a close each, plus at most 50 more (the nanosleeps, the
    // exit, the end of the write that moved the child into the cgroup).
    assert_rate_within(
        row.kernel.opens_per_second,
        OPENS as f64..=OPENS as f64,
        interval,
    );
    assert_rate_within(
        row.kernel.syscalls_per_second,
        (2 * OPENS) as f64..=(2 * OPENS + OPENS / 10 + 50) as f64,
        interval,
    );
    assert_eq!(row.kernel.tcp_retransmits_per_second, Some(0.0), "{row:?}");
    let (p50, p99) = (
        row.kernel.runq_latency_p50_seconds.expect("run-queue p50"),
        row.kernel.runq_latency_p99_seconds.expect("run-queue p99"),
    );
    assert!(0.0 < p50 && p50 <= p99, "{row:?}");
    // The http probe is off.
    assert_eq!(
        (
            row.kernel.requests_per_second,
            row.kernel.request_latency_p99_seconds
        ),
        (None, None)
    );
    agent.runtime.block_on(receiver.shutdown()).unwrap();

    // With only the files probe the other kernel columns are empty.
    let receiver = start_receiver(&agent, "ebpf/files_only", serde_json::json!({"files": {}}));
    let interval = open_between_collections(&agent, &receiver, &pod, OPENS);
    let row = top_once(&agent, &pod);
    assert_rate_within(
        row.kernel.opens_per_second,
        OPENS as f64..=OPENS as f64,
        interval,
    );
    assert_eq!(
        (
            row.kernel.runq_latency_p50_seconds,
            row.kernel.runq_latency_p99_seconds,
            row.kernel.syscalls_per_second,
            row.kernel.tcp_retransmits_per_second,
        ),
        (None, None, None, None),
        "{row:?}"
    );
    agent.runtime.block_on(receiver.shutdown()).unwrap();
}

/// A memory cgroup with a tiny limit, of the hierarchy that has the memory controller here
/// (cgroup v1's on hybrid hosts), removed on drop.
struct TinyMemoryCgroup(std::path::PathBuf);

impl TinyMemoryCgroup {
    fn new(limit_bytes: u64) -> TinyMemoryCgroup {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::path::Path::new("/sys/fs/cgroup/memory").join(format!("podscope-oom-{nanos:x}"));
        std::fs::create_dir(&dir).expect("a cgroup v1 memory hierarchy at /sys/fs/cgroup/memory");
        std::fs::write(dir.join("memory.limit_in_bytes"), limit_bytes.to_string()).unwrap();
        // No swap to escape to.
        let _ = std::fs::write(dir.join("memory.swappiness"), "0");
        TinyMemoryCgroup(dir)
    }
}

impl Drop for TinyMemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn trace_oom_kill_reports_the_victim_of_a_tiny_memory_limit() {
    let agent = Agent::start(|_| {});
    let pod = PodCgroup::new();
    let memory = TinyMemoryCgroup::new(16 << 20);
    let procs = c(memory.0.join("cgroup.procs").to_str().unwrap());
    let mut client = agent.connect();
    accepted(&client.hello(trace(TraceProbe::OomKill, vec![target(&pod, "hungry-0")])));
    let killed = pod.run(|| {
        // SAFETY: raw syscalls only (open/write/close/mmap/fork/waitpid/_exit), on memory
        // prepared before the fork.
        unsafe {
            let pid = libc::fork();
            if pid == 0 {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(2);
                }
                libc::close(fd);
                let size = 256usize << 20;
                let memory = libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if memory == libc::MAP_FAILED {
                    libc::_exit(3);
                }
                let bytes = memory.cast::<u8>();
                let mut offset = 0;
                while offset < size {
                    bytes.add(offset).write_volatile(1);
                    offset += 4096;
                }
                libc::_exit(0);
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL {
                0
            } else {
                1
            }
        }
    });
    assert_eq!(killed, 0, "the allocation was not killed by the OOM killer");
    let events = client.events_until(|_| true);
    let event = &events[0];
    assert_eq!(event.probe, TraceProbe::OomKill);
    assert_eq!(
        (event.pod.as_str(), event.container.as_str()),
        ("hungry-0", "app")
    );
    // The victim ran out of memory itself: it is its own trigger.
    assert_eq!(event.fields["trigger_pid"], event.pid.to_string());
}

#[test]
fn events_a_slow_client_cannot_take_are_counted_as_lost_never_dropped_silently() {
    const OPENS: u64 = 100_000;
    let agent = Agent::start(|_| {});
    let pod = PodCgroup::new();
    let mut client = agent.connect();
    accepted(&client.hello(trace(TraceProbe::Open, vec![target(&pod, "flood-0")])));
    // The client reads nothing while the pod opens: the socket, the session's queue and the
    // ring buffer fill up.
    let missing = c("/nonexistent/podscope-flood");
    assert_eq!(
        pod.run(|| {
            for _ in 0..OPENS {
                // SAFETY: openat on a path prepared before the fork.
                unsafe { libc::openat(libc::AT_FDCWD, missing.as_ptr(), libc::O_RDONLY) };
            }
            0
        }),
        0
    );
    let (mut delivered, mut lost) = (0u64, 0u64);
    while delivered + lost < OPENS {
        match client.message().expect("events and Lost messages") {
            Message::Event(event) => {
                assert_eq!(event.fields["path"], "/nonexistent/podscope-flood");
                delivered += 1;
            }
            Message::Lost { count, .. } => lost += count,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(delivered + lost, OPENS);
    assert!(
        lost > 0,
        "a client that reads nothing should have lost events"
    );
    // Nothing more comes before a marker opened now.
    let marker = c("/nonexistent/podscope-marker");
    assert_eq!(
        pod.run(|| {
            // SAFETY: openat on a path prepared before the fork.
            unsafe { libc::openat(libc::AT_FDCWD, marker.as_ptr(), libc::O_RDONLY) };
            0
        }),
        0
    );
    let events = client.events_until(|e| e.fields["path"] == "/nonexistent/podscope-marker");
    assert_eq!(events.len(), 1, "{events:?}");
}

#[test]
fn trace_tcp_accept_and_close_name_the_server_side_and_durations() {
    let agent = Agent::start(|_| {});
    let pod = PodCgroup::new();
    let mut accepts = agent.connect();
    accepted(&accepts.hello(trace(TraceProbe::TcpAccept, vec![target(&pod, "server-0")])));
    let mut closes = agent.connect();
    accepted(&closes.hello(trace(TraceProbe::TcpClose, vec![target(&pod, "server-0")])));
    let kernel = agent.extension.trace_kernel();
    // Two sessions, one program: the three tcp probes share it.
    assert_eq!(kernel.attached(), ["podscope_trace_tcp_state"]);
    assert_eq!(kernel.sessions(), 2);
    // In the pod: a listener, three connections to it accepted, each closed from both ends.
    let served = pod.run(|| {
        // SAFETY: socket calls on stack memory only.
        unsafe {
            let listener = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let mut address = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
                },
                sin_zero: [0; 8],
            };
            let size = std::mem::size_of::<libc::sockaddr_in>() as u32;
            let mut length = size;
            if libc::bind(
                listener,
                (&address as *const libc::sockaddr_in).cast(),
                size,
            ) != 0
                || libc::listen(listener, 8) != 0
                || libc::getsockname(
                    listener,
                    (&mut address as *mut libc::sockaddr_in).cast(),
                    &mut length,
                ) != 0
            {
                return 1;
            }
            for _ in 0..3 {
                let client = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if libc::connect(client, (&address as *const libc::sockaddr_in).cast(), size) != 0 {
                    return 2;
                }
                let server = libc::accept(listener, std::ptr::null_mut(), std::ptr::null_mut());
                if server < 0 {
                    return 3;
                }
                // The client closes first; the server reads its FIN, then closes too.
                libc::close(client);
                let mut byte = 0u8;
                libc::read(server, (&mut byte as *mut u8).cast(), 1);
                libc::close(server);
            }
            libc::close(listener);
            0
        }
    });
    assert_eq!(served, 0);
    let seen = std::cell::Cell::new(0);
    let events = accepts.events_until(|_| {
        seen.set(seen.get() + 1);
        seen.get() == 3
    });
    let port = &events[0].fields["sport"];
    for event in &events {
        assert_eq!(
            (event.pod.as_str(), event.fields["saddr"].as_str()),
            ("server-0", "127.0.0.1")
        );
        // The server's side: its local port is the listener's for every connection.
        assert_eq!(&event.fields["sport"], port);
    }
    // Each connection closes on both ends, each end seen established: with its duration.
    let seen = std::cell::Cell::new(0);
    let events = closes.events_until(|_| {
        seen.set(seen.get() + 1);
        seen.get() == 6
    });
    let server_ends = events.iter().filter(|e| &e.fields["sport"] == port).count();
    assert_eq!(server_ends, 3);
    assert!(
        events.iter().all(|e| e.fields.contains_key("duration_ns")),
        "{events:?}"
    );
}

/// Runs `sh -c script` in `pod` and waits for it (at most 60 s); its exit status.
fn run_in(pod: &mut PodCgroup, script: &str) -> i32 {
    let marker = std::env::temp_dir().join(format!(
        "podscope-session-{}",
        podscope_testkit::pod_cgroup::unique_ids().1
    ));
    pod.spawn_shell(&format!("{script}; echo $? > {}", marker.display()));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(status) = std::fs::read_to_string(&marker) {
            if status.ends_with('\n') {
                let _ = std::fs::remove_file(&marker);
                return status.trim().parse().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "{script} did not finish in 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A pod running the http probe tests' `status_server.py` on a free port: its pid and port.
fn python_server(pod: &mut PodCgroup) -> (u32, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/http/status_server.py");
    // `exec`: the shell's pid becomes the server's.
    let pid = pod.spawn_shell(&format!(
        "exec /usr/bin/python3 {} {port}",
        server.display()
    ));
    podscope_testkit::pod_cgroup::wait_listening(port);
    (pid, port)
}

#[test]
fn trace_http_streams_exactly_the_pods_exchanges_and_filters_on_status() {
    let agent = Agent::start(|_| {});
    let mut web = PodCgroup::new();
    let mut other = PodCgroup::new();
    let mut client = PodCgroup::new();
    let receiver = start_receiver(&agent, "ebpf", serde_json::json!({"http": {}}));
    let (web_pid, web_port) = python_server(&mut web);
    let (_, other_port) = python_server(&mut other);
    let mut all = agent.connect();
    accepted(&all.hello(trace(TraceProbe::Http, vec![target(&web, "web-0")])));
    let mut not_found = agent.connect();
    accepted(&not_found.hello(Request::Trace {
        probe: TraceProbe::Http,
        targets: vec![target(&web, "web-0")],
        filters: vec!["status=404".to_string()],
        duration: None,
    }));
    // 5 × 200 and 3 × 404 from web-0, 2 from the other pod, then web-0's marker (a 404 too,
    // on a path of its own): the exchanges reach a session in the order they were read.
    let get = |port: u16, path: &str| format!("curl -s -o /dev/null http://127.0.0.1:{port}{path}");
    let mut script = Vec::new();
    script.extend((0..5).map(|_| get(web_port, "/ok")));
    script.extend((0..3).map(|_| get(web_port, "/status/404")));
    script.extend((0..2).map(|_| get(other_port, "/ok")));
    script.push(get(web_port, "/status/404/end"));
    assert_eq!(run_in(&mut client, &script.join(" && ")), 0);

    let is_marker = |e: &Event| e.fields["path"] == "/status/404/end";
    let events = all.events_until(is_marker);
    let summary: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{}/{}/{} {} {} {} {} {}",
                e.namespace,
                e.pod,
                e.container,
                e.fields["role"],
                e.fields["method"],
                e.fields["path"],
                e.fields["route"],
                e.fields["status"]
            )
        })
        .collect();
    let mut expected = vec!["shop/web-0/app server GET /ok /ok 200".to_string(); 5];
    expected.extend(vec![
        "shop/web-0/app server GET /status/404 /status/{id} 404"
            .to_string();
        3
    ]);
    expected.push("shop/web-0/app server GET /status/404/end /status/{id}/end 404".to_string());
    assert_eq!(summary, expected);
    for event in &events {
        assert_eq!(event.probe, TraceProbe::Http);
        assert_eq!(event.node, "node-under-test");
        assert_eq!((event.pid, event.comm.as_str()), (web_pid, "python3"));
        // The peer is curl's end of the connection.
        assert!(event.fields["peer"].starts_with("127.0.0.1:"), "{event:?}");
        assert_ne!(event.fields["peer"], format!("127.0.0.1:{web_port}"));
        assert!(event.fields["duration_ns"].parse::<u64>().unwrap() > 0);
        assert_eq!(
            (
                event.fields["scheme"].as_str(),
                event.fields["version"].as_str()
            ),
            ("http", "1.1")
        );
        assert_eq!(event.fields["trace_id"].len(), 32);
        assert_eq!(event.fields["span_id"].len(), 16);
    }
    let times: Vec<u64> = events.iter().map(|e| e.time_unix_nano).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");

    let events = not_found.events_until(is_marker);
    let paths: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.fields["path"].as_str(), e.fields["status"].as_str()))
        .collect();
    assert_eq!(
        paths,
        [
            ("/status/404", "404"),
            ("/status/404", "404"),
            ("/status/404", "404"),
            ("/status/404/end", "404")
        ]
    );
    drop(all);
    drop(not_found);
    agent.runtime.block_on(receiver.shutdown()).unwrap();
}

#[test]
fn trace_http_without_the_http_probe_names_the_fix() {
    let agent = Agent::start(|_| {});
    let pod = PodCgroup::new();
    let mut client = agent.connect();
    let message = refused(
        client.hello(trace(TraceProbe::Http, vec![target(&pod, "web-0")])),
        ErrorCode::ProbeUnavailable,
    );
    assert_eq!(
        message,
        "probe http is not available on node node-under-test: no ebpf receiver with the http probe reports to this session extension; enable the ebpf receiver's `http` probe (receivers.ebpf.probes.http) and name this extension in its `session:` setting"
    );
}
