//! The fuzz corpora as regression tests, on stable and without libFuzzer: every file of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` (the inputs of crashes found and
//! fixed) goes through the same harness function the fuzz target calls (`fuzz/src/lib.rs`).
//! Part of `cargo test --workspace` (scripts/test.sh). A file that panics fails its target's test
//! with the file named.
//!
//! `cargo test -p podscope --test fuzz_corpus_replay -- --ignored write_seed_corpora` writes the
//! seeds the corpora started from (real configs, OTLP requests of the testkit generator, the
//! cgroup parser's table, the project's own eBPF objects, ...); scripts/fuzz.sh grows and
//! minimizes the corpora from there.

#[path = "src/lib.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files_of(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Feeds every corpus and regression file of `target` to `harness`; fails naming the files that
/// panicked. The corpus must not be empty (a missing corpus would pass silently otherwise).
fn replay(target: &str, harness: fn(&[u8])) {
    let corpus = files_of(&fuzz_dir().join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target} is empty or missing: the corpus is part of the repository"
    );
    let regressions = files_of(&fuzz_dir().join("regressions").join(target));
    let mut failed = Vec::new();
    for file in corpus.iter().chain(&regressions) {
        let data = std::fs::read(file).expect("read a corpus file");
        if catch_unwind(AssertUnwindSafe(|| harness(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs panicked: {failed:?}",
        failed.len(),
        corpus.len() + regressions.len()
    );
}

/// One `#[test]` per fuzz target, named after it, replaying its corpus through its harness.
macro_rules! replay_targets {
    ($($target:ident),+ $(,)?) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target), harness::$target);
            }
        )+
    };
}

replay_targets!(
    config_loader,
    otlp_protobuf,
    otlp_json,
    cgroup_path,
    pod_trim,
    http_events,
    user_program_elf,
    elf_symbols,
    symbol_maps,
);

/// The seeds, from real inputs. Run by hand (see the module docs); the corpora are committed.
#[test]
#[ignore = "writes fuzz/corpus/; run by hand to reseed"]
fn write_seed_corpora() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    };

    // Every example config of the repository.
    for file in files_of(&root.join("configs")) {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        write("config_loader", &name, &std::fs::read(&file).unwrap());
    }

    // OTLP requests of the testkit's generator, in both encodings.
    seeds::otlp_requests(&write);

    // The cgroup parser's own table of real paths (its tests), and this process's cgroup file.
    let table = std::fs::read_to_string(root.join("k8s/src/cgroup/tests.rs")).unwrap();
    for (i, literal) in seeds::string_literals(&table)
        .into_iter()
        .filter(|s| s.contains('/'))
        .enumerate()
    {
        write("cgroup_path", &format!("table-{i}"), literal.as_bytes());
    }
    write(
        "cgroup_path",
        "proc-self-cgroup",
        &std::fs::read("/proc/self/cgroup").unwrap(),
    );

    seeds::pods(&write);
    seeds::http(&write);

    // The project's own compiled eBPF objects (ELF with BTF, as users' objects are).
    use podscope_ebpf::objects;
    for (name, object) in [
        ("cgroups", objects::CGROUPS),
        ("hist_check", objects::HIST_CHECK),
        ("sched", objects::SCHED),
        ("bench_noop", objects::BENCH_NOOP),
    ] {
        write("user_program_elf", name, object);
    }

    // Small real binaries: a distribution's stripped one (dynamic symbols only) and a BPF object.
    write(
        "elf_symbols",
        "true",
        &std::fs::read("/usr/bin/true").unwrap(),
    );
    write("elf_symbols", "bench_noop.bpf.o", objects::BENCH_NOOP);

    let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap();
    let head: Vec<&str> = kallsyms.lines().take(64).collect();
    write("symbol_maps", "kallsyms", head.join("\n").as_bytes());
    write(
        "symbol_maps",
        "proc-self-maps",
        &std::fs::read("/proc/self/maps").unwrap(),
    );
    write(
        "symbol_maps",
        "perf-map",
        b"7f0000001000 40 LazyCompile:~hot app.js:3\n7f0000002000 10 _ZN4core3fmt5write17h0123456789abcdefE\n0x7f0000003000 0x20 _RNvCs1234_7example4main\n7f0000004000 8 _ZN3foo3barEi\n",
    );
}

mod seeds {
    use podscope_core::otlp::{otlp, Encoding};
    use podscope_ebpf::abi::{
        HttpEventHead, HTTP_DIR_IN, HTTP_DIR_OUT, HTTP_EVENT_CLOSE, HTTP_EVENT_DATA,
        HTTP_PROTO_HTTP1, HTTP_PROTO_HTTP2, HTTP_ROLE_CLIENT, HTTP_ROLE_SERVER,
    };
    use podscope_testkit::fake_otlp;

    type Write<'a> = &'a dyn Fn(&str, &str, &[u8]);

    pub fn otlp_requests(write: Write) {
        let batches = [
            ("spans", fake_otlp::spans(3, &[("service.name", "shop")])),
            ("service-spans", fake_otlp::service_spans(4)),
            ("service-points", fake_otlp::service_points(4)),
            (
                "profile",
                fake_otlp::cpu_profile(3, &[("k8s.pod.name", "shop-0")]),
            ),
        ];
        for (name, batch) in &batches {
            let wire = otlp(batch.signal());
            write(
                "otlp_protobuf",
                name,
                &wire.encode_request(batch, Encoding::Protobuf),
            );
            write(
                "otlp_json",
                name,
                &wire.encode_request(batch, Encoding::Json),
            );
        }
    }

    /// The contents of the `"…"` literals of Rust source (no escapes beyond `\"`).
    pub fn string_literals(source: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = source;
        while let Some(start) = rest.find('"') {
            let after = &rest[start + 1..];
            let Some(end) = after.find('"') else { break };
            out.push(after[..end].to_string());
            rest = &after[end + 1..];
        }
        out
    }

    pub fn pods(write: Write) {
        let pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "shop-7d9f8b6c5d-x2x9q",
                "namespace": "default",
                "uid": "7a1d2c3e-4b5f-6789-abcd-ef0123456789",
                "creationTimestamp": "2026-12-02T10:00:00Z",
                "labels": {"app": "shop", "app.kubernetes.io/name": "shop", "pod-template-hash": "7d9f8b6c5d"},
                "annotations": {"prometheus.io/scrape": "true"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "shop-7d9f8b6c5d", "uid": "1b2c3d4e-0000-1111-2222-333344445555", "controller": true}]
            },
            "spec": {"nodeName": "node-a", "containers": [{"name": "shop", "image": "registry.example/shop:1.4.2"}]},
            "status": {
                "phase": "Running",
                "podIP": "10.244.1.7",
                "podIPs": [{"ip": "10.244.1.7"}, {"ip": "fd00::7"}],
                "startTime": "2026-12-02T10:00:01Z",
                "containerStatuses": [{
                    "name": "shop", "image": "registry.example/shop:1.4.2", "imageID": "registry.example/shop@sha256:0123",
                    "containerID": "containerd://0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                    "ready": true, "restartCount": 2, "started": true,
                    "state": {"running": {"startedAt": "2026-12-02T10:00:02Z"}}
                }],
                "initContainerStatuses": [{
                    "name": "init", "image": "busybox", "imageID": "", "ready": false, "restartCount": 0,
                    "containerID": "cri-o://fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210",
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}
                }]
            }
        });
        write("pod_trim", "deployment-pod", pod.to_string().as_bytes());
        let job_pod = serde_json::json!({
            "metadata": {
                "name": "backup-29012345-abcde", "namespace": "ops", "uid": "0123456789abcdef0123456789abcdef",
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "backup-29012345", "uid": "u", "controller": true}]
            },
            "status": {"phase": "Succeeded", "podIPs": []}
        });
        write("pod_trim", "cronjob-pod", job_pod.to_string().as_bytes());
    }

    fn head(role: u32, direction: u32, protocol: u32, t: u64) -> HttpEventHead {
        let server = role == HTTP_ROLE_SERVER;
        let mut head = HttpEventHead {
            timestamp_ns: t,
            cgroup_id: if server { 100 } else { 200 },
            tgid: if server { 1000 } else { 2000 },
            tid: if server { 1000 } else { 2000 },
            fd: 7,
            kind: HTTP_EVENT_DATA as u8,
            direction: direction as u8,
            protocol: protocol as u8,
            role: role as u8,
            family: 2,
            local_port: if server { 8080 } else { 40_000 },
            remote_port: if server { 40_000 } else { 8080 },
            ..Default::default()
        };
        head.local_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        head.remote_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        head
    }

    fn record(mut head: HttpEventHead, data: &[u8]) -> Vec<u8> {
        head.total_len = data.len() as u32;
        head.to_record(data)
    }

    fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// An HPACK block of literal headers without indexing or Huffman coding.
    fn hpack(headers: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in headers {
            out.push(0x00);
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
            out.push(value.len() as u8);
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    pub fn http(write: Write) {
        // HTTP/1.1 seen from both ends, as the kernel writes it (with a traceparent), then a close.
        let request = b"GET /api/v1/users/42/orders?page=2 HTTP/1.1\r\nHost: shop.default.svc:8080\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n";
        let response = b"HTTP/1.1 404 Not Found\r\nServer: nginx\r\nContent-Length: 0\r\n\r\n";
        let mut close = head(HTTP_ROLE_SERVER, HTTP_DIR_IN, HTTP_PROTO_HTTP1, 2_000);
        close.kind = HTTP_EVENT_CLOSE as u8;
        let records = vec![
            record(
                head(HTTP_ROLE_CLIENT, HTTP_DIR_OUT, HTTP_PROTO_HTTP1, 1_000),
                request,
            ),
            record(
                head(HTTP_ROLE_SERVER, HTTP_DIR_IN, HTTP_PROTO_HTTP1, 1_050),
                &request[..40],
            ),
            record(
                head(HTTP_ROLE_SERVER, HTTP_DIR_IN, HTTP_PROTO_HTTP1, 1_060),
                &request[40..],
            ),
            record(
                head(HTTP_ROLE_SERVER, HTTP_DIR_OUT, HTTP_PROTO_HTTP1, 1_900),
                response,
            ),
            record(
                head(HTTP_ROLE_CLIENT, HTTP_DIR_IN, HTTP_PROTO_HTTP1, 1_950),
                response,
            ),
            record(close, b""),
        ];
        write(
            "http_events",
            "http1",
            &super::harness::frame_records(&records),
        );

        // A gRPC call over HTTP/2 as its server reads and writes it.
        let mut inbound = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        inbound.extend(h2_frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
        inbound.extend(h2_frame(
            0x1,
            0x4,
            1,
            &hpack(&[
                (":method", "POST"),
                (":path", "/shop.Cart/Add"),
                (":scheme", "http"),
                ("content-type", "application/grpc"),
            ]),
        ));
        inbound.extend(h2_frame(0x0, 0x1, 1, &[0, 0, 0, 0, 2, 8, 1]));
        let mut outbound = h2_frame(0x4, 0, 0, &[]);
        outbound.extend(h2_frame(0x1, 0x4, 1, &hpack(&[(":status", "200")])));
        outbound.extend(h2_frame(0x0, 0, 1, &[0, 0, 0, 0, 0]));
        outbound.extend(h2_frame(0x1, 0x5, 1, &hpack(&[("grpc-status", "5")])));
        let records = vec![
            record(
                head(HTTP_ROLE_SERVER, HTTP_DIR_IN, HTTP_PROTO_HTTP2, 1_000),
                &inbound,
            ),
            record(
                head(HTTP_ROLE_SERVER, HTTP_DIR_OUT, HTTP_PROTO_HTTP2, 1_500),
                &outbound,
            ),
        ];
        write(
            "http_events",
            "grpc",
            &super::harness::frame_records(&records),
        );
    }
}
