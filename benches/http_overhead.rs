//! What the http probe costs an HTTP server, measured side by side in one run: wrk against nginx
//! (one worker, keep-alive, a 3-byte body) with nothing attached and with the http probe
//! (default settings, both ends traced, spans and RED built and discarded), rows interleaved
//! over many short rounds; each probe row is compared with the mean of the baselines right
//! before and after it. Reported: the throughput loss and the CPU per request added (median,
//! interquartile range and a bootstrap interval of the median over the rounds: this VM's
//! baseline moves by tens of % between rounds), and the added latency per request. Also the
//! probe's kernel map memory, and the events it lost (a full ring buffer) at that load.
//!
//! Throughput on a machine shared with other work is noisy, so each row also says where the CPU
//! went, per request: nginx's worker and wrk (user and system time; the probe's kernel programs
//! run in their system time), and the agent (this process: the ring-buffer reader, pairing,
//! spans). The difference of those is the probe's cost, whatever else the machine runs. With
//! BENCH_BPF_STATS=1 the kernel's own account of the probe's programs is added
//! (`kernel.bpf_stats_enabled`, which itself adds a little to each program run).
//!
//! Run: `cargo bench --bench http_overhead` (root; nginx and wrk from scripts/install-deps.sh;
//! env BENCH_ROUNDS (20), BENCH_SECONDS (2), BENCH_BPF_STATS (0), BENCH_SCOPE (`both`: every
//! process traced; `server`: nginx in a kubelet-style pod cgroup and only pods traced, wrk
//! outside), BENCH_SAMPLING (`spans.sampling_ratio`, 1)). Under `cargo test` it is a quick smoke
//! run.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use podscope_core::config::parse_component_config;
use podscope_core::{BuildContext, Component as _, ReceiverConsumers};
use podscope_integration::agent::free_port;
use podscope_receiver::ebpf::{EbpfReceiver, EbpfReceiverConfig};
use podscope_testkit::{BuildContextForTests as _, Discard, PodCgroup};

mod spread;
use spread::{median, Spread};

/// nginx's master: our child, or a process of the pod cgroup it runs in (the cgroup ends it).
enum Master {
    Child(Child),
    /// The cgroup is held only to be dropped with the server: that ends nginx and removes it.
    InPod {
        _pod: PodCgroup,
        pid: u32,
    },
}

struct Nginx {
    master: Master,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn master_pid(&self) -> u32 {
        match &self.master {
            Master::Child(child) => child.id(),
            Master::InPod { pid, .. } => *pid,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Master::Child(child) = &mut self.master {
            // SAFETY: kill(2) on our own child: SIGQUIT is nginx's graceful stop of its workers.
            unsafe { libc::kill(child.id() as i32, libc::SIGQUIT) };
            let _ = child.wait();
        }
        // In a pod: dropping the PodCgroup kills what runs in it and removes it.
    }
}

/// nginx with one worker on a free port; inside a kubelet-style pod cgroup when `pod` is given.
fn nginx(pod: Option<PodCgroup>) -> Nginx {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = format!(
        "user root; worker_processes 1; daemon off; master_process on; pid {0}/nginx.pid; error_log {0}/error.log;\n\
         events {{ worker_connections 1024; }}\n\
         http {{ access_log off; keepalive_requests 1000000; client_body_temp_path {0}; proxy_temp_path {0}; fastcgi_temp_path {0}; uwsgi_temp_path {0}; scgi_temp_path {0};\n\
           server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"ok\\n\"; }} }} }}\n",
        dir.path().display()
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let master = match pod {
        None => Master::Child(
            Command::new("nginx")
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(dir.path().join("nginx.conf"))
                .stdin(Stdio::null())
                .spawn()
                .expect("nginx (scripts/install-deps.sh installs it)"),
        ),
        Some(mut pod) => {
            // `exec`: the shell becomes nginx's master, in the pod's cgroup from the start.
            let pid = pod.spawn_shell(&format!(
                "exec nginx -p {0} -c {0}/nginx.conf",
                dir.path().display()
            ));
            Master::InPod { _pod: pod, pid }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Nginx {
        master,
        port,
        _dir: dir,
    }
}

/// One wrk run: requests/s, mean latency (µs), requests, and the CPU time (µs) of wrk, of
/// nginx's worker and of this process (the agent) during it.
struct Run {
    rps: f64,
    latency: f64,
    requests: f64,
    wrk_cpu: f64,
    nginx_cpu: f64,
    agent_cpu: f64,
}

impl Run {
    /// CPU µs per request of the workload (wrk and nginx's worker).
    fn workload_per_request(&self) -> f64 {
        (self.wrk_cpu + self.nginx_cpu) / self.requests
    }

    /// CPU µs per request of the agent.
    fn agent_per_request(&self) -> f64 {
        self.agent_cpu / self.requests
    }
}

/// User and system CPU µs of `who` (RUSAGE_SELF, or RUSAGE_CHILDREN: the children waited for).
fn rusage_cpu(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut usage);
        usage
    };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

/// User and system CPU µs of process `pid` (`/proc/<pid>/stat`, in clock ticks).
fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command (which may hold spaces): utime is the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz * 1e6
}

/// The kernel's account of the http probe's programs, when `kernel.bpf_stats_enabled` is on:
/// (run time ns, runs), summed over its programs.
fn bpf_program_time() -> (f64, f64) {
    let output = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .expect("bpftool (scripts/install-deps.sh installs it)");
    let programs: Vec<serde_json::Value> =
        serde_json::from_slice(&output.stdout).unwrap_or_default();
    programs
        .iter()
        .filter(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("podscope_http"))
        })
        .fold((0.0, 0.0), |(time, runs), p| {
            (
                time + p["run_time_ns"].as_f64().unwrap_or(0.0),
                runs + p["run_cnt"].as_f64().unwrap_or(0.0),
            )
        })
}

/// The pid of nginx's one worker process (the master's child).
fn nginx_worker(master: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().find_map(|p| p.parse().ok()) {
            return pid;
        }
        assert!(Instant::now() < deadline, "nginx started no worker");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wrk(port: u16, seconds: u64, nginx_worker: u32) -> Run {
    let (wrk_before, nginx_before, agent_before) = (
        rusage_cpu(libc::RUSAGE_CHILDREN),
        process_cpu(nginx_worker),
        rusage_cpu(libc::RUSAGE_SELF),
    );
    let output = Command::new("wrk")
        .args(["-t1", "-c8", &format!("-d{seconds}s")])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .expect("wrk (scripts/install-deps.sh installs it)");
    let text = String::from_utf8_lossy(&output.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk's output:\n{text}"));
    let latency = text
        .lines()
        .find_map(|l| {
            let mut fields = l.split_whitespace();
            (fields.next()? == "Latency").then(|| micros(fields.next()?))?
        })
        .unwrap_or_else(|| panic!("no Latency in wrk's output:\n{text}"));
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ")?.0.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{text}"));
    Run {
        rps,
        latency,
        requests,
        wrk_cpu: rusage_cpu(libc::RUSAGE_CHILDREN) - wrk_before,
        nginx_cpu: process_cpu(nginx_worker) - nginx_before,
        agent_cpu: rusage_cpu(libc::RUSAGE_SELF) - agent_before,
    }
}

/// wrk's `123.45us`, `1.20ms`, `1.00s` in µs.
fn micros(text: &str) -> Option<f64> {
    for (unit, scale) in [("us", 1.0), ("ms", 1e3), ("s", 1e6)] {
        if let Some(n) = text.strip_suffix(unit) {
            return n.parse::<f64>().ok().map(|v| v * scale);
        }
    }
    None
}

/// Which ends of the requests the probe sees.
#[derive(Clone, Copy, PartialEq)]
enum Scope {
    /// Every process of the machine, so wrk's requests and nginx's exchanges both.
    Both,
    /// Only pods' containers (`cgroup_filter` on kubepods, as configs/http-spans.yaml), nginx
    /// running in one and wrk outside: what a node pays for a service it runs whose clients
    /// are elsewhere.
    Server,
}

/// A started receiver with the http probe, and the telemetry it counts into.
async fn probe(
    scope: Scope,
    sampling_ratio: f64,
) -> (EbpfReceiver, podscope_core::telemetry::AgentTelemetry) {
    let http = serde_json::json!({"spans": {"sampling_ratio": sampling_ratio}});
    let config: EbpfReceiverConfig = parse_component_config(match scope {
        Scope::Both => serde_json::json!({"collection_interval": "1h", "probes": {"http": http}}),
        Scope::Server => serde_json::json!({
            "collection_interval": "1h",
            "cgroup_filter": {"include": ["/kubepods.slice/**"]},
            "probes": {"http": http},
        }),
    })
    .unwrap();
    let ctx = BuildContext::for_tests("ebpf");
    let telemetry = ctx.telemetry.clone();
    let receiver = EbpfReceiver::new(
        config,
        ctx,
        ReceiverConsumers {
            metrics: Some(Arc::new(Discard)),
            traces: Some(Arc::new(Discard)),
            profiles: None,
            logs: None,
        },
    )
    .unwrap();
    receiver.start().await.unwrap();
    assert!(
        receiver.skipped_probes().is_empty(),
        "{:?}",
        receiver.skipped_probes()
    );
    (receiver, telemetry)
}

/// A counter of the agent's telemetry text (0 if absent).
fn counter(telemetry: &podscope_core::telemetry::AgentTelemetry, series: &str) -> f64 {
    telemetry
        .encode_text()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("http_overhead: needs root (eBPF); skipped");
        return;
    }
    let quick = std::env::args().all(|a| a != "--bench");
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (rounds, seconds) = if quick {
        (1, 1)
    } else {
        (env("BENCH_ROUNDS", 20), env("BENCH_SECONDS", 2))
    };
    let bpf_stats = std::env::var("BENCH_BPF_STATS").is_ok_and(|v| v == "1");
    let scope = match std::env::var("BENCH_SCOPE").as_deref() {
        Ok("server") => Scope::Server,
        Ok("both") | Err(_) => Scope::Both,
        Ok(other) => panic!("BENCH_SCOPE={other}: expected `both` or `server`"),
    };
    let sampling_ratio: f64 = std::env::var("BENCH_SAMPLING")
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("BENCH_SAMPLING={v}: expected a ratio"))
        })
        .unwrap_or(1.0);
    if bpf_stats {
        std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").expect("bpf_stats_enabled");
    }
    let server = nginx((scope == Scope::Server).then(PodCgroup::new));
    let worker = nginx_worker(server.master_pid());
    let mut losses = Vec::new();
    let mut cpu_changes = Vec::new();
    let mut added_latency = Vec::new();
    let (mut workload_base, mut workload_with, mut agent) = (Vec::new(), Vec::new(), Vec::new());
    let (mut kernel_per_request, mut kernel_per_run) = (Vec::new(), Vec::new());
    let mut rows = Vec::new();
    let mut memory = 0;
    let (mut events, mut lost) = (0.0, 0.0);
    let mut previous = wrk(server.port, seconds, worker);
    for round in 0..rounds {
        let (receiver, telemetry) = probe(scope, sampling_ratio).await;
        let programs_before = bpf_program_time();
        let with = wrk(server.port, seconds, worker);
        let programs_after = bpf_program_time();
        receiver.collect_now().await.unwrap();
        memory = receiver
            .map_memory()
            .iter()
            .filter(|m| m.probe == "http")
            .map(|m| m.bytes)
            .sum::<u64>();
        receiver.shutdown().await.unwrap();
        events += counter(
            &telemetry,
            "podscope_ebpf_ringbuf_events_total{ring=\"http_events\"}",
        );
        lost += counter(
            &telemetry,
            "podscope_ebpf_ringbuf_lost_events_total{ring=\"http_events\"}",
        );
        let after = wrk(server.port, seconds, worker);
        let base_rps = (previous.rps + after.rps) / 2.0;
        let base_latency = (previous.latency + after.latency) / 2.0;
        let loss = (base_rps - with.rps) / base_rps * 100.0;
        losses.push(loss);
        added_latency.push(with.latency - base_latency);
        let base_cpu = (previous.workload_per_request() + after.workload_per_request()) / 2.0;
        workload_base.push(base_cpu);
        cpu_changes.push(
            (with.workload_per_request() + with.agent_per_request() - base_cpu) / base_cpu * 100.0,
        );
        workload_with.push(with.workload_per_request());
        agent.push(with.agent_per_request());
        let (program_ns, program_runs) = (
            programs_after.0 - programs_before.0,
            programs_after.1 - programs_before.1,
        );
        let kernel = if bpf_stats && program_runs > 0.0 {
            kernel_per_request.push(program_ns / 1e3 / with.requests);
            kernel_per_run.push(program_ns / program_runs);
            format!(
                ", the probe's programs {:.2} µs per request ({:.0} ns per run, {:.1} runs per request)",
                program_ns / 1e3 / with.requests,
                program_ns / program_runs,
                program_runs / with.requests
            )
        } else {
            String::new()
        };
        rows.push(format!(
            "round {}: without {:.0} req/s ({:.1} µs), with the http probe {:.0} req/s ({:.1} µs), without {:.0} req/s ({:.1} µs): loss {loss:.1} %; CPU per request: wrk and nginx {base_cpu:.2} µs without, {:.2} µs with, the agent {:.2} µs{kernel}",
            round + 1,
            previous.rps,
            previous.latency,
            with.rps,
            with.latency,
            after.rps,
            after.latency,
            with.workload_per_request(),
            with.agent_per_request(),
        ));
        previous = after;
    }
    if bpf_stats {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    }
    for row in &rows {
        println!("{row}");
    }
    let (base, with, agent) = (median(workload_base), median(workload_with), median(agent));
    println!(
        "http probe ({}, spans.sampling_ratio {sampling_ratio}), wrk -t1 -c8 against nginx (keep-alive), {rounds} rounds of {seconds} s: throughput loss {} (target ≤ 5 %); CPU per request added (workload and agent) {}; median added latency {:.1} µs per request, kernel map memory {:.1} KiB, events read {events:.0}, lost {lost:.0} ({:.2} %)",
        match scope {
            Scope::Both => "both ends traced",
            Scope::Server => "nginx in a pod, only pods traced",
        },
        Spread::of(&losses),
        Spread::of(&cpu_changes),
        median(added_latency),
        memory as f64 / 1024.0,
        lost / (events + lost).max(1.0) * 100.0
    );
    println!(
        "CPU per request (medians): wrk and nginx {base:.2} µs without the probe, {with:.2} µs with (+{:.2} µs: the probe's programs and what they cause in the workload), the agent {agent:.2} µs; the CPU cost added is {:.1} % of the workload's",
        with - base,
        (with - base + agent) / base * 100.0
    );
    if bpf_stats && !kernel_per_request.is_empty() {
        println!(
            "the probe's programs (kernel.bpf_stats_enabled): {:.2} µs per request, {:.0} ns per run (medians)",
            median(kernel_per_request),
            median(kernel_per_run)
        );
    }
}
