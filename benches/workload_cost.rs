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
//! Run: `cargo bench --bench workload_cost` (root; needs wrk, which `scripts/install-deps.sh`
//! installs). Under `cargo test` it is a quick smoke run.

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

/// The workloads: name, unit of what they count.
const WORKLOADS: [(&str, &str); 6] = [
    ("syscall", "getppid/s"),
    ("pipe", "round trips/s"),
    ("open", "open+close/s"),
    ("tcp", "connections/s"),
    ("fork-exec", "fork+exec/s"),
    ("http", "requests/s (wrk)"),
];

/// Runs workload `name` for `seconds` in this process and returns how many it did per second.
fn run_workload(name: &str, seconds: f64) -> f64 {
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
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    drop(stream);
                }
            });
            repeat(
                100,
                Box::new(move || {
                    use std::os::fd::AsRawFd as _;
                    let stream = TcpStream::connect(address).unwrap();
                    // Abortive close: no TIME_WAIT piling up over a run of tens of thousands.
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
    done as f64 / started.elapsed().as_secs_f64()
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

/// Runs workload `name` for `seconds` in a process of its own; its throughput.
fn measure(name: &str, seconds: f64) -> f64 {
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
        return text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("wrk said: {text}"));
    }
    let out = Command::new(&exe)
        .args(["--workload", name, &seconds.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "workload {name}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The receivers the workloads run under.
#[derive(Clone, Copy)]
enum State {
    Default,
    Every,
}

impl State {
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
        let rate = run_workload(&args[i + 1], args[i + 2].parse().unwrap());
        println!("{rate}");
        return;
    }
    if args.iter().any(|a| a == "--http-server") {
        http_server();
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    let (seconds, rounds) = if full { (3.0, 5) } else { (0.2, 1) };
    // Per workload: baselines, and the loss of each state against the runs around it.
    let mut baselines = vec![Vec::new(); WORKLOADS.len()];
    let mut losses = vec![[Vec::new(), Vec::new()]; WORKLOADS.len()];
    for _ in 0..rounds {
        for (w, (name, _)) in WORKLOADS.iter().enumerate() {
            let mut before = measure(name, seconds);
            baselines[w].push(before);
            for (s, state) in [State::Default, State::Every].into_iter().enumerate() {
                let receiver = state.attach().await;
                let with = measure(name, seconds);
                receiver.shutdown().await.unwrap();
                let after = measure(name, seconds);
                let baseline = (before + after) / 2.0;
                losses[w][s].push(100.0 * (1.0 - with / baseline));
                before = after;
            }
        }
    }
    println!(
        "throughput loss per workload ({seconds} s per run, median of {rounds} paired rounds):"
    );
    println!(
        "  {:<10} {:>14} {:<18} {:>16} {:>16}",
        "workload", "nothing", "", "default config", "every probe"
    );
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (w, (name, unit)) in WORKLOADS.iter().enumerate() {
        println!(
            "  {:<10} {:>14.0} {:<18} {:>15.1}% {:>15.1}%   (rounds: default {}; every {})",
            name,
            median_of(baselines[w].clone()),
            unit,
            median_of(losses[w][0].clone()),
            median_of(losses[w][1].clone()),
            list(&losses[w][0]),
            list(&losses[w][1]),
        );
    }
}
