//! What the uprobes and tcp probes cost, measured side by side in one run:
//! - ns per call of a probed user function (in a forked child, so the agent's own-process filter
//!   does not hide it): no probe, a no-op uprobe (the kernel's uprobe floor), podscope's uprobe
//!   counting per process, and the same capturing an integer argument;
//! - ns per TCP connection (connect, a byte from the server, abortive close, on loopback) without
//!   and with the tcp probe;
//! - iperf3 throughput on loopback without and with the tcp probe (its per-MB cost).
//!
//! Run: `cargo bench --bench probe_costs` (root). Under `cargo test` it is a quick smoke run.

use std::io::Read as _;
use std::sync::Arc;
use std::time::Duration;

use aya::programs::UProbe;
use podscope_core::config::parse_component_config;
use podscope_core::{BuildContext, Component as _, ReceiverConsumers};
use podscope_receiver::ebpf::{EbpfReceiver, EbpfReceiverConfig};
use podscope_testkit::BuildContextForTests as _;
use podscope_testkit::Discard;

/// The probed function. `no_mangle` keeps its name in the symbol table.
#[no_mangle]
#[inline(never)]
pub extern "C" fn podscope_bench_target(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_mul(3)
}

/// Runs `work` in a forked child and returns the ns per iteration it measured.
fn in_child(iterations: u64, work: impl Fn(u64)) -> f64 {
    let mut fds = [0; 2];
    // SAFETY: the child makes raw syscalls and calls `work`, then _exits.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        let pid = libc::fork();
        if pid == 0 {
            let mut start: libc::timespec = std::mem::zeroed();
            let mut end: libc::timespec = std::mem::zeroed();
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut start);
            for i in 0..iterations {
                work(i);
            }
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut end);
            let ns = ((end.tv_sec - start.tv_sec) * 1_000_000_000 + (end.tv_nsec - start.tv_nsec))
                as u64;
            libc::write(fds[1], (&ns as *const u64).cast(), 8);
            libc::_exit(0);
        }
        libc::close(fds[1]);
        let mut file: std::fs::File = std::os::fd::FromRawFd::from_raw_fd(fds[0]);
        let mut buf = [0u8; 8];
        file.read_exact(&mut buf).unwrap();
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        u64::from_ne_bytes(buf) as f64 / iterations as f64
    }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[samples.len() / 2]
}

fn calls(n: u64) -> f64 {
    let f: extern "C" fn(u64) -> u64 = std::hint::black_box(podscope_bench_target);
    median(
        (0..3)
            .map(|_| {
                in_child(n, |i| {
                    std::hint::black_box(f(i));
                })
            })
            .collect(),
    )
}

fn connections(n: u64, port: u16) -> f64 {
    median(
        (0..3)
            .map(|_| {
                in_child(n, |_| unsafe {
                    let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                    let addr = libc::sockaddr_in {
                        sin_family: libc::AF_INET as u16,
                        sin_port: port.to_be(),
                        sin_addr: libc::in_addr {
                            s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
                        },
                        sin_zero: [0; 8],
                    };
                    libc::connect(
                        fd,
                        (&addr as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    );
                    // Wait for the server's byte: the connection was accepted, so the accept
                    // queue never overflows (a full queue drops SYNs, and each retry costs a
                    // second: that, not the probe, slowed earlier runs down after a few
                    // thousand connections).
                    let mut byte = 0u8;
                    libc::read(fd, (&mut byte as *mut u8).cast(), 1);
                    // Abortive close: no TIME_WAIT, so thousands of connections do not exhaust
                    // the ephemeral ports and slow connect() down for the rows that follow.
                    let linger = libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as u32,
                    );
                    libc::close(fd);
                })
            })
            .collect(),
    )
}

async fn receiver(probes: serde_json::Value) -> EbpfReceiver {
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
            logs: None,
        },
    )
    .unwrap();
    r.start().await.unwrap();
    assert!(r.skipped_probes().is_empty(), "{:?}", r.skipped_probes());
    r
}

/// iperf3 throughput in Gbit/s over `seconds` on loopback, or None without iperf3.
fn iperf3(seconds: u32) -> Option<f64> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port()
        .to_string();
    let mut server = std::process::Command::new("iperf3")
        .args(["-s", "-1", "-p", &port])
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let mut out = None;
    for _ in 0..50 {
        let run = std::process::Command::new("iperf3")
            .args([
                "-c",
                "127.0.0.1",
                "-p",
                &port,
                "-t",
                &seconds.to_string(),
                "-J",
            ])
            .output()
            .ok()?;
        if run.status.success() {
            out = Some(run.stdout);
            break;
        }
        std::thread::sleep(Duration::from_millis(100)); // the server is still starting
    }
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_slice(&out?).ok()?;
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 1_000_000 } else { 20_000 };
    let exe = std::env::current_exe().unwrap();

    let base = calls(n);
    let mut noop = aya::Ebpf::load(podscope_ebpf::objects::BENCH_NOOP).unwrap();
    let program: &mut UProbe = noop
        .program_mut("podscope_bench_noop_uprobe")
        .unwrap()
        .try_into()
        .unwrap();
    program.load().unwrap();
    program
        .attach(
            "podscope_bench_target",
            &exe,
            aya::programs::uprobe::UProbeScope::AllProcesses,
        )
        .unwrap();
    let floor = calls(n);
    drop(noop);
    let entry = |capture: Option<serde_json::Value>| {
        let mut e = serde_json::json!({"binary": exe, "symbol": "podscope_bench_target", "metric": {"name": "bench_calls"}});
        if let Some(c) = capture {
            e["capture"] = c;
        }
        serde_json::json!({"uprobes": [e]})
    };
    let counting = receiver(entry(None)).await;
    let ours = calls(n);
    counting.shutdown().await.unwrap();
    let capturing = receiver(entry(Some(
        serde_json::json!({"value": "arg1", "type": "int"}),
    )))
    .await;
    let ours_int = calls(n);
    capturing.shutdown().await.unwrap();
    println!("ns per call of a probed function ({n} calls, median of 3):");
    for (name, ns) in [
        ("no probe", base),
        ("no-op uprobe (floor)", floor),
        ("podscope uprobe, count per process", ours),
        ("podscope uprobe, capture int arg", ours_int),
    ] {
        println!("  {name:<38} {ns:>9.1} ns   +{:>8.1} ns", ns - base);
    }

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::Write as _;
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(b"x");
        }
    });
    let conns = if full { 20_000 } else { 500 };
    let without = connections(conns, port);
    let tcp = receiver(serde_json::json!({"tcp": {}})).await;
    let with = connections(conns, port);
    tcp.shutdown().await.unwrap();
    let without_again = connections(conns, port);
    println!(
        "ns per TCP connection (connect, one byte from the server, abortive close on loopback, {conns} connections, median of 3):"
    );
    println!("  without the tcp probe {without:>10.0} ns");
    println!(
        "  with the tcp probe    {with:>10.0} ns   +{:.0} ns",
        with - without
    );
    println!("  without, again        {without_again:>10.0} ns");

    if full {
        let plain = iperf3(5);
        let tcp = receiver(serde_json::json!({"tcp": {}})).await;
        let probed = iperf3(5);
        tcp.shutdown().await.unwrap();
        match (plain, probed) {
            (Some(a), Some(b)) => println!(
                "iperf3 loopback, 5 s: {a:.2} Gbit/s without, {b:.2} Gbit/s with the tcp probe"
            ),
            _ => println!("iperf3 unavailable: throughput rows skipped"),
        }
    }
}
