//! Users' own eBPF programs (`receivers.ebpf.programs`) against real kernel activity (root only;
//! CI runs as root). Each program is C compiled here with clang, as a user would build it; a
//! forked child in a kubelet-style pod cgroup does exactly known work with raw syscalls, and the
//! metrics the spec names are asserted with exact values.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, Metric, ResourceMetrics};
use podscope_core::config::parse_component_config;
use podscope_core::{
    Batch, BuildContext, Component as _, ConsumeError, Consumer, ReceiverConsumers,
};
use podscope_integration::bpf::{compile, PREAMBLE};
use podscope_receiver::ebpf::programs::Phase;
use podscope_receiver::ebpf::{EbpfReceiver, EbpfReceiverConfig};
use podscope_testkit::pod_cgroup::{unique_ids, PodCgroup};
use podscope_testkit::BuildContextForTests as _;

/// getppid calls per cgroup, on the classic tracepoint; the syscall is a global set by the spec.
const CGROUP_COUNTER: &str = r#"
const volatile __u32 only_tgid = 0;
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, __u64);
    __type(value, __u64);
} calls SEC(".maps");

SEC("tracepoint/syscalls/sys_enter_getppid")
int count_getppid(void *ctx)
{
    __u64 cgroup = bpf_get_current_cgroup_id();
    __u64 one = 1, *count = bpf_map_lookup_elem(&calls, &cgroup);
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        bpf_map_update_elem(&calls, &cgroup, &one, BPF_NOEXIST);
    return 0;
}
"#;

/// getppid calls per cgroup and command name (a struct key with a string field), from the
/// raw tracepoint, in a per-CPU hash.
const COMM_COUNTER: &str = r#"
const volatile long syscall_nr = -1;
struct comm_key {
    __u64 cgroup_id;
    char comm[16];
};
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_HASH);
    __uint(max_entries, 1024);
    __type(key, struct comm_key);
    __type(value, __u64);
} by_comm SEC(".maps");

SEC("raw_tp/sys_enter")
int count_by_comm(void *ctx)
{
    /* raw_tp/sys_enter: args[0] the registers, args[1] the syscall number */
    if (((long *)ctx)[1] != syscall_nr)
        return 0;
    struct comm_key key = { .cgroup_id = bpf_get_current_cgroup_id() };
    bpf_get_current_comm(&key.comm, sizeof(key.comm));
    __u64 one = 1, *count = bpf_map_lookup_elem(&by_comm, &key);
    if (count)
        *count += 1;
    else
        bpf_map_update_elem(&by_comm, &key, &one, BPF_NOEXIST);
    return 0;
}
"#;

/// write(999, …) sizes as an exp2 histogram per cgroup (bucket k: (2^(k-1), 2^k]), on tp_btf.
const WRITE_SIZES: &str = r#"
struct size_key {
    __u64 cgroup_id;
    __u32 bucket;
    __u32 pad;
};
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4096);
    __type(key, struct size_key);
    __type(value, __u64);
} write_sizes SEC(".maps");

static __always_inline __u32 exp2_bucket(__u64 v)
{
    __u32 k = 0;
    if (v <= 1)
        return 0;
    v -= 1;
    while (v && k < 64) {
        v >>= 1;
        k++;
    }
    return k;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(on_write, struct pt_regs *regs, long id)
{
    if (id != 1 || regs->di != 999)
        return 0;
    struct size_key key = { .cgroup_id = bpf_get_current_cgroup_id(), .bucket = exp2_bucket(regs->dx) };
    __u64 one = 1, *count = bpf_map_lookup_elem(&write_sizes, &key);
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        bpf_map_update_elem(&write_sizes, &key, &one, BPF_NOEXIST);
    return 0;
}
"#;

#[derive(Default)]
struct Collected(Mutex<Vec<Batch>>);

#[async_trait]
impl Consumer for Collected {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        self.0.lock().unwrap().push(batch);
        Ok(())
    }
}

impl Collected {
    fn last(&self) -> Vec<ResourceMetrics> {
        match self.0.lock().unwrap().last() {
            Some(Batch::Metrics(rms)) => rms.to_vec(),
            _ => Vec::new(),
        }
    }
}

async fn start(config: serde_json::Value) -> (EbpfReceiver, Arc<Collected>) {
    let config: EbpfReceiverConfig = parse_component_config(config).unwrap();
    let collected = Arc::new(Collected::default());
    let receiver = EbpfReceiver::new(
        config,
        BuildContext::for_tests("ebpf"),
        ReceiverConsumers {
            metrics: Some(collected.clone()),
            traces: None,
            profiles: None,
            logs: None,
        },
    )
    .unwrap();
    receiver.start().await.unwrap();
    (receiver, collected)
}

/// The metrics of the resource of cgroup `id`.
fn metrics_of(rms: &[ResourceMetrics], id: u64) -> Vec<Metric> {
    rms.iter()
        .filter(|rm| {
            rm.resource.as_ref().is_some_and(|r| {
                r.attributes.iter().any(|a| {
                    a.key == "podscope.cgroup.id"
                        && matches!(a.value.as_ref().and_then(|v| v.value.as_ref()), Some(any_value::Value::IntValue(i)) if *i as u64 == id)
                })
            })
        })
        .flat_map(|rm| rm.scope_metrics.iter().flat_map(|s| s.metrics.clone()))
        .collect()
}

/// Counter points of `name` as `k=v,…` → value.
fn counter(metrics: &[Metric], name: &str) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for m in metrics.iter().filter(|m| m.name == name) {
        if let Some(metric::Data::Sum(sum)) = &m.data {
            for p in &sum.data_points {
                let labels: Vec<String> = p
                    .attributes
                    .iter()
                    .map(|a| match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(any_value::Value::StringValue(s)) => format!("{}={s}", a.key),
                        other => format!("{}={other:?}", a.key),
                    })
                    .collect();
                let value = match p.value {
                    Some(number_data_point::Value::AsInt(i)) => i,
                    _ => -1,
                };
                out.insert(labels.join(","), value);
            }
        }
    }
    out
}

const GETPPID: libc::c_long = libc::SYS_getppid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_cgroup_tracepoint_counter_and_a_struct_key_with_a_string_count_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let counter_object = compile(
        dir.path(),
        "counter",
        &format!("{PREAMBLE}{CGROUP_COUNTER}"),
    );
    let comm_object = compile(dir.path(), "comm", &format!("{PREAMBLE}{COMM_COUNTER}"));
    let (uid, container) = unique_ids();
    let pod = PodCgroup::with_ids(&uid, &container);
    let (receiver, collected) = start(serde_json::json!({
        "collection_interval": "1h",
        "programs": {
            "getppid": {
                "object": {"file": counter_object},
                "metrics": {"counters": [{
                    "name": "test.getppid.calls", "unit": "{call}", "map": "calls",
                    "labels": [{"decoder": "cgroup"}],
                }]},
            },
            "by-comm": {
                "object": {"file": comm_object},
                "globals": {"syscall_nr": GETPPID},
                "metrics": {"counters": [{
                    "name": "test.calls.by_comm", "map": "by_comm",
                    "labels": [
                        {"field": "cgroup_id", "decoder": "cgroup"},
                        {"name": "process.command", "field": "comm", "decoder": "string"},
                    ],
                }]},
            },
        },
    }))
    .await;
    let statuses = receiver.programs().statuses();
    for (name, status) in &statuses {
        assert_eq!(status.phase, Phase::Loaded, "{name}: {}", status.message);
    }
    assert_eq!(
        statuses["getppid"].attached,
        ["tracepoint/syscalls/sys_enter_getppid (count_getppid)"]
    );

    let exit = pod.run(|| {
        // SAFETY: prctl and getppid with valid arguments; raw syscalls only (see `run`).
        unsafe {
            libc::prctl(libc::PR_SET_NAME, c"podscope-t1".as_ptr());
            for _ in 0..37 {
                libc::syscall(GETPPID);
            }
        }
        0
    });
    assert_eq!(exit, 0);
    receiver.collect_now().await.unwrap();
    let metrics = metrics_of(&collected.last(), pod.id());
    assert_eq!(
        counter(&metrics, "test.getppid.calls"),
        BTreeMap::from([(String::new(), 37)])
    );
    assert_eq!(
        counter(&metrics, "test.calls.by_comm"),
        BTreeMap::from([("process.command=podscope-t1".to_string(), 37)])
    );
    let unit = metrics
        .iter()
        .find(|m| m.name == "test.getppid.calls")
        .unwrap()
        .unit
        .clone();
    assert_eq!(unit, "{call}");
    receiver.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exp2_histogram_map_becomes_an_exponential_histogram() {
    let dir = tempfile::tempdir().unwrap();
    let object = compile(dir.path(), "sizes", &format!("{PREAMBLE}{WRITE_SIZES}"));
    let (uid, container) = unique_ids();
    let pod = PodCgroup::with_ids(&uid, &container);
    let (receiver, collected) = start(serde_json::json!({
        "collection_interval": "1h",
        "programs": {"sizes": {
            "object": {"file": object},
            "metrics": {"histograms": [{
                "name": "test.write.size", "unit": "By", "map": "write_sizes",
                "bucketType": "exp2", "bucketField": "bucket",
                "labels": [{"field": "cgroup_id", "decoder": "cgroup"}],
            }]},
        }},
    }))
    .await;
    let status = &receiver.programs().statuses()["sizes"];
    assert_eq!(status.phase, Phase::Loaded, "{}", status.message);
    pod.run(|| {
        let buffer = [0u8; 2048];
        for size in [1usize, 2, 3, 4, 5, 1000, 1024, 1025] {
            // SAFETY: write(2) on a closed descriptor (EBADF) from a valid buffer.
            unsafe { libc::syscall(libc::SYS_write, 999, buffer.as_ptr(), size) };
        }
        0
    });
    receiver.collect_now().await.unwrap();
    let metrics = metrics_of(&collected.last(), pod.id());
    let histogram = metrics
        .iter()
        .find(|m| m.name == "test.write.size")
        .expect("the histogram");
    let Some(metric::Data::ExponentialHistogram(h)) = &histogram.data else {
        panic!("not an exponential histogram: {histogram:?}");
    };
    let point = &h.data_points[0];
    assert_eq!((point.count, point.scale, point.zero_count), (8, 0, 0));
    let buckets = point.positive.as_ref().unwrap();
    // OTLP scale 0, index i = (2^i, 2^(i+1)]: 1 → -1, 2 → 0, 3 and 4 → 1, 5 → 2, 1000 and
    // 1024 → 9, 1025 → 10.
    assert_eq!(buckets.offset, -1);
    assert_eq!(
        buckets.bucket_counts,
        vec![1, 1, 2, 1, 0, 0, 0, 0, 0, 0, 2, 1]
    );
    receiver.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_programs_fail_alone_with_the_reason_while_a_good_one_counts() {
    let dir = tempfile::tempdir().unwrap();
    let good = compile(dir.path(), "good", &format!("{PREAMBLE}{CGROUP_COUNTER}"));
    let garbage = dir.path().join("garbage.bpf.o");
    std::fs::write(&garbage, b"this is not an ELF object, just bytes").unwrap();
    let unknown = compile(
        dir.path(),
        "unknown",
        &format!("{PREAMBLE}SEC(\"bogus/section\") int nothing(void *ctx) {{ return 0; }}\n"),
    );
    // Reads a map value without checking it for NULL: the verifier refuses.
    let rejected = compile(
        dir.path(),
        "rejected",
        &format!(
            "{PREAMBLE}{}",
            r#"
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16);
    __type(key, __u64);
    __type(value, __u64);
} calls SEC(".maps");
SEC("tracepoint/syscalls/sys_enter_getppid")
int unchecked(void *ctx)
{
    __u64 key = 0;
    __u64 *count = bpf_map_lookup_elem(&calls, &key);
    *count += 1;
    return 0;
}
"#
        ),
    );
    let spec = |object: &Path| {
        serde_json::json!({
            "object": {"file": object},
            "metrics": {"counters": [{"name": "test.calls", "map": "calls", "labels": [{"decoder": "cgroup"}]}]},
        })
    };
    let (uid, container) = unique_ids();
    let pod = PodCgroup::with_ids(&uid, &container);
    let (receiver, collected) = start(serde_json::json!({
        "collection_interval": "1h",
        "probes": {"sched": {}},
        "programs": {
            "good": spec(&good),
            "garbage": spec(&garbage),
            "unknown": spec(&unknown),
            "rejected": spec(&rejected),
        },
    }))
    .await;
    let statuses = receiver.programs().statuses();
    assert_eq!(
        statuses["good"].phase,
        Phase::Loaded,
        "{}",
        statuses["good"].message
    );
    for (name, reason) in [
        ("garbage", "not an ELF object"),
        (
            "unknown",
            "program nothing: unknown section \"bogus/section\"",
        ),
        ("rejected", "the verifier rejected it"),
    ] {
        let status = &statuses[name];
        assert_eq!(status.phase, Phase::Failed, "{name}");
        assert!(
            status.message.contains(reason),
            "{name}: {}",
            status.message
        );
        assert!(status.attached.is_empty());
    }
    // The verifier's own words, trimmed to its last lines.
    let verifier = &statuses["rejected"].message;
    assert!(
        verifier.contains("invalid mem access 'map_value_or_null'"),
        "{verifier}"
    );
    assert!(verifier.len() < 2048, "{} bytes", verifier.len());
    assert_eq!(receiver.programs().loaded(), ["good"]);

    pod.run(|| {
        for _ in 0..11 {
            // SAFETY: getppid has no arguments.
            unsafe { libc::syscall(GETPPID) };
        }
        0
    });
    receiver.collect_now().await.unwrap();
    let rms = collected.last();
    let metrics = metrics_of(&rms, pod.id());
    assert_eq!(
        counter(&metrics, "test.calls"),
        BTreeMap::from([(String::new(), 11)])
    );
    // The built-in probe beside them still runs.
    assert!(
        rms.iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|s| &s.metrics)
            .any(|m| m.name == "podscope.sched.context_switches"),
        "the sched probe still reports"
    );
    // Its maps are in the kernel budget.
    let memory = receiver.map_memory();
    assert!(
        memory
            .iter()
            .any(|m| m.probe == "programs" && m.map == "good/calls" && m.bytes > 0),
        "{memory:?}"
    );
    receiver.shutdown().await.unwrap();
}

/// The function the uprobe test program watches. `no_mangle` keeps its name in the symbol table.
#[no_mangle]
#[inline(never)]
pub extern "C" fn podscope_test_probed_function(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_mul(3)
}

/// A uprobe and a uretprobe counting into an array (index 0 entries, 1 returns), the uprobe's
/// argument bucketed linearly (width 10, 5 buckets) into a second array, perf_event samples
/// in a per-CPU array, and a task iterator counting the tasks of one process (a global) each
/// time it runs.
const OTHER_KINDS: &str = r#"
const volatile __u32 target_tgid = 0;
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2);
    __type(key, __u32);
    __type(value, __u64);
} calls SEC(".maps");
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 5);
    __type(key, __u32);
    __type(value, __u64);
} arg_buckets SEC(".maps");
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} samples SEC(".maps");
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} tasks_seen SEC(".maps");

static __always_inline void add(void *map, __u32 index)
{
    __u64 *count = bpf_map_lookup_elem(map, &index);
    if (count)
        __sync_fetch_and_add(count, 1);
}

SEC("uprobe")
int BPF_KPROBE(on_entry, __u64 x)
{
    add(&calls, 0);
    __u32 k = x == 0 ? 0 : (__u32)((x + 9) / 10);
    add(&arg_buckets, k > 4 ? 4 : k);
    return 0;
}

SEC("uretprobe")
int on_return(void *ctx)
{
    add(&calls, 1);
    return 0;
}

SEC("perf_event")
int on_sample(void *ctx)
{
    __u32 zero = 0;
    __u64 *count = bpf_map_lookup_elem(&samples, &zero);
    if (count)
        *count += 1;
    return 0;
}

SEC("iter/task")
int count_tasks(struct bpf_iter__task *ctx)
{
    struct task_struct *task = ctx->task;
    if (task && task->tgid == target_tgid)
        add(&tasks_seen, 0);
    return 0;
}
"#;

/// Every data point of counter `name` in `rms` as `labels → value` (all resources).
fn counter_everywhere(rms: &[ResourceMetrics], name: &str) -> BTreeMap<String, i64> {
    let metrics: Vec<Metric> = rms
        .iter()
        .flat_map(|rm| rm.scope_metrics.iter().flat_map(|s| s.metrics.clone()))
        .collect();
    counter(&metrics, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uprobes_perf_events_iterators_array_maps_and_linear_histograms() {
    let dir = tempfile::tempdir().unwrap();
    let object = compile(dir.path(), "kinds", &format!("{PREAMBLE}{OTHER_KINDS}"));
    // One single-threaded process for the iterator to find, stopped when the test ends.
    let mut sleeper = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let sleeper = Kill(&mut sleeper);
    let exe = std::env::current_exe().unwrap();
    let ctx = BuildContext::for_tests("ebpf");
    let telemetry = ctx.telemetry.clone();
    let collected = Arc::new(Collected::default());
    let config: EbpfReceiverConfig = parse_component_config(serde_json::json!({
        "collection_interval": "1h",
        "programs": {"kinds": {
            "object": {"file": object},
            "globals": {"target_tgid": sleeper.0.id()},
            "attach": [
                {"program": "on_entry", "binary": exe, "symbol": "podscope_test_probed_function"},
                {"program": "on_return", "binary": exe, "symbol": "podscope_test_probed_function"},
                {"program": "on_sample", "frequency": 997},
            ],
            "metrics": {
                "counters": [
                    {"name": "test.calls", "map": "calls",
                     "labels": [{"name": "phase", "decoder": "static_map", "values": {"0": "entry", "1": "return"}}]},
                    {"name": "test.calls.capped", "map": "calls", "maxSeries": 1,
                     "labels": [{"name": "index", "decoder": "uint"}]},
                    {"name": "test.samples", "map": "samples"},
                    {"name": "test.tasks", "map": "tasks_seen"},
                ],
                "histograms": [
                    {"name": "test.arg", "map": "arg_buckets", "bucketType": "linear",
                     "bucketWidth": 10, "bucketCount": 5},
                ],
            },
        }},
    }))
    .unwrap();
    let receiver = EbpfReceiver::new(
        config,
        ctx,
        ReceiverConsumers {
            metrics: Some(collected.clone()),
            traces: None,
            profiles: None,
            logs: None,
        },
    )
    .unwrap();
    receiver.start().await.unwrap();
    let status = &receiver.programs().statuses()["kinds"];
    assert_eq!(status.phase, Phase::Loaded, "{}", status.message);
    assert_eq!(
        status.attached,
        [
            "iter/task (count_tasks)",
            "uprobe (on_entry)",
            "uretprobe (on_return)",
            "perf_event (on_sample)",
        ]
    );

    for x in [5, 10, 15, 100, 0, 23, 7] {
        std::hint::black_box(podscope_test_probed_function(std::hint::black_box(x)));
    }
    // CPU time for the sampler: a busy second at most, until a sample is seen.
    let spin_until = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while std::time::Instant::now() < spin_until {
        std::hint::black_box((0..10_000u64).sum::<u64>());
    }
    receiver.collect_now().await.unwrap();
    let rms = collected.last();
    assert_eq!(
        counter_everywhere(&rms, "test.calls"),
        BTreeMap::from([
            ("phase=entry".to_string(), 7),
            ("phase=return".to_string(), 7)
        ])
    );
    // maxSeries 1: the first label set is kept, the other counted as overflow.
    assert_eq!(counter_everywhere(&rms, "test.calls.capped").len(), 1);
    let overflow = "podscope_ebpf_program_series_overflow_total{program=\"kinds\",metric=\"test.calls.capped\"}";
    let text = telemetry.encode_text();
    assert!(text.contains(&format!("{overflow} 1")), "{text}");
    // The iterator ran once, at this collection, and saw the sleeper's one task.
    assert_eq!(
        counter_everywhere(&rms, "test.tasks"),
        BTreeMap::from([(String::new(), 1)])
    );
    let samples = counter_everywhere(&rms, "test.samples")[""];
    assert!(samples > 0, "perf_event samples per-CPU summed: {samples}");
    let histogram = rms
        .iter()
        .flat_map(|rm| rm.scope_metrics.iter().flat_map(|s| s.metrics.clone()))
        .find(|m| m.name == "test.arg")
        .expect("the linear histogram");
    let Some(metric::Data::Histogram(h)) = &histogram.data else {
        panic!("not an explicit histogram: {histogram:?}");
    };
    let point = &h.data_points[0];
    // Bounds 0, 10, 20, 30: 0 → ≤0; 5, 10, 7 → (0,10]; 15 → (10,20]; 23 → (20,30]; 100 → the rest.
    assert_eq!(point.explicit_bounds, vec![0.0, 10.0, 20.0, 30.0]);
    assert_eq!(point.bucket_counts, vec![1, 3, 1, 1, 1]);
    assert_eq!(point.count, 7);

    receiver.collect_now().await.unwrap();
    assert_eq!(
        counter_everywhere(&collected.last(), "test.tasks"),
        BTreeMap::from([(String::new(), 2)]),
        "the iterator runs at each collection"
    );
    receiver.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_limits_and_a_wrong_sha256_fail_a_program_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let counter = compile(
        dir.path(),
        "counter",
        &format!("{PREAMBLE}{CGROUP_COUNTER}"),
    );
    // 1 M preallocated entries of 16 bytes: far over a 1 MiB budget.
    let big = compile(
        dir.path(),
        "big",
        &format!(
            "{PREAMBLE}{}",
            r#"
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1048576);
    __type(key, __u64);
    __type(value, __u64);
} calls SEC(".maps");
SEC("tracepoint/syscalls/sys_enter_getppid")
int big(void *ctx)
{
    __u64 key = 0, one = 1;
    bpf_map_update_elem(&calls, &key, &one, BPF_ANY);
    return 0;
}
"#
        ),
    );
    let bytes = std::fs::read(&counter).unwrap();
    let spec = |object: &Path| {
        serde_json::json!({
            "object": {"file": object},
            "metrics": {"counters": [{"name": "test.calls", "map": "calls", "labels": [{"decoder": "cgroup"}]}]},
        })
    };
    let mut wrong_sum = spec(&counter);
    wrong_sum["sha256"] = "0".repeat(64).into();
    let mut right_sum = spec(&counter);
    right_sum["sha256"] = podscope_receiver::ebpf::programs::sha256_hex(&bytes).into();
    let too_large = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(vec![0u8; bytes.len() + 4097])
    };
    let (receiver, _collected) = start(serde_json::json!({
        "collection_interval": "1h",
        "user_programs": {"limits": {
            "allowed_types": ["tracepoint"],
            "max_map_memory_bytes": 1048576,
            "max_object_bytes": bytes.len() + 4096,
        }},
        "programs": {
            "right-sum": right_sum,
            "wrong-sum": wrong_sum,
            "big-map": spec(&big),
            "raw-tp": {
                "object": {"file": compile(dir.path(), "comm", &format!("{PREAMBLE}{COMM_COUNTER}"))},
                "metrics": {"counters": [{"name": "test.by_comm", "map": "by_comm"}]},
            },
            "too-large": {
                "object": {"base64": too_large},
                "metrics": {"counters": [{"name": "test.calls", "map": "calls"}]},
            },
        },
    }))
    .await;
    let statuses = receiver.programs().statuses();
    assert_eq!(
        statuses["right-sum"].phase,
        Phase::Loaded,
        "{}",
        statuses["right-sum"].message
    );
    for (name, reason) in [
        ("wrong-sum", "the object's SHA-256 is"),
        ("big-map", "user programs may hold 1048576 bytes together"),
        (
            "raw-tp",
            "program count_by_comm (raw_tp/sys_enter): raw_tp programs are not allowed here",
        ),
        ("too-large", "(user_programs.limits.max_object_bytes)"),
    ] {
        let status = &statuses[name];
        assert_eq!(status.phase, Phase::Failed, "{name}: {}", status.message);
        assert!(
            status.message.contains(reason),
            "{name}: {}",
            status.message
        );
    }
    assert_eq!(receiver.programs().loaded(), ["right-sum"]);
    receiver.shutdown().await.unwrap();
}
