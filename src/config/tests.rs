//! Config files as users write them: every example loads, every refusal has its exact message
//! and position, and every problem of a file is reported at once.

use std::path::{Path, PathBuf};

use std::time::Duration;

use podscope_core::component::create_receiver;
use podscope_core::{
    BuildContext, ComponentConfig, ComponentId, ComponentKind, Receiver, ReceiverBuilder,
    ReceiverConsumers, ReceiverFactory, Signal,
};
use podscope_receiver::ebpf::EbpfReceiverConfig;
use podscope_receiver::otlp::OtlpReceiverConfig;
use serde::Deserialize;

use super::*;

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in {}", dir.display());
    files
}

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn every_shipped_config_and_valid_example_loads() {
    let files = yaml_files("configs")
        .into_iter()
        .chain(yaml_files("configs/testdata/valid"));
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        if let Err(errors) = load_with(
            &text,
            &file.display().to_string(),
            &Registry::builtin(),
            &no_env,
        ) {
            panic!("{} should load:\n{errors}", file.display());
        }
    }
}

/// What podscope validate prints for them: nothing but OK. A `k8sattributes` that names no
/// extension runs its own without a word.
#[test]
fn shipped_configs_load_without_warnings() {
    for file in yaml_files("configs") {
        let text = std::fs::read_to_string(&file).unwrap();
        let config = load_with(&text, "f.yaml", &Registry::builtin(), &no_env).unwrap();
        assert_eq!(config.warnings, Vec::<String>::new(), "{}", file.display());
    }
    let config = load_default().unwrap();
    let own = ComponentId::parse("k8s_metadata/k8sattributes").unwrap();
    assert_eq!(config.service.extensions, vec![own.clone()]);
    assert_eq!(
        config.extension_users[&(
            ComponentKind::Processor,
            ComponentId::parse("k8sattributes").unwrap()
        )],
        vec![own]
    );
}

#[test]
fn every_refusal_has_its_exact_messages_and_positions() {
    for file in yaml_files("configs/testdata/invalid") {
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        let expected = std::fs::read_to_string(file.with_extension("expected"))
            .unwrap_or_else(|_| panic!("{name}: add {name}.expected with the error lines"));
        let errors = load_with(&text, &name, &Registry::builtin(), &no_env)
            .err()
            .unwrap_or_else(|| panic!("{name} should be refused"));
        assert_eq!(errors.to_string(), expected.trim_end(), "{name}");
    }
}

#[test]
fn the_default_config_runs_ebpf_and_otlp_through_memory_limiter_k8sattributes_and_batch_to_prometheus_and_debug(
) {
    let config = load_default().unwrap();
    assert_eq!(config.source, "<embedded default>");
    let names: Vec<_> = config
        .service
        .pipelines
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, vec!["metrics", "traces"]);
    let ids = |v: &Vec<ComponentId>| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    let [metrics, traces] = &config.service.pipelines[..] else {
        unreachable!()
    };
    assert_eq!(ids(&metrics.receivers), vec!["ebpf", "otlp"]);
    assert_eq!(ids(&traces.receivers), vec!["otlp"]);
    for p in [metrics, traces] {
        assert_eq!(
            ids(&p.processors),
            vec!["memory_limiter", "k8sattributes", "batch"]
        );
    }
    assert_eq!(ids(&metrics.exporters), vec!["prometheus", "debug"]);
    assert_eq!(ids(&traces.exporters), vec!["debug"]);
    let ebpf: &EbpfReceiverConfig = config.settings(ComponentKind::Receiver, "ebpf").unwrap();
    let probes = &ebpf.probes;
    let on = [
        ("process", probes.process.is_some()),
        ("syscalls", probes.syscalls.is_some()),
        ("files", probes.files.is_some()),
        ("sched", probes.sched.is_some()),
        ("block_io", probes.block_io.is_some()),
        ("tcp", probes.tcp.is_some()),
        (
            "uprobes",
            probes.uprobes.as_ref().is_some_and(|u| !u.is_empty()),
        ),
    ];
    let listed: Vec<&str> = on.iter().filter(|(_, on)| *on).map(|(p, _)| *p).collect();
    // No program on every syscall or context switch by default (issue 11): syscalls, files and
    // sched are one line away, commented out with their cost.
    assert_eq!(listed, vec!["process", "block_io", "tcp"]);
}

#[test]
fn service_settings_and_pipeline_queues_are_read() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/testdata/valid/everything.yaml"),
    )
    .unwrap();
    let config = load_with(&text, "everything.yaml", &Registry::builtin(), &no_env).unwrap();
    assert_eq!(config.service.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(
        config.service.telemetry,
        TelemetryConfig {
            metrics_address: "127.0.0.1:18888".into(),
            log_level: "info,podscope=debug".into(),
            log_encoding: LogEncoding::Json,
        }
    );
    let traces = &config.service.pipelines[0];
    assert_eq!(traces.signal, Signal::Traces);
    assert_eq!(traces.queue.capacity, 50_000);
    assert_eq!(
        traces.queue.when_full,
        podscope_core::config::WhenFull::DropNewest
    );
    let internal = &config.service.pipelines[2];
    assert_eq!(internal.name, "metrics/internal");
    assert_eq!(internal.queue.block_timeout, Duration::from_secs(1));
    assert_eq!(
        internal.queue.capacity, 10_000,
        "defaults fill what is not set"
    );
    // The default for the unset variable was used.
    let otlp: &OtlpReceiverConfig = config.settings(ComponentKind::Receiver, "otlp").unwrap();
    assert_eq!(
        otlp.protocols.grpc.as_ref().unwrap().endpoint,
        "127.0.0.1:4317"
    );
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn env_values_are_substituted_with_their_types() {
    let text = "receivers:\n  otlp:\n    protocols:\n      grpc:\n        endpoint: ${env:HOST}:${env:PORT}\n        max_recv_msg_size_mib: ${env:MIB}\nexporters:\n  debug:\nservice:\n  pipelines:\n    traces: {receivers: [otlp], exporters: [debug]}\n";
    let env = |name: &str| match name {
        "HOST" => Some("127.0.0.1".to_string()),
        "PORT" => Some("5317".to_string()),
        "MIB" => Some("16".to_string()),
        _ => None,
    };
    let config = load_with(text, "env.yaml", &Registry::builtin(), &env).unwrap();
    let otlp: &OtlpReceiverConfig = config.settings(ComponentKind::Receiver, "otlp").unwrap();
    let grpc = otlp.protocols.grpc.as_ref().unwrap();
    assert_eq!(grpc.endpoint, "127.0.0.1:5317");
    assert_eq!(grpc.max_recv_msg_size_mib, 16);
}

#[test]
fn unused_components_are_warnings_not_errors() {
    let text = "receivers:\n  otlp: {protocols: {grpc: {}}}\nexporters:\n  debug:\n  nop:\nservice:\n  pipelines:\n    traces: {receivers: [otlp], exporters: [debug]}\n";
    let config = load_with(text, "w.yaml", &Registry::builtin(), &no_env).unwrap();
    assert_eq!(
        config.warnings,
        vec!["exporters.nop is defined but no pipeline uses it"]
    );
}

/// A receiver that produces metrics only, to test signal checks.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsOnlyConfig {}

impl ComponentConfig for MetricsOnlyConfig {}

impl ReceiverBuilder for MetricsOnlyConfig {
    fn build(
        self: Box<Self>,
        _: BuildContext,
        _: ReceiverConsumers,
    ) -> anyhow::Result<Box<dyn Receiver>> {
        anyhow::bail!("not built in these tests")
    }
}

static METRICS_ONLY: ReceiverFactory = ReceiverFactory {
    type_name: "metricsonly",
    description: "test receiver",
    signals: &[Signal::Metrics],
    create: create_receiver::<MetricsOnlyConfig>,
};

#[test]
fn a_component_in_a_pipeline_of_a_signal_it_cannot_handle_is_refused() {
    let mut registry = Registry::builtin();
    registry.receivers.push(&METRICS_ONLY);
    let text = "receivers:\n  metricsonly:\nexporters:\n  debug:\nservice:\n  pipelines:\n    traces:\n      receivers: [metricsonly]\n      exporters: [debug]\n";
    let errors = load_with(text, "s.yaml", &registry, &no_env).unwrap_err();
    assert_eq!(
        errors.to_string(),
        "s.yaml:8:19: service.pipelines.traces.receivers[0]: receiver metricsonly does not handle traces (it handles metrics)"
    );
}

#[test]
fn an_unreadable_file_is_one_error_naming_it() {
    let errors = load_file(Path::new("/nonexistent/podscope.yaml")).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    assert!(
        errors
            .to_string()
            .starts_with("/nonexistent/podscope.yaml:0:0: cannot read the config file"),
        "{errors}"
    );
}
