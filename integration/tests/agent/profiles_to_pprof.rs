//! The `pprof` exporter end to end, through the real `podscope` binary running the shipped
//! `configs/profiling-pprof.yaml` (its interval, frequency, cgroup filter and ports set for a
//! test): a C program built here without frame pointers burns CPU in a known call chain in a
//! kubelet-style pod cgroup whose pod the API server (the repo's fake, speaking real Kubernetes
//! JSON) serves; the agent writes one gzip pprof file per container and interval, named after
//! the pod, which the `pprof-format` npm package (a decoder we did not write) reads back with
//! exactly the samples of the same interval's OTLP profile the `file` exporter wrote beside it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use podscope_integration::agent::{free_port, AgentProcess};
use podscope_integration::fake_kube::FakeApiServer;
use podscope_integration::pprof_format;
use podscope_integration::test_programs::{compile_c, cpu_seconds, ended, BURN_C, BURN_CHAIN};
use podscope_testkit::pod_cgroup::unique_ids;
use podscope_testkit::PodCgroup;

const NODE: &str = "node-pprof";
const FREQUENCY: f64 = 99.0;

fn pod(uid: &str, container_id: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("burner-5c8d7".into()),
            namespace: Some("perf".into()),
            uid: Some(uid.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(NODE.into()),
            containers: vec![Container {
                name: "burn".into(),
                image: Some("registry.example.com/perf/burn:1.0".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            container_statuses: Some(vec![ContainerStatus {
                name: "burn".into(),
                container_id: Some(format!("containerd://{container_id}")),
                image: "registry.example.com/perf/burn:1.0".into(),
                image_id: "registry.example.com/perf/burn@sha256:00".into(),
                ready: true,
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// The shipped config with a short interval, 99 Hz, only the test's pod and a free port.
fn shipped_config(cgroup_path: &str, telemetry_port: u16) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/profiling-pprof.yaml"
    ))
    .expect("configs/profiling-pprof.yaml");
    let changes = [
        (
            "collection_interval: 10s",
            "collection_interval: 2s".to_string(),
        ),
        ("frequency: 19", "frequency: 99".to_string()),
        (
            r#"include: ["/kubepods.slice/**", "/kubepods/**"]"#,
            format!(r#"include: ["{cgroup_path}"]"#),
        ),
        (
            "auth_type: serviceAccount",
            "auth_type: kubeConfig".to_string(),
        ),
        ("127.0.0.1:8888", format!("127.0.0.1:{telemetry_port}")),
    ];
    let mut config = text;
    for (from, to) in changes {
        assert_eq!(config.matches(from).count(), 1, "{from} in the config");
        config = config.replacen(from, &to, 1);
    }
    config
}

fn int(value: &serde_json::Value) -> i64 {
    value
        .as_i64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

/// One OTLP profile of the container, as the `file` exporter wrote it.
#[derive(Debug)]
struct OtlpProfile {
    resource: BTreeMap<String, String>,
    start_unix_nanos: i64,
    sample_total: i64,
}

fn otlp_profiles(path: &Path, container_id: &str) -> Vec<OtlpProfile> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rsplit_once('\n').map_or("", |(whole, _)| whole);
    let mut found = Vec::new();
    for line in complete.lines() {
        let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        for rp in value["resourceProfiles"].as_array().into_iter().flatten() {
            let resource: BTreeMap<String, String> = rp["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|kv| {
                    Some((
                        kv["key"].as_str()?.to_string(),
                        kv["value"]["stringValue"].as_str()?.to_string(),
                    ))
                })
                .collect();
            if resource.get("container.id").map(String::as_str) != Some(container_id) {
                continue;
            }
            for sp in rp["scopeProfiles"].as_array().into_iter().flatten() {
                for profile in sp["profiles"].as_array().into_iter().flatten() {
                    found.push(OtlpProfile {
                        resource: resource.clone(),
                        start_unix_nanos: int(&profile["timeUnixNano"]),
                        sample_total: profile["samples"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|s| int(&s["values"][0]))
                            .sum(),
                    });
                }
            }
        }
    }
    found
}

/// `unix_nanos` as the exporter writes it in names: UTC `YYYYMMDDTHHMMSSZ`, computed here by
/// the civil-from-days algorithm rather than by the code under test.
fn compact_utc(unix_nanos: i64) -> String {
    let seconds = unix_nanos.div_euclid(1_000_000_000);
    let (days, in_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_interval_of_a_pod_is_a_pprof_file_named_after_it_with_the_otlp_sample_total() {
    let work = tempfile::tempdir().unwrap();
    let burn = compile_c(
        work.path(),
        "burn",
        BURN_C,
        &["-O2", "-fomit-frame-pointer"],
    );
    let (uid, container_id) = unique_ids();
    let mut cgroup = PodCgroup::with_ids(&uid, &container_id);
    let api = FakeApiServer::start().await;
    api.apply_pod(pod(&uid, &container_id));
    let kubeconfig = work.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let pprof_dir = work.path().join("pprof");
    let otlp_file = work.path().join("profiles.jsonl");
    let telemetry_port = free_port();
    let agent = AgentProcess::start_with_env(
        env!("CARGO_BIN_EXE_podscope"),
        &shipped_config(cgroup.relative_path(), telemetry_port),
        telemetry_port,
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", NODE),
            ("PODSCOPE_PPROF_DIR", pprof_dir.to_str().unwrap()),
            ("PODSCOPE_PROFILES", otlp_file.to_str().unwrap()),
        ],
    )
    .await;

    let pid = cgroup.spawn_shell(&format!("exec {} 3", burn.display()));
    let deadline = Instant::now() + Duration::from_secs(90);
    while !ended(pid) {
        assert!(Instant::now() < deadline, "the program did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expected = cpu_seconds(pid) * FREQUENCY;
    // The last interval's profile comes at the next collection: poll for most of the samples.
    loop {
        let total: i64 = otlp_profiles(&otlp_file, &container_id)
            .iter()
            .map(|p| p.sample_total)
            .sum();
        if total as f64 >= 0.8 * expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{total} samples of about {expected:.0} within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.sigterm();
    assert!(agent.wait(Duration::from_secs(60)).await.success());

    // Both exporters got the same batches: one file per OTLP profile, with its exact total.
    let profiles = otlp_profiles(&otlp_file, &container_id);
    let short_id = &container_id[..12];
    let mut names: Vec<String> = std::fs::read_dir(&pprof_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), profiles.len(), "{names:?} for {profiles:?}");
    let mut chained = 0;
    let mut total = 0;
    for profile in &profiles {
        assert_eq!(
            profile.resource.get("k8s.pod.name").map(String::as_str),
            Some("burner-5c8d7"),
            "enriched by k8sattributes"
        );
        let name = format!(
            "burner-5c8d7_perf_burn-{short_id}.{}.cpu.pb.gz",
            compact_utc(profile.start_unix_nanos)
        );
        assert!(names.contains(&name), "{name} in {names:?}");
        let decoded = pprof_format::decode(&pprof_dir.join(&name));
        assert_eq!(
            decoded.sample_types,
            vec![("samples".to_string(), "count".to_string())]
        );
        assert_eq!(decoded.total(), profile.sample_total, "{name}");
        assert!(decoded
            .samples
            .iter()
            .all(|s| s.labels.contains(&format!("container.id={container_id}"))));
        total += decoded.total();
        chained += decoded
            .samples
            .iter()
            .filter(|s| {
                s.functions
                    .windows(BURN_CHAIN.len())
                    .any(|w| w == BURN_CHAIN)
            })
            .map(|s| s.values[0])
            .sum::<i64>();
    }
    assert!(
        chained as f64 >= 0.9 * total as f64,
        "{chained} of {total} samples carry the chain"
    );
}
