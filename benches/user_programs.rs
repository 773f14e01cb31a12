//! What users' own eBPF programs (docs/programs.md) cost the agent:
//! - load to first metric: from the receiver's start (the object read and checked, its BTF
//!   parsed, its maps created, the verifier run, the program attached) to the first data point
//!   of its map delivered to the pipeline, the workload's event in between;
//! - CPU per 10 k map entries collected: the agent's CPU time for one collection of a map
//!   holding N entries (hash and per-CPU hash), read, decoded through BTF (a struct key, a
//!   cgroup and an integer label) and turned into OTLP data points;
//! - memory per loaded program: the example program of the chart
//!   (`helm/podscope/examples/ebpf-program/syscount.bpf.c`, 2 programs, 3 maps) loaded 1 and 11
//!   times, each in a fresh process (this bench re-executed): RSS and the kernel memory its
//!   program and map fds hold (`memlock` in /proc/self/fdinfo), per added program.
//!
//! Run: `cargo bench --bench user_programs` (root). Under `cargo test` it is a quick smoke run.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use opentelemetry_proto::tonic::metrics::v1::metric;
use podscope_core::config::parse_component_config;
use podscope_core::{
    Batch, BuildContext, Component as _, ConsumeError, Consumer, ReceiverConsumers,
};
use podscope_integration::bpf::{compile, PREAMBLE};
use podscope_receiver::ebpf::programs::Phase;
use podscope_receiver::ebpf::{EbpfReceiver, EbpfReceiverConfig};
use podscope_testkit::pod_cgroup::{unique_ids, PodCgroup};
use podscope_testkit::BuildContextForTests as _;
use std::sync::{Arc, Mutex};

/// write(999, NULL, len) calls counted by (cgroup, len), in a hash and a per-CPU hash: a child
/// making lengths 0..N makes N entries in each (the fd is bad, so the kernel writes nothing).
const BY_LENGTH: &str = r#"
struct len_key {
    __u64 cgroup_id;
    __u32 len;
    __u32 pad;
};
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct len_key);
    __type(value, __u64);
} by_len SEC(".maps");
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_HASH);
    __uint(max_entries, 65536);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct len_key);
    __type(value, __u64);
} by_len_cpu SEC(".maps");

SEC("tp_btf/sys_enter")
int BPF_PROG(bench_by_len, struct pt_regs *regs, long id)
{
    if (id != 1 || regs->di != 999)
        return 0;
    struct len_key key = { .cgroup_id = bpf_get_current_cgroup_id(), .len = (__u32)regs->dx };
    __u64 one = 1, *count = bpf_map_lookup_elem(&by_len, &key);
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        bpf_map_update_elem(&by_len, &key, &one, BPF_NOEXIST);
    count = bpf_map_lookup_elem(&by_len_cpu, &key);
    if (count)
        *count += 1;
    else
        bpf_map_update_elem(&by_len_cpu, &key, &one, BPF_NOEXIST);
    return 0;
}
"#;

#[derive(Default)]
struct LastBatch(Mutex<Option<Batch>>);

#[async_trait]
impl Consumer for LastBatch {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        *self.0.lock().unwrap() = Some(batch);
        Ok(())
    }
}

impl LastBatch {
    /// Data points of metric `name` in the last batch.
    fn points(&self, name: &str) -> usize {
        let last = self.0.lock().unwrap();
        let Some(Batch::Metrics(rms)) = last.as_ref() else {
            return 0;
        };
        rms.iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .filter(|m| m.name == name)
            .map(|m| match &m.data {
                Some(metric::Data::Sum(s)) => s.data_points.len(),
                _ => 0,
            })
            .sum()
    }
}

async fn start(programs: serde_json::Value) -> (EbpfReceiver, Arc<LastBatch>) {
    let config: EbpfReceiverConfig = parse_component_config(serde_json::json!({
        "collection_interval": "1h",
        "programs": programs,
    }))
    .unwrap();
    let last = Arc::new(LastBatch::default());
    let receiver = EbpfReceiver::new(
        config,
        BuildContext::for_tests("ebpf"),
        ReceiverConsumers {
            metrics: Some(last.clone()),
            traces: None,
            profiles: None,
            logs: None,
        },
    )
    .unwrap();
    receiver.start().await.unwrap();
    for (name, status) in receiver.programs().statuses() {
        assert_eq!(status.phase, Phase::Loaded, "{name}: {}", status.message);
    }
    (receiver, last)
}

/// A counter of `map` by cgroup and write length.
fn by_length_spec(object: &std::path::Path, map: &str) -> serde_json::Value {
    serde_json::json!({
        "object": {"file": object},
        "metrics": {"counters": [{
            "name": format!("bench.{map}"), "map": map, "maxSeries": 100_000,
            "labels": [
                {"field": "cgroup_id", "decoder": "cgroup"},
                {"name": "length", "field": "len", "decoder": "uint"},
            ],
        }]},
    })
}

/// In a child in `pod`'s cgroup: write(999, NULL, len) for each len in `lengths`.
fn writes(pod: &PodCgroup, lengths: std::ops::Range<usize>) {
    let exit = pod.run(move || {
        for len in lengths {
            // SAFETY: a raw write to a descriptor that is not open: EBADF, nothing read.
            unsafe { libc::syscall(libc::SYS_write, 999, std::ptr::null::<u8>(), len) };
        }
        0
    });
    assert_eq!(exit, 0);
}

/// This process's CPU time (user + system, every thread).
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

async fn load_to_first_metric(object: &std::path::Path, pod: &PodCgroup, runs: usize) {
    let (mut loads, mut firsts) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let begin = Instant::now();
        let (receiver, last) =
            start(serde_json::json!({"by-len": by_length_spec(object, "by_len")})).await;
        let loaded = begin.elapsed();
        writes(pod, 1..2);
        receiver.collect_now().await.unwrap();
        let first = begin.elapsed();
        assert_eq!(last.points("bench.by_len"), 1);
        receiver.shutdown().await.unwrap();
        loads.push(loaded.as_secs_f64() * 1e3);
        firsts.push(first.as_secs_f64() * 1e3);
    }
    println!("load to first metric (tp_btf program, 2 maps; median of {runs} runs):");
    println!(
        "  start (read, check, BTF, maps, verifier, attach): {:.1} ms",
        median(loads)
    );
    println!(
        "  first data point delivered:                       {:.1} ms",
        median(firsts)
    );
}

async fn collection_cost(object: &std::path::Path, pod: &PodCgroup, sizes: &[usize], rounds: u32) {
    let (hash, hash_last) =
        start(serde_json::json!({"hash": by_length_spec(object, "by_len")})).await;
    let (per_cpu, per_cpu_last) =
        start(serde_json::json!({"per-cpu": by_length_spec(object, "by_len_cpu")})).await;
    println!(
        "CPU per collection (one cgroup, {rounds} collections each, {} CPUs):",
        num_cpus()
    );
    let mut filled = 0;
    for &n in sizes {
        writes(pod, filled..n);
        filled = n;
        for (kind, receiver, last, metric) in [
            ("hash", &hash, &hash_last, "bench.by_len"),
            ("per-CPU hash", &per_cpu, &per_cpu_last, "bench.by_len_cpu"),
        ] {
            receiver.collect_now().await.unwrap(); // warm: series known
            assert_eq!(last.points(metric), n, "{kind}: data points");
            let before = cpu_time();
            for _ in 0..rounds {
                receiver.collect_now().await.unwrap();
            }
            let per_collection = (cpu_time() - before).as_secs_f64() / rounds as f64;
            println!(
                "  {kind:>12}, {n:>6} entries: {:>7.2} ms per collection, {:>6.2} ms per 10 k entries",
                per_collection * 1e3,
                per_collection * 1e3 * 10_000.0 / n as f64
            );
        }
    }
    hash.shutdown().await.unwrap();
    per_cpu.shutdown().await.unwrap();
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// VmRSS of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Kernel memory held by this process's BPF program and map descriptors (their `memlock`).
fn kernel_memory() -> (u64, u64) {
    let (mut programs, mut maps) = (0, 0);
    for entry in std::fs::read_dir("/proc/self/fdinfo").unwrap().flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let memlock = info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if info.contains("\nprog_id:") {
            programs += memlock;
        } else if info.contains("\nmap_id:") {
            maps += memlock;
        }
    }
    (programs, maps)
}

/// In a process of its own (`PODSCOPE_BENCH_PROGRAMS=N`): N copies of the example program
/// loaded; prints `rss programs maps` in bytes.
async fn memory_child(object: &str, copies: usize) {
    let spec: serde_json::Value = serde_json::json!({
        "object": {"file": object},
        "globals": {"slow_ns": 10_000_000},
        "metrics": {"counters": [{
            "name": "syscount.calls", "map": "calls", "value": "calls",
            "labels": [
                {"field": "cgroup_id", "decoder": "cgroup"},
                {"name": "syscall.name", "field": "nr", "decoder": "syscall"},
                {"name": "error.type", "field": "err", "decoder": "errno"},
            ],
        }]},
    });
    let programs: serde_json::Map<String, serde_json::Value> = (0..copies)
        .map(|i| (format!("syscount-{i}"), spec.clone()))
        .collect();
    let (receiver, _last) = start(programs.into()).await;
    receiver.collect_now().await.unwrap();
    let (prog_bytes, map_bytes) = kernel_memory();
    println!("{} {prog_bytes} {map_bytes}", rss());
    receiver.shutdown().await.unwrap();
}

fn memory_in_child(object: &std::path::Path, copies: usize) -> [f64; 3] {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env("PODSCOPE_BENCH_PROGRAMS", copies.to_string())
        .env("PODSCOPE_BENCH_OBJECT", object)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let numbers: Vec<f64> = text
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    [numbers[0], numbers[1], numbers[2]]
}

fn memory_per_program(object: &std::path::Path, runs: usize) {
    let (mut rss, mut progs, mut maps) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let one = memory_in_child(object, 1);
        let eleven = memory_in_child(object, 11);
        rss.push((eleven[0] - one[0]) / 10.0);
        progs.push((eleven[1] - one[1]) / 10.0);
        maps.push((eleven[2] - one[2]) / 10.0);
    }
    let kib = |v: Vec<f64>| median(v) / 1024.0;
    println!("memory per loaded program (examples/ebpf-program/syscount, 11 vs 1 loaded; median of {runs}):");
    println!("  agent RSS:             {:>8.0} KiB", kib(rss));
    println!("  kernel, programs:      {:>8.0} KiB", kib(progs));
    println!(
        "  kernel, maps:          {:>8.0} KiB ({} CPUs)",
        kib(maps),
        num_cpus()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Ok(copies) = std::env::var("PODSCOPE_BENCH_PROGRAMS") {
        let object = std::env::var("PODSCOPE_BENCH_OBJECT").unwrap();
        return memory_child(&object, copies.parse().unwrap()).await;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let dir = tempfile::tempdir().unwrap();
    let object = compile(dir.path(), "by_len", &format!("{PREAMBLE}{BY_LENGTH}"));
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("helm/podscope/examples/ebpf-program/syscount.bpf.c"),
    )
    .unwrap();
    let syscount = compile(dir.path(), "syscount", &example);
    let (uid, container) = unique_ids();
    let pod = PodCgroup::with_ids(&uid, &container);
    if full {
        load_to_first_metric(&object, &pod, 9).await;
        collection_cost(&object, &pod, &[1_000, 10_000, 50_000], 20).await;
        memory_per_program(&syscount, 3);
    } else {
        load_to_first_metric(&object, &pod, 1).await;
        collection_cost(&object, &pod, &[100], 1).await;
        memory_per_program(&syscount, 1);
    }
}
