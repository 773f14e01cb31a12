//! What the trace object of `kubectl podscope trace` costs the kernel while a session runs (root,
//! real eBPF): every map the agent holds then is the `kernel_memory` formula's figure for its
//! shape, the CPUs and its entries (what bpftool reports as `bytes_memlock`), the object's maps
//! add up to `docs/metrics.md`'s closed form, and the agent holds no map or program once the
//! session ends (the object is unloaded). One test in its own binary: the maps this process
//! holds are the trace object's only.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use podscope_core::session::{
    ContainerRef, Hello, Request, Target, TraceProbe, Welcome, PROTOCOL_VERSION,
};
use podscope_core::{BuildContext, Component as _};
use podscope_receiver::ebpf::kernel_memory::{self, MapShape};
use podscope_receiver::session::{SessionConfig, SessionExtension};
use podscope_testkit::pod_cgroup::PodCgroup;
use podscope_testkit::BuildContextForTests as _;

/// The trace object's maps, their `max_entries` (bpftool shows 15 characters of a name), and
/// what one entry costs: 56 bytes of element header and list node, key and value rounded up to 8.
const TRACE_MAPS: [(&str, u32, u64); 7] = [
    ("trace_cgroups", 4096, 56 + 8 + 8),
    ("trace_events", 1 << 22, 0),
    ("trace_lost", 64, 0),
    ("trace_open_args", 16384, 56 + 8 + 16),
    ("trace_probe_ses", 9, 0),
    ("trace_tcp_conne", 16384, 56 + 8 + 24),
    ("trace_tcp_live", 65536, 56 + 8 + 16),
];

/// docs/metrics.md ("The trace object's kernel memory"): the maps with no entry.
fn documented_empty_bytes(cpus: u64) -> u64 {
    5_869_104 + 768 * cpus
}

fn possible_cpus() -> u64 {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    list.trim()
        .split(',')
        .map(|range| match range.split_once('-') {
            Some((a, b)) => b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

/// `bpftool … -j`, parsed.
fn bpftool(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new("bpftool")
        .args(args)
        .arg("-j")
        .output()
        .expect("bpftool (scripts/install-deps.sh installs it)");
    assert!(out.status.success(), "bpftool {args:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The ids of the maps this process holds (each map descriptor names its id in fdinfo).
fn held_map_ids() -> Vec<u64> {
    let mut ids: Vec<u64> = std::fs::read_dir("/proc/self/fdinfo")
        .unwrap()
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .flat_map(|info| {
            info.lines()
                .filter_map(|l| l.strip_prefix("map_id:"))
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[test]
fn the_trace_objects_maps_cost_what_the_formula_says_and_nothing_once_the_session_ends() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = SessionConfig {
        endpoint: "127.0.0.1:0".to_string(),
        node_name: Some("node-under-test".to_string()),
        ..Default::default()
    };
    let extension = Arc::new(SessionExtension::new(
        config,
        &BuildContext::for_tests("session"),
    ));
    runtime.block_on(extension.start()).unwrap();
    assert_eq!(held_map_ids(), Vec::<u64>::new(), "maps before any session");

    let pod = PodCgroup::new();
    let stream = TcpStream::connect(extension.local_addr().unwrap()).unwrap();
    // A bound on a broken test, not a measurement.
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        client_version: "test".to_string(),
        request: Request::Trace {
            probe: TraceProbe::Open,
            targets: vec![Target {
                namespace: "shop".to_string(),
                pod: "opener-0".to_string(),
                pod_uid: "uid-opener-0".to_string(),
                containers: vec![ContainerRef {
                    name: "app".to_string(),
                    id: format!("containerd://{}", pod.container_id()),
                }],
            }],
            filters: Vec::new(),
            duration: None,
        },
    };
    (&stream)
        .write_all(format!("{}\n", serde_json::to_string(&hello).unwrap()).as_bytes())
        .unwrap();
    let mut welcome = String::new();
    BufReader::new(&stream).read_line(&mut welcome).unwrap();
    let welcome: Welcome = serde_json::from_str(&welcome).unwrap();
    assert!(matches!(welcome, Welcome::Accepted { .. }), "{welcome:?}");

    let cpus = possible_cpus();
    let mut seen = Vec::new();
    let mut total = 0;
    let mut entries_cost = 0;
    for id in held_map_ids() {
        let id = id.to_string();
        let shown = bpftool(&["map", "show", "id", &id]);
        let name = shown["name"].as_str().unwrap().to_string();
        let map_type = match shown["type"].as_str().unwrap() {
            "hash" => kernel_memory::HASH,
            "array" => kernel_memory::ARRAY,
            "percpu_array" => kernel_memory::PERCPU_ARRAY,
            "ringbuf" => kernel_memory::RINGBUF,
            other => panic!("{name}: a {other} map"),
        };
        let number = |key: &str| shown[key].as_u64().unwrap() as u32;
        let shape = MapShape {
            map_type,
            key_size: number("bytes_key"),
            value_size: number("bytes_value"),
            max_entries: number("max_entries"),
            flags: number("flags"),
        };
        // The target's cgroup is the only one traced and runs nothing: no open in flight, no
        // TCP socket, so the entries held do not change while we look.
        let entries = if map_type == kernel_memory::HASH {
            bpftool(&["map", "dump", "id", &id])
                .as_array()
                .unwrap()
                .len() as u64
        } else {
            0
        };
        let kernel = shown["bytes_memlock"].as_u64().unwrap();
        assert_eq!(
            shape.bytes(cpus, entries),
            Some(kernel),
            "{name}: {shape:?} with {entries} entries on {cpus} CPUs"
        );
        if let Some((_, max_entries, per_entry)) = TRACE_MAPS.iter().find(|(n, ..)| *n == name) {
            assert_eq!(shape.max_entries, *max_entries, "{name}");
            entries_cost += entries * per_entry;
        }
        if name == "trace_cgroups" {
            assert_eq!(entries, 1, "the one traced cgroup");
        }
        total += kernel;
        seen.push(name);
    }
    seen.sort();
    for (name, ..) in TRACE_MAPS {
        assert!(
            seen.iter().any(|s| s == name),
            "{name} missing from {seen:?}"
        );
    }
    assert_eq!(
        total,
        documented_empty_bytes(cpus) + entries_cost,
        "{seen:?}"
    );
    assert_eq!(entries_cost, 72, "one traced cgroup");

    // The session ends with its connection: the object is unloaded.
    drop(stream);
    let kernel = extension.trace_kernel();
    let deadline = Instant::now() + Duration::from_secs(30);
    while kernel.sessions() != 0 || !held_map_ids().is_empty() {
        assert!(
            Instant::now() < deadline,
            "maps still held after the session: {:?}",
            held_map_ids()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(kernel.attached_program_ids().is_empty());
    runtime.block_on(extension.shutdown()).unwrap();
}
