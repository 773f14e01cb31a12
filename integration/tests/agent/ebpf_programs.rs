//! `EbpfProgram` objects end to end (root): the real `podscope` binary against the fake API
//! server (its CRDs, watch, server-side apply of status, Events; checked with kubectl), with
//! two pods in kubelet-style cgroups made by the test. A program from a ConfigMap counts getppid
//! calls per cgroup for the pods its podSelector picks (through the `podscope_pods` map),
//! exactly, with pod attributes; programs that are garbage, have an unknown section or are
//! refused by the verifier each get a Failed status with the reason and an Event, while the good
//! one keeps counting; an update is loaded with its new generation; a node no longer selected and
//! a deletion detach the program.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use podscope_integration::agent::{free_port, AgentProcess};
use podscope_integration::bpf::{compile, PREAMBLE};
use podscope_integration::fake_kube::FakeApiServer;
use podscope_testkit::pod_cgroup::{unique_ids, PodCgroup};
use serde_json::{json, Value};

const NODE: &str = "node-programs";

/// getppid calls per cgroup, only for cgroups the agent lists in `podscope_pods`.
const COUNTER: &str = r#"
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, __u64);
    __type(value, __u8);
} podscope_pods SEC(".maps");
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
    if (!bpf_map_lookup_elem(&podscope_pods, &cgroup))
        return 0;
    __u64 one = 1, *count = bpf_map_lookup_elem(&calls, &cgroup);
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        bpf_map_update_elem(&calls, &cgroup, &one, BPF_NOEXIST);
    return 0;
}
"#;

const UNCHECKED: &str = r#"
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
"#;

fn pod(name: &str, uid: &str, app: &str, container_id: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            uid: Some(uid.into()),
            labels: Some(BTreeMap::from([("app".into(), app.into())])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(NODE.into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            container_statuses: Some(vec![k8s_openapi::api::core::v1::ContainerStatus {
                name: "app".into(),
                container_id: Some(format!("containerd://{container_id}")),
                image: "registry.example.com/shop/app:1.0".into(),
                image_id: String::new(),
                ready: true,
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

fn node(labels: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(NODE.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn program(name: &str, object: Value, metric: &str) -> Value {
    json!({
        "apiVersion": "podscope.dev/v1alpha1",
        "kind": "EbpfProgram",
        "metadata": {"name": name},
        "spec": {
            "object": object,
            "nodeSelector": {"matchLabels": {"podscope.dev/programs": "on"}},
            "podSelector": {"matchLabels": {"app": "web"}},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}},
            "metrics": {"counters": [{
                "name": metric, "unit": "{call}", "map": "calls",
                "labels": [{"decoder": "cgroup"}],
            }]},
        },
    })
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// (resource attributes, metric name, value) of every sum data point from line `from` on.
fn points(out: &Path, from: usize) -> Vec<(BTreeMap<String, String>, String, i64)> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let complete = text.rsplit_once('\n').map_or("", |(whole, _)| whole);
    let mut found = Vec::new();
    for line in complete.lines().skip(from) {
        let value: Value = serde_json::from_str(line).expect("a JSON line");
        for rm in value["resourceMetrics"].as_array().into_iter().flatten() {
            let attributes: BTreeMap<String, String> = rm["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|kv| {
                    let v = &kv["value"];
                    let text = v["stringValue"]
                        .as_str()
                        .map(str::to_string)
                        .or_else(|| v["intValue"].as_str().map(str::to_string))
                        .unwrap_or_else(|| v.to_string());
                    (kv["key"].as_str().unwrap_or("").to_string(), text)
                })
                .collect();
            for sm in rm["scopeMetrics"].as_array().into_iter().flatten() {
                for m in sm["metrics"].as_array().into_iter().flatten() {
                    for p in m["sum"]["dataPoints"].as_array().into_iter().flatten() {
                        let value = p["asInt"]
                            .as_str()
                            .and_then(|v| v.parse().ok())
                            .or(p["asInt"].as_i64())
                            .unwrap_or(-1);
                        found.push((
                            attributes.clone(),
                            m["name"].as_str().unwrap_or("").to_string(),
                            value,
                        ));
                    }
                }
            }
        }
    }
    found
}

/// Waits until a collection no longer has metrics named `prefix…`, then three more, and checks
/// none of those has them either: the program is detached and stays so.
async fn stays_detached(out: &Path, prefix: &str) {
    let has = |line: &str| line.contains(&format!("\"name\":\"{prefix}"));
    let mark = line_count(out);
    let first = until(&format!("a collection without {prefix}"), || {
        let text = std::fs::read_to_string(out).unwrap_or_default();
        let complete = text.rsplit_once('\n').map_or("", |(whole, _)| whole);
        complete
            .lines()
            .enumerate()
            .skip(mark)
            .find(|(_, l)| !has(l))
            .map(|(i, _)| i)
    })
    .await;
    until("three more collections", || {
        (line_count(out) > first + 4).then_some(())
    })
    .await;
    let text = std::fs::read_to_string(out).unwrap();
    let late: Vec<&str> = text.lines().skip(first).filter(|l| has(l)).collect();
    assert!(late.is_empty(), "{prefix} came back: {late:?}");
}

fn line_count(out: &Path) -> usize {
    std::fs::read_to_string(out)
        .map(|t| t.matches('\n').count())
        .unwrap_or(0)
}

/// Waits (at most 60 s) for `condition` to hold of the fake's state, returning its value.
async fn until<T>(what: &str, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// This node's entry of the program's status, once it has one for `generation`.
async fn node_status(api: &FakeApiServer, name: &str, generation: i64) -> Value {
    until(
        &format!("status of {name} at generation {generation}"),
        || {
            let object = api.custom("EbpfProgram", "", name)?;
            let entry = object["status"]["nodes"]
                .as_array()?
                .iter()
                .find(|e| e["node"] == NODE)?
                .clone();
            (entry["observedGeneration"] == generation).then_some(entry)
        },
    )
    .await
}

/// The value of `metric` for the resource of `cgroup_path` in the first line after `from` that
/// has it.
async fn next_value(
    out: &Path,
    from: usize,
    metric: &str,
    cgroup_path: &str,
) -> (BTreeMap<String, String>, i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((attributes, _, value)) = points(out, from).into_iter().find(|(a, name, _)| {
            name == metric && a.get("podscope.cgroup.path").map(String::as_str) == Some(cgroup_path)
        }) {
            return (attributes, value);
        }
        assert!(
            Instant::now() < deadline,
            "no {metric} for {cgroup_path} after line {from} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn getppid_calls(pod: &PodCgroup, n: usize) {
    let exit = pod.run(|| {
        for _ in 0..n {
            // SAFETY: getppid has no arguments; raw syscalls only (see PodCgroup::run).
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
        0
    });
    assert_eq!(exit, 0);
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let binary = ["/usr/bin/kubectl", "/usr/local/bin/kubectl"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("kubectl (scripts/install-deps.sh installs it)");
    let home = kubeconfig.parent().unwrap();
    let output = std::process::Command::new(binary)
        .env_clear()
        .env("HOME", home)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(home.join("kubectl-cache"))
        .arg("--request-timeout=15s")
        .args(args)
        .output()
        .expect("run kubectl");
    assert!(
        output.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_programs_from_the_cluster_count_selected_pods_report_status_and_follow_changes() {
    let dir = tempfile::tempdir().unwrap();
    let counter = std::fs::read(compile(
        dir.path(),
        "counter",
        &format!("{PREAMBLE}{COUNTER}"),
    ))
    .unwrap();
    let unknown = std::fs::read(compile(
        dir.path(),
        "unknown",
        &format!("{PREAMBLE}SEC(\"bogus/section\") int nothing(void *ctx) {{ return 0; }}\n"),
    ))
    .unwrap();
    let unchecked = std::fs::read(compile(
        dir.path(),
        "unchecked",
        &format!("{PREAMBLE}{UNCHECKED}"),
    ))
    .unwrap();

    let (web_uid, web_container) = unique_ids();
    let web = PodCgroup::with_ids(&web_uid, &web_container);
    let (db_uid, db_container) = unique_ids();
    let db = PodCgroup::with_ids(&db_uid, &db_container);

    let api = FakeApiServer::start().await;
    api.apply_node(node(&[("podscope.dev/programs", "on")]));
    api.apply_pod(pod("web-0", &web_uid, "web", &web_container));
    api.apply_pod(pod("db-0", &db_uid, "db", &db_container));
    api.apply_config_map(ConfigMap {
        metadata: ObjectMeta {
            name: Some("programs".into()),
            namespace: Some("observability".into()),
            ..Default::default()
        },
        binary_data: Some(BTreeMap::from([(
            "counter.bpf.o".to_string(),
            ByteString(counter.clone()),
        )])),
        ..Default::default()
    });
    let from_config_map = json!({"configMap": {"namespace": "observability", "name": "programs", "key": "counter.bpf.o"}});
    api.apply_custom(program(
        "getppid",
        from_config_map.clone(),
        "test.getppid.calls",
    ));
    api.apply_custom(program(
        "garbage",
        json!({"base64": base64(b"not an object at all")}),
        "test.garbage",
    ));
    api.apply_custom(program(
        "unknown-section",
        json!({"base64": base64(&unknown)}),
        "test.unknown",
    ));
    api.apply_custom(program(
        "rejected",
        json!({"base64": base64(&unchecked)}),
        "test.rejected",
    ));

    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let out = dir.path().join("out.jsonl");
    let telemetry_port = free_port();
    let config = format!(
        r#"
extensions:
  k8s_metadata:
    auth_type: kubeConfig
    filter: {{ node: {NODE} }}
receivers:
  ebpf:
    collection_interval: 300ms
    user_programs: {{ extension: k8s_metadata }}
    # The pods' cgroups (users' points go through the filter like the probes'), and the root:
    # something to collect at every interval, so that collections go on once programs detach.
    cgroup_filter: {{ include: ["/", "/kubepods.slice/**"] }}
    probes: {{ sched: {{ required: true }} }}
processors:
  k8sattributes: {{ extension: k8s_metadata }}
exporters:
  file: {{ path: {out} }}
service:
  extensions: [k8s_metadata]
  telemetry: {{ metrics: {{ address: "127.0.0.1:{telemetry_port}" }} }}
  pipelines:
    metrics: {{ receivers: [ebpf], processors: [k8sattributes], exporters: [file] }}
"#,
        out = out.display()
    );
    let agent = AgentProcess::start_with_env(
        env!("CARGO_BIN_EXE_podscope"),
        &config,
        telemetry_port,
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .await;

    // Loaded on this node; its status written by this node's field manager.
    let status = node_status(&api, "getppid", 1).await;
    assert_eq!(status["phase"], "Loaded", "{status}");
    assert_eq!(
        status["attachedPrograms"],
        json!(["tracepoint/syscalls/sys_enter_getppid (count_getppid)"])
    );
    // Only the web pod is selected: exact counts for it, nothing for db.
    getppid_calls(&web, 25);
    getppid_calls(&db, 40);
    let (attributes, value) = next_value(
        &out,
        line_count(&out),
        "test.getppid.calls",
        web.relative_path(),
    )
    .await;
    assert_eq!(value, 25);
    assert_eq!(
        attributes.get("k8s.pod.name").map(String::as_str),
        Some("web-0"),
        "{attributes:?}"
    );
    assert_eq!(
        attributes.get("k8s.namespace.name").map(String::as_str),
        Some("shop")
    );
    assert!(
        points(&out, 0)
            .iter()
            .all(|(a, name, _)| name != "test.getppid.calls"
                || a.get("podscope.cgroup.path").map(String::as_str) != Some(db.relative_path())),
        "the db pod is not selected"
    );

    // Each bad program fails alone, with its reason in its status and an Event.
    for (name, reason) in [
        ("garbage", "not an ELF object"),
        ("unknown-section", "unknown section \"bogus/section\""),
        ("rejected", "the verifier rejected it"),
    ] {
        let status = node_status(&api, name, 1).await;
        assert_eq!(status["phase"], "Failed", "{name}: {status}");
        let message = status["message"].as_str().unwrap_or("");
        assert!(message.contains(reason), "{name}: {message}");
        until(&format!("an Event for {name}"), || {
            api.events().into_iter().find(|e| {
                e["involvedObject"]["name"] == name
                    && e["reason"] == "LoadFailed"
                    && e["type"] == "Warning"
                    && e["message"].as_str().is_some_and(|m| m.contains(reason))
            })
        })
        .await;
    }
    let rejected = node_status(&api, "rejected", 1).await;
    assert!(
        rejected["message"]
            .as_str()
            .unwrap()
            .contains("invalid mem access 'map_value_or_null'"),
        "the verifier's own words: {rejected}"
    );
    // The good one kept counting meanwhile.
    getppid_calls(&web, 5);
    let (_, value) = next_value(
        &out,
        line_count(&out),
        "test.getppid.calls",
        web.relative_path(),
    )
    .await;
    assert_eq!(value, 30);

    // kubectl sees the status as the agent applied it: this node's entry, owned by its manager.
    let object: Value = serde_json::from_str(&kubectl(
        &kubeconfig,
        &[
            "get",
            "ebpfprogram",
            "getppid",
            "-o",
            "json",
            "--show-managed-fields",
        ],
    ))
    .unwrap();
    assert_eq!(object["status"]["nodes"][0]["node"], NODE);
    assert_eq!(object["status"]["nodes"][0]["phase"], "Loaded");
    let managers: Vec<&Value> = object["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["subresource"] == "status")
        .collect();
    assert_eq!(managers.len(), 1, "{managers:?}");
    assert_eq!(managers[0]["manager"], format!("podscope/{NODE}"));
    assert_eq!(managers[0]["operation"], "Apply");
    let names = kubectl(&kubeconfig, &["get", "ebpfprograms", "-o", "name"]);
    assert_eq!(
        names,
        "ebpfprogram.podscope.dev/garbage\nebpfprogram.podscope.dev/getppid\nebpfprogram.podscope.dev/rejected\nebpfprogram.podscope.dev/unknown-section\n"
    );
    let events = kubectl(
        &kubeconfig,
        &["get", "events", "-n", "default", "-o", "json"],
    );
    let events: Value = serde_json::from_str(&events).unwrap();
    assert_eq!(events["items"].as_array().unwrap().len(), 3, "{events}");

    // An update (new metric name): loaded as generation 2, counting from zero.
    api.apply_custom(program(
        "getppid",
        from_config_map.clone(),
        "test.getppid.v2",
    ));
    let status = node_status(&api, "getppid", 2).await;
    assert_eq!(status["phase"], "Loaded", "{status}");
    getppid_calls(&web, 7);
    let (_, value) = next_value(
        &out,
        line_count(&out),
        "test.getppid.v2",
        web.relative_path(),
    )
    .await;
    assert_eq!(value, 7);
    stays_detached(&out, "test.getppid.calls").await;

    // The node is no longer selected: detached, and this node's status entry removed.
    api.apply_node(node(&[("podscope.dev/programs", "off")]));
    until("this node's entry removed", || {
        let object = api.custom("EbpfProgram", "", "getppid")?;
        object["status"]["nodes"]
            .as_array()?
            .is_empty()
            .then_some(())
    })
    .await;
    stays_detached(&out, "test.getppid").await;

    // Selected again, then deleted: loaded, then detached.
    api.apply_node(node(&[("podscope.dev/programs", "on")]));
    node_status(&api, "getppid", 2).await;
    getppid_calls(&web, 3);
    let (_, value) = next_value(
        &out,
        line_count(&out),
        "test.getppid.v2",
        web.relative_path(),
    )
    .await;
    assert_eq!(value, 3, "loaded anew: counting from zero");
    assert!(api.delete_custom("EbpfProgram", "", "getppid"));
    stays_detached(&out, "test.getppid").await;

    agent.sigterm();
    let status = agent.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "podscope exited with {status:?}");
}
