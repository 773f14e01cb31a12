//! Namespaced `Probe` objects end to end (root): the real `podscope` binary against the fake API
//! server (watch, server-side apply of status, Events; checked with kubectl), with a pod in each
//! of two namespaces in kubelet-style cgroups made by the test, both labelled `app=web`. A Probe
//! in namespace A enabling tcp counts A's pod's connections exactly, with pod attributes, and
//! nothing of B's, though its selector would match B's pod; an update (adding http) is a new
//! instance; a probe kind the agent does not allow fails that Probe alone, with the reason in its
//! status and an Event; a Probe over `max_probes` fails until another stops; a selector
//! matching nothing here, and a deletion, stop the instance: its series end, its maps leave the
//! agent's kernel-memory accounting and its kernel programs are unloaded (bpftool).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use podscope_integration::agent::{free_port, AgentProcess};
use podscope_integration::fake_kube::FakeApiServer;
use podscope_testkit::pod_cgroup::{unique_ids, PodCgroup};
use serde_json::{json, Value};

const NODE: &str = "node-probes";

fn pod(namespace: &str, name: &str, uid: &str, container_id: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            uid: Some(uid.into()),
            labels: Some(BTreeMap::from([("app".into(), "web".into())])),
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
                image: "registry.example.com/app:1.0".into(),
                image_id: String::new(),
                ready: true,
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

fn probe(namespace: &str, name: &str, app: &str, probes: Value) -> Value {
    json!({
        "apiVersion": "podscope.dev/v1alpha1",
        "kind": "Probe",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": app}},
            "probes": probes,
        },
    })
}

/// (resource attributes, metric name, attributes of the point, value) of every sum data point
/// from line `from` on.
type Point = (BTreeMap<String, String>, String, String, i64);

fn points(out: &Path, from: usize) -> Vec<Point> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let complete = text.rsplit_once('\n').map_or("", |(whole, _)| whole);
    let text_of = |v: &Value| {
        v["stringValue"]
            .as_str()
            .map(str::to_string)
            .or_else(|| v["intValue"].as_str().map(str::to_string))
            .unwrap_or_else(|| v.to_string())
    };
    let attributes = |list: &Value| -> BTreeMap<String, String> {
        list.as_array()
            .into_iter()
            .flatten()
            .map(|kv| {
                (
                    kv["key"].as_str().unwrap_or("").to_string(),
                    text_of(&kv["value"]),
                )
            })
            .collect()
    };
    let mut found = Vec::new();
    for line in complete.lines().skip(from) {
        let value: Value = serde_json::from_str(line).expect("a JSON line");
        for rm in value["resourceMetrics"].as_array().into_iter().flatten() {
            let resource = attributes(&rm["resource"]["attributes"]);
            for sm in rm["scopeMetrics"].as_array().into_iter().flatten() {
                for m in sm["metrics"].as_array().into_iter().flatten() {
                    for p in m["sum"]["dataPoints"].as_array().into_iter().flatten() {
                        let value = p["asInt"]
                            .as_str()
                            .and_then(|v| v.parse().ok())
                            .or(p["asInt"].as_i64())
                            .unwrap_or(-1);
                        let point = attributes(&p["attributes"])
                            .into_iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(",");
                        found.push((
                            resource.clone(),
                            m["name"].as_str().unwrap_or("").to_string(),
                            point,
                            value,
                        ));
                    }
                }
            }
        }
    }
    found
}

fn line_count(out: &Path) -> usize {
    std::fs::read_to_string(out)
        .map(|t| t.matches('\n').count())
        .unwrap_or(0)
}

/// Waits (at most 60 s) for `condition` to hold, returning its value.
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

/// This node's entry of the Probe's status, once it has one for `generation`.
async fn node_status(api: &FakeApiServer, namespace: &str, name: &str, generation: i64) -> Value {
    until(
        &format!("status of Probe {namespace}/{name} at generation {generation}"),
        || {
            let object = api.custom("Probe", namespace, name)?;
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

/// Opens and closes `n` connections to 127.0.0.1:`port` from inside `pod` (the test's thread
/// accepts them).
fn connections(pod: &PodCgroup, port: u16, n: usize) {
    let exit = pod.run(|| {
        for _ in 0..n {
            // SAFETY: raw syscalls on a socket of this child only (see PodCgroup::run).
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                let addr = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: port.to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                let rc = libc::connect(
                    fd,
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                );
                libc::close(fd);
                if rc != 0 {
                    return 1;
                }
            }
        }
        0
    });
    assert_eq!(exit, 0, "a connection failed");
}

/// The opened-connections count to `port` of the pod at `cgroup_path` in the first collection
/// after line `from` that has the expected value, or the last seen value after 60 s.
async fn opened(
    out: &Path,
    from: usize,
    cgroup_path: &str,
    port: u16,
    want: i64,
) -> (BTreeMap<String, String>, i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (BTreeMap::new(), -1);
    loop {
        for (resource, name, point, value) in points(out, from) {
            if name == "podscope.tcp.connections.opened"
                && resource.get("podscope.cgroup.path").map(String::as_str) == Some(cgroup_path)
                && point.contains(&format!("server.port={port}"))
                && point.contains("podscope.tcp.role=client")
            {
                last = (resource, value);
                if value == want {
                    return last;
                }
            }
        }
        if Instant::now() > deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The ids of the BPF programs the agent holds (`prog_id` of its `bpf-prog` descriptors, as
/// bpftool lists them with their holders).
fn agent_programs(pid: i32) -> BTreeSet<u64> {
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let is_program = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy() == "anon_inode:bpf-prog");
        if !is_program {
            continue;
        }
        let fdinfo = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let id = std::fs::read_to_string(fdinfo).ok().and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        ids.extend(id);
    }
    ids
}

/// Whether bpftool (the kernel) still knows any of `ids`.
fn loaded(ids: &BTreeSet<u64>) -> bool {
    let output = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool (scripts/install-deps.sh installs it)");
    let programs: Value = serde_json::from_slice(&output.stdout).expect("bpftool's JSON");
    programs
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| p["id"].as_u64().is_some_and(|id| ids.contains(&id)))
}

/// The agent's `podscope_ebpf_map_memory_bytes` series of the Probe `<namespace>/<name>`'s
/// maps (`map` label `<namespace>/<name>/<map>`), as (probe, map, bytes).
async fn probe_map_memory(telemetry_port: u16, probe: &str) -> Vec<(String, String, u64)> {
    let text = reqwest::get(format!("http://127.0.0.1:{telemetry_port}/metrics"))
        .await
        .expect("the agent's telemetry endpoint")
        .text()
        .await
        .expect("its exposition");
    text.lines()
        .filter_map(|line| {
            let labels = line.strip_prefix("podscope_ebpf_map_memory_bytes{")?;
            let (labels, value) = labels.split_once("} ")?;
            let label = |key: &str| {
                let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
                let end = labels[start..].find('"')? + start;
                Some(labels[start..end].to_string())
            };
            let map = label("map")?;
            map.starts_with(&format!("{probe}/"))
                .then(|| Some((label("probe")?, map, value.trim().parse().ok()?)))?
        })
        .collect()
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
async fn a_probe_counts_its_own_namespaces_pods_only_reports_status_and_follows_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (a_uid, a_container) = unique_ids();
    let a = PodCgroup::with_ids(&a_uid, &a_container);
    let (b_uid, b_container) = unique_ids();
    let b = PodCgroup::with_ids(&b_uid, &b_container);

    let api = FakeApiServer::start().await;
    api.apply_pod(pod("team-a", "web-a", &a_uid, &a_container));
    api.apply_pod(pod("team-b", "web-b", &b_uid, &b_container));
    // Selects app=web: B's pod has that label too, and must not be seen.
    api.apply_custom(probe("team-a", "web", "web", json!({"tcp": {}})));

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });

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
    # The agent's own probe observes only the root cgroup: something to collect every interval.
    cgroup_filter: {{ include: ["/"] }}
    probes: {{ sched: {{ required: true }} }}
    tenant_probes:
      extension: k8s_metadata
      max_probes: 2
      probes: {{ tcp: {{}}, http: {{}} }}
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
    // Active on this node for the one pod of team-a it selects; its pods are in its kernel
    // filter before the status says so.
    let status = node_status(&api, "team-a", "web", 1).await;
    assert_eq!(status["phase"], "Active", "{status}");
    assert_eq!(status["activeProbes"], json!(["tcp"]));
    assert_eq!(status["podsMatched"], 1);
    let first_instance = agent_programs(agent.pid());
    // Its maps' kernel memory is in the agent's accounting, named for the Probe.
    let memory = probe_map_memory(telemetry_port, "team-a/web").await;
    assert!(
        !memory.is_empty()
            && memory
                .iter()
                .all(|(probe, _, bytes)| probe == "tcp" && *bytes > 0),
        "{memory:?}"
    );

    let mark = line_count(&out);
    connections(&a, port, 3);
    connections(&b, port, 5);
    let (resource, value) = opened(&out, mark, a.relative_path(), port, 3).await;
    assert_eq!(value, 3, "A's pod's connections, exactly");
    for (key, want) in [
        ("k8s.pod.name", "web-a"),
        ("k8s.namespace.name", "team-a"),
        ("podscope.probe.name", "web"),
    ] {
        assert_eq!(
            resource.get(key).map(String::as_str),
            Some(want),
            "{resource:?}"
        );
    }
    let of_b: Vec<Point> = points(&out, 0)
        .into_iter()
        .filter(|(r, ..)| {
            r.get("podscope.cgroup.path").map(String::as_str) == Some(b.relative_path())
                || r.get("k8s.namespace.name").map(String::as_str) == Some("team-b")
        })
        .collect();
    assert!(of_b.is_empty(), "nothing of team-b: {of_b:?}");

    // A kind the agent does not allow fails that Probe alone, with the reason and an Event.
    api.apply_custom(probe("team-a", "syscalls", "web", json!({"syscalls": {}})));
    let failed = node_status(&api, "team-a", "syscalls", 1).await;
    assert_eq!(failed["phase"], "Failed", "{failed}");
    let reason = "syscalls is not a probe this agent lets a Probe enable (allowed: tcp, http)";
    assert!(
        failed["message"].as_str().unwrap_or("").contains(reason),
        "{failed}"
    );
    until("an Event in team-a", || {
        api.events().into_iter().find(|e| {
            e["metadata"]["namespace"] == "team-a"
                && e["involvedObject"]["kind"] == "Probe"
                && e["involvedObject"]["name"] == "syscalls"
                && e["reason"] == "ProbeFailed"
                && e["type"] == "Warning"
                && e["message"].as_str().is_some_and(|m| m.contains(reason))
        })
    })
    .await;
    // The other kept counting meanwhile.
    let mark = line_count(&out);
    connections(&a, port, 2);
    let (_, value) = opened(&out, mark, a.relative_path(), port, 5).await;
    assert_eq!(value, 5);

    // kubectl sees the status as this node's agent applied it, and the Event.
    let object: Value = serde_json::from_str(&kubectl(
        &kubeconfig,
        &[
            "get",
            "probe",
            "web",
            "-n",
            "team-a",
            "-o",
            "json",
            "--show-managed-fields",
        ],
    ))
    .unwrap();
    assert_eq!(object["status"]["nodes"][0]["node"], NODE);
    assert_eq!(object["status"]["nodes"][0]["phase"], "Active");
    let managers: Vec<&Value> = object["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["subresource"] == "status")
        .collect();
    assert_eq!(managers.len(), 1, "{managers:?}");
    assert_eq!(managers[0]["manager"], format!("podscope/{NODE}"));
    assert_eq!(
        kubectl(
            &kubeconfig,
            &["get", "probes", "-n", "team-a", "-o", "name"]
        ),
        "probe.podscope.dev/syscalls\nprobe.podscope.dev/web\n"
    );
    assert_eq!(
        kubectl(
            &kubeconfig,
            &["get", "probes", "-n", "team-b", "-o", "name"]
        ),
        ""
    );
    let events: Value = serde_json::from_str(&kubectl(
        &kubeconfig,
        &["get", "events", "-n", "team-a", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(events["items"].as_array().unwrap().len(), 1, "{events}");

    // At most two Probes' instances (max_probes): a third fails with the reason, and starts
    // once another stops.
    api.apply_custom(probe("team-a", "second", "web", json!({"tcp": {}})));
    let second = node_status(&api, "team-a", "second", 1).await;
    assert_eq!(second["phase"], "Active", "{second}");
    api.apply_custom(probe("team-a", "third", "web", json!({"tcp": {}})));
    let third = node_status(&api, "team-a", "third", 1).await;
    assert_eq!(third["phase"], "Failed", "{third}");
    assert!(
        third["message"]
            .as_str()
            .unwrap_or("")
            .contains("this node already runs 2 Probes' instances, the agent's limit (tenant_probes.max_probes)"),
        "{third}"
    );
    assert!(api.delete_custom("Probe", "team-a", "second"));
    until("the third Probe active once the second is gone", || {
        let object = api.custom("Probe", "team-a", "third")?;
        (object["status"]["nodes"][0]["phase"] == "Active").then_some(())
    })
    .await;
    assert!(api.delete_custom("Probe", "team-a", "third"));

    // An update adding http: a new instance (generation 2), counting from zero.
    api.apply_custom(probe(
        "team-a",
        "web",
        "web",
        json!({"tcp": {}, "http": {}}),
    ));
    let status = node_status(&api, "team-a", "web", 2).await;
    assert_eq!(status["phase"], "Active", "{status}");
    assert_eq!(status["activeProbes"], json!(["http", "tcp"]));
    // The old instance stopped before the new one's status was written: its programs are
    // the agent's no more, and the kernel has unloaded them.
    let second_instance = agent_programs(agent.pid());
    let first_only: BTreeSet<u64> = first_instance
        .difference(&second_instance)
        .copied()
        .collect();
    assert!(
        !first_only.is_empty(),
        "{first_instance:?} → {second_instance:?}"
    );
    until("the first instance's programs unloaded", || {
        (!loaded(&first_only)).then_some(())
    })
    .await;
    let mark = line_count(&out);
    connections(&a, port, 4);
    let (_, value) = opened(&out, mark, a.relative_path(), port, 4).await;
    assert_eq!(value, 4, "the new instance counts from zero");

    // A selector that matches no pod here: stopped, this node's entry removed, programs gone.
    api.apply_custom(probe("team-a", "web", "db", json!({"tcp": {}, "http": {}})));
    until("this node's entry removed", || {
        let object = api.custom("Probe", "team-a", "web")?;
        object["status"]["nodes"]
            .as_array()?
            .is_empty()
            .then_some(())
    })
    .await;
    let own = agent_programs(agent.pid());
    let second_only: BTreeSet<u64> = second_instance.difference(&own).copied().collect();
    assert_eq!(
        second_instance.len() - second_only.len(),
        own.len(),
        "the agent's own programs stay: {second_instance:?} → {own:?}"
    );
    assert!(!second_only.is_empty());
    until("the second instance's programs unloaded", || {
        (!loaded(&second_only)).then_some(())
    })
    .await;

    // Selecting its pod again, then deleted: active, then its series end and programs go.
    api.apply_custom(probe("team-a", "web", "web", json!({"tcp": {}})));
    let status = node_status(&api, "team-a", "web", 4).await;
    assert_eq!(status["phase"], "Active", "{status}");
    let third_only: BTreeSet<u64> = agent_programs(agent.pid())
        .difference(&own)
        .copied()
        .collect();
    assert!(!third_only.is_empty());
    assert!(api.delete_custom("Probe", "team-a", "web"));
    until("the deleted Probe's programs detached", || {
        (agent_programs(agent.pid()) == own).then_some(())
    })
    .await;
    until("the deleted Probe's programs unloaded", || {
        (!loaded(&third_only)).then_some(())
    })
    .await;
    let mark = line_count(&out);
    connections(&a, port, 2);
    until("three collections", || {
        (line_count(&out) > mark + 3).then_some(())
    })
    .await;
    assert_eq!(probe_map_memory(telemetry_port, "team-a/web").await, []);
    let late: Vec<Point> = points(&out, mark)
        .into_iter()
        .filter(|(r, ..)| r.contains_key("podscope.probe.name"))
        .collect();
    assert!(late.is_empty(), "series of a deleted Probe: {late:?}");

    agent.sigterm();
    let status = agent.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "podscope exited with {status:?}");
}
