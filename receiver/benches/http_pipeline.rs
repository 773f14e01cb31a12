//! The http probe's userspace side from recorded events: ring-buffer decode, head parsing,
//! pairing, trace context, route, RED update and span build (and drop), per request as one end
//! sees it (each request is made and served on this node: its CLIENT and SERVER ends are two,
//! from four events). Target (issue 12): ≥ 300 k requests/s per core. The events are what the kernel writes for curl-like requests (a ~200-byte head with a
//! `traceparent`) to a keep-alive server, on 64 connections with ids in their paths.
//!
//! Run: `cargo bench -p podscope-receiver --bench http_pipeline`. Times are the bench thread's
//! CPU time, so the figure is per core.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use podscope_ebpf::abi::{
    HttpEventHead, HTTP_DIR_IN, HTTP_DIR_OUT, HTTP_EVENT_DATA, HTTP_PROTO_HTTP1, HTTP_ROLE_CLIENT,
    HTTP_ROLE_SERVER,
};
use podscope_receiver::ebpf::{HttpProbeConfig, HttpRecordedEvents};

const CONNECTIONS: u32 = 64;
const REQUESTS_PER_BATCH: u32 = 1024;

fn head(fd: u32, role: u32, direction: u32, t: u64, client_port: u16) -> HttpEventHead {
    let server = role == HTTP_ROLE_SERVER;
    let mut head = HttpEventHead {
        timestamp_ns: t,
        cgroup_id: if server { 100 } else { 200 },
        tgid: if server { 1000 } else { 2000 },
        tid: if server { 1000 } else { 2000 },
        fd,
        kind: HTTP_EVENT_DATA as u8,
        direction: direction as u8,
        protocol: HTTP_PROTO_HTTP1 as u8,
        role: role as u8,
        family: 2,
        local_port: if server { 8080 } else { client_port },
        remote_port: if server { client_port } else { 8080 },
        ..Default::default()
    };
    head.local_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
    head.remote_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
    head
}

/// The records of `n` requests, each seen from both ends, in the order the kernel writes them.
fn records(n: u32, round: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 0..n {
        let conn = 10 + i % CONNECTIONS;
        let port = 40_000 + (i % CONNECTIONS) as u16;
        let t = round * 1_000_000_000 + u64::from(i) * 10_000;
        let request = format!(
            "GET /api/v1/users/{}/orders?page=2 HTTP/1.1\r\nHost: shop.default.svc:8080\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e{:04x}-00f067aa0ba902b7-01\r\n\r\n",
            i % 500,
            i % 0xffff
        );
        let response = b"HTTP/1.1 200 OK\r\nServer: ngin";
        let mut push = |h: HttpEventHead, data: &[u8]| {
            let mut h = h;
            h.total_len = data.len() as u32;
            out.push(h.to_record(data));
        };
        push(
            head(conn, HTTP_ROLE_CLIENT, HTTP_DIR_OUT, t, port),
            request.as_bytes(),
        );
        push(
            head(conn, HTTP_ROLE_SERVER, HTTP_DIR_IN, t + 50, port),
            request.as_bytes(),
        );
        push(
            head(conn, HTTP_ROLE_SERVER, HTTP_DIR_OUT, t + 900, port),
            response,
        );
        push(
            head(conn, HTTP_ROLE_CLIENT, HTTP_DIR_IN, t + 950, port),
            response,
        );
    }
    out
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn pipeline(c: &mut Criterion) {
    let config = HttpProbeConfig::default();
    let mut group = c.benchmark_group("http_pipeline");
    // Each request is seen from both ends: two exchanges, two spans.
    group.throughput(Throughput::Elements(2 * u64::from(REQUESTS_PER_BATCH)));
    let batches: Vec<Vec<Vec<u8>>> = (0..8).map(|r| records(REQUESTS_PER_BATCH, r)).collect();
    // Timed in the thread's CPU time, not wall time: "per core" on a machine shared with other
    // work (the wall time of a descheduled thread says nothing about the code).
    group.bench_function("requests (one end each) from recorded events", |b| {
        let mut events = HttpRecordedEvents::new(&config);
        let mut round = 0;
        b.iter_custom(|iterations| {
            let start = thread_cpu_time();
            for _ in 0..iterations {
                for record in &batches[round % batches.len()] {
                    events.apply(record);
                }
                round += 1;
                let spans = events.finish();
                assert_eq!(spans.len(), 2 * REQUESTS_PER_BATCH as usize);
                drop(std::hint::black_box(spans));
            }
            thread_cpu_time() - start
        });
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
