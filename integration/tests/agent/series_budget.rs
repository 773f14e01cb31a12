//! The default config's series budget (issue 11 point 6): the real agent runs
//! `configs/default.yaml` (its ports moved to free ones, and a `file` exporter beside the others
//! to see the data points it sent) over kubelet-style pod cgroups that each run the same small
//! workload — programs, a failing open, a TCP connection — and the series its Prometheus endpoint
//! serves per container are exactly what `docs/metrics.md`'s formula gives for those data points
//! (one per counter point; a histogram's buckets from its lowest to its highest, a zero bucket if
//! it has zeros, `+Inf`, `_sum` and `_count`; one `target_info`), within 100 per container and
//! 10,000 for a node of 100 pods.

use std::collections::BTreeMap;
use std::io::{BufRead as _, Write as _};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::metrics::v1::{metric, ResourceMetrics};
use podscope_integration::agent::{free_port, AgentProcess};
use podscope_testkit::pod_cgroup::unique_ids;
use podscope_testkit::PodCgroup;

const PODS: usize = 10;

/// The default config with free ports, and the metrics pipeline also writing to `file`.
fn default_config(prometheus: u16, telemetry: u16, file: &std::path::Path) -> String {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/default.yaml"))
            .expect("configs/default.yaml");
    let moved = [
        ("0.0.0.0:4317", format!("127.0.0.1:{}", free_port())),
        ("0.0.0.0:4318", format!("127.0.0.1:{}", free_port())),
        ("0.0.0.0:9464", format!("127.0.0.1:{prometheus}")),
        ("127.0.0.1:8888", format!("127.0.0.1:{telemetry}")),
        (
            "exporters: [prometheus, debug]",
            "exporters: [prometheus, debug, file]".to_string(),
        ),
        (
            "exporters:\n",
            format!("exporters:\n  file:\n    path: {}\n", file.display()),
        ),
    ];
    let mut config = text;
    for (from, to) in moved {
        assert_eq!(
            config.matches(from).count(),
            1,
            "{from} in configs/default.yaml"
        );
        config = config.replacen(from, &to, 1);
    }
    config
}

fn string_attr<'a>(
    attributes: &'a [opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<&'a str> {
    attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        }
    })
}

/// The series the formula gives for one resource's data points, by metric.
fn formula(rm: &ResourceMetrics) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
        let series = match &m.data {
            Some(metric::Data::Sum(s)) => s.data_points.len(),
            Some(metric::Data::ExponentialHistogram(h)) => h
                .data_points
                .iter()
                .map(|p| {
                    let span = p.positive.as_ref().map_or(0, |b| b.bucket_counts.len());
                    span + usize::from(p.zero_count > 0) + 3
                })
                .sum(),
            other => panic!("{}: unexpected {other:?}", m.name),
        };
        *out.entry(m.name.clone()).or_default() += series;
    }
    out
}

/// The series of one container at the Prometheus endpoint (by its cgroup path label), by family
/// (the metric name before `_bucket`/`_sum`/`_count`/`_total`, `target_info` apart).
fn served(page: &str, path: &str) -> BTreeMap<String, usize> {
    let label = format!("podscope_cgroup_path=\"{path}\"");
    let mut out = BTreeMap::new();
    for line in page
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(&label))
    {
        let name = line.split(['{', ' ']).next().unwrap().to_string();
        *out.entry(name).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_config_serves_the_series_its_formula_gives_within_the_budget() {
    // A server each pod connects to once: one peer, one server port.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = std::io::BufReader::new(stream);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = reader.get_mut().write_all(b"ok\n");
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.jsonl");
    let (prometheus, telemetry) = (free_port(), free_port());
    let config = default_config(prometheus, telemetry, &file);
    let agent = AgentProcess::start(env!("CARGO_BIN_EXE_podscope"), &config, telemetry).await;

    // Each pod: three programs exiting 0, one failing to open a file (exit 1), one TCP
    // connection, then a marker and a sleep (its cgroup stays, with nothing more to count).
    let mut pods = Vec::new();
    for i in 0..PODS {
        let (uid, container) = unique_ids();
        let mut pod = PodCgroup::with_ids(&uid, &container);
        let done = dir.path().join(format!("done-{i}"));
        pod.spawn_shell(&format!(
            "/bin/true; /bin/true; /bin/true; /bin/cat /nonexistent-podscope-test 2>/dev/null; \
             /bin/bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}; echo hi >&3; read -u 3 answer'; \
             : > {}; exec /bin/sleep 3600",
            done.display()
        ));
        pods.push((pod, done));
        std::thread::sleep(Duration::from_millis(2)); // unique ids come from the clock
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pods.iter().all(|(_, done)| done.exists()) {
        assert!(
            Instant::now() < deadline,
            "the pods' workloads did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Two more collections (5 s apart) after the last pod finished: the last carries each pod's
    // final figures.
    let lines = |file: &std::path::Path| {
        std::fs::read_to_string(file)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let seen = lines(&file);
    while lines(&file) < seen + 2 {
        assert!(
            Instant::now() < deadline,
            "no collection reached the file exporter"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page = reqwest::get(format!("http://127.0.0.1:{prometheus}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let mut latest: BTreeMap<String, ResourceMetrics> = BTreeMap::new();
    for line in text.lines() {
        let request: ExportMetricsServiceRequest = serde_json::from_str(line).unwrap();
        for rm in request.resource_metrics {
            let attributes = rm
                .resource
                .as_ref()
                .map(|r| r.attributes.as_slice())
                .unwrap_or_default();
            if let Some(path) = string_attr(attributes, "podscope.cgroup.path") {
                latest.insert(path.to_string(), rm);
            }
        }
    }

    let mut most = 0;
    for (pod, _) in &pods {
        let path = pod.relative_path();
        let rm = latest
            .get(path)
            .unwrap_or_else(|| panic!("no data points for {path}"));
        let mut want = formula(rm);
        let got = served(&page, path);
        let want_total: usize = want.values().sum::<usize>() + 1; // + target_info
        let got_total: usize = got.values().sum();
        want.insert("target_info".to_string(), 1);
        assert_eq!(
            got_total, want_total,
            "{path}: the endpoint serves {got:#?}, the formula gives {want:#?}"
        );
        most = most.max(got_total);
    }
    assert!(most <= 100, "{most} series for one container");
    // The node's own series (block devices, and cgroups outside any pod) beside 100 pods'.
    let pod_paths: Vec<&str> = pods.iter().map(|(p, _)| p.relative_path()).collect();
    let others = page
        .lines()
        .filter(|l| !l.starts_with('#') && l.starts_with("podscope_"))
        .filter(|l| !pod_paths.iter().any(|p| l.contains(&format!("\"{p}\""))))
        .count();
    eprintln!(
        "most series for one container: {most}; the node's other cgroups and devices: {others}"
    );
    assert!(
        100 * most + others <= 10_000,
        "100 pods of {most} series and {others} others"
    );
    agent.sigterm();
    assert!(agent.wait(Duration::from_secs(30)).await.success());
}
