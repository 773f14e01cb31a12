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
fn a_sample_linked_to_a_span_carries_its_trace_and_span_id_as_labels() {
    use opentelemetry_proto::tonic::profiles::v1development::Link;
    let mut linked = profiles(2, "c1");
    let dictionary = linked.dictionary.as_mut().unwrap();
    dictionary.link_table.push(Link {
        trace_id: (1..=16).collect(),
        span_id: vec![0xab; 8],
    });
    let samples = &mut linked.resource_profiles[0].scope_profiles[0].profiles[0].samples;
    samples[1].link_index = 1;
    let mut builder = PprofBuilder::new("samples");
    builder.add(&linked);
    // The same stacks without a link stay apart from the linked one.
    builder.add(&profiles(2, "c1"));
    let profile = builder.finish();
    let s = |i: i64| profile.string_table[i as usize].as_str();
    let mut seen: Vec<(String, i64, Option<String>, Option<String>)> = profile
        .sample
        .iter()
        .map(|sample| {
            let label = |key: &str| {
                sample
                    .label
                    .iter()
                    .find(|l| s(l.key) == key)
                    .map(|l| s(l.str).to_string())
            };
            let leaf = &profile.location[sample.location_id[0] as usize - 1];
            let name = s(profile.function[leaf.line[0].function_id as usize - 1].name);
            (
                name.to_string(),
                sample.value[0],
                label("trace_id"),
                label("span_id"),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("work_0".into(), 2, None, None),
            ("work_1".into(), 2, None, None),
            (
                "work_1".into(),
                2,
                Some("0102030405060708090a0b0c0d0e0f10".into()),
                Some("abababababababab".into())
            ),
        ]
    );
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

mod exporter {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use podscope_core::config::parse_component_config;
    use podscope_core::telemetry::AgentTelemetry;
    use podscope_core::{BuildContext, Exporter, ExporterBuilder};
    use podscope_testkit::BuildContextForTests as _;

    use super::super::*;
    use super::*;

    const CONTAINER: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn batch_of(containers: &[&[(&str, &str)]], samples: usize) -> Batch {
        let mut batch = cpu_profile(samples, containers[0]);
        for attributes in &containers[1..] {
            batch.append(cpu_profile(samples, attributes)).unwrap();
        }
        batch
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn decoded(path: &Path) -> PprofProfile {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()),
            &mut bytes,
        )
        .unwrap();
        PprofProfile::decode(&bytes[..]).unwrap()
    }

    async fn started(settings: serde_json::Value) -> (Arc<dyn Exporter>, AgentTelemetry) {
        let config: PprofConfig = parse_component_config(settings).unwrap();
        let ctx = BuildContext::for_tests("pprof");
        let telemetry = ctx.telemetry.clone();
        let exporter = Box::new(config).build(ctx).unwrap();
        exporter.start().await.unwrap();
        (exporter, telemetry)
    }

    #[test]
    fn files_are_named_after_the_pod_container_or_cgroup_and_the_interval() {
        let batch = batch_of(
            &[
                &[
                    ("container.id", CONTAINER),
                    ("k8s.pod.name", "web-7d9f"),
                    ("k8s.namespace.name", "shop"),
                    ("k8s.container.name", "nginx"),
                ],
                &[("container.id", CONTAINER)],
                &[("podscope.cgroup.path", "/system.slice/cron.service")],
                &[("k8s.pod.name", "../../etc"), ("k8s.namespace.name", "a/b")],
            ],
            3,
        );
        let Batch::Profiles(data) = &batch else {
            unreachable!()
        };
        let files = pprof_files(data);
        // cpu_profile's interval starts at 1_700_000_000 s: 2023-11-14T22:13:20Z.
        assert_eq!(
            files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
            [
                "web-7d9f_shop_nginx-0123456789ab.20231114T221320Z.cpu.pb.gz",
                "container-0123456789ab.20231114T221320Z.cpu.pb.gz",
                "cgroup-system.slice-cron.service.20231114T221320Z.cpu.pb.gz",
                "-..-etc_a-b_unknown.20231114T221320Z.cpu.pb.gz",
            ]
        );
        assert!(files.iter().all(|f| f.samples == 3));
    }

    #[tokio::test]
    async fn one_gzip_pprof_per_container_and_interval_with_every_sample() {
        let dir = tempfile::tempdir().unwrap();
        let (exporter, telemetry) = started(serde_json::json!({"directory": dir.path()})).await;
        exporter
            .consume(batch_of(
                &[
                    &[("container.id", "aaaa1111")],
                    &[("container.id", "bbbb2222")],
                ],
                4,
            ))
            .await
            .unwrap();
        // The same container and interval again (a split batch): a second file, not overwritten.
        exporter
            .consume(batch_of(&[&[("container.id", "aaaa1111")]], 2))
            .await
            .unwrap();
        exporter.shutdown().await.unwrap();
        assert_eq!(
            names(dir.path()),
            [
                "container-aaaa1111.20231114T221320Z.cpu-1.pb.gz",
                "container-aaaa1111.20231114T221320Z.cpu.pb.gz",
                "container-bbbb2222.20231114T221320Z.cpu.pb.gz",
            ]
        );
        let total = |name: &str| -> i64 {
            let profile = decoded(&dir.path().join(name));
            let labels: Vec<&str> = profile.sample[0]
                .label
                .iter()
                .map(|l| profile.string_table[l.str as usize].as_str())
                .collect();
            assert!(labels.contains(&&name["container-".len().."container-".len() + 8]));
            assert_eq!(profile.time_nanos, 1_700_000_000_000_000_000);
            assert_eq!(profile.duration_nanos, 10_000_000_000);
            profile.sample.iter().map(|s| s.value[0]).sum()
        };
        // Sample i has value i + 1.
        assert_eq!(total("container-aaaa1111.20231114T221320Z.cpu.pb.gz"), 10);
        assert_eq!(total("container-bbbb2222.20231114T221320Z.cpu.pb.gz"), 10);
        assert_eq!(total("container-aaaa1111.20231114T221320Z.cpu-1.pb.gz"), 3);
        assert!(telemetry.encode_text().contains(
            "podscope_exporter_sent_items_total{component=\"pprof\",signal=\"profiles\"} 10"
        ));
    }

    fn file(name: &str, bytes: usize) -> PprofFile {
        PprofFile {
            name: name.to_string(),
            bytes: vec![7; bytes],
            samples: 1,
        }
    }

    #[test]
    fn rotation_removes_the_oldest_files_past_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let rotation = PprofRotation {
            max_files: 3,
            ..Default::default()
        };
        let mut directory = PprofDirectory::open(dir.path(), rotation.clone()).unwrap();
        for n in 1..=5 {
            directory.write(&file(&format!("f{n}.pb.gz"), 10)).unwrap();
        }
        assert_eq!(names(dir.path()), ["f3.pb.gz", "f4.pb.gz", "f5.pb.gz"]);
        assert_eq!(directory.usage(), (3, 30));
        // A restart finds the files already there (oldest by time) and keeps counting them.
        drop(directory);
        let mut directory = PprofDirectory::open(dir.path(), rotation).unwrap();
        assert_eq!(directory.usage(), (3, 30));
        directory.write(&file("f6.pb.gz", 10)).unwrap();
        assert_eq!(names(dir.path()), ["f4.pb.gz", "f5.pb.gz", "f6.pb.gz"]);
    }

    #[test]
    fn rotation_keeps_the_byte_budget_but_never_removes_the_newest_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut directory = PprofDirectory::open(
            dir.path(),
            PprofRotation {
                max_files: 100,
                max_megabytes: 1,
            },
        )
        .unwrap();
        // 400 KiB each: two fit in 1 MiB, a third does not.
        for n in 1..=4 {
            directory
                .write(&file(&format!("f{n}.pb.gz"), 400 * 1024))
                .unwrap();
        }
        assert_eq!(names(dir.path()), ["f3.pb.gz", "f4.pb.gz"]);
        directory
            .write(&file("big.pb.gz", 2 * 1024 * 1024))
            .unwrap();
        assert_eq!(names(dir.path()), ["big.pb.gz"]);
    }

    #[tokio::test]
    async fn a_directory_that_cannot_be_made_fails_at_start_naming_exporter_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("a-file");
        std::fs::write(&blocker, b"").unwrap();
        let target = blocker.join("profiles");
        let config: PprofConfig =
            parse_component_config(serde_json::json!({"directory": target})).unwrap();
        let exporter = Box::new(config)
            .build(BuildContext::for_tests("pprof"))
            .unwrap();
        let error = exporter.start().await.unwrap_err().to_string();
        assert!(
            error.contains("pprof exporter") && error.contains(&target.display().to_string()),
            "{error}"
        );
    }

    #[test]
    fn directory_is_required_and_budgets_are_positive() {
        assert!(parse_component_config::<PprofConfig>(serde_json::json!({})).is_err());
        let errors = parse_component_config::<PprofConfig>(serde_json::json!({
            "directory": "/tmp/x", "rotation": {"max_files": 0, "max_megabytes": 0}
        }))
        .unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"rotation.max_files"), "{errors:?}");
        assert!(paths.contains(&"rotation.max_megabytes"), "{errors:?}");
    }

    /// A 64 KiB tmpfs, unmounted on drop (root only).
    struct SmallDisk {
        path: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl SmallDisk {
        fn mount() -> SmallDisk {
            let dir = tempfile::tempdir().unwrap();
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "mount tmpfs (root needed)");
            SmallDisk {
                path: dir.path().to_path_buf(),
                _dir: dir,
            }
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(&self.path)
                .status();
        }
    }

    #[tokio::test]
    async fn a_full_disk_drops_and_counts_the_file_and_the_exporter_goes_on() {
        let disk = SmallDisk::mount();
        let (exporter, telemetry) = started(serde_json::json!({"directory": disk.path})).await;
        // Fill the disk with a file that is not the exporter's.
        let filler = disk.path.join("filler");
        let mut out = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        while std::io::Write::write_all(&mut out, &chunk).is_ok() {}
        drop(out);
        exporter
            .consume(batch_of(&[&[("container.id", "aaaa1111")]], 3))
            .await
            .expect("taken, dropped and counted");
        let metrics = telemetry.encode_text();
        assert!(
            metrics.contains(
                "podscope_exporter_dropped_items_total{component=\"pprof\",signal=\"profiles\",reason=\"disk_full\"} 3"
            ),
            "{metrics}"
        );
        assert_eq!(names(&disk.path), ["filler"], "no partial file left");
        // Room again: the next interval is written.
        std::fs::remove_file(&filler).unwrap();
        exporter
            .consume(batch_of(&[&[("container.id", "aaaa1111")]], 2))
            .await
            .unwrap();
        exporter.shutdown().await.unwrap();
        assert_eq!(
            names(&disk.path),
            ["container-aaaa1111.20231114T221320Z.cpu.pb.gz"]
        );
    }
}
