//! The command line: kubectl's usual flags, then one verb.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use podscope_core::session::{TopScope, TraceProbe};

/// The namespace the chart's README installs the agents into.
pub const DEFAULT_AGENT_NAMESPACE: &str = "observability";
/// The labels the chart puts on every agent pod.
pub const DEFAULT_AGENT_SELECTOR: &str =
    "app.kubernetes.io/name=podscope,app.kubernetes.io/component=agent";

#[derive(Debug, Parser)]
#[command(
    name = "kubectl podscope",
    bin_name = "kubectl podscope",
    version,
    about = "Live traces, a top view, bpftrace and profiles of pods and nodes, from the podscope agents",
    long_about = "Live traces, a top view, bpftrace and profiles of pods and nodes, from the podscope \
                  agent already running on every node (no Job is scheduled, no kernel headers needed).\n\n\
                  The plugin resolves TARGET through the Kubernetes API to pods and their nodes, then \
                  port-forwards into the podscope agent pod of each node (access needed: `create` on \
                  `pods/portforward` in the agent namespace; see docs/kubectl.md).",
    after_help = "TARGET is node/NAME, pod/NAME (with -c CONTAINER), deploy/NAME, sts/NAME, ds/NAME, \
                  job/NAME, or none with -l SELECTOR.\n\n\
                  Exit codes: 0 done, 1 other failure, 2 usage, 3 target not found, 4 no agent on a \
                  node, 5 RBAC denied, 6 plugin and agent speak different protocol versions, 7 probe \
                  not available on the node's kernel, 8 bpftrace disabled in the agent, 9 agent busy, \
                  10 agent unreachable, 11 the agent failed the request."
)]
pub struct Cli {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the cluster and the agents, as kubectl's own flags.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace of TARGET (default: the context's namespace).
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// Select pods in every namespace (with -l, and for top).
    #[arg(short = 'A', long = "all-namespaces", global = true)]
    pub all_namespaces: bool,
    /// The namespace the podscope agents run in.
    #[arg(long, global = true, value_name = "NAMESPACE", default_value = DEFAULT_AGENT_NAMESPACE)]
    pub agent_namespace: String,
    /// The label selector of the agent pods.
    #[arg(long, global = true, value_name = "SELECTOR", default_value = DEFAULT_AGENT_SELECTOR)]
    pub agent_selector: String,
    /// Connect to one agent's session endpoint directly instead of port-forwarding through the
    /// API server (local use, tests); every target's node is served by that agent.
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub agent_address: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream the events of one built-in probe from every node TARGET spans, merged in time order.
    #[command(after_help = "Examples:\n  kubectl podscope trace pod/web-0 exec\n  \
                      kubectl podscope trace deploy/web tcp-connect --duration 30s -o json\n  \
                      kubectl podscope trace -l app=web open --filter comm=nginx\n  \
                      kubectl podscope trace node/worker-1 oom-kill")]
    Trace(TraceArgs),
    /// A refreshing table of CPU, run-queue latency, syscalls, opens and TCP retransmits.
    #[command(
        after_help = "Keys: c CPU, r run-queue p99, s syscalls/s, o opens/s, t retransmits/s, \
                      p requests/s, n name (sort); q or Ctrl-C quits.\n\nExamples:\n  \
                      kubectl podscope top pods\n  kubectl podscope top containers -l app=web --sort syscalls\n  \
                      kubectl podscope top nodes --once -o json"
    )]
    Top(TopArgs),
    /// Run a bpftrace program on TARGET's node, with $container_pid and $container_cgroup_id of its container.
    #[command(
        after_help = "The agent must enable bpftrace (chart value session.bpftrace.enabled).\n\nExamples:\n  \
                      kubectl podscope bpftrace pod/web-0 -e 'tracepoint:syscalls:sys_enter_openat /cgroup == $container_cgroup_id/ { @[comm] = count(); }'\n  \
                      kubectl podscope bpftrace node/worker-1 -f biolatency.bt --duration 10s"
    )]
    Bpftrace(BpftraceArgs),
    /// Profile TARGET's CPU for a while and write a flame graph, folded stacks or a pprof file.
    #[command(
        after_help = "The output format follows the file name: .svg (flame graph), .folded, \
                      .pb.gz or .pprof (gzip-compressed pprof).\n\nExample:\n  \
                      kubectl podscope profile deploy/web --duration 30s -o flame.svg"
    )]
    Profile(ProfileArgs),
    /// Every agent: its node, version, probes attached or skipped and why, health.
    Status(StatusArgs),
    // TraceSession objects (docs/kubectl.md, "Trace sessions"): written and read through the
    // API server in the session's namespace; the agents run them.
    /// Create a TraceSession: the agents trace TARGET's pods of the namespace with PROBE… for a while.
    #[command(
        after_help = "TARGET is pod/NAME, deploy/NAME, sts/NAME, ds/NAME or job/NAME of the \
                      session's namespace (a workload stands for its pod selector), or none with \
                      -l SELECTOR.\n\nExamples:\n  \
                      kubectl podscope run web-execs -n shop deploy/web exec tcp-connect --duration 10m --ttl 1h\n  \
                      kubectl podscope run opens -n shop -l app=web open --deadline 2026-12-03T18:00:00Z\n  \
                      kubectl podscope run web-execs -n shop pod/web-0 exec --dry-run=client -o yaml"
    )]
    Run(crate::sessions::RunArgs),
    /// List TraceSessions (or show some by name): phase, probes, nodes, events, age.
    Get(crate::sessions::GetArgs),
    /// One TraceSession in full: its spec, phase and reason, the merged summary, each node's entry.
    Describe(crate::sessions::DescribeArgs),
    /// Delete TraceSessions: their traces stop on every node.
    Delete(crate::sessions::DeleteArgs),
    /// Turn a TraceSession's probes and targets into a Probe, measured continuously by the agents.
    #[command(
        after_help = "Examples:\n  kubectl podscope promote session/web-execs -n shop\n  \
                      kubectl podscope promote session/web-execs -n shop --name web --dry-run=client -o yaml"
    )]
    Promote(crate::promote::PromoteArgs),
    /// Follow a TraceSession's events from every node that runs it (from now, or --from-start).
    #[command(
        after_help = "Needs `get` on tracesessions in the session's namespace (the token in its \
                      status opens the agents' logs).\n\nExamples:\n  \
                      kubectl podscope attach web-execs -n shop\n  \
                      kubectl podscope attach web-execs --from-start -o json"
    )]
    Attach(crate::attach::AttachArgs),
    /// Print what a TraceSession recorded (kept by the agents until it is deleted), -f to follow.
    #[command(
        after_help = "Examples:\n  kubectl podscope logs web-execs -n shop\n  \
                      kubectl podscope logs web-execs -f"
    )]
    Logs(crate::attach::LogsArgs),
}

/// TARGET and the selection flags every verb that takes one shares.
#[derive(Debug, Clone, Args)]
pub struct Selection {
    /// Select pods by label instead of naming TARGET (e.g. app=web,tier!=db).
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// The container of pod/NAME (default: all running containers of the pod).
    #[arg(short = 'c', long, value_name = "NAME")]
    pub container: Option<String>,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// TARGET then PROBE (PROBE alone with -l).
    #[arg(value_name = "TARGET PROBE", num_args = 1..=2, required = true)]
    pub words: Vec<String>,
    #[command(flatten)]
    pub selection: Selection,
    /// Stop after this long (e.g. 30s, 5m); default: until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Keep only events whose FIELD equals VALUE (comm, pid or a probe field; also FIELD!=VALUE,
    /// and FIELD>=N, <=, >, < on numbers, e.g. status>=500); repeatable.
    #[arg(long = "filter", value_name = "FIELD=VALUE")]
    pub filters: Vec<String>,
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// What one row is.
    #[arg(value_enum)]
    pub scope: TopScopeArg,
    /// Limit to TARGET's pods (node/NAME, pod/NAME, deploy/NAME, …); default: every pod of the
    /// namespace (-n, -A) on every node.
    pub target: Option<String>,
    #[command(flatten)]
    pub selection: Selection,
    /// The column to sort by, largest first (name sorts A→Z).
    #[arg(long, value_enum, default_value_t = SortKey::Cpu)]
    pub sort: SortKey,
    /// Refresh interval.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub interval: Duration,
    /// Print one table and exit (for scripts, with -o json).
    #[arg(long)]
    pub once: bool,
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct BpftraceArgs {
    /// node/NAME (no container) or one container: pod/NAME [-c NAME].
    pub target: Option<String>,
    #[command(flatten)]
    pub selection: Selection,
    /// The program text.
    #[arg(
        short = 'e',
        value_name = "PROGRAM",
        conflicts_with = "file",
        required_unless_present = "file"
    )]
    pub program: Option<String>,
    /// A file holding the program.
    #[arg(short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Stop after this long; default: when the program exits or on Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct ProfileArgs {
    pub target: Option<String>,
    #[command(flatten)]
    pub selection: Selection,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub duration: Duration,
    /// Where to write the profile: NAME.svg, NAME.folded, NAME.pb.gz or NAME.pprof.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
    /// Samples per second (default: the agent's).
    #[arg(long, value_name = "HZ")]
    pub frequency: Option<u32>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TopScopeArg {
    Pods,
    Containers,
    Nodes,
}

impl From<TopScopeArg> for TopScope {
    fn from(scope: TopScopeArg) -> TopScope {
        match scope {
            TopScopeArg::Pods => TopScope::Pods,
            TopScopeArg::Containers => TopScope::Containers,
            TopScopeArg::Nodes => TopScope::Nodes,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortKey {
    Cpu,
    Runq,
    Syscalls,
    Opens,
    Retransmits,
    Requests,
    Name,
}

/// PROBE as typed: `tcp-connect`, `tcp_connect` and `tcpconnect` are the same probe.
/// A probe `run` accepts: a trace probe, or `top` or `profile` (TraceSessions only).
pub fn parse_session_probe(text: &str) -> Result<TraceProbe, String> {
    match text.to_ascii_lowercase().as_str() {
        "top" => Ok(TraceProbe::Top),
        "profile" => Ok(TraceProbe::Profile),
        _ => parse_probe(text).map_err(|e| format!("{e}; or, for a session, top or profile")),
    }
}

pub fn parse_probe(text: &str) -> Result<TraceProbe, String> {
    let squashed: String = text
        .chars()
        .filter(|c| !matches!(c, '-' | '_'))
        .collect::<String>()
        .to_ascii_lowercase();
    let probe = match squashed.as_str() {
        "exec" => TraceProbe::Exec,
        "exit" => TraceProbe::Exit,
        "open" => TraceProbe::Open,
        "tcpconnect" => TraceProbe::TcpConnect,
        "tcpaccept" => TraceProbe::TcpAccept,
        "tcpclose" => TraceProbe::TcpClose,
        "tcpretransmit" => TraceProbe::TcpRetransmit,
        "http" => TraceProbe::Http,
        "oomkill" => TraceProbe::OomKill,
        "signal" | "signals" => TraceProbe::Signal,
        _ => {
            return Err(format!(
                "unknown probe {text:?}: one of exec, exit, open, tcp-connect, tcp-accept, \
                 tcp-close, tcp-retransmit, http, oom-kill, signal"
            ))
        }
    };
    Ok(probe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_names_are_read_with_any_separator() {
        assert_eq!(parse_probe("tcp-connect"), Ok(TraceProbe::TcpConnect));
        assert_eq!(parse_probe("tcp_retransmit"), Ok(TraceProbe::TcpRetransmit));
        assert_eq!(parse_probe("OOM-KILL"), Ok(TraceProbe::OomKill));
        assert_eq!(parse_probe("signals"), Ok(TraceProbe::Signal));
        let error = parse_probe("kprobe").unwrap_err();
        assert!(
            error.starts_with("unknown probe \"kprobe\": one of exec,"),
            "{error}"
        );
    }

    #[test]
    fn a_session_also_takes_top_and_profile_which_trace_does_not() {
        assert_eq!(parse_session_probe("top"), Ok(TraceProbe::Top));
        assert_eq!(parse_session_probe("Profile"), Ok(TraceProbe::Profile));
        assert_eq!(parse_session_probe("http"), Ok(TraceProbe::Http));
        assert!(parse_probe("top").is_err());
        let error = parse_session_probe("flame").unwrap_err();
        assert!(
            error.ends_with("signal; or, for a session, top or profile"),
            "{error}"
        );
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
