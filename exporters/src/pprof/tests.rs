use std::collections::BTreeMap;

use opentelemetry_proto::tonic::profiles::v1development::ProfilesData;
use podscope_core::Batch;
use podscope_testkit::fake_otlp::cpu_profile;
use prost::Message as _;

use super::*;

fn profiles(n: usize, container: &str) -> ProfilesData {
    match cpu_profile(n, &[("container.id", container)]) {
        Batch::Profiles(data) => (*data).clone(),
        _ => unreachable!("cpu_profile makes profiles"),
    }
}

#[test]
fn pprof_sums_equal_stacks_across_messages_and_keeps_names_files_and_build_ids() {
    let mut builder = PprofBuilder::new("samples");
    assert_eq!(builder.add(&profiles(3, "c1")), 3);
    assert_eq!(builder.add(&profiles(3, "c1")), 3);
    // Another sample type is left out.
    assert_eq!(PprofBuilder::new("off_cpu").add(&profiles(3, "c1")), 0);
    let profile = builder.finish();
    let s = |i: i64| profile.string_table[i as usize].as_str();
    assert_eq!(s(0), "");
    assert_eq!(
        (
            s(profile.sample_type[0].r#type),
            s(profile.sample_type[0].unit)
        ),
        ("samples", "count")
    );
    let period_type = profile.period_type.unwrap();
    assert_eq!(
        (s(period_type.r#type), s(period_type.unit)),
        ("cpu", "nanoseconds")
    );
    assert_eq!(profile.period, 1_000_000_000 / 19);
    // Sample i has value i + 1 in each message: summed, 2, 4, 6.
    let mut by_leaf: Vec<(String, Vec<String>, i64)> = profile
        .sample
        .iter()
        .map(|sample| {
            let names: Vec<String> = sample
                .location_id
                .iter()
                .map(|&id| {
                    let location = &profile.location[id as usize - 1];
                    assert_eq!(location.id, id);
                    let function = &profile.function[location.line[0].function_id as usize - 1];
                    s(function.name).to_string()
                })
                .collect();
            let container = sample
                .label
                .iter()
                .find(|l| s(l.key) == "container.id")
                .map(|l| s(l.str).to_string())
                .unwrap();
            (container, names, sample.value[0])
        })
        .collect();
    by_leaf.sort();
    assert_eq!(
        by_leaf,
        vec![
            ("c1".into(), vec!["work_0".into(), "main".into()], 2),
            ("c1".into(), vec!["work_1".into(), "main".into()], 4),
            ("c1".into(), vec!["work_2".into(), "main".into()], 6),
        ]
    );
    assert_eq!(profile.mapping.len(), 1);
    assert_eq!(s(profile.mapping[0].filename), "/bin/app");
    assert_eq!(s(profile.mapping[0].build_id), "ab".repeat(20));
    // The gzip file holds exactly the message.
    let gz = encode_gzip(&profile);
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut bytes).unwrap();
    assert_eq!(PprofProfile::decode(&bytes[..]).unwrap(), profile);
}

#[test]
fn folded_stacks_go_root_first_and_sum() {
    let mut folded = BTreeMap::new();
    fold(
        &[profiles(2, "c1"), profiles(2, "c2")],
        "samples",
        &mut folded,
    );
    assert_eq!(
        folded,
        BTreeMap::from([
            ("[unknown];main;work_0".to_string(), 2),
            ("[unknown];main;work_1".to_string(), 4),
        ])
    );
}

#[test]
fn unnamed_frames_show_their_file_and_address() {
    let frame = ResolvedFrame {
        function: None,
        file: "/usr/lib/libfoo.so".into(),
        build_id: None,
        address: 0x1a2b,
    };
    assert_eq!(frame.display_name(), "libfoo.so+0x1a2b");
}
