//! pprof files read back by a decoder we did not write (the `pprof-format` npm package): exact
//! sample types, stacks, values, labels and build ids.

use opentelemetry_proto::tonic::profiles::v1development::ProfilesData;
use podscope_core::Batch;
use podscope_exporters::pprof::{encode_gzip, PprofBuilder};
use podscope_integration::pprof_format;
use podscope_testkit::fake_otlp::cpu_profile;

fn profiles(n: usize, container: &str) -> ProfilesData {
    match cpu_profile(n, &[("container.id", container)]) {
        Batch::Profiles(data) => (*data).clone(),
        _ => unreachable!("cpu_profile makes profiles"),
    }
}

#[test]
fn pprof_format_reads_back_exact_samples() {
    let mut builder = PprofBuilder::new("samples");
    builder.add(&profiles(3, "c1"));
    builder.add(&profiles(3, "c1"));
    builder.add(&profiles(2, "c2"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cpu.pb.gz");
    std::fs::write(&path, encode_gzip(&builder.finish())).unwrap();

    let decoded = pprof_format::decode(&path);
    assert_eq!(
        decoded.sample_types,
        vec![("samples".to_string(), "count".to_string())]
    );
    // cpu_profile's sample i has value i + 1: c1 twice (2 + 4 + 6), c2 once (1 + 2).
    assert_eq!(decoded.total(), 15);
    let mut samples: Vec<(Vec<String>, i64, Vec<String>)> = decoded
        .samples
        .iter()
        .map(|s| (s.functions.clone(), s.values[0], s.labels.clone()))
        .collect();
    samples.sort();
    let stack = |leaf: &str| vec![leaf.to_string(), "main".to_string()];
    let labels = |c: &str| vec![format!("container.id={c}")];
    assert_eq!(
        samples,
        vec![
            (stack("work_0"), 1, labels("c2")),
            (stack("work_0"), 2, labels("c1")),
            (stack("work_1"), 2, labels("c2")),
            (stack("work_1"), 4, labels("c1")),
            (stack("work_2"), 6, labels("c1")),
        ]
    );
    assert_eq!(
        decoded.mappings,
        vec![("/bin/app".to_string(), "ab".repeat(20))]
    );
}
