//! Spans and data points per second through the `file` exporter's encode step (batch → one
//! OTLP-JSON line), the part of the exporter that costs CPU. Criterion reports items/s and bytes/s.
//!
//! Run: `cargo bench --bench file_encode`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use podscope_core::Batch;
use podscope_exporters::file::encode_json_line;
use podscope_testkit::fake_otlp;

fn spans(n: usize) -> Batch {
    fake_otlp::spans(n, &[])
}

fn points(n: usize) -> Batch {
    fake_otlp::syscall_points(n, 0, &[])
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("file_encode");
    for (name, batch) in [("spans", spans(1000)), ("data_points", points(1000))] {
        let bytes = encode_json_line(&batch).len() as u64;
        group.throughput(Throughput::Elements(1000));
        group.bench_with_input(BenchmarkId::new(name, 1000), &batch, |b, batch| {
            b.iter(|| encode_json_line(batch))
        });
        group.throughput(Throughput::Bytes(bytes));
        group.bench_with_input(
            BenchmarkId::new(format!("{name}_bytes"), 1000),
            &batch,
            |b, batch| b.iter(|| encode_json_line(batch)),
        );
    }
    group.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
