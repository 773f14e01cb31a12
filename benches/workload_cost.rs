//! What the eBPF receiver costs a node's own work (issue 11 point 5): a fixed mix of workloads —
//! a syscall loop, a pipe ping-pong between two threads, an open/close loop, a TCP connect/accept
//! loop, a fork+exec loop, and an HTTP keep-alive server under `wrk` — each run with nothing
//! attached, with `configs/default.yaml`'s eBPF receiver, and with every probe on, and its
//! throughput loss in % reported.
//!
//! Paired and interleaved, because this shared VM drifts: for each workload, the states alternate
//! with "nothing attached" runs between them (none, default, none, every, none, …), each loss is
//! against the mean of the two "nothing attached" runs around it, and workloads take turns over
//! the rounds (with a single workload, a round's last "nothing attached" run is the next round's
//! first). Every figure is the median over the rounds, with its interquartile range and a 95 %
//! bootstrap interval of the median (the rounds resampled): on this VM a single round's
//! throughput swings by tens of percent, so many short rounds (`--rounds 30 --seconds 1`) pin the
//! median down where a few long ones cannot. Each workload runs in a process of its own (this
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
//! `scripts/install-deps.sh` installs): 5 rounds of 3 s runs, both states. Knobs, after `--`:
//! - `--workloads tcp,http`: only those workloads;
//! - `--rounds N`, `--seconds S`: N rounds of S-second runs (the TCP row on this VM:
//!   `-- --workloads tcp --states default --rounds 30 --seconds 1`, about 2 minutes);
//! - `--states default` (or `every`): only that state besides "nothing attached".
//!
//! Under `cargo test` it is a quick smoke run (one round of 0.2 s runs).

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
mod spread;

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
#[derive(Clone, Copy, PartialEq)]
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

    /// Its name in `--states`.
    fn flag(self) -> &'static str {
        match self {
            State::Default => "default",
            State::Every => "every",
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

/// The value after `flag` in the arguments, parsed; `default` without the flag.
fn knob<T: std::str::FromStr>(args: &[String], flag: &str, default: T) -> T {
    match args.iter().position(|a| a == flag) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a value")),
        None => default,
    }
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
    let seconds: f64 = knob(&args, "--seconds", if full { 3.0 } else { 0.2 });
    let rounds: usize = knob(&args, "--rounds", if full { 5 } else { 1 });
    assert!(
        seconds > 0.0 && rounds > 0,
        "--seconds and --rounds must be positive"
    );
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
    // `--states default` (or `every`) measures only that state against "nothing attached".
    let states: Vec<State> = {
        let chosen: String = knob(&args, "--states", "default,every".to_string());
        let states: Vec<State> = [State::Default, State::Every]
            .into_iter()
            .filter(|s| chosen.split(',').any(|c| c == s.flag()))
            .collect();
        assert!(
            !states.is_empty(),
            "--states takes default, every or both (default,every), not {chosen:?}"
        );
        states
    };
    // Per workload: the "nothing attached" runs, and per state its runs with the pair of
    // "nothing attached" runs around each.
    let mut baselines: Vec<Vec<Run>> = vec![Vec::new(); workloads.len()];
    let mut paired: Vec<Vec<Vec<(Run, Run, Run)>>> =
        vec![vec![Vec::new(); states.len()]; workloads.len()];
    // With one workload, a round's last "nothing attached" run is the one just before the next
    // round's first state: it opens that round too.
    let mut previous: Option<Run> = None;
    for _ in 0..rounds {
        for (w, (name, _)) in workloads.iter().enumerate() {
            let mut before = match previous.take() {
                Some(run) => run,
                None => {
                    let run = measure(name, seconds);
                    baselines[w].push(run);
                    run
                }
            };
            for (s, state) in states.iter().copied().enumerate() {
                let receiver = state.attach().await;
                let with = measure(name, seconds);
                receiver.shutdown().await.unwrap();
                let after = measure(name, seconds);
                baselines[w].push(after);
                paired[w][s].push((before, with, after));
                before = after;
            }
            if workloads.len() == 1 {
                previous = Some(before);
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
        "per workload and state ({seconds} s per run, {rounds} paired rounds, each against the mean of the \"nothing attached\" runs around it): throughput loss, and the change of the workload's CPU time per operation (user + system of its own processes, their eBPF programs' time included); medians, interquartile ranges, 95 % bootstrap intervals of the medians"
    );
    for (w, (name, unit)) in workloads.iter().enumerate() {
        println!(
            "  {name}: nothing attached {:.0} {unit}, {:.2} µs CPU per operation",
            spread::median(baselines[w].iter().map(Run::rate).collect()),
            spread::median(baselines[w].iter().map(Run::workload_us).collect()),
        );
        for (s, state) in states.iter().enumerate() {
            let loss: Vec<f64> = change(&paired[w][s], Run::rate)
                .into_iter()
                .map(|c| -c)
                .collect();
            let cpu = change(&paired[w][s], Run::workload_us);
            let with = |figure: fn(&Run) -> f64| -> f64 {
                spread::median(
                    paired[w][s]
                        .iter()
                        .map(|(_, with, _)| figure(with))
                        .collect(),
                )
            };
            println!(
                "    {:<15} throughput loss {}",
                state.name(),
                spread::Spread::of(&loss)
            );
            println!(
                "    {:<15} CPU per operation {:.2} µs, change {}; agent (this process) {:.3} µs per operation",
                "",
                with(Run::workload_us),
                spread::Spread::of(&cpu),
                with(Run::agent_us),
            );
            println!(
                "    {:<15} rounds: loss {}; CPU change {}",
                "",
                list(&loss),
                list(&cpu)
            );
        }
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
        for state in states.iter().copied() {
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
