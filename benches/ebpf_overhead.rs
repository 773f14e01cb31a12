//! What the eBPF receiver costs, measured side by side in one run:
//! - ns added per syscall (getppid, in a separate process) with nothing attached, a no-op raw_tp
//!   program (the floor), podscope's `syscalls` probe counting only, the same with latency, and
//!   bpftrace `tracepoint:raw_syscalls:sys_enter { @[cgroup] = count(); }`;
//! - load + attach time of the default probes;
//! - the agent's RSS and CPU while idle (the real binary, default config, 30 s).
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

/// Median of 3 measurements.
fn median(calls: u64) -> f64 {
    let mut v: Vec<f64> = (0..3).map(|_| ns_per_syscall(calls)).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[1]
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
    let mut rows: Vec<(String, f64)> = Vec::new();

    let base = median(calls);
    rows.push(("nothing attached".into(), base));

    let mut noop = aya::Ebpf::load(podscope_ebpf::objects::BENCH_NOOP).unwrap();
    let prog: &mut RawTracePoint = noop
        .program_mut("podscope_bench_noop")
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().unwrap();
    prog.attach("sys_enter").unwrap();
    rows.push(("no-op raw_tp (floor)".into(), median(calls)));
    drop(noop);

    let btf = aya::Btf::from_sys_fs().unwrap();
    let mut noop_btf = aya::Ebpf::load(podscope_ebpf::objects::BENCH_NOOP).unwrap();
    let prog: &mut aya::programs::BtfTracePoint = noop_btf
        .program_mut("podscope_bench_noop_btf")
        .unwrap()
        .try_into()
        .unwrap();
    prog.load("sys_exit", &btf).unwrap();
    prog.attach().unwrap();
    rows.push(("no-op tp_btf on sys_exit".into(), median(calls)));
    drop(noop_btf);

    let (counting, _) =
        receiver(serde_json::json!({"syscalls": {"latency": false, "errors": false}})).await;
    rows.push(("podscope syscalls, counting".into(), median(calls)));
    counting.shutdown().await.unwrap();

    let (errors, _) = receiver(serde_json::json!({"syscalls": {"latency": false}})).await;
    rows.push(("podscope syscalls, counting + errors".into(), median(calls)));
    errors.shutdown().await.unwrap();

    let (latency, _) = receiver(serde_json::json!({"syscalls": {"latency": true}})).await;
    rows.push(("podscope syscalls, errors + latency".into(), median(calls)));
    latency.shutdown().await.unwrap();

    if full {
        match bpftrace("tracepoint:raw_syscalls:sys_enter { @[cgroup] = count(); }") {
            Some(mut child) => {
                rows.push(("bpftrace @[cgroup] = count()".into(), median(calls)));
                let _ = child.kill();
                let _ = child.wait();
            }
            None => eprintln!("bpftrace unavailable: row skipped"),
        }
    }

    println!("ns per getppid ({calls} calls, median of 3), added over nothing attached:");
    for (name, ns) in &rows {
        println!("  {name:<36} {ns:>8.1} ns   +{:>6.1} ns", ns - base);
    }
    let added = |name: &str| {
        rows.iter()
            .find(|r| r.0.starts_with(name))
            .map(|r| r.1 - base)
    };
    if let (Some(floor), Some(ours)) = (added("no-op raw_tp"), added("podscope syscalls, counting"))
    {
        println!("  podscope counting / no-op floor: {:.2}x", ours / floor);
        if let Some(bt) = added("bpftrace") {
            println!("  podscope counting / bpftrace:    {:.2}x", ours / bt);
        }
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
        println!(
            "agent idle (release, all probes, 10s interval): RSS {} MiB, CPU {:.2} % of a core",
            rss_kib(agent.pid()) / 1024,
            cpu * 100.0
        );
        agent.sigterm();
        assert!(agent.wait(Duration::from_secs(30)).await.success());
    }
}
