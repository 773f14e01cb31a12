//! What the eBPF receiver costs a node's own work (issue 11 point 5): a fixed mix of workloads —
//! a syscall loop, a pipe ping-pong between two threads, an open/close loop, a TCP connect/accept
//! loop, a fork+exec loop, and an HTTP keep-alive server under `wrk` — each run with nothing
//! attached, with `configs/default.yaml`'s eBPF receiver, and with every probe on, and its
//! throughput loss in % reported.
//!
//! Paired and interleaved, because this shared VM drifts: for each workload, the three states
//! alternate with "nothing attached" runs between them (none, default, none, all, none), each
//! loss is against the mean of the two runs around it, workloads take turns over the rounds, and
//! every figure is the median over the rounds. Each workload runs in a process of its own (this
//! binary again, `--workload NAME SECONDS`), which the receiver observes like any other.
//!
//! Besides throughput, which other processes on the machine disturb, each run reports figures
//! that contention disturbs less: the workload's CPU time (user + system, of its processes, which
//! includes the time of the eBPF programs that run in their context) per operation, and this
//! process's CPU time per operation — the agent's, since the receiver runs here. A last pass, not
//! timed, reads each of the receiver's programs' runs and ns per run from the kernel's BPF
//! statistics.
//!
//! Run: `cargo bench --bench workload_cost` (root; needs wrk and bpftool, which
//! `scripts/install-deps.sh` installs); `cargo bench --bench workload_cost -- --workloads tcp,http`
//! runs only those. Under `cargo test` it is a quick smoke run.

use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use podscope_core::config::parse_component_config;
use podscope_core::{BuildContext, Component as _, ComponentKind, ReceiverConsumers};
use podscope_receiver::ebpf::{EbpfReceiver, EbpfReceiverConfig};
use podscope_testkit::BuildContextForTests as _;
use podscope_testkit::Discard;

mod bpf_stats;
mod cpu;

/// The workloads: name, unit of what they count.
const WORKLOADS: [(&str, &str); 6] = [
    ("syscall", "getppid/s"),
    ("pipe", "round trips/s"),
    ("open", "open+close/s"),
    ("tcp", "connections/s"),
    ("fork-exec", "fork+exec/s"),
    ("http", "requests/s (wrk)"),
];

/// Runs workload `name` for `seconds` in this process; how many operations it did, in how many
/// seconds.
fn run_workload(name: &str, seconds: f64) -> (u64, f64) {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut done = 0u64;
    // Checks the clock every `batch` operations (a clock read per getppid would dominate).
    let mut repeat = |batch: u64, mut op: Box<dyn FnMut() + '_>| {
        while Instant::now() < deadline {
            for _ in 0..batch {
                op();
            }
            done += batch;
        }
    };
    match name {
        // SAFETY: getppid has no preconditions.
        "syscall" => repeat(
            10_000,
            Box::new(|| unsafe {
                libc::syscall(libc::SYS_getppid);
            }),
        ),
        "pipe" => {
            // Both threads on one CPU: every round trip is the same two context switches.
            cpu::pin_to_one_cpu();
            let (mut ping_r, mut ping_w) = std::io::pipe().unwrap();
            let (mut pong_r, mut pong_w) = std::io::pipe().unwrap();
            std::thread::spawn(move || {
                let mut byte = [0u8];
                while ping_r.read_exact(&mut byte).is_ok() {
                    if pong_w.write_all(&byte).is_err() {
                        break;
                    }
                }
            });
            repeat(
                1_000,
                Box::new(move || {
                    let mut byte = [0u8];
                    ping_w.write_all(&byte).unwrap();
                    pong_r.read_exact(&mut byte).unwrap();
                }),
            );
        }
        "open" => {
            let path = std::ffi::CString::new("/proc/self/stat").unwrap();
            repeat(
                1_000,
                Box::new(move || {
                    // SAFETY: a NUL-terminated path; the descriptor is closed at once.
                    unsafe {
                        let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
                        libc::close(fd);
                    }
                }),
            );
        }
        "tcp" => {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let address = listener.local_addr().unwrap();
            // In lockstep: the server resets each connection it accepts and the client waits for
            // that reset before it connects again, so no connection is left closing (no
            // TIME_WAIT) and the accept queue never overflows (a client that did not wait
            // outran the server, and its dropped SYNs waited out 1 s retransmissions: 200-260
            // connections/s).
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    close_with_reset(stream);
                }
            });
            repeat(
                100,
                Box::new(move || {
                    // Rarely the new connection's SYN meets the end of the previous one on the
                    // same port and is reset: an attempt all the same.
                    if let Ok(mut stream) = TcpStream::connect(address) {
                        let _ = stream.read(&mut [0u8; 1]);
                    }
                }),
            );
        }
        "fork-exec" => repeat(
            10,
            Box::new(|| {
                let status = Command::new("/bin/true").status().unwrap();
                assert!(status.success());
            }),
        ),
        other => panic!("no workload {other}"),
    }
    (done, started.elapsed().as_secs_f64())
}

/// Closes `stream` with a reset (SO_LINGER 0): the connection ends at once, without TIME_WAIT.
fn close_with_reset(stream: TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a linger struct of its size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}

/// An HTTP/1.1 keep-alive server answering every request with a 2-byte body, until killed;
/// prints its port.
fn http_server() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    std::io::stdout().flush().unwrap();
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut writer = stream.try_clone().unwrap();
            let mut reader = std::io::BufReader::new(stream);
            let mut line = String::new();
            loop {
                // The request line and headers, up to the blank line (wrk sends no body).
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line == "\r\n" => {
                        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if writer.write_all(answer).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                }
            }
        });
    }
}

/// One run of a workload.
#[derive(Debug, Clone, Copy)]
struct Run {
    ops: f64,
    seconds: f64,
    /// User + system CPU seconds of the workload's processes (the eBPF programs that run in
    /// their context included).
    workload_cpu: f64,
    /// User + system CPU seconds of this process meanwhile: the agent's (the receiver runs here;
    /// the thread that waits for the workload uses next to none).
    agent_cpu: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ops / self.seconds
    }

    /// Workload CPU µs per operation.
    fn workload_us(&self) -> f64 {
        1e6 * self.workload_cpu / self.ops
    }

    /// Agent CPU µs per operation.
    fn agent_us(&self) -> f64 {
        1e6 * self.agent_cpu / self.ops
    }
}

/// Runs workload `name` for `seconds` in a process of its own (for `http`, a server and wrk).
fn measure(name: &str, seconds: f64) -> Run {
    let (children, own) = (
        cpu::seconds(libc::RUSAGE_CHILDREN),
        cpu::seconds(libc::RUSAGE_SELF),
    );
    let (ops, elapsed) = run_in_child(name, seconds);
    Run {
        ops,
        seconds: elapsed,
        workload_cpu: cpu::seconds(libc::RUSAGE_CHILDREN) - children,
        agent_cpu: cpu::seconds(libc::RUSAGE_SELF) - own,
    }
}

/// Operations done and seconds taken by workload `name` in a process of its own, waited for.
fn run_in_child(name: &str, seconds: f64) -> (f64, f64) {
    let exe = std::env::current_exe().unwrap();
    if name == "http" {
        let mut server = Command::new(&exe)
            .args(["--http-server"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut port = String::new();
        std::io::BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut port)
            .unwrap();
        let out = Command::new("wrk")
            .args(["-t1", "-c8", &format!("-d{}s", seconds.ceil() as u64)])
            .arg(format!("http://127.0.0.1:{}/", port.trim()))
            .output()
            .expect("wrk (scripts/install-deps.sh installs it)");
        let _ = server.kill();
        let _ = server.wait();
        let text = String::from_utf8_lossy(&out.stdout);
        // "  123456 requests in 3.00s, 9.42MB read"
        return text
            .lines()
            .find_map(|l| {
                let (requests, rest) = l.trim().split_once(" requests in ")?;
                let elapsed = rest.split([',', 's']).next()?;
                Some((requests.parse().ok()?, elapsed.parse().ok()?))
            })
            .unwrap_or_else(|| panic!("wrk said: {text}"));
    }
    let out = Command::new(&exe)
        .args(["--workload", name, &seconds.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "workload {name}");
    let text = String::from_utf8_lossy(&out.stdout);
    let (ops, elapsed) = text.trim().split_once(' ').expect("ops seconds");
    (ops.parse().unwrap(), elapsed.parse().unwrap())
}

/// The receivers the workloads run under.
#[derive(Clone, Copy)]
enum State {
    Default,
    Every,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Default => "default config",
            State::Every => "every probe",
        }
    }

    fn config(self) -> EbpfReceiverConfig {
        match self {
            State::Default => podscope::config::load_default()
                .expect("configs/default.yaml loads")
                .settings::<EbpfReceiverConfig>(ComponentKind::Receiver, "ebpf")
                .expect("an ebpf receiver in configs/default.yaml")
                .clone(),
            // Every host probe with every option that adds kernel work (uprobes need a target
            // and are left out).
            State::Every => parse_component_config(serde_json::json!({
                "collection_interval": "5s",
                "probes": {
                    "process": {"lifetime": true},
                    "syscalls": {"by": "syscall", "latency": true},
                    "files": {"capture_paths": true},
                    "sched": {},
                    "block_io": {},
                    "tcp": {}
                }
            }))
            .unwrap(),
        }
    }

    async fn attach(self) -> EbpfReceiver {
        let receiver = EbpfReceiver::new(
            self.config(),
            BuildContext::for_tests("ebpf"),
            ReceiverConsumers {
                metrics: Some(Arc::new(Discard)),
                traces: None,
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
        receiver
    }
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--workload") {
        let (ops, seconds) = run_workload(&args[i + 1], args[i + 2].parse().unwrap());
        println!("{ops} {seconds}");
        return;
    }
    if args.iter().any(|a| a == "--http-server") {
        http_server();
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    let (seconds, rounds) = if full { (3.0, 5) } else { (0.2, 1) };
    // `-- --workloads tcp,http` runs only those.
    let chosen: Vec<&str> = args
        .iter()
        .position(|a| a == "--workloads")
        .map(|i| args[i + 1].split(',').collect())
        .unwrap_or_else(|| WORKLOADS.iter().map(|(name, _)| *name).collect());
    let workloads: Vec<(&str, &str)> = WORKLOADS
        .into_iter()
        .filter(|(name, _)| chosen.contains(name))
        .collect();
    let states = [State::Default, State::Every];
    // Per workload: the "nothing attached" runs, and per state its runs with the pair of
    // "nothing attached" runs around each.
    let mut baselines: Vec<Vec<Run>> = vec![Vec::new(); workloads.len()];
    let mut paired: Vec<[Vec<(Run, Run, Run)>; 2]> =
        vec![[Vec::new(), Vec::new()]; workloads.len()];
    for _ in 0..rounds {
        for (w, (name, _)) in workloads.iter().enumerate() {
            let mut before = measure(name, seconds);
            baselines[w].push(before);
            for (s, state) in states.into_iter().enumerate() {
                let receiver = state.attach().await;
                let with = measure(name, seconds);
                receiver.shutdown().await.unwrap();
                let after = measure(name, seconds);
                baselines[w].push(after);
                paired[w][s].push((before, with, after));
                before = after;
            }
        }
    }
    // A figure's change against the mean of the runs around it, in %.
    let change = |runs: &[(Run, Run, Run)], figure: fn(&Run) -> f64| -> Vec<f64> {
        runs.iter()
            .map(|(before, with, after)| {
                100.0 * (figure(with) / ((figure(before) + figure(after)) / 2.0) - 1.0)
            })
            .collect()
    };
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "throughput loss per workload ({seconds} s per run, median of {rounds} paired rounds):"
    );
    println!(
        "  {:<10} {:>14} {:<18} {:>16} {:>16}",
        "workload", "nothing", "", "default config", "every probe"
    );
    for (w, (name, unit)) in workloads.iter().enumerate() {
        let loss = |s: usize| -> Vec<f64> {
            change(&paired[w][s], Run::rate)
                .into_iter()
                .map(|c| -c)
                .collect()
        };
        println!(
            "  {:<10} {:>14.0} {:<18} {:>15.1}% {:>15.1}%   (rounds: default {}; every {})",
            name,
            median_of(baselines[w].iter().map(Run::rate).collect()),
            unit,
            median_of(loss(0)),
            median_of(loss(1)),
            list(&loss(0)),
            list(&loss(1)),
        );
    }
    println!(
        "CPU time per operation, µs (user + system; median of {rounds} paired rounds): the workload's own processes (their eBPF programs' time included), its change against the runs around it, and the agent's (this process, where the receiver runs):"
    );
    println!(
        "  {:<10} {:>9} {:>10} {:>9} {:>10} {:>9} {:>13} {:>13}",
        "workload",
        "nothing",
        "default",
        "change",
        "every",
        "change",
        "agent default",
        "agent every"
    );
    for (w, (name, _)) in workloads.iter().enumerate() {
        let with = |s: usize, figure: fn(&Run) -> f64| -> f64 {
            median_of(
                paired[w][s]
                    .iter()
                    .map(|(_, with, _)| figure(with))
                    .collect(),
            )
        };
        let cpu_change = |s: usize| change(&paired[w][s], Run::workload_us);
        println!(
            "  {:<10} {:>9.2} {:>10.2} {:>8.1}% {:>10.2} {:>8.1}% {:>13.3} {:>13.3}   (change rounds: default {}; every {})",
            name,
            median_of(baselines[w].iter().map(Run::workload_us).collect()),
            with(0, Run::workload_us),
            median_of(cpu_change(0)),
            with(1, Run::workload_us),
            median_of(cpu_change(1)),
            with(0, Run::agent_us),
            with(1, Run::agent_us),
            list(&cpu_change(0)),
            list(&cpu_change(1)),
        );
    }
    let nothing_agent: Vec<f64> = baselines.iter().flatten().map(Run::agent_us).collect();
    println!(
        "  (this process with nothing attached: {:.3} µs per operation at most)",
        nothing_agent.iter().cloned().fold(0.0, f64::max)
    );

    // Not timed: the statistics slow every program on the machine a little.
    let Some(_stats) = bpf_stats::StatsOn::enable() else {
        return;
    };
    println!(
        "each program's runs per operation and ns per run (kernel BPF statistics, one {seconds} s run per workload and state):"
    );
    for (name, _) in &workloads {
        for state in states {
            let receiver = state.attach().await;
            let before = bpf_stats::snapshot();
            let run = measure(name, seconds);
            let after = bpf_stats::snapshot();
            receiver.shutdown().await.unwrap();
            let programs = bpf_stats::between(&before, &after);
            let per_op: f64 = programs
                .iter()
                .map(|(_, runs, ns)| *runs as f64 * ns / run.ops)
                .sum();
            println!(
                "  {name} ({}): {per_op:.1} ns of programs per operation",
                state.name()
            );
            for (program, runs, ns) in programs {
                println!(
                    "    {program:<36} {:>9.3} runs/op {ns:>8.1} ns/run",
                    runs as f64 / run.ops
                );
            }
        }
    }
}
