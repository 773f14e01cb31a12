//! The `podscope` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use podscope::config::{self, AgentConfig, LogEncoding};
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
    /// Print the version.
    Version,
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
        Command::Version => {
            println!("podscope {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
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
