//! What the eBPF receiver's root-only tests share: a kubelet-style pod cgroup whose child does
//! exactly known work, a consumer that keeps what the receiver sent, a started receiver, and
//! readers of the data points it produced.
//!
//! Every test file that needs root (`ebpf_probes.rs`, `ebpf_core.rs`) includes this module; each
//! uses a part of it.
#![allow(
    dead_code,
    reason = "each test file that includes this module uses part of it"
)]

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
pub struct PodCgroup {
    /// The directories made for it, removed leaf-first on drop (empty: made elsewhere).
    pub dirs: Vec<PathBuf>,
    pub leaf: PathBuf,
}

impl PodCgroup {
    pub fn new() -> PodCgroup {
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

    /// The path below the cgroup2 mount, as the receiver reports it (`podscope.cgroup.path`).
    pub fn relative_path(&self) -> String {
        let root = cgroup2_mount().expect("a cgroup2 mount");
        format!("/{}", self.leaf.strip_prefix(root).unwrap().display())
    }

    /// The container id the cgroup's name carries.
    pub fn container_id(&self) -> String {
        let name = self.leaf.file_name().unwrap().to_str().unwrap();
        name.trim_start_matches("cri-containerd-")
            .trim_end_matches(".scope")
            .to_string()
    }

    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.leaf).unwrap().ino()
    }

    /// Forks a child that joins this cgroup, runs `work` and exits with its return value.
    /// `work` must only make raw syscalls (it runs between fork and exit of a threaded process).
    pub fn run(&self, work: impl FnOnce() -> i32) -> i32 {
        run_in_cgroup(&self.leaf, work)
    }
}

/// Forks a child that joins the cgroup at `dir`, runs `work` and exits with its return value
/// (asserted normal). `work` must only make raw syscalls (it runs between fork and exit of a
/// threaded process).
pub fn run_in_cgroup(dir: &Path, work: impl FnOnce() -> i32) -> i32 {
    let procs = CString::new(dir.join("cgroup.procs").to_str().unwrap()).unwrap();
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

/// A cgroup of its own at the top of the tree, outside the kubelet's (no other test's cgroup is
/// ever created below it), removed on drop.
pub struct HostCgroup(pub PathBuf);

impl HostCgroup {
    pub fn new() -> HostCgroup {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = cgroup2_mount()
            .expect("a cgroup2 mount")
            .join(format!("podscope-test-{nanos:x}"));
        std::fs::create_dir(&dir).unwrap();
        HostCgroup(dir)
    }

    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.0).unwrap().ino()
    }

    /// The path below the cgroup2 mount (`/podscope-test-…`).
    pub fn relative_path(&self) -> String {
        format!("/{}", self.0.file_name().unwrap().to_str().unwrap())
    }

    /// [`run_in_cgroup`] in this cgroup.
    pub fn run(&self, work: impl FnOnce() -> i32) -> i32 {
        run_in_cgroup(&self.0, work)
    }
}

impl Drop for HostCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
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
pub struct Collected(pub Mutex<Vec<Batch>>);

#[async_trait]
impl Consumer for Collected {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        self.0.lock().unwrap().push(batch);
        Ok(())
    }
}

impl Collected {
    /// How many batches arrived so far.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Every resource of the batches after the first `skip`.
    pub fn since(&self, skip: usize) -> Vec<ResourceMetrics> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .skip(skip)
            .flat_map(|batch| match batch {
                Batch::Metrics(rms) => rms.to_vec(),
                _ => Vec::new(),
            })
            .collect()
    }

    pub fn last(&self) -> Vec<ResourceMetrics> {
        match self.0.lock().unwrap().last() {
            Some(Batch::Metrics(rms)) => rms.to_vec(),
            _ => Vec::new(),
        }
    }
}

pub async fn start(probes: serde_json::Value) -> (EbpfReceiver, Arc<Collected>) {
    let (receiver, collected, _) =
        start_config(serde_json::json!({"collection_interval": "1h", "probes": probes})).await;
    (receiver, collected)
}

/// A started receiver with every probe of `config` attached, its data points and the agent
/// telemetry it registers into.
pub async fn start_config(
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

pub fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
}

pub fn text(v: Option<&any_value::Value>) -> String {
    match v {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// (metric name, data point attributes as `k=v,…`) → value, for one cgroup's resource.
pub fn counters(rms: &[ResourceMetrics], cgroup_id: u64) -> BTreeMap<(String, String), i64> {
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

pub fn distribution(
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
pub fn resources_of(
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
pub fn counts_by(
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

pub fn get(c: &BTreeMap<(String, String), i64>, name: &str, attrs: &str) -> i64 {
    c.get(&(name.to_string(), attrs.to_string()))
        .copied()
        .unwrap_or(0)
}

/// The value of one series in the Prometheus text exposition (`name{labels}` as written).
pub fn exposed(text: &str, series: &str) -> Option<i64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// A TCP socket connected (or not: the return code says) to `ip:port`, with raw syscalls only,
/// for workloads that run between fork and exit.
///
/// # Safety
/// Plain socket syscalls; the caller closes the returned descriptor.
pub unsafe fn connect_v4(ip: [u8; 4], port: u16) -> (i32, i32) {
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
