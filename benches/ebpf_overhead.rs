//! What the eBPF receiver costs, measured side by side in one run:
//! - ns added per syscall (getppid, in a separate process) by a no-op raw_tp program (the floor),
//!   podscope's `syscalls` probe counting only, with errors, with latency, and bpftrace
//!   `tracepoint:raw_syscalls:sys_enter { @[cgroup] = count(); }`, each against its own pair of
//!   "nothing attached" baselines, rows interleaved over rounds (medians reported);
//! - load + attach time of the default probes;
//! - the agent's RSS, kernel map memory and CPU while idle (the real binary, default config, 30 s).
//!
//! Run: `cargo bench --bench ebpf_overhead` (root). Under `cargo test` it is a quick smoke run.

use std::io::{BufRead as _, Read as _};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aya::programs::RawTracePoint;
use podscope_core::config::parse_component_config;
use podscope_core::{
    Batch, BuildContext, Component as _, ConsumeError, Consumer, ReceiverConsumers,
};
use podscope_integration::agent::{free_port, AgentProcess};
use podscope_receiver::ebpf::{EbpfReceiver, EbpfReceiverConfig};

struct Discard;

#[async_trait]
impl Consumer for Discard {
    async fn consume(&self, _: Batch) -> Result<(), ConsumeError> {
        Ok(())
    }
}

/// ns per getppid in a forked child (the agent never observes itself, so the load must come from
/// another process).
fn ns_per_syscall(calls: u64) -> f64 {
    let mut fds = [0; 2];
    // SAFETY: plain syscalls; the child only makes async-signal-safe calls before _exit.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        let pid = libc::fork();
        if pid == 0 {
            let mut start: libc::timespec = std::mem::zeroed();
            let mut end: libc::timespec = std::mem::zeroed();
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut start);
            for _ in 0..calls {
                libc::syscall(libc::SYS_getppid);
            }
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut end);
            let ns = ((end.tv_sec - start.tv_sec) as i64 * 1_000_000_000
                + (end.tv_nsec - start.tv_nsec) as i64) as u64;
            libc::write(fds[1], (&ns as *const u64).cast(), 8);
            libc::_exit(0);
        }
        libc::close(fds[1]);
        let mut ns = 0u64;
        let mut file = std::fs::File::from_raw_fd_checked(fds[0]);
        let mut buf = [0u8; 8];
        file.read_exact(&mut buf).unwrap();
        ns = ns.max(u64::from_ne_bytes(buf));
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        ns as f64 / calls as f64
    }
}

trait FromRawFdChecked {
    unsafe fn from_raw_fd_checked(fd: i32) -> std::fs::File;
}

impl FromRawFdChecked for std::fs::File {
    unsafe fn from_raw_fd_checked(fd: i32) -> std::fs::File {
        assert!(fd >= 0);
        // SAFETY: fd is an open pipe end this function now owns.
        unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
    }
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// What a row attaches to the syscall path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Row {
    NoopRawTp,
    NoopTpBtf,
    Counting,
    CountingErrors,
    Latency,
    Bpftrace,
}

/// Something attached, until `detach`.
enum Attached {
    Ebpf(aya::Ebpf),
    Receiver(Box<EbpfReceiver>),
    Bpftrace(std::process::Child),
}

impl Attached {
    async fn detach(self) {
        match self {
            Attached::Ebpf(ebpf) => drop(ebpf),
            Attached::Receiver(receiver) => receiver.shutdown().await.unwrap(),
            Attached::Bpftrace(mut child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::NoopRawTp => "no-op raw_tp on sys_enter (floor)",
            Row::NoopTpBtf => "no-op tp_btf on sys_exit",
            Row::Counting => "podscope syscalls, counting",
            Row::CountingErrors => "podscope syscalls, counting + errors",
            Row::Latency => "podscope syscalls, errors + latency",
            Row::Bpftrace => "bpftrace @[cgroup] = count()",
        }
    }

    async fn attach(self) -> Option<Attached> {
        let syscalls = |probe: serde_json::Value| serde_json::json!({ "syscalls": probe });
        Some(match self {
            Row::NoopRawTp => {
                let mut noop = aya::Ebpf::load(podscope_ebpf::objects::BENCH_NOOP).unwrap();
                let prog: &mut RawTracePoint = noop
                    .program_mut("podscope_bench_noop")
                    .unwrap()
                    .try_into()
                    .unwrap();
                prog.load().unwrap();
                prog.attach("sys_enter").unwrap();
                Attached::Ebpf(noop)
            }
            Row::NoopTpBtf => {
                let btf = aya::Btf::from_sys_fs().unwrap();
                let mut noop = aya::Ebpf::load(podscope_ebpf::objects::BENCH_NOOP).unwrap();
                let prog: &mut aya::programs::BtfTracePoint = noop
                    .program_mut("podscope_bench_noop_btf")
                    .unwrap()
                    .try_into()
                    .unwrap();
                prog.load("sys_exit", &btf).unwrap();
                prog.attach().unwrap();
                Attached::Ebpf(noop)
            }
            Row::Counting => Attached::Receiver(Box::new(
                receiver(syscalls(
                    serde_json::json!({"latency": false, "errors": false}),
                ))
                .await
                .0,
            )),
            Row::CountingErrors => Attached::Receiver(Box::new(
                receiver(syscalls(serde_json::json!({"latency": false})))
                    .await
                    .0,
            )),
            Row::Latency => Attached::Receiver(Box::new(
                receiver(syscalls(serde_json::json!({"latency": true})))
                    .await
                    .0,
            )),
            Row::Bpftrace => Attached::Bpftrace(bpftrace(
                "tracepoint:raw_syscalls:sys_enter { @[cgroup] = count(); }",
            )?),
        })
    }
}

async fn receiver(probes: serde_json::Value) -> (EbpfReceiver, Duration) {
    let config: EbpfReceiverConfig =
        parse_component_config(serde_json::json!({"collection_interval": "1h", "probes": probes}))
            .unwrap();
    let r = EbpfReceiver::new(
        config,
        BuildContext::for_tests("ebpf"),
        ReceiverConsumers {
            metrics: Some(Arc::new(Discard)),
            traces: None,
            profiles: None,
        },
    )
    .unwrap();
    let started = Instant::now();
    r.start().await.unwrap();
    let took = started.elapsed();
    assert!(r.skipped_probes().is_empty(), "{:?}", r.skipped_probes());
    (r, took)
}

fn ensure_tracefs() {
    if !std::path::Path::new("/sys/kernel/tracing/events").exists() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
            .status();
    }
}

/// Starts bpftrace with `program` and returns once it says it attached.
fn bpftrace(program: &str) -> Option<std::process::Child> {
    ensure_tracefs();
    let mut child = Command::new("bpftrace")
        .arg("-e")
        .arg(program)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let stdout = child.stdout.take()?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    match lines.next() {
        Some(Ok(line)) if line.starts_with("Attaching") => {}
        _ => {
            let _ = child.kill();
            return None;
        }
    }
    // bpftrace prints "Attaching" just before attaching; keep reading in the background so it
    // never blocks on a full pipe, and give the attach a moment (a benchmark, not a test).
    std::thread::spawn(move || for _ in lines {});
    std::thread::sleep(Duration::from_millis(500));
    Some(child)
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap())
        })
        .unwrap()
}

fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    // SAFETY: sysconf has no preconditions.
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap())
        / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let calls: u64 = if full { 5_000_000 } else { 200_000 };
    // Paired and interleaved, because this shared VM drifts within a run: every row is measured
    // right after its own "nothing attached" baseline and right before a second one, its added
    // cost is the difference to their mean, and the rows take turns over ROUNDS rounds; each
    // row's figure is the median over the rounds (so is each ratio).
    let rounds = if full { 5 } else { 1 };
    let kinds = [
        Row::NoopRawTp,
        Row::NoopTpBtf,
        Row::Counting,
        Row::CountingErrors,
        Row::Latency,
        Row::Bpftrace,
    ];
    let mut added: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let mut baselines = Vec::new();
    for _ in 0..rounds {
        for (i, kind) in kinds.iter().enumerate() {
            if *kind == Row::Bpftrace && !full {
                continue;
            }
            let before = ns_per_syscall(calls);
            let Some(attached) = kind.attach().await else {
                eprintln!("{}: unavailable, row skipped", kind.name());
                continue;
            };
            let with = ns_per_syscall(calls);
            attached.detach().await;
            let after = ns_per_syscall(calls);
            baselines.push((before + after) / 2.0);
            added[i].push(with - (before + after) / 2.0);
        }
    }
    println!(
        "ns added per getppid ({calls} calls per measurement, median of {rounds} paired rounds; nothing attached: {:.1} ns):",
        median_of(baselines.clone())
    );
    for (kind, values) in kinds.iter().zip(&added) {
        if values.is_empty() {
            continue;
        }
        println!(
            "  {:<36} +{:>6.1} ns   (rounds: {})",
            kind.name(),
            median_of(values.clone()),
            values
                .iter()
                .map(|v| format!("{v:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let ratios = |a: usize, b: usize| -> Vec<f64> {
        added[a].iter().zip(&added[b]).map(|(x, y)| x / y).collect()
    };
    let floor_ratios = ratios(2, 0);
    println!(
        "  podscope counting / no-op floor: {:.2}x   (rounds: {})",
        median_of(floor_ratios.clone()),
        floor_ratios
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !added[5].is_empty() {
        let bt_ratios = ratios(2, 5);
        println!(
            "  podscope counting / bpftrace:    {:.2}x   (rounds: {})",
            median_of(bt_ratios.clone()),
            bt_ratios
                .iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    let (all, took) = receiver(serde_json::json!({"process": {}, "syscalls": {}, "files": {}, "sched": {}, "block_io": {}})).await;
    println!(
        "load + attach of the default probes: {} ms",
        took.as_millis()
    );
    all.shutdown().await.unwrap();

    if full {
        let telemetry_port = free_port();
        let config = format!(
            "receivers:\n  ebpf:\n    probes: {{process: {{}}, syscalls: {{}}, files: {{}}, sched: {{}}, block_io: {{}}}}\nprocessors:\n  batch:\nexporters:\n  nop:\nservice:\n  telemetry: {{metrics: {{address: \"127.0.0.1:{telemetry_port}\"}}, logs: {{level: warn}}}}\n  pipelines:\n    metrics: {{receivers: [ebpf], processors: [batch], exporters: [nop]}}\n"
        );
        let agent =
            AgentProcess::start(env!("CARGO_BIN_EXE_podscope"), &config, telemetry_port).await;
        tokio::time::sleep(Duration::from_secs(5)).await; // let start-up settle before measuring idle
        let cpu_before = cpu_seconds(agent.pid());
        let window = Duration::from_secs(30);
        tokio::time::sleep(window).await;
        let cpu = (cpu_seconds(agent.pid()) - cpu_before) / window.as_secs_f64();
        // Kernel map memory is not in RSS: the agent reports it (bytes_memlock of its maps).
        let telemetry = reqwest::get(format!("http://127.0.0.1:{telemetry_port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let kernel_maps: u64 = telemetry
            .lines()
            .find_map(|l| l.strip_prefix("podscope_ebpf_map_memory_total_bytes "))
            .and_then(|v| v.trim().parse().ok())
            .expect("podscope_ebpf_map_memory_total_bytes in the agent's telemetry");
        println!(
            "agent idle (release, all probes, 10s interval): RSS {} MiB + kernel maps {} MiB, CPU {:.2} % of a core",
            rss_kib(agent.pid()) / 1024,
            kernel_maps >> 20,
            cpu * 100.0
        );
        agent.sigterm();
        assert!(agent.wait(Duration::from_secs(30)).await.success());
    }
}
