//! The `podscope` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use podscope::config::{self, AgentConfig, LogEncoding};
use podscope::profile::{self, ProfileOptions, TargetArg};
use podscope::registry;
use podscope::service::Service;
use podscope::telemetry_server::TelemetryServer;
use podscope_core::health::Readiness;
use podscope_core::telemetry::AgentTelemetry;
use podscope_core::Signal;

#[derive(Parser)]
#[command(
    name = "podscope",
    about = "eBPF performance-analysis agent for Kubernetes, configured like an OpenTelemetry Collector",
    disable_version_flag = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (with no --config: the embedded default config).
    Run {
        /// Config file (Collector-style YAML).
        #[arg(long, short = 'c', env = "PODSCOPE_CONFIG")]
        config: Option<PathBuf>,
        /// Log level or tracing filter (`debug`, `info,podscope=debug`); overrides
        /// service.telemetry.logs.level.
        #[arg(long)]
        log_level: Option<String>,
        /// Log format; overrides service.telemetry.logs.encoding.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Check a config file: prints OK, or every error with file, line, column and key path.
    Validate {
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    /// List every component podscope can run, with the signals it handles.
    Components,
    /// Profile a process, cgroup or container for a while, without a config or a cluster, and
    /// write a flame graph (.svg), pprof (.pb.gz) or folded stacks (.folded). Needs root.
    Profile {
        #[command(flatten)]
        target: ProfileTargetArgs,
        /// How long to record (e.g. 30s, 2m).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Record where threads block and for how long (off-CPU time) instead of on-CPU samples.
        #[arg(long)]
        off_cpu: bool,
        /// On-CPU samples per second and CPU.
        #[arg(long, default_value_t = 99)]
        frequency: u64,
        /// The output; its name gives the format: .svg, .pb.gz or .folded.
        #[arg(long, short = 'o')]
        output: PathBuf,
    },
    /// Users' own eBPF programs.
    Program {
        #[command(subcommand)]
        command: ProgramCommand,
    },
    /// Print the version.
    Version,
}

/// Exactly one of them.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct ProfileTargetArgs {
    /// A process (all its threads).
    #[arg(long)]
    pid: Option<u32>,
    /// A cgroup directory (absolute, or relative to the cgroup2 mount) and those below it.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// A container id, or a unique prefix of one.
    #[arg(long)]
    container: Option<String>,
}

impl ProfileTargetArgs {
    fn target(self) -> TargetArg {
        match (self.pid, self.cgroup, self.container) {
            (Some(pid), _, _) => TargetArg::Pid(pid),
            (_, Some(cgroup), _) => TargetArg::Cgroup(cgroup),
            (_, _, Some(container)) => TargetArg::Container(container),
            // clap requires exactly one of them.
            (None, None, None) => unreachable!("clap requires a target"),
        }
    }
}

#[derive(Subcommand)]
enum ProgramCommand {
    /// Load an object on this machine (root): list its programs, maps with their BTF layouts
    /// and globals, run the verifier and attach, then print the metrics the spec makes of a few
    /// seconds of activity; or the exact error.
    Check {
        /// The compiled object (`clang -g -O2 -target bpf -c prog.bpf.c -o prog.bpf.o`).
        object: PathBuf,
        /// A program spec in YAML, or an EbpfProgram manifest (its `spec`); its `object` is
        /// replaced by OBJECT.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// How long to let the programs count before reading the maps.
        #[arg(long, default_value = "5s")]
        wait: humantime::Duration,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Console,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            log_level,
            log_format,
        } => run(config, log_level, log_format),
        Command::Validate { config } => match config::load_file(&config) {
            Ok(loaded) => {
                for warning in &loaded.warnings {
                    eprintln!("warning: {warning}");
                }
                println!("OK");
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Components => {
            print_components();
            ExitCode::SUCCESS
        }
        Command::Profile {
            target,
            duration,
            off_cpu,
            frequency,
            output,
        } => {
            let options = ProfileOptions {
                target: target.target(),
                duration,
                off_cpu,
                frequency,
                output,
            };
            match profile::run(&options, &mut std::io::stderr()) {
                Ok(summary) => {
                    let what = if off_cpu {
                        format!("{:.3} s blocked", summary.total as f64 / 1e9)
                    } else {
                        format!("{} samples", summary.total)
                    };
                    println!(
                        "wrote {}: {what} in {} stacks ({} lost)",
                        options.output.display(),
                        summary.stacks,
                        summary.lost
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("podscope profile: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Program {
            command: ProgramCommand::Check { object, spec, wait },
        } => program_check(&object, spec.as_deref(), wait.into()),
        Command::Version => {
            println!("podscope {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}

/// `podscope program check`: the report on stdout; an error on stderr after what was found.
fn program_check(
    object: &std::path::Path,
    spec: Option<&std::path::Path>,
    wait: std::time::Duration,
) -> ExitCode {
    let object = &std::path::absolute(object).unwrap_or_else(|_| object.to_path_buf());
    let spec = match spec.map(|path| read_program_spec(path, object)).transpose() {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(podscope_receiver::ebpf::programs::check(object, spec, wait)) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err((found, error)) => {
            // What was found before the error goes to stdout, the error itself to stderr.
            print!("{found}");
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// A spec file: a program spec, or an EbpfProgram manifest whose `spec` is one; checked as the
/// agent checks it.
fn read_program_spec(
    path: &std::path::Path,
    object: &std::path::Path,
) -> Result<podscope_receiver::ebpf::programs::ProgramSpec, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut value = config::yaml_to_json(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if value["kind"] == "EbpfProgram" {
        value = value["spec"].take();
    }
    if let Some(fields) = value.as_object_mut() {
        fields.insert("object".into(), serde_json::json!({ "file": object }));
    }
    let spec: podscope_receiver::ebpf::programs::ProgramSpec =
        serde_path_to_error::deserialize(value)
            .map_err(|e| format!("{}: {}: {}", path.display(), e.path(), e.inner()))?;
    let mut errors = Vec::new();
    spec.validate("spec", &mut errors);
    if !errors.is_empty() {
        let lines: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {e}", path.display()))
            .collect();
        return Err(lines.join("\n"));
    }
    Ok(spec)
}

fn print_components() {
    let signals = |s: &[Signal]| s.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",");
    println!(
        "{:<10} {:<22} {:<16} DESCRIPTION",
        "KIND", "TYPE", "SIGNALS"
    );
    for f in registry::receivers() {
        println!(
            "{:<10} {:<22} {:<16} {}",
            "receiver",
            f.type_name,
            signals(f.signals),
            f.description
        );
    }
    for f in registry::processors() {
        println!(
            "{:<10} {:<22} {:<16} {}",
            "processor",
            f.type_name,
            signals(f.signals),
            f.description
        );
    }
    for f in registry::exporters() {
        println!(
            "{:<10} {:<22} {:<16} {}",
            "exporter",
            f.type_name,
            signals(f.signals),
            f.description
        );
    }
    // Extensions are in no pipeline, so they handle no signal.
    for f in registry::extensions() {
        println!(
            "{:<10} {:<22} {:<16} {}",
            "extension", f.type_name, "-", f.description
        );
    }
}

fn run(
    config_path: Option<PathBuf>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
) -> ExitCode {
    let loaded = match &config_path {
        Some(path) => config::load_file(path),
        None => config::load_default(),
    };
    let config = match loaded {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let json = match log_format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Console) => false,
        None => config.service.telemetry.log_encoding == LogEncoding::Json,
    };
    let level = log_level.unwrap_or_else(|| config.service.telemetry.log_level.clone());
    if let Err(e) = init_logging(&level, json) {
        eprintln!("--log-level {level:?}: {e}");
        return ExitCode::FAILURE;
    }
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("podscope")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_service(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_service(config: AgentConfig) -> anyhow::Result<()> {
    tracing::info!(config = %config.source, version = env!("CARGO_PKG_VERSION"), "starting podscope");
    let telemetry = AgentTelemetry::new();
    let readiness = Readiness::default();
    let telemetry_server = TelemetryServer::start(
        &config.service.telemetry.metrics_address,
        telemetry.clone(),
        readiness.clone(),
    )
    .await?;
    let shutdown_timeout = config.service.shutdown_timeout;
    let mut service = Service::build(config, telemetry, readiness)?;
    service.start().await?;

    let signal = wait_for_stop_signal().await?;
    tracing::info!(signal, timeout = ?shutdown_timeout, "stopping: receivers first, then draining pipelines");
    let report = service.shutdown().await;
    for error in &report.errors {
        tracing::warn!("shutdown: {error}");
    }
    if report.completed_in_time {
        tracing::info!("stopped; everything held was flushed");
    } else {
        tracing::warn!(
            "stopped at the shutdown deadline; undelivered data was dropped and counted"
        );
    }
    telemetry_server.stop().await;
    Ok(())
}

async fn wait_for_stop_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

fn init_logging(level: &str, json: bool) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(())
}
