use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use podscope_core::{ComponentConfig, FieldError};
use serde::Deserialize;

/// `extensions: session:` — the endpoint `kubectl podscope` talks to on this node.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Where the session endpoint listens. Default `127.0.0.1:7070`: the loopback of the agent
    /// pod, reached only through a port-forward into the pod (so access is exactly the
    /// Kubernetes permission `create pods/portforward` on the agent's namespace). Port 0 picks a
    /// free port (tests).
    pub endpoint: String,
    /// Sessions served at once (trace, top, bpftrace, profile and status alike); one more is
    /// refused with `busy`. Default 8, at most 64 (the kernel filter keeps one bit per session).
    pub max_sessions: u32,
    /// The node name put on every event and table. Default: the `NODE_NAME` environment
    /// variable (the chart sets it from `spec.nodeName`), else the host name.
    pub node_name: Option<String>,
    /// How long a client has to send its first line (`Hello`) before the connection is closed.
    /// Default 10s.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// Kernel BTF for the trace programs (CO-RE). Default `/sys/kernel/btf/vmlinux`.
    pub btf_path: PathBuf,
    pub bpftrace: BpftraceConfig,
    pub trace_sessions: TraceSessionsConfig,
    /// The `k8s_metadata` extension (in `service.extensions`, listed before this one) whose pod
    /// cache names the pods and containers of what no target named: a whole-node trace, `top`
    /// without targets. Without it those rows carry the pod UID and a short container id.
    pub k8s_metadata: Option<String>,
    /// How profiles become files: given by the agent binary, not a setting.
    #[serde(skip)]
    pub profile_encoder: super::profile::ProfileEncoder,
}

/// `bpftrace:` — running the real bpftrace for `kubectl podscope bpftrace`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BpftraceConfig {
    /// Run users' bpftrace programs. Default false: a program is arbitrary kernel code run as
    /// the agent (root); enable it only where everyone allowed to port-forward into the agent
    /// may run that.
    pub enabled: bool,
    /// The bpftrace binary (a name looked up in `PATH`, or a path). Default `bpftrace` (the
    /// agent image ships it).
    pub path: PathBuf,
    /// The longest a bpftrace session may run; a request for longer (or for no limit) is cut
    /// to this. Default 10m.
    #[serde(with = "humantime_serde")]
    pub max_duration: Duration,
}

/// `trace_sessions:` — running the cluster's `TraceSession` objects whose pods are on this node.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceSessionsConfig {
    /// The `k8s_metadata` extension that watches `TraceSession` objects and whose pod cache
    /// says which of their pods run here. It must come before this extension in
    /// `service.extensions`. Unset (the default): TraceSessions are not run.
    pub extension: Option<String>,
    /// The memory one session's log of events (for `attach` and `logs`) may keep on this node,
    /// in MiB; past it the oldest events are dropped and counted. Default 16.
    pub log_per_session_mib: u64,
    /// The memory every session log of this node may keep together, in MiB; past it the
    /// largest log drops its oldest events. Default 128.
    pub log_total_mib: u64,
    /// A namespace's TraceSessions that run at once; the next ones wait (Pending, reason
    /// `NamespaceSessionLimit`) in creation order until one ends. Default 3. Every agent must
    /// have the same value for them to agree on which sessions run.
    pub max_running_per_namespace: u32,
    /// The events a session counts per second on a node (all its probes together); those over
    /// it are dropped and counted as `dropped` in its status. Default 10000.
    pub max_events_per_second: u64,
    /// Run the `spec.bpftrace` programs of TraceSessions. Default false: such a program is
    /// arbitrary kernel code run as root, written by whoever may create TraceSessions in any
    /// namespace; separate from `bpftrace.enabled` (who may port-forward into the agent). Off,
    /// such a session is Failed with reason `BpftraceDisabled`.
    pub allow_bpftrace: bool,
}

impl Default for TraceSessionsConfig {
    fn default() -> Self {
        TraceSessionsConfig {
            extension: None,
            log_per_session_mib: 16,
            log_total_mib: 128,
            max_running_per_namespace: 3,
            max_events_per_second: 10_000,
            allow_bpftrace: false,
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            endpoint: format!("127.0.0.1:{}", podscope_core::session::DEFAULT_PORT),
            max_sessions: 8,
            node_name: None,
            hello_timeout: Duration::from_secs(10),
            btf_path: PathBuf::from("/sys/kernel/btf/vmlinux"),
            bpftrace: BpftraceConfig::default(),
            trace_sessions: TraceSessionsConfig::default(),
            k8s_metadata: None,
            profile_encoder: Default::default(),
        }
    }
}

impl Default for BpftraceConfig {
    fn default() -> Self {
        BpftraceConfig {
            enabled: false,
            path: PathBuf::from("bpftrace"),
            max_duration: Duration::from_secs(600),
        }
    }
}

/// The most sessions the kernel filter can tell apart (one bit each).
pub const SESSION_SLOTS: u32 = podscope_ebpf::abi::PODSCOPE_TRACE_MAX_SESSIONS;

impl ComponentConfig for SessionConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Err(e) = self.endpoint.parse::<SocketAddr>() {
            errors.push(FieldError::new(
                "endpoint",
                format!(
                    "{:?} is not an address and port such as 127.0.0.1:7070 ({e})",
                    self.endpoint
                ),
            ));
        }
        if self.max_sessions == 0 || self.max_sessions > SESSION_SLOTS {
            errors.push(FieldError::new(
                "max_sessions",
                format!("must be between 1 and {SESSION_SLOTS}"),
            ));
        }
        if self.node_name.as_deref().is_some_and(str::is_empty) {
            errors.push(FieldError::new(
                "node_name",
                "must not be empty (leave it out for $NODE_NAME or the host name)",
            ));
        }
        if self.hello_timeout.is_zero() {
            errors.push(FieldError::new("hello_timeout", "must be more than 0s"));
        }
        if self.bpftrace.path.as_os_str().is_empty() {
            errors.push(FieldError::new("bpftrace.path", "must not be empty"));
        }
        if let Some(extension) = &self.k8s_metadata {
            match podscope_core::ComponentId::parse(extension) {
                Ok(id) if id.type_name() == "k8s_metadata" => {}
                Ok(_) => errors.push(FieldError::new(
                    "k8s_metadata",
                    format!("{extension:?} is not a k8s_metadata extension id"),
                )),
                Err(e) => errors.push(FieldError::new("k8s_metadata", e)),
            }
        }
        if self.bpftrace.max_duration.is_zero() {
            errors.push(FieldError::new(
                "bpftrace.max_duration",
                "must be more than 0s",
            ));
        }
        if self.trace_sessions.log_per_session_mib == 0 {
            errors.push(FieldError::new(
                "trace_sessions.log_per_session_mib",
                "must be at least 1",
            ));
        }
        if self.trace_sessions.log_total_mib < self.trace_sessions.log_per_session_mib {
            errors.push(FieldError::new(
                "trace_sessions.log_total_mib",
                format!(
                    "must be at least trace_sessions.log_per_session_mib ({})",
                    self.trace_sessions.log_per_session_mib
                ),
            ));
        }
        if let Some(Err(e)) = self
            .trace_sessions
            .extension
            .as_deref()
            .map(podscope_core::ComponentId::parse)
        {
            errors.push(FieldError::new("trace_sessions.extension", e.to_string()));
        }
        if self.trace_sessions.max_running_per_namespace == 0 {
            errors.push(FieldError::new(
                "trace_sessions.max_running_per_namespace",
                "must be at least 1",
            ));
        }
        if self.trace_sessions.max_events_per_second == 0 {
            errors.push(FieldError::new(
                "trace_sessions.max_events_per_second",
                "must be at least 1",
            ));
        }
        errors
    }
}

impl SessionConfig {
    /// The node name events are labelled with (see `node_name`).
    pub fn resolved_node_name(&self, host_name: &str) -> String {
        self.node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(|| host_name.to_string())
    }
}
