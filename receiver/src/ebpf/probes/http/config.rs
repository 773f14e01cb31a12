use std::time::Duration;

use podscope_core::FieldError;
use serde::Deserialize;

use crate::ebpf::probes::MapSizes;

/// `probes.http:`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpProbeConfig {
    /// Default true.
    pub enabled: bool,
    /// Fail startup if the probe cannot attach (default false: log one line and go on).
    pub required: bool,
    /// Kernel map sizes by map name (see [`MapSizes`]).
    pub max_entries: MapSizes,
    /// How the socket syscalls are hooked. `auto` (default): the per-syscall tracepoints
    /// (`syscalls:sys_enter_write`, …), mounting tracefs when it is missing, else the raw
    /// `sys_enter`/`sys_exit` hooks; `tracepoints` or `raw` to choose (see BENCHMARKS.md for
    /// what each costs).
    pub syscall_hooks: SyscallHooks,
    /// Bytes of a request head captured (method, path, `traceparent`, …; heads split over
    /// several reads are put together up to this), and of each read or write of an HTTP/2
    /// connection. 64 to 1024, default 512.
    pub capture_bytes: u32,
    /// Bytes of events that wake the agent early; below that it reads them every
    /// `event_poll_interval`. Default 65536.
    pub wakeup_bytes: u64,
    /// Default 100ms.
    #[serde(with = "humantime_serde")]
    pub event_poll_interval: Duration,
    /// `http.route`: rules and the per-container cap.
    pub routes: RoutesConfig,
    /// Regexes whose matches in `url.path` (and routes made from it) are replaced by
    /// `<redacted>`.
    pub redact: Vec<String>,
    /// Spans: which are kept.
    pub spans: SpansConfig,
    /// HTTPS through OpenSSL.
    pub tls: TlsConfig,
}

impl Default for HttpProbeConfig {
    fn default() -> Self {
        HttpProbeConfig {
            enabled: true,
            required: false,
            max_entries: MapSizes::default(),
            syscall_hooks: SyscallHooks::Auto,
            capture_bytes: 512,
            wakeup_bytes: 65536,
            event_poll_interval: Duration::from_millis(100),
            routes: RoutesConfig::default(),
            redact: Vec::new(),
            spans: SpansConfig::default(),
            tls: TlsConfig::default(),
        }
    }
}

crate::ebpf::probes::probe_settings!(HttpProbeConfig);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyscallHooks {
    Auto,
    Tracepoints,
    Raw,
}

/// `routes:`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutesConfig {
    /// Path patterns tried in order; the first that matches is the route. A segment `{name}`
    /// or `*` matches any one segment, a last segment `**` any rest (`/users/{id}/cart`,
    /// `/static/**`). Paths no rule matches get the heuristic: segments that are numbers, UUIDs
    /// or long hex strings become `{id}`.
    pub rules: Vec<String>,
    /// Distinct routes kept per container; further ones are reported as route `{other}` and
    /// counted in `podscope_ebpf_http_route_overflow_total`. Default 100.
    pub max_per_container: usize,
}

impl Default for RoutesConfig {
    fn default() -> Self {
        RoutesConfig {
            rules: Vec::new(),
            max_per_container: 100,
        }
    }
}

/// `spans:`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpansConfig {
    /// Share of traces whose spans are sent, decided on the trace id (so both ends of a call,
    /// and every span of a trace, are kept or dropped together). RED metrics count every
    /// request whatever this is. 0 to 1, default 1.
    pub sampling_ratio: f64,
}

impl Default for SpansConfig {
    fn default() -> Self {
        SpansConfig {
            sampling_ratio: 1.0,
        }
    }
}

/// `tls:`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Uprobes on OpenSSL's `SSL_read`/`SSL_write` (and `_ex`). Default true.
    pub enabled: bool,
    /// The libssl files to probe: host paths, or `container:<path>` for that path inside every
    /// container. A file name may end in `*` (`libssl.so*`). Missing files are skipped.
    pub libraries: Vec<String>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        let paths = [
            "/usr/lib/x86_64-linux-gnu/libssl.so*",
            "/lib/x86_64-linux-gnu/libssl.so*",
            "/usr/lib64/libssl.so*",
            "/usr/lib/libssl.so*",
            "/lib/libssl.so*",
        ];
        TlsConfig {
            enabled: true,
            libraries: paths
                .iter()
                .map(|p| p.to_string())
                .chain(paths.iter().map(|p| format!("container:{p}")))
                .collect(),
        }
    }
}

impl HttpProbeConfig {
    pub fn validate(&self, prefix: &str, errors: &mut Vec<FieldError>) {
        let at = |key: &str| format!("{prefix}.{key}");
        if !(64..=podscope_ebpf::abi::PODSCOPE_HTTP_CAPTURE_MAX).contains(&self.capture_bytes) {
            errors.push(FieldError::new(
                at("capture_bytes"),
                format!(
                    "must be 64 to {}",
                    podscope_ebpf::abi::PODSCOPE_HTTP_CAPTURE_MAX
                ),
            ));
        }
        if self.wakeup_bytes == 0 {
            errors.push(FieldError::new(at("wakeup_bytes"), "must be at least 1"));
        }
        if self.event_poll_interval < Duration::from_millis(1) {
            errors.push(FieldError::new(
                at("event_poll_interval"),
                "must be at least 1ms",
            ));
        }
        if self.routes.max_per_container == 0 {
            errors.push(FieldError::new(
                at("routes.max_per_container"),
                "must be at least 1",
            ));
        }
        for (i, rule) in self.routes.rules.iter().enumerate() {
            if let Err(e) = super::route::RoutePattern::new(rule) {
                errors.push(FieldError::new(format!("{prefix}.routes.rules[{i}]"), e));
            }
        }
        for (i, pattern) in self.redact.iter().enumerate() {
            if let Err(e) = regex::Regex::new(pattern) {
                errors.push(FieldError::new(
                    format!("{prefix}.redact[{i}]"),
                    format!("invalid regex: {e}"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.spans.sampling_ratio) {
            errors.push(FieldError::new(
                at("spans.sampling_ratio"),
                "must be 0 to 1",
            ));
        }
        for (i, library) in self.tls.libraries.iter().enumerate() {
            let path = library.strip_prefix("container:").unwrap_or(library);
            if !path.starts_with('/') {
                errors.push(FieldError::new(
                    format!("{prefix}.tls.libraries[{i}]"),
                    "must be an absolute path, or container:<absolute path inside the container>",
                ));
            }
        }
    }
}
