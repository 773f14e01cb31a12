//! The eBPF probes against real kernel activity (root only; CI runs as root).
//!
//! Each test makes a kubelet-style pod cgroup, forks a child that moves itself into it and then
//! does exactly known work with raw syscalls only (no allocation, no dynamic loading, nothing the
//! test did not ask for), and asserts the receiver's data points for that cgroup.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, ExponentialHistogramDataPoint, ResourceMetrics,
};
use podscope_core::config::parse_component_config;
use podscope_core::{
    Batch, BuildContext, Component as _, ConsumeError, Consumer, ReceiverConsumers,
};
use podscope_receiver::ebpf::{cgroup2_mount, EbpfReceiver, EbpfReceiverConfig};

/// A pod cgroup that exists for the test's lifetime and is removed leaf-first afterwards.
struct PodCgroup {
    dirs: Vec<PathBuf>,
    leaf: PathBuf,
}

impl PodCgroup {
    fn new() -> PodCgroup {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "these tests load eBPF programs and need root"
        );
        let root = cgroup2_mount().expect("a cgroup2 mount");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let unique = format!("{:016x}{:08x}", nanos as u64, std::process::id());
        let uid = format!(
            "{}_{}_{}_{}_{}",
            &unique[0..8],
            &unique[8..12],
            &unique[12..16],
            &unique[16..20],
            "000000000000"
        );
        let container = format!("{unique}{unique}{unique}{unique}")[..64].to_string();
        let dirs = vec![
            root.join("kubepods.slice"),
            root.join("kubepods.slice/kubepods-besteffort.slice"),
            root.join(format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice")),
            root.join(format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/cri-containerd-{container}.scope"
            )),
        ];
        for dir in &dirs {
            // Parents are shared with tests running at the same time: they may appear or vanish.
            for _ in 0..50 {
                match std::fs::create_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
        let leaf = dirs.last().unwrap().clone();
        assert!(leaf.is_dir(), "could not create {}", leaf.display());
        PodCgroup { dirs, leaf }
    }

    fn id(&self) -> u64 {
        std::fs::metadata(&self.leaf).unwrap().ino()
    }

    /// Forks a child that joins this cgroup, runs `work` and exits with its return value.
    /// `work` must only make raw syscalls (it runs between fork and exit of a threaded process).
    fn run(&self, work: impl FnOnce() -> i32) -> i32 {
        let procs = CString::new(self.leaf.join("cgroup.procs").to_str().unwrap()).unwrap();
        // SAFETY: the child only calls async-signal-safe functions before _exit.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(99);
                }
                libc::close(fd);
                libc::_exit(work());
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            assert!(
                libc::WIFEXITED(status),
                "child did not exit normally: {status}"
            );
            libc::WEXITSTATUS(status)
        }
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            // Shared parents stay while another test still uses them.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

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

async fn start(probes: serde_json::Value) -> (EbpfReceiver, Arc<Collected>) {
    let (receiver, collected, _) =
        start_config(serde_json::json!({"collection_interval": "1h", "probes": probes})).await;
    (receiver, collected)
}

/// A started receiver with every probe of `config` attached, its data points and the agent
/// telemetry it registers into.
async fn start_config(
    config: serde_json::Value,
) -> (
    EbpfReceiver,
    Arc<Collected>,
    podscope_core::telemetry::AgentTelemetry,
) {
    let config: EbpfReceiverConfig = parse_component_config(config).unwrap();
    let ctx = BuildContext::for_tests("ebpf");
    let telemetry = ctx.telemetry.clone();
    let collected = Arc::new(Collected::default());
    let receiver = EbpfReceiver::new(
        config,
        ctx,
        ReceiverConsumers {
            metrics: Some(collected.clone()),
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
    (receiver, collected, telemetry)
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
}

fn text(v: Option<&any_value::Value>) -> String {
    match v {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// (metric name, data point attributes as `k=v,…`) → value, for one cgroup's resource.
fn counters(rms: &[ResourceMetrics], cgroup_id: u64) -> BTreeMap<(String, String), i64> {
    let mut out = BTreeMap::new();
    for rm in resources_of(rms, Some(cgroup_id)) {
        for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
            if let Some(metric::Data::Sum(sum)) = &m.data {
                for p in &sum.data_points {
                    let key = p
                        .attributes
                        .iter()
                        .map(|a| {
                            format!(
                                "{}={}",
                                a.key,
                                text(a.value.as_ref().and_then(|v| v.value.as_ref()))
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(",");
                    let Some(number_data_point::Value::AsInt(v)) = p.value else {
                        panic!("int sums")
                    };
                    out.insert((m.name.clone(), key), v);
                }
            }
        }
    }
    out
}

fn distribution(
    rms: &[ResourceMetrics],
    owner: Option<u64>,
    name: &str,
    attrs: &[(&str, &str)],
) -> Option<ExponentialHistogramDataPoint> {
    resources_of(rms, owner)
        .flat_map(|rm| rm.scope_metrics.iter().flat_map(|s| &s.metrics))
        .filter(|m| m.name == name)
        .find_map(|m| match &m.data {
            Some(metric::Data::ExponentialHistogram(h)) => h
                .data_points
                .iter()
                .find(|p| {
                    attrs
                        .iter()
                        .all(|(k, v)| text(attr(&p.attributes, k)) == *v)
                })
                .cloned(),
            _ => None,
        })
}

/// The resources of a cgroup (`Some(id)`) or of the host (`None`).
fn resources_of(
    rms: &[ResourceMetrics],
    cgroup_id: Option<u64>,
) -> impl Iterator<Item = &ResourceMetrics> {
    rms.iter().filter(move |rm| {
        let id = rm
            .resource
            .as_ref()
            .and_then(|r| attr(&r.attributes, "podscope.cgroup.id").cloned());
        match cgroup_id {
            Some(want) => id == Some(any_value::Value::IntValue(want as i64)),
            None => id.is_none(),
        }
    })
}

/// A counter's values summed by one attribute (`label`), e.g. uprobe hits by command.
fn counts_by(
    c: &BTreeMap<(String, String), i64>,
    metric: &str,
    label: &str,
) -> BTreeMap<String, i64> {
    let prefix = format!("{label}=");
    let mut out = BTreeMap::new();
    for ((name, attrs), v) in c {
        if name != metric {
            continue;
        }
        let value = attrs
            .split(',')
            .find_map(|a| a.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("{metric} without {label}: {attrs}"));
        *out.entry(value.to_string()).or_default() += v;
    }
    out
}

fn get(c: &BTreeMap<(String, String), i64>, name: &str, attrs: &str) -> i64 {
    c.get(&(name.to_string(), attrs.to_string()))
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_counts_exact_opens_and_failures_by_errno() {
    let (receiver, collected) =
        start(serde_json::json!({"files": {"capture_paths": true, "top_paths": 5}})).await;
    let pod = PodCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("named-file");
    std::fs::write(&file, b"x").unwrap();
    let file = CString::new(file.to_str().unwrap()).unwrap();
    let missing = CString::new(dir.path().join("missing").to_str().unwrap()).unwrap();
    let code = pod.run(|| unsafe {
        for _ in 0..7 {
            let fd = libc::open(file.as_ptr(), libc::O_RDONLY);
            libc::close(fd);
        }
        for _ in 0..3 {
            libc::open(missing.as_ptr(), libc::O_RDONLY); // ENOENT
        }
        0
    });
    assert_eq!(code, 0);
    receiver.collect_now().await.unwrap();
    let c = counters(&collected.last(), pod.id());
    assert_eq!(get(&c, "podscope.files.opens", ""), 10, "{c:#?}");
    assert_eq!(
        get(&c, "podscope.files.open_errors", "error.type=ENOENT"),
        3,
        "{c:#?}"
    );
    assert_eq!(
        get(
            &c,
            "podscope.files.path_opens",
            &format!("file.path={}", file.to_str().unwrap())
        ),
        7,
        "{c:#?}"
    );
    // The resource names the container from the cgroup path.
    let rms = collected.last();
    let resource = resources_of(&rms, Some(pod.id()))
        .next()
        .unwrap()
        .resource
        .clone()
        .unwrap();
    let container = text(attr(&resource.attributes, "container.id"));
    assert!(pod
        .leaf
        .to_str()
        .unwrap()
        .ends_with(&format!("cri-containerd-{container}.scope")));
    receiver.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syscalls_counts_a_chosen_syscall_exactly_with_errors_and_latency() {
    let (receiver, collected) = start(serde_json::json!({"syscalls": {"latency": true}})).await;
    let pod = PodCgroup::new();
    pod.run(|| unsafe {
        for _ in 0..1000 {
            libc::syscall(libc::SYS_getppid);
        }
        for _ in 0..5 {
            libc::syscall(libc::SYS_close, -1i64); // EBADF
        }
        0
    });
    receiver.collect_now().await.unwrap();
    let rms = collected.last();
    let c = counters(&rms, pod.id());
    assert_eq!(
        get(&c, "podscope.syscalls", "syscall.name=getppid"),
        1000,
        "{c:#?}"
    );
    assert_eq!(
        get(&c, "podscope.syscalls.errors", "syscall.name=getppid"),
        0
    );
    // 5 failing closes, plus the one that closed cgroup.procs after joining.
    assert_eq!(
        get(&c, "podscope.syscalls", "syscall.name=close"),
        6,
        "{c:#?}"
    );
    assert_eq!(
        get(&c, "podscope.syscalls.errors", "syscall.name=close"),
        5,
        "{c:#?}"
    );
    let latency = distribution(
        &rms,
        Some(pod.id()),
        "podscope.syscalls.latency",
        &[("syscall.name", "getppid")],
    )
    .unwrap();
    assert_eq!(latency.count, 1000);
    // getppid takes well under a millisecond: every bucket is below 2^20 ns.
    let buckets = latency.positive.unwrap();
    assert!(
        buckets.offset + buckets.bucket_counts.len() as i32 <= 20,
        "{buckets:?}"
    );
    receiver.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_counts_execs_forks_and_exit_codes() {
    let (receiver, collected) = start(serde_json::json!({"process": {}})).await;
    let pod = PodCgroup::new();
    let sh = CString::new("/bin/sh").unwrap();
    let dash_c = CString::new("-c").unwrap();
    let script = CString::new("exit 3").unwrap();
    pod.run(|| unsafe {
        for _ in 0..4 {
            let pid = libc::fork();
            if pid == 0 {
                let argv = [
                    sh.as_ptr(),
                    dash_c.as_ptr(),
                    script.as_ptr(),
                    std::ptr::null(),
                ];
                libc::execv(sh.as_ptr(), argv.as_ptr());
                libc::_exit(127);
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
        }
        0
    });
    receiver.collect_now().await.unwrap();
    let rms = collected.last();
    let c = counters(&rms, pod.id());
    assert_eq!(get(&c, "podscope.process.forks", ""), 4, "{c:#?}");
    assert_eq!(get(&c, "podscope.process.execs", ""), 4, "{c:#?}");
    assert_eq!(
        get(&c, "podscope.process.exits", "process.exit.code=3"),
        4,
        "{c:#?}"
    );
    assert_eq!(
        get(&c, "podscope.process.exits", "process.exit.code=0"),
        1,
        "the forked child itself: {c:#?}"
    );
    let lifetime = distribution(&rms, Some(pod.id()), "podscope.process.lifetime", &[]).unwrap();
    assert_eq!(lifetime.count, 5);
    receiver.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sched_sees_run_queue_waits_of_two_threads_on_one_cpu() {
    let (receiver, collected) = start(serde_json::json!({"sched": {}})).await;
    let pod = PodCgroup::new();
    pod.run(|| unsafe {
        // Two busy processes pinned to CPU 0 for 300 ms each must wait for each other.
        let mut children = [0; 2];
        for child in &mut children {
            let pid = libc::fork();
            if pid == 0 {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(0, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                let mut start: libc::timespec = std::mem::zeroed();
                libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut start);
                loop {
                    let mut now: libc::timespec = std::mem::zeroed();
                    libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now);
                    let elapsed_ms = (now.tv_sec - start.tv_sec) * 1000
                        + (now.tv_nsec - start.tv_nsec) / 1_000_000;
                    if elapsed_ms >= 300 {
                        break;
                    }
                }
                libc::_exit(0);
            }
            *child = pid;
        }
        for pid in children {
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
        }
        0
    });
    receiver.collect_now().await.unwrap();
    let rms = collected.last();
    let c = counters(&rms, pod.id());
    assert!(
        get(
            &c,
            "podscope.sched.context_switches",
            "podscope.sched.switch=involuntary"
        ) >= 2,
        "{c:#?}"
    );
    assert!(
        get(
            &c,
            "podscope.sched.context_switches",
            "podscope.sched.switch=voluntary"
        ) >= 1,
        "waitpid blocks: {c:#?}"
    );
    let runq = distribution(&rms, Some(pod.id()), "podscope.sched.runqueue.latency", &[]).unwrap();
    assert!(runq.count >= 2, "{runq:?}");
    // Sharing one CPU for 300 ms each, they waited tens of milliseconds in total at least.
    assert!(runq.sum.unwrap() >= 50e6, "{runq:?}");
    receiver.shutdown().await.unwrap();
}

/// A loop device over a temp file, detached on drop.
struct LoopDevice {
    path: String,
    _backing: tempfile::NamedTempFile,
}

impl LoopDevice {
    fn new(bytes: usize) -> Option<LoopDevice> {
        let backing = tempfile::NamedTempFile::new().unwrap();
        backing.as_file().set_len(bytes as u64).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(backing.path())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("losetup failed: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        Some(LoopDevice {
            path: String::from_utf8(out.stdout).unwrap().trim().to_string(),
            _backing: backing,
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.path])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_io_counts_direct_reads_on_a_loop_device() {
    let device = LoopDevice::new(4 << 20).expect("a loop device (losetup, root)");
    let name = device.path.trim_start_matches("/dev/").to_string();
    let (receiver, collected) = start(serde_json::json!({"block_io": {}})).await;
    let before = {
        receiver.collect_now().await.unwrap();
        distribution(
            &collected.last(),
            None,
            "podscope.block.latency",
            &[
                ("system.device", &name),
                ("podscope.block.operation", "read"),
            ],
        )
        .map(|p| p.count)
        .unwrap_or(0)
    };
    let pod = PodCgroup::new();
    let path = CString::new(device.path.clone()).unwrap();
    let code = pod.run(|| unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_DIRECT);
        if fd < 0 {
            return 1;
        }
        let mut buffer: *mut libc::c_void = std::ptr::null_mut();
        if libc::posix_memalign(&mut buffer, 4096, 4096) != 0 {
            return 2;
        }
        for i in 0..16 {
            if libc::pread(fd, buffer, 4096, i * 8192) != 4096 {
                return 3;
            }
        }
        libc::close(fd);
        0
    });
    assert_eq!(code, 0, "direct reads failed");
    receiver.collect_now().await.unwrap();
    let rms = collected.last();
    let latency = distribution(
        &rms,
        None,
        "podscope.block.latency",
        &[
            ("system.device", &name),
            ("podscope.block.operation", "read"),
        ],
    )
    .unwrap();
    assert_eq!(latency.count - before, 16, "{latency:?}");
    let bytes = counters_host(&rms, "podscope.block.io", &name, "read");
    assert!(bytes >= 16 * 4096, "{bytes}");
    receiver.shutdown().await.unwrap();
}

fn counters_host(rms: &[ResourceMetrics], name: &str, device: &str, op: &str) -> i64 {
    resources_of(rms, None)
        .flat_map(|rm| rm.scope_metrics.iter().flat_map(|s| &s.metrics))
        .filter(|m| m.name == name)
        .filter_map(|m| match &m.data {
            Some(metric::Data::Sum(s)) => s
                .data_points
                .iter()
                .find(|p| {
                    text(attr(&p.attributes, "system.device")) == device
                        && text(attr(&p.attributes, "podscope.block.operation")) == op
                })
                .and_then(|p| match p.value {
                    Some(number_data_point::Value::AsInt(v)) => Some(v),
                    _ => None,
                }),
            _ => None,
        })
        .next()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cgroup_filter_drops_unselected_cgroups_in_the_kernel() {
    let pod = PodCgroup::new();
    let other = PodCgroup::new();
    let selected = pod.leaf.file_name().unwrap().to_str().unwrap().to_string();
    let config: EbpfReceiverConfig = parse_component_config(serde_json::json!({
        "collection_interval": "1h",
        "cgroup_filter": {"include": [format!("/kubepods.slice/**/{selected}")]},
        "probes": {"syscalls": {"latency": false}}
    }))
    .unwrap();
    let collected = Arc::new(Collected::default());
    let receiver = EbpfReceiver::new(
        config,
        BuildContext::for_tests("ebpf"),
        ReceiverConsumers {
            metrics: Some(collected.clone()),
            traces: None,
            profiles: None,
        },
    )
    .unwrap();
    receiver.start().await.unwrap();
    for p in [&pod, &other] {
        p.run(|| unsafe {
            for _ in 0..10 {
                libc::syscall(libc::SYS_getppid);
            }
            0
        });
    }
    receiver.collect_now().await.unwrap();
    let rms = collected.last();
    assert_eq!(
        get(
            &counters(&rms, pod.id()),
            "podscope.syscalls",
            "syscall.name=getppid"
        ),
        10
    );
    assert!(
        counters(&rms, other.id()).is_empty(),
        "the other cgroup is filtered out"
    );
    assert_eq!(
        resources_of(&rms, Some(1)).count(),
        0,
        "the root cgroup is filtered out"
    );
    receiver.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_probe_whose_kernel_feature_is_missing_is_skipped_with_a_clear_line_or_fails_when_required(
) {
    let config = |required: bool| -> EbpfReceiverConfig {
        parse_component_config(serde_json::json!({
            "btf_path": "/nonexistent/vmlinux",
            "probes": {"process": {"required": required}, "sched": {}}
        }))
        .unwrap()
    };
    let consumers = || ReceiverConsumers {
        metrics: Some(Arc::new(Collected::default())),
        traces: None,
        profiles: None,
    };
    let receiver =
        EbpfReceiver::new(config(false), BuildContext::for_tests("ebpf"), consumers()).unwrap();
    receiver.start().await.unwrap();
    let skipped: Vec<String> = receiver
        .skipped_probes()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(
        skipped[0].starts_with("probe process: cannot attach tp_btf/sched_process_exec: kernel BTF is not available at /nonexistent/vmlinux"),
        "{skipped:?}"
    );
    assert!(
        skipped[1].starts_with("probe sched: cannot attach tp_btf/sched_wakeup: kernel BTF"),
        "{skipped:?}"
    );
    receiver.shutdown().await.unwrap();

    let receiver =
        EbpfReceiver::new(config(true), BuildContext::for_tests("ebpf"), consumers()).unwrap();
    let error = receiver.start().await.unwrap_err().to_string();
    assert!(
        error.starts_with(
            "probe process: cannot attach tp_btf/sched_process_exec: kernel BTF is not available"
        ),
        "{error}"
    );
    assert!(error.ends_with("(the probe is required)"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_events_feed_the_process_table() {
    let (receiver, _collected) =
        start(serde_json::json!({"process": {"event_poll_interval": "20ms"}})).await;
    let mut child = std::process::Command::new("/bin/sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = child.id();
    let table = receiver.processes();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while table.get(pid).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "exec of pid {pid} never reached the table"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(table.get(pid).unwrap().comm, "sleep");
    child.kill().unwrap();
    child.wait().unwrap();
    while table.get(pid).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "exit of pid {pid} never reached the table"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    receiver.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syscalls_counting_only_mode_counts_exactly_from_the_entry_hook() {
    let (receiver, collected) =
        start(serde_json::json!({"syscalls": {"latency": false, "errors": false}})).await;
    let pod = PodCgroup::new();
    pod.run(|| unsafe {
        for _ in 0..500 {
            libc::syscall(libc::SYS_getppid);
        }
        for _ in 0..5 {
            libc::syscall(libc::SYS_close, -1i64);
        }
        0
    });
    receiver.collect_now().await.unwrap();
    let rms = collected.last();
    let c = counters(&rms, pod.id());
    assert_eq!(
        get(&c, "podscope.syscalls", "syscall.name=getppid"),
        500,
        "{c:#?}"
    );
    // Counted on entry: the 5 failing closes, and the close of cgroup.procs after joining.
    assert_eq!(
        get(&c, "podscope.syscalls", "syscall.name=close"),
        6,
        "{c:#?}"
    );
    assert_eq!(
        get(&c, "podscope.syscalls.errors", "syscall.name=close"),
        0,
        "errors are off"
    );
    assert!(distribution(
        &rms,
        Some(pod.id()),
        "podscope.syscalls.latency",
        &[("syscall.name", "getppid")]
    )
    .is_none());
    receiver.shutdown().await.unwrap();
}

/// Runs `bash -i` on a pseudo-terminal inside `pod` (readline only reads from a terminal), types
/// `lines` one per prompt, and waits for it to exit.
fn interactive_bash(pod: &PodCgroup, lines: &[&str]) {
    interactive_bash_in(pod, None, "/bin/bash", lines, None)
}

/// [`interactive_bash`] with a root to `chroot` into (a fake container image), and a handshake
/// at the first prompt: `handshake.0` is told bash's pid, and typing waits for `handshake.1`.
fn interactive_bash_in(
    pod: &PodCgroup,
    root: Option<&Path>,
    bash: &str,
    lines: &[&str],
    handshake: Option<(std::sync::mpsc::Sender<i32>, std::sync::mpsc::Receiver<()>)>,
) {
    use std::io::{Read as _, Write as _};
    let root = root.map(|r| CString::new(r.to_str().unwrap()).unwrap());
    use std::os::fd::FromRawFd as _;
    let procs = CString::new(pod.leaf.join("cgroup.procs").to_str().unwrap()).unwrap();
    let bash = CString::new(bash).unwrap();
    let args = [
        CString::new("bash").unwrap(),
        CString::new("--norc").unwrap(),
        CString::new("--noprofile").unwrap(),
        CString::new("-i").unwrap(),
    ];
    let env = [
        CString::new("TERM=dumb").unwrap(),
        CString::new("PS1=ready> ").unwrap(),
    ];
    // SAFETY: openpty/fork/exec with owned descriptors; the child only makes raw syscalls.
    unsafe {
        let (mut master, mut slave) = (0, 0);
        assert_eq!(
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null()
            ),
            0
        );
        let pid = libc::fork();
        if pid == 0 {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(99);
            }
            libc::close(fd);
            if let Some(root) = &root {
                if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                    libc::_exit(98);
                }
            }
            libc::setsid();
            libc::ioctl(slave, libc::TIOCSCTTY, 0);
            for target in 0..3 {
                libc::dup2(slave, target);
            }
            libc::close(master);
            let argv = [
                args[0].as_ptr(),
                args[1].as_ptr(),
                args[2].as_ptr(),
                args[3].as_ptr(),
                std::ptr::null(),
            ];
            let envp = [env[0].as_ptr(), env[1].as_ptr(), std::ptr::null()];
            libc::execve(bash.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
        libc::close(slave);
        let mut terminal = std::fs::File::from_raw_fd(master);
        let mut seen = String::new();
        let mut buffer = [0u8; 4096];
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut handshake = handshake;
        for line in lines.iter().chain(std::iter::once(&"exit")) {
            // Wait for the prompt, then type the line.
            let prompts = seen.matches("ready> ").count();
            while seen.matches("ready> ").count() == prompts || seen.is_empty() && prompts == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "bash never prompted: {seen:?}"
                );
                let n = terminal.read(&mut buffer).expect("read the terminal");
                seen.push_str(&String::from_utf8_lossy(&buffer[..n]));
                if seen.matches("ready> ").count() > prompts {
                    break;
                }
            }
            if let Some((up, go)) = handshake.take() {
                up.send(pid).unwrap();
                go.recv().unwrap();
            }
            terminal.write_all(format!("{line}\n").as_bytes()).unwrap();
        }
        // Keep draining until bash exits so it never blocks on a full terminal.
        std::thread::spawn(move || while matches!(terminal.read(&mut buffer), Ok(n) if n > 0) {});
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uprobes_count_bash_commands_like_the_talk_and_a_missing_symbol_spares_the_others() {
    let config: EbpfReceiverConfig = parse_component_config(serde_json::json!({
        "collection_interval": "1h",
        "probes": {"uprobes": [
            {
                "binary": "/bin/bash", "symbol": "readline", "return": true,
                "capture": {"value": "retval", "type": "string", "max_len": 80},
                "metric": {"name": "commands_count", "description": "The number of times a command is invoked via bash",
                           "labels": {"value": "command", "pid": "pid", "node": "nodename"}},
                "redact": ["(?i)password=\\S+"]
            },
            {"binary": "/bin/bash", "symbol": "podscope_no_such_symbol", "metric": {"name": "never"}}
        ]}
    }))
    .unwrap();
    let collected = Arc::new(Collected::default());
    let receiver = EbpfReceiver::new(
        config,
        BuildContext::for_tests("ebpf"),
        ReceiverConsumers {
            metrics: Some(collected.clone()),
            traces: None,
            profiles: None,
        },
    )
    .unwrap();
    receiver.start().await.unwrap();
    let skipped: Vec<String> = receiver
        .skipped_probes()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(
        skipped[0].starts_with(
            "probe uprobes: cannot load: uprobes[1] /bin/bash:podscope_no_such_symbol:"
        ),
        "{skipped:?}"
    );

    let pod = PodCgroup::new();
    let bash = std::thread::scope(|s| {
        s.spawn(|| {
            interactive_bash(
                &pod,
                &["echo one", "echo two", "echo one", "true password=hunter2"],
            )
        })
        .join()
    });
    bash.unwrap();
    receiver.collect_now().await.unwrap();
    let c = counters(&collected.last(), pod.id());
    let commands = counts_by(&c, "commands_count", "command");
    let expected: BTreeMap<String, i64> = [
        ("echo one", 2),
        ("echo two", 1),
        ("true <redacted>", 1),
        ("exit", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(commands, expected, "{c:#?}");
    let any = c.keys().find(|(name, _)| name == "commands_count").unwrap();
    assert!(
        any.1.contains("nodename=test-host") && any.1.contains("pid="),
        "{any:?}"
    );
    receiver.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_counts_connections_bytes_and_refusals_for_the_client_cgroup() {
    use std::io::Read as _;
    let (receiver, collected) = start(serde_json::json!({"tcp": {}})).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let mut received = 0;
        for _ in 0..3 {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buffer = Vec::new();
            stream.read_to_end(&mut buffer).unwrap();
            received += buffer.len();
        }
        received
    });
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // dropped: nothing listens
    let pod = PodCgroup::new();
    let payload = [7u8; 1000];
    let code = pod.run(|| unsafe {
        let connect = |port: u16| connect_v4([127, 0, 0, 1], port);
        for _ in 0..3 {
            let (fd, rc) = connect(port);
            if rc != 0 || libc::write(fd, payload.as_ptr().cast(), payload.len()) != 1000 {
                return 1;
            }
            // Orderly close after the peer acknowledged everything.
            libc::shutdown(fd, libc::SHUT_WR);
            let mut byte = 0u8;
            libc::read(fd, (&mut byte as *mut u8).cast(), 1);
            libc::close(fd);
        }
        let (fd, rc) = connect(closed_port);
        libc::close(fd);
        if rc == 0 {
            2
        } else {
            0
        }
    });
    assert_eq!(code, 0, "the workload's connections did not go as planned");
    assert_eq!(server.join().unwrap(), 3000);
    // Closing happens asynchronously in the kernel: poll until the three closes are counted.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let base = format!("network.transport=tcp,network.type=ipv4,network.peer.address=127.0.0.1,server.port={port},network.peer.port={port},podscope.tcp.role=client");
    loop {
        receiver.collect_now().await.unwrap();
        let c = counters(&collected.last(), pod.id());
        if get(&c, "podscope.tcp.connections.closed", &base) == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "closes not counted: {c:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rms = collected.last();
    let c = counters(&rms, pod.id());
    assert_eq!(
        get(&c, "podscope.tcp.connections.opened", &base),
        3,
        "{c:#?}"
    );
    let io = |direction: &str| {
        c.iter()
            .find(|((name, attrs), _)| {
                name == "podscope.tcp.io"
                    && attrs.contains(&format!("server.port={port}"))
                    && attrs.contains(&format!("network.io.direction={direction}"))
            })
            .map(|(_, v)| *v)
    };
    assert_eq!(
        io("transmit"),
        Some(3000),
        "payload only, not SYN/FIN sequence space: {c:#?}"
    );
    assert_eq!(
        io("receive"),
        Some(0),
        "the server sent nothing back: {c:#?}"
    );
    let refused = c
        .iter()
        .find(|((name, attrs), _)| {
            name == "podscope.tcp.connections.failed"
                && attrs.contains(&format!("server.port={closed_port}"))
        })
        .map(|((_, attrs), v)| (attrs.clone(), *v));
    let (attrs, count) = refused.expect("the refused connection is counted");
    assert_eq!(count, 1);
    assert!(attrs.contains("error.type=refused"), "{attrs}");
    let duration = distribution(
        &rms,
        Some(pod.id()),
        "podscope.tcp.connection.duration",
        &[("server.port", &port.to_string())],
    );
    assert_eq!(duration.map(|d| d.count), Some(3));
    receiver.shutdown().await.unwrap();
}

/// A TCP socket connected (or not: the return code says) to `ip:port`, with raw syscalls only,
/// for workloads that run between fork and exit.
///
/// # Safety
/// Plain socket syscalls; the caller closes the returned descriptor.
unsafe fn connect_v4(ip: [u8; 4], port: u16) -> (i32, i32) {
    // SAFETY: see the function's contract; `addr` outlives the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(ip),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        (fd, rc)
    }
}

/// Two network namespaces joined by a veth pair (IPv4 and IPv6), removed on drop.
struct NetnsPair {
    a: String,
    b: String,
    veth_b: String,
}

impl NetnsPair {
    fn new(tag: &str) -> NetnsPair {
        let id = format!("{:x}", std::process::id() % 0xffff);
        let (a, b) = (format!("ps{tag}a{id}"), format!("ps{tag}b{id}"));
        let (veth_a, veth_b) = (format!("v{tag}a{id}"), format!("v{tag}b{id}"));
        let ip = |args: &str| {
            let status = std::process::Command::new("ip")
                .args(args.split_whitespace())
                .status()
                .expect("ip (iproute2)");
            assert!(status.success(), "ip {args}");
        };
        ip(&format!("netns add {a}"));
        ip(&format!("netns add {b}"));
        let pair = NetnsPair {
            a: a.clone(),
            b: b.clone(),
            veth_b: veth_b.clone(),
        };
        ip(&format!("link add {veth_a} type veth peer name {veth_b}"));
        ip(&format!("link set {veth_a} netns {a}"));
        ip(&format!("link set {veth_b} netns {b}"));
        ip(&format!("-n {a} addr add 10.251.0.1/24 dev {veth_a}"));
        ip(&format!("-n {b} addr add 10.251.0.2/24 dev {veth_b}"));
        ip(&format!("-n {a} -6 addr add fd51::1/64 dev {veth_a} nodad"));
        ip(&format!("-n {b} -6 addr add fd51::2/64 dev {veth_b} nodad"));
        for (ns, dev) in [(&a, &veth_a), (&b, &veth_b)] {
            ip(&format!("-n {ns} link set {dev} up"));
            ip(&format!("-n {ns} link set lo up"));
        }
        pair
    }

    fn ns_fd(name: &str) -> std::fs::File {
        std::fs::File::open(format!("/var/run/netns/{name}")).expect("netns file")
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

/// Two hosts joined by a veth pair: an IPv6 connection, and an IPv4 one that meets an outage.
/// Retransmissions are provoked by taking the veth down for 1.5 s (several RTOs), not with
/// `tc netem` loss: this kernel has no netem qdisc (`tc qdisc add … netem` answers "Specified
/// qdisc kind is unknown", and it ships no modules to load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_across_network_namespaces_counts_ipv6_and_retransmissions() {
    use std::io::Read as _;
    use std::os::fd::AsRawFd as _;
    let (receiver, collected) = start(serde_json::json!({"tcp": {}})).await;
    let net = NetnsPair::new("t");
    // The server lives in namespace b, on a thread that joined it.
    let b_fd = NetnsPair::ns_fd(&net.b);
    let (ports_tx, ports_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with an open namespace fd.
        assert_eq!(
            unsafe { libc::setns(b_fd.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let v4 = std::net::TcpListener::bind("10.251.0.2:0").unwrap();
        let v6 = std::net::TcpListener::bind("[fd51::2]:0").unwrap();
        ports_tx
            .send((
                v4.local_addr().unwrap().port(),
                v6.local_addr().unwrap().port(),
            ))
            .unwrap();
        let mut total = 0;
        // IPv6 first: taking the link down later drops IPv6 addresses (keep_addr_on_down=0).
        for listener in [&v6, &v4] {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buffer = Vec::new();
            stream.read_to_end(&mut buffer).unwrap();
            total += buffer.len();
        }
        total
    });
    let (port4, port6) = ports_rx.recv().unwrap();
    let a_fd = NetnsPair::ns_fd(&net.a);
    let pod = PodCgroup::new();
    // The client pauses between connect and write (a pipe says when) so the link can go down.
    let pipe = || {
        let mut fds = [0; 2];
        // SAFETY: pipe fills the two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        (fds[0], fds[1])
    };
    let ((ready_r, ready_w), (go_r, go_w)) = (pipe(), pipe());
    let a_raw = a_fd.as_raw_fd();
    let flapper = std::thread::spawn({
        let b = net.b.clone();
        let veth = net.veth_b.clone();
        move || unsafe {
            let mut byte = 0u8;
            libc::read(ready_r, (&mut byte as *mut u8).cast(), 1); // client connected
            let down = std::process::Command::new("ip")
                .args(["-n", &b, "link", "set", &veth, "down"])
                .status()
                .unwrap();
            assert!(down.success());
            libc::write(go_w, b"g".as_ptr().cast(), 1);
            std::thread::sleep(Duration::from_millis(1500)); // several RTOs (200 ms minimum)
            let up = std::process::Command::new("ip")
                .args(["-n", &b, "link", "set", &veth, "up"])
                .status()
                .unwrap();
            assert!(up.success());
        }
    });
    let payload = [1u8; 2000];
    let code = pod.run(|| unsafe {
        if libc::setns(a_raw, libc::CLONE_NEWNET) != 0 {
            return 10;
        }
        let mut byte = 0u8;
        // IPv6 first, no outage.
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM, 0);
        let mut addr6: libc::sockaddr_in6 = std::mem::zeroed();
        addr6.sin6_family = libc::AF_INET6 as u16;
        addr6.sin6_port = port6.to_be();
        addr6.sin6_addr.s6_addr = [0xfd, 0x51, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        if libc::connect(
            fd,
            (&addr6 as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as u32,
        ) != 0
        {
            return 13;
        }
        libc::write(fd, payload.as_ptr().cast(), 500);
        libc::shutdown(fd, libc::SHUT_WR);
        libc::read(fd, (&mut byte as *mut u8).cast(), 1);
        libc::close(fd);
        // IPv4, through the outage.
        let (fd, rc) = connect_v4([10, 251, 0, 2], port4);
        if rc != 0 {
            return 11;
        }
        libc::write(ready_w, b"r".as_ptr().cast(), 1);
        libc::read(go_r, (&mut byte as *mut u8).cast(), 1);
        if libc::write(fd, payload.as_ptr().cast(), payload.len()) != 2000 {
            return 12;
        }
        libc::shutdown(fd, libc::SHUT_WR);
        libc::read(fd, (&mut byte as *mut u8).cast(), 1); // returns once the peer closed
        libc::close(fd);
        0
    });
    flapper.join().unwrap();
    assert_eq!(code, 0, "client workload failed");
    assert_eq!(server.join().unwrap(), 2500);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let find = |c: &BTreeMap<(String, String), i64>, name: &str, needle: &str| {
        c.iter()
            .filter(|((n, attrs), _)| n == name && attrs.contains(needle))
            .map(|(_, v)| *v)
            .sum::<i64>()
    };
    loop {
        receiver.collect_now().await.unwrap();
        let c = counters(&collected.last(), pod.id());
        if find(&c, "podscope.tcp.connections.closed", "network.type=ipv6") == 1
            && find(&c, "podscope.tcp.connections.closed", "network.type=ipv4") == 1
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "closes not counted: {c:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = counters(&collected.last(), pod.id());
    assert_eq!(
        find(
            &c,
            "podscope.tcp.connections.opened",
            "network.peer.address=fd51::2"
        ),
        1,
        "{c:#?}"
    );
    assert_eq!(
        find(
            &c,
            "podscope.tcp.connections.opened",
            "network.peer.address=10.251.0.2"
        ),
        1,
        "{c:#?}"
    );
    assert!(
        find(
            &c,
            "podscope.tcp.retransmits",
            "network.peer.address=10.251.0.2"
        ) >= 1,
        "the outage forced retransmissions: {c:#?}"
    );
    assert_eq!(
        find(
            &c,
            "podscope.tcp.io",
            &format!("server.port={port4},network.peer.port={port4},podscope.tcp.role=client,network.io.direction=transmit")
        ),
        2000,
        "{c:#?}"
    );
    assert_eq!(
        find(
            &c,
            "podscope.tcp.io",
            &format!("server.port={port6},network.peer.port={port6},podscope.tcp.role=client,network.io.direction=transmit")
        ),
        500,
        "{c:#?}"
    );
    receiver.shutdown().await.unwrap();
}

/// A function for uprobes on this test binary's own code; `no_mangle` keeps its symbol.
#[no_mangle]
#[inline(never)]
pub extern "C" fn podscope_test_target(value: u64, label: *const libc::c_char) -> u64 {
    std::hint::black_box(label);
    std::hint::black_box(value).wrapping_add(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uprobes_capture_integer_and_string_arguments_on_entry() {
    let exe = std::env::current_exe().unwrap();
    let entry = |capture: serde_json::Value, name: &str| serde_json::json!({"binary": exe, "symbol": "podscope_test_target", "capture": capture, "metric": {"name": name}});
    let config: EbpfReceiverConfig = parse_component_config(serde_json::json!({
        "collection_interval": "1h",
        "probes": {"uprobes": [
            entry(serde_json::json!({"value": "arg1", "type": "int"}), "target_by_value"),
            entry(serde_json::json!({"value": "arg2", "type": "string", "max_len": 4}), "target_by_label"),
        ]}
    }))
    .unwrap();
    let collected = Arc::new(Collected::default());
    let receiver = EbpfReceiver::new(
        config,
        BuildContext::for_tests("ebpf"),
        ReceiverConsumers {
            metrics: Some(collected.clone()),
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
    let pod = PodCgroup::new();
    let (alpha, beta) = (
        CString::new("alpha").unwrap(),
        CString::new("beta").unwrap(),
    );
    let f: extern "C" fn(u64, *const libc::c_char) -> u64 =
        std::hint::black_box(podscope_test_target);
    pod.run(|| {
        for _ in 0..5 {
            f(7, alpha.as_ptr());
        }
        for _ in 0..3 {
            f(9, beta.as_ptr());
        }
        0
    });
    receiver.collect_now().await.unwrap();
    let c = counters(&collected.last(), pod.id());
    let sum = |name: &str, value: &str| -> i64 {
        c.iter()
            .filter(|((n, attrs), _)| n == name && attrs.starts_with(&format!("value={value},")))
            .map(|(_, v)| *v)
            .sum()
    };
    assert_eq!(sum("target_by_value", "7"), 5, "{c:#?}");
    assert_eq!(sum("target_by_value", "9"), 3, "{c:#?}");
    // max_len 4 keeps the first 4 bytes.
    assert_eq!(sum("target_by_label", "alph"), 5, "{c:#?}");
    assert_eq!(sum("target_by_label", "beta"), 3, "{c:#?}");
    receiver.shutdown().await.unwrap();
}

/// A fake container image: the host's bash at `bash` and the libraries it loads, copied under
/// `root` (their own inodes, so a probe on the host's bash cannot see them).
fn fake_image_with_bash(root: &Path, bash: &str) {
    let image_bash = root.join(bash.trim_start_matches('/'));
    std::fs::create_dir_all(image_bash.parent().unwrap()).unwrap();
    std::fs::copy("/bin/bash", &image_bash).unwrap();
    let mut files = Vec::new();
    let ldd = std::process::Command::new("ldd")
        .arg("/bin/bash")
        .output()
        .expect("ldd");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`
        let path = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(path) = path {
            files.push(PathBuf::from(path));
        }
    }
    for file in files {
        let real = std::fs::canonicalize(&file).unwrap();
        for target in [&file, &real] {
            let dest = root.join(target.strip_prefix("/").unwrap());
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            if !dest.exists() {
                std::fs::copy(&real, &dest).unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_uprobe_traces_the_binary_inside_the_containers_root() {
    let config: EbpfReceiverConfig = parse_component_config(serde_json::json!({
        "collection_interval": "1h",
        "probes": {"uprobes": [{
            "binary": "container:/bin/bash", "symbol": "readline", "return": true,
            "capture": {"value": "retval", "type": "string"},
            "metric": {"name": "commands_count", "labels": {"value": "command"}}
        }]}
    }))
    .unwrap();
    let collected = Arc::new(Collected::default());
    let receiver = Arc::new(
        EbpfReceiver::new(
            config,
            BuildContext::for_tests("ebpf"),
            ReceiverConsumers {
                metrics: Some(collected.clone()),
                traces: None,
                profiles: None,
            },
        )
        .unwrap(),
    );
    receiver.start().await.unwrap();
    assert_eq!(
        receiver.skipped_probes().len(),
        0,
        "{:?}",
        receiver
            .skipped_probes()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    );

    let image = tempfile::tempdir().unwrap();
    fake_image_with_bash(image.path(), "/bin/bash");
    let pod = PodCgroup::new();
    let (up_tx, up_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let root = image.path().to_path_buf();
    let bash = std::thread::spawn({
        let leaf = pod.leaf.clone();
        move || {
            let pod = PodCgroup {
                dirs: Vec::new(),
                leaf,
            };
            interactive_bash_in(
                &pod,
                Some(&root),
                "/bin/bash",
                &[
                    "echo before",
                    "echo in-container",
                    "echo in-container",
                    "true",
                ],
                Some((up_tx, go_rx)),
            );
        }
    });
    // bash is up in its container: the next scan attaches to its binary, then it gets typed at.
    tokio::task::spawn_blocking(move || up_rx.recv().unwrap())
        .await
        .unwrap();
    receiver.collect_now().await.unwrap();
    go_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || bash.join().unwrap())
        .await
        .unwrap();
    receiver.collect_now().await.unwrap();

    let c = counters(&collected.last(), pod.id());
    let commands = counts_by(&c, "commands_count", "command");
    // `echo before` returns from the readline call that was already waiting when the probe
    // attached: a uretprobe catches only calls entered after it is in place.
    let expected: BTreeMap<String, i64> = [("echo in-container", 2), ("true", 1), ("exit", 1)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(commands, expected);
    receiver.shutdown().await.unwrap();
}

/// Where the image of the next test keeps bash: a path no other container here has, so that
/// only the test's own container can count as an attachment.
const UNIQUE_BASH: &str = "/opt/podscope-test-image/bin/bash";

/// With the process probe on, a container's first exec makes `container:` uprobes look at it at
/// once, without waiting for the next collection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_uprobe_attaches_when_the_containers_first_process_starts() {
    let (receiver, collected, telemetry) = start_config(serde_json::json!({
        "collection_interval": "1h",
        "probes": {
            "process": {"event_poll_interval": "20ms"},
            "uprobes": [{
                "binary": format!("container:{UNIQUE_BASH}"), "symbol": "readline", "return": true,
                "capture": {"value": "retval", "type": "string"},
                "metric": {"name": "readline_returns", "labels": {"value": "command"}}
            }]
        }
    }))
    .await;
    let attachments = || {
        telemetry
            .encode_text()
            .lines()
            .find_map(|l| l.strip_prefix("podscope_ebpf_uprobe_container_attachments_total "))
            .map(|v| v.trim().to_string())
    };
    // Whatever containers exist already were looked at when the receiver started.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let before: u64 = loop {
        if let Some(v) = attachments() {
            break v.parse().unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no attachment counter"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let image = tempfile::tempdir().unwrap();
    fake_image_with_bash(image.path(), UNIQUE_BASH);
    let pod = PodCgroup::new();
    let (up_tx, up_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let root = image.path().to_path_buf();
    let leaf = pod.leaf.clone();
    let bash = std::thread::spawn(move || {
        let pod = PodCgroup {
            dirs: Vec::new(),
            leaf,
        };
        interactive_bash_in(
            &pod,
            Some(&root),
            UNIQUE_BASH,
            &["echo first", "echo second"],
            Some((up_tx, go_rx)),
        );
    });
    let bash_pid = tokio::task::spawn_blocking(move || up_rx.recv().unwrap())
        .await
        .unwrap();
    // No collection is asked for: the exec event alone leads to the attachment (no other
    // container has this path, so the count is this container's).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while attachments().map(|v| v.parse::<u64>().unwrap()) != Some(before + 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "bash in the new container (pid {bash_pid}) was not attached: {:?} (before: {before})",
            attachments()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    go_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || bash.join().unwrap())
        .await
        .unwrap();
    // Calls entered after the attachment are counted. Whether the first readline call (waiting
    // at the first prompt) was entered before or after the attachment is a race, so `echo first`
    // is not checked; `echo second` and `exit` come from calls entered later.
    receiver.collect_now().await.unwrap();
    let c = counters(&collected.last(), pod.id());
    let commands = counts_by(&c, "readline_returns", "command");
    assert_eq!(
        (commands.get("echo second"), commands.get("exit")),
        (Some(&1), Some(&1)),
        "{c:?}"
    );
    receiver.shutdown().await.unwrap();
}

/// The RTT of a connection that stays open is sampled at every collection (one sample per open
/// connection), not only when it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_samples_the_rtt_of_open_connections_at_each_collection() {
    use std::io::Read as _;
    let (receiver, collected) = start(serde_json::json!({"tcp": {}})).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (accepted_tx, accepted_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).unwrap();
        accepted_tx.send(()).unwrap();
        release_rx.recv().unwrap();
        // Dropping the stream closes it: the client's read returns and it exits.
    });
    let pod = PodCgroup::new();
    let pod_id = pod.id();
    let leaf = pod.leaf.clone();
    let client = std::thread::spawn(move || {
        let pod = PodCgroup {
            dirs: Vec::new(),
            leaf,
        };
        pod.run(|| unsafe {
            let (fd, rc) = connect_v4([127, 0, 0, 1], port);
            if rc != 0 || libc::write(fd, b"x".as_ptr().cast(), 1) != 1 {
                return 1;
            }
            // Held open until the server lets go.
            let mut byte = 0u8;
            libc::read(fd, (&mut byte as *mut u8).cast(), 1);
            libc::close(fd);
            0
        })
    });
    tokio::task::spawn_blocking(move || accepted_rx.recv().unwrap())
        .await
        .unwrap();
    let port_text = port.to_string();
    let open_rtt = |rms: &[ResourceMetrics]| {
        distribution(
            rms,
            Some(pod_id),
            "podscope.tcp.rtt.open",
            &[("server.port", &port_text), ("podscope.tcp.role", "client")],
        )
    };
    for _ in 0..2 {
        receiver.collect_now().await.unwrap();
        let sample = open_rtt(&collected.last()).expect("the open connection is sampled");
        assert_eq!(
            sample.count, 1,
            "one open connection, one sample per collection"
        );
    }
    release_tx.send(()).unwrap();
    server.join().unwrap();
    let code = tokio::task::spawn_blocking(move || client.join().unwrap())
        .await
        .unwrap();
    assert_eq!(code, 0);
    // Closed now: no open sample, and its RTT at close is in the closing distribution.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        receiver.collect_now().await.unwrap();
        let rms = collected.last();
        let closed = distribution(
            &rms,
            Some(pod_id),
            "podscope.tcp.rtt",
            &[("server.port", &port_text)],
        );
        if closed.is_some_and(|d| d.count == 1) {
            assert!(
                open_rtt(&rms).is_none(),
                "a closed connection is not sampled"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the close was not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    receiver.shutdown().await.unwrap();
}

/// Symbols of shared libraries resolve like those of executables: a uprobe on libc's `getpid`
/// (the libc this test process has mapped) counts a child's calls exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uprobe_on_a_shared_library_counts_calls_exactly() {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let libc_path = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
        .expect("libc mapped")
        .to_string();
    let config: EbpfReceiverConfig = parse_component_config(serde_json::json!({
        "collection_interval": "1h",
        "probes": {"uprobes": [{
            "binary": libc_path, "symbol": "getpid",
            "metric": {"name": "getpid_calls"}
        }]}
    }))
    .unwrap();
    let collected = Arc::new(Collected::default());
    let receiver = EbpfReceiver::new(
        config,
        BuildContext::for_tests("ebpf"),
        ReceiverConsumers {
            metrics: Some(collected.clone()),
            traces: None,
            profiles: None,
        },
    )
    .unwrap();
    receiver.start().await.unwrap();
    assert!(receiver.skipped_probes().is_empty());
    let pod = PodCgroup::new();
    let code = pod.run(|| {
        for _ in 0..5 {
            // SAFETY: getpid has no preconditions; it goes through libc's wrapper.
            unsafe { libc::getpid() };
        }
        0
    });
    assert_eq!(code, 0);
    receiver.collect_now().await.unwrap();
    let calls: i64 = counters(&collected.last(), pod.id())
        .iter()
        .filter(|((name, _), _)| name == "getpid_calls")
        .map(|(_, v)| *v)
        .sum();
    assert_eq!(calls, 5);
    receiver.shutdown().await.unwrap();
}

#[test]
fn a_map_that_is_missing_or_of_another_type_is_a_load_error_naming_it() {
    use podscope_receiver::ebpf::object::{
        KernelFeatures, MapDef, ObjectSettings, ProbeObject, ProbeSpec,
    };
    let spec = |maps: &'static [MapDef]| ProbeSpec {
        name: "process",
        object: podscope_ebpf::objects::PROCESS,
        programs: &[],
        maps,
    };
    let features = KernelFeatures::detect(Path::new("/sys/kernel/btf/vmlinux"));
    let load = |spec: &ProbeSpec| {
        ProbeObject::load(
            spec,
            &features,
            &[],
            &Default::default(),
            &ObjectSettings::default(),
        )
    };
    let error = |r: Result<_, podscope_receiver::ebpf::ProbeError>| r.err().unwrap().to_string();

    // A map the probe declares but the object lacks.
    const MISSPELT: &[MapDef] = &[MapDef::entries("process_count")];
    assert_eq!(
        error(load(&spec(MISSPELT)).map(drop)),
        "probe process: cannot load: map process_count: missing from the object"
    );
    let mut object = load(&spec(&[])).unwrap();
    assert_eq!(
        error(
            object
                .hash::<u64, u64>(&MapDef::entries("process_count"))
                .map(drop)
        ),
        "probe process: cannot load: map process_count: missing from the object"
    );
    // process_counts is keyed by a 16-byte struct.
    assert_eq!(
        error(object.hash::<u64, u64>(&MapDef::entries("process_counts")).map(drop)),
        "probe process: cannot load: map process_counts: not a hash map of the probe's key and value types (invalid key size 8, expected 16)"
    );
    // process_lifetime is a plain hash map (type 1), not a per-CPU one.
    assert_eq!(
        error(
            object
                .per_cpu_hash::<u64, u64>(&MapDef::entries("process_lifetime"), |a, b| *a += b)
                .map(drop)
        ),
        "probe process: cannot load: map process_lifetime: not a per-CPU hash map of the probe's key and value types (invalid map type 1)"
    );
}

/// The value of one series in the Prometheus text exposition (`name{labels}` as written).
fn exposed(text: &str, series: &str) -> Option<i64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_map_memory_is_reported_as_bpftool_reads_it() {
    // A filter that selects no cgroup: no map gains or loses entries while the figures are
    // compared (block_io is not filtered by cgroup, so it is left out).
    let (receiver, _collected, telemetry) = start_config(serde_json::json!({
        "collection_interval": "1h",
        "cgroup_filter": {"include": ["/podscope-test-selects-nothing"]},
        "probes": {"process": {}, "syscalls": {}, "files": {}, "sched": {}, "tcp": {}}
    }))
    .await;
    receiver.collect_now().await.unwrap();
    let maps = receiver.map_memory();
    let bpftool = std::process::Command::new("bpftool")
        .args(["map", "show", "-j"])
        .output()
        .expect("bpftool (scripts/install-deps.sh installs it)");
    assert!(bpftool.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&bpftool.stdout).unwrap();
    let memlock_of = |id: u32| {
        shown
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .and_then(|m| m["bytes_memlock"].as_u64())
    };

    let probes: std::collections::BTreeSet<&str> = maps.iter().map(|m| m.probe).collect();
    assert_eq!(
        probes.into_iter().collect::<Vec<_>>(),
        ["files", "process", "sched", "syscalls", "tcp"]
    );
    let text = telemetry.encode_text();
    let mut total = 0;
    for m in &maps {
        assert_eq!(
            memlock_of(m.id),
            Some(m.bytes),
            "{}/{} (map id {}): bpftool's bytes_memlock",
            m.probe,
            m.map,
            m.id
        );
        assert_eq!(
            exposed(
                &text,
                &format!(
                    "podscope_ebpf_map_memory_bytes{{probe=\"{}\",map=\"{}\"}}",
                    m.probe, m.map
                )
            ),
            Some(m.bytes as i64),
            "{text}"
        );
        total += m.bytes;
    }
    // Every probe map is there, and the big preallocated ones weigh what bpftool says.
    for (probe, map) in [
        ("process", "process_counts"),
        ("process", "process_events"),
        ("syscalls", "syscall_counts"),
        ("syscalls", "syscall_latency"),
        ("sched", "runnable_since"),
        ("tcp", "tcp_live"),
    ] {
        assert!(
            maps.iter().any(|m| m.probe == probe && m.map == map),
            "{probe}/{map} missing from {maps:?}"
        );
    }
    assert_eq!(
        exposed(&text, "podscope_ebpf_map_memory_total_bytes"),
        Some(total as i64)
    );
    receiver.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_map_counts_every_refused_insert() {
    let pod = PodCgroup::new();
    let selected = pod.leaf.file_name().unwrap().to_str().unwrap().to_string();
    // Room for two (kind, exit code) keys of the pod's cgroup.
    let (receiver, collected, telemetry) = start_config(serde_json::json!({
        "collection_interval": "1h",
        "cgroup_filter": {"include": [format!("/kubepods.slice/**/{selected}")]},
        "probes": {"process": {"max_entries": {"process_counts": 2}}}
    }))
    .await;
    // The kernel filter lists the pod once a collection ran.
    receiver.collect_now().await.unwrap();
    let series = "podscope_ebpf_map_full_total{probe=\"process\",map=\"process_counts\"}";
    assert_eq!(exposed(&telemetry.encode_text(), series), Some(0));

    // Five children exit with codes 1 to 5, then the pod's process with 0: the fork key and the
    // exit-code-1 key fill the map; the exits with 2, 3, 4, 5 and 0 find it full.
    let status = pod.run(|| unsafe {
        for code in 1..=5 {
            let pid = libc::fork();
            if pid == 0 {
                libc::_exit(code);
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
        }
        0
    });
    assert_eq!(status, 0);
    receiver.collect_now().await.unwrap();
    let c = counters(&collected.last(), pod.id());
    assert_eq!(get(&c, "podscope.process.forks", ""), 5, "{c:#?}");
    assert_eq!(
        get(&c, "podscope.process.exits", "process.exit.code=1"),
        1,
        "{c:#?}"
    );
    assert_eq!(c.len(), 2, "only the two keys that fit: {c:#?}");
    assert_eq!(exposed(&telemetry.encode_text(), series), Some(5));
    receiver.shutdown().await.unwrap();
}
