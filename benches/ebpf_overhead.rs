//! What the eBPF receiver costs, measured side by side in one run:
//! - ns added per syscall (getppid, in a separate process) by a no-op raw_tp program (the floor),
//!   podscope's `syscalls` probe counting only, by default, with latency, the `files` probe on
//!   its tracepoints and on tp_btf, every probe of `configs/default.yaml`, and bpftrace
//!   `tracepoint:raw_syscalls:sys_enter { @[cgroup] = count(); }`, each against its own pair of
//!   "nothing attached" baselines, rows interleaved over rounds (medians reported);
//! - ns added per pipe round trip between two processes (wakeups and context switches) by no-op
//!   tp_btf programs on the scheduler's hooks (the floor) and by the `sched` probe, the same way,
//!   and per context switch or wakeup (the round trip's switches and wakeups counted by the
//!   kernel's BPF statistics);
//! - beside each wall-clock figure, the same in CPU time of the measured processes (user +
//!   system, from `getrusage`), which other processes on a shared machine disturb less;
//! - a pass, not timed, that reads each attached program's runs per operation and ns per run
//!   from the kernel's BPF statistics;
//! - load + attach time of the default probes;
//! - the agent's RSS, kernel map memory and CPU while idle (the real binary, the default config's
//!   eBPF receiver, 30 s).
//!
//! Run: `cargo bench --bench ebpf_overhead` (root; needs bpftrace and bpftool, which
//! `scripts/install-deps.sh` installs). Under `cargo test` it is a quick smoke run.

use std::io::{BufRead as _, Read as _};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::programs::RawTracePoint;
use podscope_core::config::parse_component_config;
use podscope_core::{BuildContext, Component as _, ComponentKind, ReceiverConsumers};
use podscope_integration::agent::{free_port, AgentProcess};
use podscope_receiver::ebpf::{EbpfReceiver, EbpfReceiverConfig};
use podscope_testkit::BuildContextForTests as _;
use podscope_testkit::Discard;

mod bpf_stats;
mod cpu;
mod proc_stat;
use proc_stat::cpu_seconds;

/// A measurement: wall-clock ns and CPU ns (user + system of the measured processes) per
/// operation.
type Figures = [f64; 2];
const WALL: usize = 0;
const CPU: usize = 1;

/// ns per getppid in a forked child (the agent never observes itself, so the load must come from
/// another process), wall-clock and CPU.
fn ns_per_syscall(calls: u64) -> Figures {
    let cpu_before = cpu::seconds(libc::RUSAGE_CHILDREN);
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
        let cpu_ns = 1e9 * (cpu::seconds(libc::RUSAGE_CHILDREN) - cpu_before);
        [ns as f64 / calls as f64, cpu_ns / calls as f64]
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

/// ns per round trip of one byte over two pipes between two processes (forked, so the agent
/// observes them, and pinned to one CPU): each round trip is two wakeups and two context
/// switches. Wall-clock, and the CPU of both processes.
fn ns_per_round_trip(trips: u64) -> Figures {
    let cpu_before = cpu::seconds(libc::RUSAGE_CHILDREN);
    let (mut ping, mut pong, mut result) = ([0; 2], [0; 2], [0; 2]);
    // SAFETY: plain syscalls; the children only make async-signal-safe calls before _exit.
    unsafe {
        assert_eq!(libc::pipe(ping.as_mut_ptr()), 0);
        assert_eq!(libc::pipe(pong.as_mut_ptr()), 0);
        assert_eq!(libc::pipe(result.as_mut_ptr()), 0);
        let echo = libc::fork();
        if echo == 0 {
            cpu::pin_to_one_cpu();
            // Only the caller may hold ping's write end: its exit is this loop's end of file.
            libc::close(ping[1]);
            let mut byte = 0u8;
            while libc::read(ping[0], (&mut byte as *mut u8).cast(), 1) == 1 {
                libc::write(pong[1], (&byte as *const u8).cast(), 1);
            }
            libc::_exit(0);
        }
        let caller = libc::fork();
        if caller == 0 {
            cpu::pin_to_one_cpu();
            let (mut start, mut end): (libc::timespec, libc::timespec) =
                (std::mem::zeroed(), std::mem::zeroed());
            let mut byte = 0u8;
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut start);
            for _ in 0..trips {
                libc::write(ping[1], (&byte as *const u8).cast(), 1);
                libc::read(pong[0], (&mut byte as *mut u8).cast(), 1);
            }
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut end);
            let ns = ((end.tv_sec - start.tv_sec) * 1_000_000_000 + (end.tv_nsec - start.tv_nsec))
                as u64;
            libc::write(result[1], (&ns as *const u64).cast(), 8);
            libc::_exit(0);
        }
        for fd in [ping[0], ping[1], pong[0], pong[1], result[1]] {
            libc::close(fd);
        }
        let mut file = std::fs::File::from_raw_fd_checked(result[0]);
        let mut buf = [0u8; 8];
        file.read_exact(&mut buf).unwrap();
        for pid in [caller, echo] {
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
        }
        let cpu_ns = 1e9 * (cpu::seconds(libc::RUSAGE_CHILDREN) - cpu_before);
        [
            u64::from_ne_bytes(buf) as f64 / trips as f64,
            cpu_ns / trips as f64,
        ]
    }
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// What a row attaches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Row {
    NoopRawTp,
    NoopTpBtf,
    Counting,
    SyscallsDefault,
    Latency,
    LatencySet,
    FilesTracepoints,
    FilesTpBtf,
    DefaultConfig,
    Bpftrace,
    NoopSched,
    Sched,
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

/// The no-op tp_btf programs `functions` of the bench object on their tracepoints.
fn noop_tp_btf(programs: &[(&str, &str)]) -> Attached {
    let btf = aya::Btf::from_sys_fs().unwrap();
    let mut noop = aya::Ebpf::load(podscope_ebpf::objects::BENCH_NOOP).unwrap();
    for (function, tracepoint) in programs {
        let prog: &mut aya::programs::BtfTracePoint =
            noop.program_mut(function).unwrap().try_into().unwrap();
        prog.load(tracepoint, &btf).unwrap();
        prog.attach().unwrap();
    }
    Attached::Ebpf(noop)
}

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::NoopRawTp => "no-op raw_tp on sys_enter (floor)",
            Row::NoopTpBtf => "no-op tp_btf on sys_exit",
            Row::Counting => "syscalls, counting only (errors: false; on entry)",
            Row::SyscallsDefault => "syscalls, default (by group, errors; on exit)",
            Row::Latency => "syscalls, latency: true (every syscall)",
            Row::LatencySet => "syscalls, default + latency_syscalls: [read, fsync]",
            Row::FilesTracepoints => "files, default (open tracepoints)",
            Row::FilesTpBtf => "files, hooks: tp_btf (every syscall)",
            Row::DefaultConfig => "configs/default.yaml (every default probe)",
            Row::Bpftrace => "bpftrace @[cgroup] = count()",
            Row::NoopSched => "no-op tp_btf on sched_switch + wakeups (floor)",
            Row::Sched => "sched probe",
        }
    }

    async fn attach(self) -> Option<Attached> {
        let probes = |probes: serde_json::Value| async move {
            let config: EbpfReceiverConfig = parse_component_config(
                serde_json::json!({"collection_interval": "1h", "probes": probes}),
            )
            .unwrap();
            Attached::Receiver(Box::new(receiver(config).await.0))
        };
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
            Row::NoopTpBtf => noop_tp_btf(&[("podscope_bench_noop_btf", "sys_exit")]),
            Row::Counting => probes(serde_json::json!({"syscalls": {"errors": false}})).await,
            Row::SyscallsDefault => probes(serde_json::json!({"syscalls": {}})).await,
            Row::Latency => probes(serde_json::json!({"syscalls": {"latency": true}})).await,
            Row::LatencySet => {
                ensure_tracefs();
                probes(serde_json::json!({"syscalls": {"latency_syscalls": ["read", "fsync"]}}))
                    .await
            }
            Row::FilesTracepoints => probes(serde_json::json!({"files": {}})).await,
            Row::FilesTpBtf => probes(serde_json::json!({"files": {"hooks": "tp_btf"}})).await,
            Row::DefaultConfig => Attached::Receiver(Box::new(receiver(default_config()).await.0)),
            Row::Bpftrace => Attached::Bpftrace(bpftrace(
                "tracepoint:raw_syscalls:sys_enter { @[cgroup] = count(); }",
            )?),
            Row::NoopSched => noop_tp_btf(&[
                ("podscope_bench_noop_switch", "sched_switch"),
                ("podscope_bench_noop_wakeup", "sched_wakeup"),
                ("podscope_bench_noop_wakeup_new", "sched_wakeup_new"),
            ]),
            Row::Sched => probes(serde_json::json!({"sched": {}})).await,
        })
    }
}

/// The eBPF receiver's settings in `configs/default.yaml`, as the agent loads them.
fn default_config() -> EbpfReceiverConfig {
    let config = podscope::config::load_default().expect("configs/default.yaml loads");
    let mut ebpf = config
        .settings::<EbpfReceiverConfig>(ComponentKind::Receiver, "ebpf")
        .expect("an ebpf receiver in configs/default.yaml")
        .clone();
    ebpf.collection_interval = Duration::from_secs(3600);
    ebpf
}

async fn receiver(config: EbpfReceiverConfig) -> (EbpfReceiver, Duration) {
    let r = EbpfReceiver::new(
        config,
        BuildContext::for_tests("ebpf"),
        ReceiverConsumers {
            metrics: Some(Arc::new(Discard)),
            traces: None,
            profiles: None,
            logs: None,
        },
    )
    .unwrap();
    let started = Instant::now();
    r.start().await.unwrap();
    let took = started.elapsed();
    assert!(r.skipped_probes().is_empty(), "{:?}", r.skipped_probes());
    (r, took)
}

/// Each row measured between two "nothing attached" baselines, rows taking turns over `rounds`:
/// per row, the added cost of each round (the measurement minus its baselines' mean), and the
/// baselines' median, wall-clock and CPU.
async fn paired(
    rows: &[Row],
    rounds: usize,
    measure: impl Fn() -> Figures,
) -> (Vec<Vec<Figures>>, Figures) {
    let mut added = vec![Vec::new(); rows.len()];
    let mut baselines = Vec::new();
    for _ in 0..rounds {
        for (i, row) in rows.iter().enumerate() {
            let before = measure();
            let Some(attached) = row.attach().await else {
                eprintln!("{}: unavailable, row skipped", row.name());
                continue;
            };
            let with = measure();
            attached.detach().await;
            let after = measure();
            let baseline = [WALL, CPU].map(|f| (before[f] + after[f]) / 2.0);
            baselines.push(baseline);
            added[i].push([WALL, CPU].map(|f| with[f] - baseline[f]));
        }
    }
    let baseline = [WALL, CPU].map(|f| median_of(baselines.iter().map(|b| b[f]).collect()));
    (added, baseline)
}

fn list(values: &[f64], digits: usize) -> String {
    values
        .iter()
        .map(|v| format!("{v:.digits$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Prints each row's median added cost, wall-clock and CPU, and the median ratios of row `of` to
/// row `to`.
fn report(rows: &[Row], added: &[Vec<Figures>], unit: &str, ratios: &[(Row, Row)]) {
    let figure = |values: &[Figures], f: usize| values.iter().map(|v| v[f]).collect::<Vec<_>>();
    for (row, values) in rows.iter().zip(added) {
        if !values.is_empty() {
            println!(
                "  {:<52} +{:>8.1} {unit}  CPU +{:>8.1} {unit}   (rounds: {}; CPU {})",
                row.name(),
                median_of(figure(values, WALL)),
                median_of(figure(values, CPU)),
                list(&figure(values, WALL), 1),
                list(&figure(values, CPU), 1)
            );
        }
    }
    let column = |row: Row| rows.iter().position(|r| *r == row).map(|i| &added[i]);
    for (of, to) in ratios {
        let (Some(a), Some(b)) = (column(*of), column(*to)) else {
            continue;
        };
        if a.is_empty() || b.is_empty() {
            continue;
        }
        let ratio = |f: usize| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x[f] / y[f]).collect() };
        println!(
            "  {} / {}: {:.2}x, CPU {:.2}x   (rounds: {}; CPU {})",
            of.name(),
            to.name(),
            median_of(ratio(WALL)),
            median_of(ratio(CPU)),
            list(&ratio(WALL), 2),
            list(&ratio(CPU), 2)
        );
    }
}

/// Not timed (the statistics slow every program a little): each row's programs, their runs per
/// operation and ns per run, from one measurement of `ops` operations with the row attached.
/// Returns, per row, its programs (name, runs per operation, ns per run).
async fn program_costs(
    rows: &[Row],
    ops: u64,
    measure: impl Fn() -> Figures,
) -> Vec<Vec<(String, f64, f64)>> {
    let Some(_stats) = bpf_stats::StatsOn::enable() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for row in rows {
        let Some(attached) = row.attach().await else {
            out.push(Vec::new());
            continue;
        };
        let before = bpf_stats::snapshot();
        measure();
        let after = bpf_stats::snapshot();
        attached.detach().await;
        let programs: Vec<(String, f64, f64)> = bpf_stats::between(&before, &after)
            .into_iter()
            .map(|(name, runs, ns)| (name, runs as f64 / ops as f64, ns))
            .collect();
        if !programs.is_empty() {
            println!("  {}:", row.name());
        }
        for (name, per_op, ns) in &programs {
            println!("    {name:<36} {per_op:>9.3} runs/op {ns:>8.1} ns/run");
        }
        out.push(programs);
    }
    out
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (calls, trips) = if full {
        (5_000_000, 200_000)
    } else {
        (200_000, 5_000)
    };
    // Paired and interleaved, because this shared VM drifts within a run: every row is measured
    // right after its own "nothing attached" baseline and right before a second one, its added
    // cost is the difference to their mean, and the rows take turns over ROUNDS rounds; each
    // row's figure is the median over the rounds (so is each ratio).
    let rounds = if full { 5 } else { 1 };
    let mut syscall_rows = vec![
        Row::NoopRawTp,
        Row::NoopTpBtf,
        Row::Counting,
        Row::SyscallsDefault,
        Row::Latency,
        Row::LatencySet,
        Row::FilesTracepoints,
        Row::FilesTpBtf,
        Row::DefaultConfig,
    ];
    if full {
        syscall_rows.push(Row::Bpftrace);
    }
    let (added, baseline) = paired(&syscall_rows, rounds, || ns_per_syscall(calls)).await;
    println!(
        "ns added per getppid ({calls} calls per measurement, median of {rounds} paired rounds; nothing attached: {:.1} ns, CPU {:.1} ns):",
        baseline[WALL], baseline[CPU]
    );
    report(
        &syscall_rows,
        &added,
        "ns",
        &[
            (Row::DefaultConfig, Row::NoopRawTp),
            (Row::SyscallsDefault, Row::NoopRawTp),
            (Row::LatencySet, Row::NoopRawTp),
            (Row::Counting, Row::NoopRawTp),
            (Row::Counting, Row::Bpftrace),
        ],
    );

    println!("programs per getppid (kernel BPF statistics, one measurement per row):");
    program_costs(&syscall_rows, calls, || ns_per_syscall(calls)).await;

    let sched_rows = [Row::NoopSched, Row::Sched];
    let (added, baseline) = paired(&sched_rows, rounds, || ns_per_round_trip(trips)).await;
    println!(
        "ns added per pipe round trip between two processes on one CPU (2 wakeups, 2 context switches; {trips} per measurement, median of {rounds} paired rounds; nothing attached: {:.1} ns, CPU {:.1} ns):",
        baseline[WALL], baseline[CPU]
    );
    report(&sched_rows, &added, "ns", &[(Row::Sched, Row::NoopSched)]);
    println!("programs per round trip (kernel BPF statistics, one measurement per row):");
    let programs = program_costs(&sched_rows, trips, || ns_per_round_trip(trips)).await;
    // The floor's programs count the hooks' events: switches, and wakeups (of new tasks too).
    let events = |hook: &str| -> f64 {
        programs.first().map_or(0.0, |floor| {
            floor
                .iter()
                .filter(|(name, _, _)| name.starts_with(hook))
                .map(|(_, per_trip, _)| per_trip)
                .sum()
        })
    };
    let (switches, wakeups) = (
        events("podscope_bench_noop_switch"),
        events("podscope_bench_noop_wakeup"),
    );
    if switches + wakeups > 0.0 {
        println!(
            "  per round trip: {switches:.2} context switches, {wakeups:.2} wakeups; ns added per event (switch or wakeup), median of the rounds:"
        );
        for (row, values) in sched_rows.iter().zip(&added) {
            let per_event =
                |f: usize| median_of(values.iter().map(|v| v[f] / (switches + wakeups)).collect());
            println!(
                "  {:<52} +{:>8.1} ns  CPU +{:>8.1} ns",
                row.name(),
                per_event(WALL),
                per_event(CPU)
            );
        }
    }

    let (all, took) = receiver(default_config()).await;
    println!(
        "load + attach of the default probes: {} ms",
        took.as_millis()
    );
    all.shutdown().await.unwrap();

    if full {
        let telemetry_port = free_port();
        // The default config's receiver, without its network servers (the bench may share the
        // machine with an agent on the default ports).
        let default_yaml =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/default.yaml"))
                .unwrap();
        let probes = default_yaml
            .split("  otlp:\n")
            .next()
            .unwrap()
            .split("receivers:\n")
            .nth(1)
            .unwrap();
        let config = format!(
            "receivers:\n{probes}processors:\n  batch:\nexporters:\n  nop:\nservice:\n  telemetry: {{metrics: {{address: \"127.0.0.1:{telemetry_port}\"}}, logs: {{level: warn}}}}\n  pipelines:\n    metrics: {{receivers: [ebpf], processors: [batch], exporters: [nop]}}\n"
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
        let rss = rss_kib(agent.pid()) * 1024;
        println!(
            "agent idle (release, configs/default.yaml's eBPF receiver, 5s interval): RSS {:.1} MiB + kernel maps {:.1} MiB = {:.1} MiB, CPU {:.2} % of a core",
            rss as f64 / (1 << 20) as f64,
            kernel_maps as f64 / (1 << 20) as f64,
            (rss + kernel_maps) as f64 / (1 << 20) as f64,
            cpu * 100.0
        );
        agent.sigterm();
        assert!(agent.wait(Duration::from_secs(30)).await.success());
    }
}
