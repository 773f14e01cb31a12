//! What the eBPF receiver's root-only tests share beyond `podscope-testkit`: a cgroup outside the
//! kubelet's, a started receiver recording what it sends, and readers of the data points it
//! produced.
//!
//! Every test file that needs root (`ebpf_probes.rs`, `ebpf_core.rs`) includes this module; each
//! uses a part of it.
#![allow(
    dead_code,
    reason = "each test file that includes this module uses part of it"
)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, ExponentialHistogramDataPoint, ResourceMetrics,
};
use podscope_core::config::parse_component_config;
use podscope_core::{BuildContext, Component as _, ReceiverConsumers};
use podscope_receiver::ebpf::{cgroup2_mount, EbpfReceiver, EbpfReceiverConfig};
use podscope_testkit::pod_cgroup::run_in_cgroup;
use podscope_testkit::{BuildContextForTests as _, Recorder};

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

pub async fn start(probes: serde_json::Value) -> (EbpfReceiver, Arc<Recorder>) {
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
    Arc<Recorder>,
    podscope_core::telemetry::AgentTelemetry,
) {
    let config: EbpfReceiverConfig = parse_component_config(config).unwrap();
    let ctx = BuildContext::for_tests("ebpf");
    let telemetry = ctx.telemetry.clone();
    let collected = Arc::new(Recorder::default());
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
