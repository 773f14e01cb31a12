//! `TraceSession` objects run by this node's agent: a namespace owner's trace of pods of their
//! own namespace, kept in the object's status rather than streamed to a terminal. The session
//! extension runs them (with `trace_sessions.extension` naming the `k8s_metadata` extension
//! that watches them) through the same trace object as `kubectl podscope trace`
//! ([`TraceKernel`]): one subscription per probe, filtered in the kernel to the cgroups of the
//! session's pods on this node, retargeted when pods come or go under its selector.
//!
//! Each agent writes its node's entry of `status.nodes` (events per probe, lost, pods, times) and
//! the merged status (phase, reason, the nodes' sums: `trace_session_status`, the same merge on
//! every node); and deletes a finished session once `ttlAfterFinished` has passed. Each event
//! is also kept in the session's log on this node ([`SessionLogs`]) until the session object is
//! gone, for `attach` and `logs`; the first agent to run a session gives it the attach token
//! that reads those logs (`status.attachToken`). It refuses, with the reason in the status, a
//! session naming a pod outside its namespace, a probe it cannot run, a bpftrace program the
//! agent does not allow, or `export: true` where no `trace_sessions` receiver takes what it
//! records. An exported session's events and summaries also go to that receiver
//! ([`SessionExports`]).
//!
//! A namespace's sessions run up to the cap of `trace_sessions.max_running_per_namespace`, the
//! others wait (`caps`); a session counts at most `max_events_per_second` events, the others
//! are dropped and counted. A `spec.bpftrace` program runs beside the probes (`bpftrace_run`),
//! started again over the new cgroups when pods join or leave (its lines counted across); the
//! probes that are not the trace object's (`http`, `top`, `profile`) run beside them too
//! (`session_probes`); a `spec.schedule` makes runs of `duration` at each firing (`schedule`).
//!
//! It must not reach past the session's namespace: pods are matched in that namespace only,
//! whatever the spec says.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use podscope_core::session::TraceProbe;
use podscope_k8s::cgroup::{parse_container_cgroup, CgroupIndex};
use podscope_k8s::k8s_metadata::{TraceSessionObject, TraceSessions};
use podscope_k8s::K8sMetadata;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::bpftrace_run::{self, BpftraceRun};
use super::caps::{admitted, Candidate, RateCap};
use super::config::TraceSessionsConfig;
use super::events::{clock_offset_ns, to_event};
use super::export::{ExportedSummary, SessionExports};
use super::schedule::{RunWindow, Schedule};
use super::server::probe_name;
use super::session_http::HttpRun;
use super::session_log::{SessionLog, SessionLogs};
use super::session_probes::{CgroupNames, RunSink, SessionProbeRun};
use super::session_profile::ProfileRun;
use super::session_top::TopRun;
use super::summary::RunSummary;
use super::targets::{node_labels, CgroupLabels};
use super::trace::{Subscription, TraceKernel, TraceRefusal};
use super::trace_session_status::{merge, refused_status, rfc3339, Scheduled, BPFTRACE};
use crate::ebpf::programs::spec::LabelSelectorSpec;

/// The phase of an exported summary of a run the agent's stop ended (never a status's: the
/// session runs again when the agent is back).
pub const AGENT_STOPPED: &str = "AgentStopped";
/// How often running sessions' counts are written and deadlines and TTLs checked.
const TICK: Duration = Duration::from_secs(1);
/// How long changes are gathered before acting on them (a rollout changes many pods at once).
const SETTLE: Duration = Duration::from_millis(100);
/// How long the first pass waits for the agent to be ready: the receivers start after the
/// extensions, and a session's `http` and `top` need theirs.
const STARTUP_WAIT: Duration = Duration::from_secs(30);

/// `spec` of a `TraceSession` (`podscope.dev/v1alpha1`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TraceSessionSpec {
    /// The pods to trace, of the session's own namespace only.
    pub targets: SessionTargets,
    /// The built-in probes: the trace probes (as `kubectl podscope trace` names them: exec,
    /// exit, open, tcp_connect, …, http) and `top` and `profile` (`session_probes`); may be
    /// left out with a `bpftrace` program.
    #[serde(default)]
    pub probes: Vec<TraceProbe>,
    /// A bpftrace program, its output lines counted; `$session_cgroups` in it is the predicate
    /// over the session's pods' cgroups. Run only where the agent allows it.
    #[serde(default)]
    pub bpftrace: Option<String>,
    /// How long it runs, counted from the object's creation (`30s`, `5m`); or `deadline`.
    #[serde(default, with = "humantime_serde")]
    pub duration: Option<Duration>,
    /// When it ends (RFC 3339); or `duration`.
    #[serde(default)]
    pub deadline: Option<String>,
    /// How long a finished session (Completed or Failed) is kept before the agent deletes it;
    /// unset: kept until someone deletes it.
    #[serde(default, with = "humantime_serde")]
    pub ttl_after_finished: Option<Duration>,
    /// A cron pattern (UTC; five fields, or six with seconds first): each firing runs the
    /// session for `duration`.
    #[serde(default)]
    pub schedule: Option<String>,
    /// Its events and summaries also go to the agent's pipelines, through the
    /// `trace_sessions` receiver (refused where the agent has none).
    #[serde(default)]
    pub export: Option<bool>,
}

/// `spec.targets`: pods by name, by label selector, or both (their union).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SessionTargets {
    /// Pod names of the session's namespace (`name`, or `namespace/name` with that namespace).
    #[serde(default)]
    pub pods: Vec<String>,
    /// Pods of the session's namespace whose labels match.
    #[serde(default)]
    pub pod_selector: Option<LabelSelectorSpec>,
}

/// Why a session cannot run: a status `reason` and a `message` naming what in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

fn refusal(reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        message: message.into(),
    }
}

/// A session's spec checked: what to trace, where, until when.
#[derive(Debug, Clone)]
pub struct ResolvedSession {
    pub namespace: String,
    pub pod_names: Vec<String>,
    pub selector: Option<podscope_k8s::labels::Selector>,
    pub probes: Vec<TraceProbe>,
    pub bpftrace: Option<String>,
    /// When it ends; for a scheduled session, when its current or last run ends (see
    /// [`ResolvedSession::run_window`]).
    pub end: SystemTime,
    pub created: SystemTime,
    /// `spec.schedule` and the duration of each run.
    pub schedule: Option<(Schedule, Duration)>,
    pub ttl_after_finished: Option<Duration>,
    /// `spec.export`.
    pub export: bool,
}

impl ResolvedSession {
    /// The run current or last at `now`: the whole session's, or for a scheduled session the
    /// last firing's (`None` before the first).
    pub fn run_window(&self, now: SystemTime) -> Option<RunWindow> {
        match &self.schedule {
            Some((schedule, duration)) => schedule.last_run(self.created, now, *duration),
            None => Some(RunWindow {
                start: self.created,
                end: self.end,
            }),
        }
    }

    fn selects(&self, pod: &podscope_k8s::k8s_metadata::PodMeta) -> bool {
        if *pod.namespace != *self.namespace {
            return false;
        }
        if self.pod_names.iter().any(|name| **name == *pod.name) {
            return true;
        }
        self.selector.as_ref().is_some_and(|selector| {
            let labels = pod
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            podscope_k8s::labels::matches(selector, &labels)
        })
    }
}

impl TraceSessionSpec {
    pub fn parse(spec: &Value) -> Result<TraceSessionSpec, Refusal> {
        serde_path_to_error::deserialize(spec.clone()).map_err(|e| {
            let at = match e.path().to_string().as_str() {
                "." => "spec".to_string(),
                path => format!("spec.{path}"),
            };
            refusal("InvalidSpec", format!("{at}: {}", e.inner()))
        })
    }

    /// What the session in `namespace`, created at `created`, asks for, or the first reason it
    /// is refused.
    pub fn resolve(
        &self,
        namespace: &str,
        created: SystemTime,
    ) -> Result<ResolvedSession, Refusal> {
        let mut pod_names = Vec::new();
        for (i, pod) in self.targets.pods.iter().enumerate() {
            let name = match pod.split_once('/') {
                Some((other, name)) if other != namespace => {
                    return Err(refusal(
                        "TargetOutsideNamespace",
                        format!(
                            "spec.targets.pods[{i}]: pod {other}/{name} is in namespace {other}, outside the session's namespace {namespace}; a TraceSession traces pods of its own namespace only"
                        ),
                    ))
                }
                Some((_, name)) => name,
                None => pod.as_str(),
            };
            if name.is_empty() {
                return Err(refusal(
                    "InvalidSpec",
                    format!("spec.targets.pods[{i}]: empty pod name"),
                ));
            }
            pod_names.push(name.to_string());
        }
        let selector =
            match &self.targets.pod_selector {
                Some(spec) => Some(spec.selector().map_err(|e| {
                    refusal("InvalidSpec", format!("spec.targets.podSelector: {e}"))
                })?),
                None => None,
            };
        if pod_names.is_empty() && selector.is_none() {
            return Err(refusal(
                "InvalidSpec",
                "spec.targets: names no pod (give pods, a podSelector, or both)",
            ));
        }
        if self.probes.is_empty() && self.bpftrace.is_none() {
            return Err(refusal(
                "InvalidSpec",
                "spec.probes: names no probe (give probes, a bpftrace program, or both)",
            ));
        }
        if self
            .bpftrace
            .as_deref()
            .is_some_and(|p| p.trim().is_empty())
        {
            return Err(refusal(
                "InvalidSpec",
                "spec.bpftrace: the program is empty",
            ));
        }
        let schedule = match &self.schedule {
            None => None,
            Some(pattern) => {
                let schedule = Schedule::parse(pattern).map_err(|e| {
                    refusal(
                        "InvalidSpec",
                        format!("spec.schedule: {pattern:?} is not a cron pattern ({e})"),
                    )
                })?;
                let Some(duration) = self.duration.filter(|_| self.deadline.is_none()) else {
                    return Err(refusal(
                        "InvalidSpec",
                        "spec: a scheduled session runs for its duration from each firing: give duration (such as 5m), not deadline",
                    ));
                };
                Some((schedule, duration))
            }
        };
        let end = match (self.duration, &self.deadline) {
            (Some(_), Some(_)) => {
                return Err(refusal(
                    "InvalidSpec",
                    "spec: give duration or deadline, not both",
                ))
            }
            (None, None) => {
                return Err(refusal(
                    "InvalidSpec",
                    "spec: give a duration (such as 5m) or a deadline (RFC 3339)",
                ))
            }
            (Some(duration), None) => created + duration,
            (None, Some(deadline)) => humantime_serde::re::humantime::parse_rfc3339_weak(deadline)
                .map_err(|e| {
                    refusal(
                        "InvalidSpec",
                        format!("spec.deadline: {deadline:?} is not an RFC 3339 time ({e})"),
                    )
                })?,
        };
        Ok(ResolvedSession {
            namespace: namespace.to_string(),
            pod_names,
            selector,
            probes: self.probes.clone(),
            bpftrace: self.bpftrace.clone(),
            // A scheduled session's runs have their own ends.
            end: if schedule.is_some() { created } else { end },
            created,
            schedule,
            ttl_after_finished: self.ttl_after_finished,
            export: self.export == Some(true),
        })
    }
}

/// What the session extension gives the task.
pub struct TraceSessionRunner {
    pub sessions: TraceSessions,
    pub metadata: Arc<K8sMetadata>,
    pub kernel: Arc<TraceKernel>,
    /// Where each session's events are kept for `attach` and `logs`.
    pub logs: Arc<SessionLogs>,
    /// The node name on the kept events.
    pub node: String,
    pub cgroup_root: std::path::PathBuf,
    /// The caps (`max_running_per_namespace`, `max_events_per_second`) and `allow_bpftrace`.
    pub config: TraceSessionsConfig,
    /// The bpftrace binary (`bpftrace.path`).
    pub bpftrace_path: std::path::PathBuf,
    /// The extension's state: the http probes' exchanges, the receivers' figures (`top`), the
    /// profile encoder.
    pub(super) shared: Arc<super::Shared>,
    /// Where sessions with `export: true` hand their events and summaries.
    pub export: Arc<SessionExports>,
}

/// A session running on this node.
struct Run {
    uid: String,
    /// Per probe: its subscription (dropped at the end) and the task counting its events.
    probes: Vec<ProbeRun>,
    /// Its probes that are not the trace object's (`http`, `top`, `profile`).
    others: Vec<SessionProbeRun>,
    pods: Vec<String>,
    cgroups: Vec<u64>,
    lost: u64,
    /// The session's events-per-second cap here; what it dropped.
    rate: Arc<RateCap>,
    /// Top keys and durations of its counted events.
    summary: Arc<Mutex<RunSummary>>,
    /// Its `spec.bpftrace` program, running.
    bpftrace: Option<BpftraceRun>,
    /// Lines its bpftrace programs printed before the last restart (one per change of the
    /// run's cgroups: `$session_cgroups` is written into the program).
    bpftrace_lines_before: u64,
    /// Why its bpftrace program could not be started again (the run then fails).
    bpftrace_restart_failure: Option<String>,
    started: SystemTime,
    /// Where its events are kept (outlives the run, until the session object goes).
    log: Arc<SessionLog>,
    names: CgroupNames,
    /// The run of the session it is: its window and, for a scheduled session, its number.
    window: RunWindow,
    number: Option<u64>,
}

struct ProbeRun {
    probe: TraceProbe,
    subscription: Subscription,
    count: Arc<AtomicU64>,
    counter: JoinHandle<()>,
}

/// What this node knows of a session across passes.
#[derive(Default)]
struct Known {
    run: Option<Run>,
    /// The node entry last written, and when.
    node_entry: Option<(Map<String, Value>, tokio::time::Instant)>,
    /// The merged status last written.
    merged: Option<Map<String, Value>>,
    /// When this node first saw the session fail (its completion time).
    failed_at: Option<SystemTime>,
    /// This node wrote the session's attach token.
    token_claimed: bool,
    /// A scheduled session's firings counted so far: up to which, and how many.
    firings: Option<(SystemTime, u64)>,
}

impl Known {
    /// The number of the scheduled run that started at `start` (the first is 1). Counted on
    /// from what `status` says (`lastScheduleTime`, `runs`) when this agent has not counted yet,
    /// so that a restarted agent does not walk every firing since the session's creation.
    fn run_number(
        &mut self,
        schedule: &Schedule,
        created: SystemTime,
        status: &Value,
        start: SystemTime,
    ) -> u64 {
        let written = || {
            let at = humantime_serde::re::humantime::parse_rfc3339_weak(
                status["lastScheduleTime"].as_str()?,
            )
            .ok()?;
            Some((at, status["runs"].as_u64()?))
        };
        let (from, counted) = self
            .firings
            .or_else(written)
            .filter(|(at, _)| *at <= start)
            .unwrap_or((created, 0));
        let number = counted + schedule.firings(from, start);
        self.firings = Some((start, number));
        number
    }
}

impl TraceSessionRunner {
    pub async fn run(self, cancel: CancellationToken) {
        let mut known: HashMap<(String, String), Known> = HashMap::new();
        let mut index = CgroupIndex::new(self.cgroup_root.clone());
        let mut session_changes = self.sessions.changes();
        let mut pod_changes = self.metadata.changes();
        let mut ticker = tokio::time::interval(TICK);
        let started = tokio::time::Instant::now();
        while self.shared.readiness.check().is_err() && started.elapsed() < STARTUP_WAIT {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(SETTLE) => {}
            }
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                Ok(()) = session_changes.changed() => tokio::time::sleep(SETTLE).await,
                Ok(()) = pod_changes.changed() => tokio::time::sleep(SETTLE).await,
                _ = ticker.tick() => {}
            }
            session_changes.mark_unchanged();
            pod_changes.mark_unchanged();
            index.refresh();
            self.reconcile(&mut known, &index).await;
        }
        // The agent stops (its `trace_sessions` receivers end the runs before the pipelines
        // drain: `SessionExports::end_runs`). An exported run hands its final counts over, phase
        // AgentStopped; its status entry keeps the last tick's counts (the session runs again,
        // a new run, when the agent is back).
        let sessions = self.sessions.sessions();
        let ending = known.drain().filter_map(|((namespace, name), entry)| {
            let run = entry.run?;
            let session = sessions
                .iter()
                .find(|s| s.namespace == namespace && s.name == name && s.uid == run.uid)
                .cloned();
            Some(self.end_at_stop(run, session))
        });
        // At once: each may wait for its bpftrace program to print its maps.
        futures::future::join_all(ending).await;
    }

    /// Ends `run` of `session` as the agent stops; exports its final summary when the session
    /// asks for export.
    async fn end_at_stop(&self, run: Run, session: Option<TraceSessionObject>) {
        let (mut node, _) = finish(run).await;
        let now = SystemTime::now();
        let Some((session, resolved)) =
            session.and_then(|s| self.resolve(&s, now).ok().map(|r| (s, r)))
        else {
            return;
        };
        node.insert("phase".into(), json!(AGENT_STOPPED));
        node.insert(
            "message".into(),
            json!(format!(
                "the agent on node {} stopped before the run ended; these are its counts until then",
                self.sessions.node()
            )),
        );
        self.export_summary(&session, &resolved, &node);
    }

    async fn reconcile(&self, known: &mut HashMap<(String, String), Known>, index: &CgroupIndex) {
        let sessions = self.sessions.sessions();
        let present: std::collections::HashSet<(String, String)> = sessions
            .iter()
            .map(|s| (s.namespace.clone(), s.name.clone()))
            .collect();
        // Deleted sessions: their runs stop.
        let gone: Vec<(String, String)> = known
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(run) = known.remove(&key).and_then(|k| k.run) {
                tracing::info!(session = %format!("{}/{}", key.0, key.1), "TraceSession deleted: its trace stops");
                finish(run).await;
            }
        }
        // A session object gone (deleted, or its TTL passed): its kept events go too.
        for key in self.logs.keys() {
            if !present.contains(&key) {
                self.logs.remove(&key);
            }
        }
        let now = SystemTime::now();
        // Which sessions may run, decided alike on every node: those whose time has come, that
        // have not failed, the oldest first in each namespace.
        let candidates: Vec<Candidate> = sessions
            .iter()
            .filter(|s| s.status["phase"] != "Failed")
            .filter_map(|s| {
                let resolved = self.resolve(s, now).ok()?;
                let window = resolved.run_window(now)?;
                (now < window.end).then_some(Candidate {
                    namespace: &s.namespace,
                    name: &s.name,
                    uid: &s.uid,
                    created: s.created.unwrap_or(now),
                })
            })
            .collect();
        let may_run: std::collections::HashSet<String> =
            admitted(&candidates, self.config.max_running_per_namespace)
                .into_iter()
                .map(str::to_string)
                .collect();
        for session in &sessions {
            let entry = known
                .entry((session.namespace.clone(), session.name.clone()))
                .or_default();
            if entry.run.as_ref().is_some_and(|r| r.uid != session.uid) {
                // Replaced by a new object of the same name.
                if let Some(run) = entry.run.take() {
                    finish(run).await;
                }
                *entry = Known::default();
            }
            let admitted = may_run.contains(&session.uid);
            self.reconcile_one(session, entry, index, now, admitted)
                .await;
        }
    }

    async fn reconcile_one(
        &self,
        session: &TraceSessionObject,
        known: &mut Known,
        index: &CgroupIndex,
        now: SystemTime,
        admitted: bool,
    ) {
        let mut resolved = match self.resolve(session, now) {
            Ok(resolved) => resolved,
            Err(refused) => {
                if let Some(run) = known.run.take() {
                    finish(run).await;
                }
                let failed_at = *known.failed_at.get_or_insert(now);
                let merged = refused_status(&refused, failed_at);
                self.write_merged(session, known, merged).await;
                // Without a readable spec there is no TTL to honour.
                return;
            }
        };
        // The run this is (a scheduled session's last firing's; before its first, none).
        let window = resolved.run_window(now);
        let number = match (&resolved.schedule, window) {
            (Some((schedule, _)), Some(window)) => {
                Some(known.run_number(schedule, resolved.created, &session.status, window.start))
            }
            _ => None,
        };
        resolved.end = window.map_or(resolved.created, |w| w.end);
        // A run of an earlier firing (cut at this one) ends.
        // (An unscheduled session keeps its run when its spec changes its end.)
        let firing = window.map(|w| w.start);
        if let Some(run) = known
            .run
            .take_if(|run| resolved.schedule.is_some() && Some(run.window.start) != firing)
        {
            let end = run.window.end;
            let (mut node, _) = finish(run).await;
            node.insert("endTime".into(), json!(rfc3339(end)));
            self.export_summary(session, &resolved, &node);
            self.write_node(session, known, node, true).await;
        }
        let (pods, cgroups) = self.pods_here(&resolved, index);
        let running = window.is_some_and(|w| w.start <= now && now < w.end);
        // Start, follow pods, or finish this node's run. A node where it failed to start does
        // not try again: its entry says why, and the session is Failed.
        if running
            && admitted
            && known.run.is_none()
            && known.failed_at.is_none()
            && !cgroups.is_empty()
        {
            let window = window.expect("running: a window");
            match self.start(
                session,
                &resolved,
                (pods.clone(), cgroups.clone()),
                index,
                now,
                (window, number),
            ) {
                Ok(run) => {
                    tracing::info!(session = %session.key(), pods = ?run.pods, "TraceSession running on this node");
                    known.run = Some(run);
                }
                Err(message) => {
                    known.failed_at.get_or_insert(now);
                    let mut node = Map::new();
                    node.insert("phase".into(), json!("Failed"));
                    node.insert("pods".into(), json!(pods));
                    node.insert("message".into(), json!(message));
                    self.write_node(session, known, node, true).await;
                }
            }
        } else if let Some(run) = known.run.as_mut().filter(|_| running) {
            if run.cgroups != cgroups && !cgroups.is_empty() {
                *run.names.write().unwrap_or_else(|e| e.into_inner()) =
                    self.names_of(&cgroups, index);
                for probe in &run.probes {
                    if let Err(e) = probe.subscription.retarget(cgroups.clone()) {
                        tracing::warn!(session = %session.key(), error = ?e, "TraceSession: cannot follow its pods' cgroups");
                    }
                }
                for probe in &mut run.others {
                    probe.retarget(&cgroups, index);
                }
                if let Some(program) = &resolved.bpftrace {
                    self.restart_bpftrace(session, run, program, &cgroups).await;
                }
                run.cgroups = cgroups;
                run.pods = pods;
            }
        }
        self.attach_token(session, known).await;
        let bpftrace_failure = known.run.as_ref().and_then(|run| {
            run.bpftrace_restart_failure
                .clone()
                .or_else(|| run.bpftrace.as_ref()?.failure())
        });
        if let Some(message) = bpftrace_failure {
            let run = known.run.take().expect("checked above");
            let (mut node, _) = finish(run).await;
            known.failed_at.get_or_insert(now);
            node.insert("phase".into(), json!("Failed"));
            node.insert("message".into(), json!(message));
            self.export_summary(session, &resolved, &node);
            self.write_node(session, known, node, true).await;
        }
        if let Some(run) = known.run.as_mut() {
            for probe in &mut run.probes {
                run.lost += probe.subscription.lost_since();
            }
            for probe in &mut run.others {
                run.lost += probe.lost_since();
            }
            if running {
                let node = node_entry(run, "Running", None);
                self.export_summary(session, &resolved, &node);
                self.write_node(session, known, node, false).await;
            } else {
                let run = known.run.take().expect("checked above");
                let (mut node, _) = finish(run).await;
                node.insert("endTime".into(), json!(rfc3339(resolved.end)));
                self.export_summary(session, &resolved, &node);
                self.write_node(session, known, node, true).await;
            }
        } else if let Some((last, _)) = &known.node_entry {
            // The run ended but its log is kept: the node's total bound may still push
            // events out of it, and the entry says so.
            let dropped = self
                .logs
                .get(&(session.namespace.clone(), session.name.clone()))
                .filter(|log| log.uid == session.uid)
                .map(|log| log.dropped());
            if let Some(dropped) = dropped.filter(|d| last.get("logDropped") != Some(&json!(d))) {
                let mut node = last.clone();
                node.insert("logDropped".into(), json!(dropped));
                self.write_node(session, known, node, false).await;
            }
        }
        let waiting = (running && !admitted && known.run.is_none())
            .then_some(self.config.max_running_per_namespace);
        let scheduled = resolved.schedule.as_ref().map(|(schedule, _)| Scheduled {
            last: window.zip(number),
            next: schedule.next_firing(now),
        });
        let own_entry = known
            .node_entry
            .as_ref()
            .map(|(entry, _)| (self.sessions.node(), entry));
        let merged = merge(
            session,
            own_entry,
            known.failed_at,
            &resolved,
            now,
            waiting,
            scheduled,
        );
        let finished_at = merged
            .get("completionTime")
            .and_then(Value::as_str)
            .and_then(|t| humantime_serde::re::humantime::parse_rfc3339_weak(t).ok());
        self.write_merged(session, known, merged).await;
        // TTL after finishing: whichever agent sees it first deletes the session.
        if let (Some(ttl), Some(finished)) = (resolved.ttl_after_finished, finished_at) {
            if now >= finished + ttl {
                match self.sessions.delete(session).await {
                    Ok(()) => {
                        tracing::info!(session = %session.key(), "TraceSession deleted: its ttlAfterFinished passed")
                    }
                    Err(e) => {
                        tracing::warn!(session = %session.key(), error = %e, "cannot delete the TraceSession")
                    }
                }
            }
        }
    }

    /// The session's spec checked, and what this agent allows of it.
    fn resolve(
        &self,
        session: &TraceSessionObject,
        now: SystemTime,
    ) -> Result<ResolvedSession, Refusal> {
        let created = session.created.unwrap_or(now);
        let resolved = TraceSessionSpec::parse(&session.spec)
            .and_then(|spec| spec.resolve(&session.namespace, created))?;
        if let Some(lacking) = self.export.unavailable().filter(|_| resolved.export) {
            return Err(refusal(
                "ExportUnavailable",
                format!(
                    "spec.export: the agent on node {} cannot export this session: {lacking}",
                    self.sessions.node()
                ),
            ));
        }
        if resolved.bpftrace.is_some() && !self.config.allow_bpftrace {
            return Err(refusal(
                "BpftraceDisabled",
                format!(
                    "spec.bpftrace: the agent on node {} does not run bpftrace programs of TraceSessions; the cluster admin allows them with extensions.session.trace_sessions.allow_bpftrace: true (a bpftrace program is arbitrary kernel code run as root)",
                    self.sessions.node()
                ),
            ));
        }
        Ok(resolved)
    }

    /// Hands this node's status entry of an exported session to the pipelines.
    fn export_summary(
        &self,
        session: &TraceSessionObject,
        resolved: &ResolvedSession,
        entry: &Map<String, Value>,
    ) {
        if !resolved.export {
            return;
        }
        let start = entry
            .get("startTime")
            .and_then(Value::as_str)
            .and_then(|t| humantime_serde::re::humantime::parse_rfc3339_weak(t).ok())
            .unwrap_or(resolved.created);
        self.export.summary(ExportedSummary {
            namespace: session.namespace.clone(),
            session: session.name.clone(),
            node: self.node.clone(),
            start,
            time: SystemTime::now(),
            entry: entry.clone(),
        });
    }

    /// The session's pods on this node (names, sorted) and every cgroup of theirs.
    fn pods_here(&self, session: &ResolvedSession, index: &CgroupIndex) -> (Vec<String>, Vec<u64>) {
        let store = self.metadata.pods();
        let mut pods = std::collections::BTreeSet::new();
        let mut cgroups = Vec::new();
        for (id, path) in index.iter() {
            let Some(uid) = parse_container_cgroup(path).and_then(|c| c.pod_uid) else {
                continue;
            };
            let Some(pod) = store.live_pod(&uid) else {
                continue;
            };
            if session.selects(pod) {
                pods.insert(pod.name.to_string());
                cgroups.push(id);
            }
        }
        cgroups.sort_unstable();
        (pods.into_iter().collect(), cgroups)
    }

    /// The names of `cgroups` (their pods are in the pod cache: [`Self::pods_here`] found them).
    fn names_of(&self, cgroups: &[u64], index: &CgroupIndex) -> HashMap<u64, CgroupLabels> {
        cgroups
            .iter()
            .filter_map(|id| {
                let path = index.path(*id)?;
                Some((*id, node_labels(path, Some(&self.metadata))))
            })
            .collect()
    }

    /// Gives the session its attach token when it has none (the first agent to run it does),
    /// and tells its log here the token that reads it.
    async fn attach_token(&self, session: &TraceSessionObject, known: &mut Known) {
        let key = (session.namespace.clone(), session.name.clone());
        let Some(log) = self.logs.get(&key).filter(|log| log.uid == session.uid) else {
            return;
        };
        match session.status["attachToken"].as_str() {
            Some(token) if !token.is_empty() => log.set_token(token),
            _ if known.run.is_some() && !known.token_claimed => {
                let token = new_attach_token();
                match self.sessions.claim_attach_token(session, &token).await {
                    Ok(true) => {
                        log.set_token(&token);
                        known.token_claimed = true;
                    }
                    // Another agent's token (or a newer object): the watch brings it.
                    Ok(false) => {
                        tracing::debug!(session = %session.key(), "TraceSession changed while its attach token was written; reading it again")
                    }
                    Err(e) => {
                        tracing::warn!(session = %session.key(), error = %e, "cannot write the TraceSession's attach token")
                    }
                }
            }
            _ => {}
        }
    }

    fn start(
        &self,
        session: &TraceSessionObject,
        resolved: &ResolvedSession,
        (pods, cgroups): (Vec<String>, Vec<u64>),
        index: &CgroupIndex,
        now: SystemTime,
        (window, number): (RunWindow, Option<u64>),
    ) -> Result<Run, String> {
        let names: CgroupNames = Arc::new(RwLock::new(self.names_of(&cgroups, index)));
        let key = (session.namespace.clone(), session.name.clone());
        let log = self.logs.open(&key, &session.uid);
        let clock_offset = clock_offset_ns();
        let mut probes = Vec::new();
        let rate = Arc::new(RateCap::new(self.config.max_events_per_second));
        let summary = Arc::new(Mutex::new(RunSummary::default()));
        let sink = RunSink {
            log: log.clone(),
            logs: self.logs.clone(),
            names: names.clone(),
            node: self.node.clone(),
            rate: rate.clone(),
            summary: summary.clone(),
            clock_offset,
            session: session.key(),
            export: resolved
                .export
                .then(|| (self.export.clone(), session.name.clone())),
        };
        let mut others = Vec::new();
        for probe in &resolved.probes {
            let other = match probe {
                TraceProbe::Http => Some(SessionProbeRun::Http(HttpRun::start(
                    &self.shared.http_exchanges,
                    &cgroups,
                    sink.clone(),
                )?)),
                TraceProbe::Top => Some(SessionProbeRun::Top(TopRun::start(
                    self.shared.clone(),
                    &cgroups,
                    index,
                    sink.clone(),
                ))),
                TraceProbe::Profile => Some(SessionProbeRun::Profile(ProfileRun::start(
                    self.shared.config.profile_encoder,
                    &cgroups,
                    index,
                    sink.clone(),
                )?)),
                _ => None,
            };
            if let Some(other) = other {
                others.push(other);
                continue;
            }
            let mut subscription = self
                .kernel
                .subscribe(*probe, cgroups.clone(), false)
                .map_err(|e| match e {
                    TraceRefusal::Unavailable(why) | TraceRefusal::Internal(why) => {
                        format!("probe {}: {why}", probe_name(*probe))
                    }
                })?;
            let count = Arc::new(AtomicU64::new(0));
            // The counting task owns the receiver; dropping the subscription closes it.
            let (_, idle) = mpsc::channel(1);
            let mut events = std::mem::replace(&mut subscription.events, idle);
            let counted = count.clone();
            let key = session.key();
            let cap = rate.clone();
            let summarized = summary.clone();
            let traced = *probe;
            let (log, logs, names, node) = (
                log.clone(),
                self.logs.clone(),
                names.clone(),
                self.node.clone(),
            );
            let export = resolved
                .export
                .then(|| (self.export.clone(), session.name.clone()));
            let counter = tokio::spawn(async move {
                while let Some(raw) = events.recv().await {
                    if !cap.admit(raw.timestamp_ns) {
                        continue;
                    }
                    counted.fetch_add(1, Ordering::Relaxed);
                    summarized
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .add(traced, &raw);
                    let labels = names
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&raw.cgroup_id)
                        .cloned()
                        .unwrap_or_default();
                    if let Some(event) = to_event(&raw, &labels, &node, clock_offset) {
                        log.append(&event);
                        logs.enforce_total();
                        if let Some((export, name)) = &export {
                            export.event(name, &event);
                        }
                    }
                }
                tracing::debug!(session = %key, "TraceSession: a probe's events ended");
            });
            probes.push(ProbeRun {
                probe: *probe,
                subscription,
                count,
                counter,
            });
        }
        let bpftrace = match &resolved.bpftrace {
            Some(program) => Some(BpftraceRun::start(
                &self.bpftrace_path,
                &bpftrace_run::substitute(program, &cgroups),
                rate.clone(),
                session.key(),
            )?),
            None => None,
        };
        Ok(Run {
            uid: session.uid.clone(),
            probes,
            others,
            pods,
            cgroups,
            lost: 0,
            rate,
            summary,
            bpftrace,
            bpftrace_lines_before: 0,
            bpftrace_restart_failure: None,
            started: now,
            log,
            names,
            window,
            number,
        })
    }

    /// Runs the session's bpftrace program again over `cgroups` (its pods changed): the
    /// running one is interrupted (it prints its maps), its lines kept in the count, and the
    /// program started with the new `$session_cgroups`. Events between the two are not seen.
    async fn restart_bpftrace(
        &self,
        session: &TraceSessionObject,
        run: &mut Run,
        program: &str,
        cgroups: &[u64],
    ) {
        if let Some(running) = run.bpftrace.take() {
            run.bpftrace_lines_before += running.finish().await;
        }
        match BpftraceRun::start(
            &self.bpftrace_path,
            &bpftrace_run::substitute(program, cgroups),
            run.rate.clone(),
            session.key(),
        ) {
            Ok(restarted) => {
                tracing::info!(session = %session.key(), "TraceSession: its pods changed; bpftrace runs again over their cgroups");
                run.bpftrace = Some(restarted);
            }
            Err(e) => {
                tracing::warn!(session = %session.key(), error = %e, "TraceSession: cannot run its bpftrace program again");
                run.bpftrace_restart_failure = Some(format!(
                    "its pods changed and its bpftrace program could not run again: {e}"
                ));
            }
        }
    }

    /// Writes this node's entry when it changed: at once with `now`, else at most once a tick.
    async fn write_node(
        &self,
        session: &TraceSessionObject,
        known: &mut Known,
        entry: Map<String, Value>,
        now: bool,
    ) {
        if let Some((last, at)) = &known.node_entry {
            let phase_same = last.get("phase") == entry.get("phase");
            if *last == entry || (!now && phase_same && at.elapsed() < TICK) {
                return;
            }
        }
        match self.sessions.report_node(session, entry.clone()).await {
            Ok(()) => known.node_entry = Some((entry, tokio::time::Instant::now())),
            Err(e) => {
                tracing::warn!(session = %session.key(), error = %e, "cannot write the TraceSession's status")
            }
        }
    }

    async fn write_merged(
        &self,
        session: &TraceSessionObject,
        known: &mut Known,
        merged: Map<String, Value>,
    ) {
        let current: Map<String, Value> = session
            .status
            .as_object()
            .map(|s| {
                s.iter()
                    // Not the merge's: the nodes' entries, and the token (its own manager's).
                    .filter(|(k, _)| !matches!(k.as_str(), "nodes" | "attachToken"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        if current == merged || known.merged.as_ref() == Some(&merged) {
            return;
        }
        match self.sessions.report_merged(session, merged.clone()).await {
            Ok(()) => known.merged = Some(merged),
            Err(e) => {
                tracing::warn!(session = %session.key(), error = %e, "cannot write the TraceSession's status")
            }
        }
    }
}

/// Ends a run: the subscriptions go (the kernel stops delivering), the counters take what was
/// still queued. Its node entry, phase Completed, and the final counts.
async fn finish(run: Run) -> (Map<String, Value>, u64) {
    let mut lost = run.lost;
    let mut counts = Vec::new();
    for mut probe in run.probes {
        lost += probe.subscription.lost_since();
        drop(probe.subscription);
        let _ = (&mut probe.counter).await;
        counts.push((probe_name(probe.probe), probe.count.load(Ordering::Relaxed)));
    }
    for probe in run.others {
        let name = probe_name(probe.probe());
        let (count, others_lost) = probe.finish().await;
        lost += others_lost;
        counts.push((name, count));
    }
    match run.bpftrace {
        Some(bpftrace) => {
            let lines = run.bpftrace_lines_before + bpftrace.finish().await;
            counts.push((BPFTRACE.to_string(), lines));
        }
        // Not started again after its pods changed: what the earlier ones printed.
        None if run.bpftrace_restart_failure.is_some() => {
            counts.push((BPFTRACE.to_string(), run.bpftrace_lines_before));
        }
        None => {}
    }
    // Every event is in the log now: followers read to the end and stop.
    run.log.end();
    let summary = Run {
        uid: run.uid,
        probes: Vec::new(),
        others: Vec::new(),
        pods: run.pods,
        cgroups: run.cgroups,
        lost,
        rate: run.rate,
        summary: run.summary,
        bpftrace: None,
        bpftrace_lines_before: run.bpftrace_lines_before,
        bpftrace_restart_failure: None,
        started: run.started,
        log: run.log,
        names: run.names,
        window: run.window,
        number: run.number,
    };
    (node_entry(&summary, "Completed", Some(&counts)), lost)
}

/// A node's status entry (without `node`) for `run` in `phase`; `counts` when the probes are
/// gone already.
fn node_entry(run: &Run, phase: &str, counts: Option<&[(String, u64)]>) -> Map<String, Value> {
    let mut events = Map::new();
    match counts {
        Some(counts) => {
            for (probe, count) in counts {
                events.insert(probe.clone(), json!(count));
            }
        }
        None => {
            for probe in &run.probes {
                events.insert(
                    probe_name(probe.probe),
                    json!(probe.count.load(Ordering::Relaxed)),
                );
            }
            for probe in &run.others {
                events.insert(probe_name(probe.probe()), json!(probe.count()));
            }
            if let Some(bpftrace) = &run.bpftrace {
                events.insert(
                    BPFTRACE.into(),
                    json!(run.bpftrace_lines_before + bpftrace.lines()),
                );
            }
        }
    }
    let mut entry = Map::new();
    entry.insert("phase".into(), json!(phase));
    entry.insert("pods".into(), json!(run.pods));
    entry.insert("events".into(), Value::Object(events));
    entry.insert("lost".into(), json!(run.lost));
    // Events pushed out of the node's log of the session by its memory bounds.
    entry.insert("logDropped".into(), json!(run.log.dropped()));
    entry.insert("dropped".into(), json!(run.rate.dropped()));
    let summary = run.summary.lock().unwrap_or_else(|e| e.into_inner());
    let (top, durations) = summary.to_status();
    entry.insert("top".into(), top);
    entry.insert("durations".into(), durations);
    if let Some(pods) = summary.pod_counters() {
        entry.insert("podCounters".into(), pods);
    }
    drop(summary);
    entry.insert("startTime".into(), json!(rfc3339(run.started)));
    if let Some(number) = run.number {
        entry.insert("run".into(), json!(number));
    }
    entry
}

/// 128 random bits in hex: who holds it may read the session's events (`attach`, `logs`).
fn new_attach_token() -> String {
    rand::random::<[u8; 16]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use podscope_testkit::yaml::document_as_json;

    const CRD: &str = include_str!("../../../helm/podscope/crds/tracesessions.podscope.dev.yaml");
    const EXAMPLE: &str =
        include_str!("../../../helm/podscope/examples/trace-session/web-execs.yaml");
    const SCHEDULED_EXAMPLE: &str =
        include_str!("../../../helm/podscope/examples/trace-session/hourly-execs.yaml");

    fn created() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn refused(spec: Value) -> Refusal {
        TraceSessionSpec::parse(&spec)
            .and_then(|s| s.resolve("team-a", created()))
            .expect_err("refused")
    }

    #[test]
    fn the_charts_example_is_a_session_this_agent_runs() {
        let example = document_as_json(EXAMPLE);
        let resolved = TraceSessionSpec::parse(&example["spec"])
            .unwrap()
            .resolve("shop", created())
            .unwrap();
        assert_eq!(
            resolved.probes,
            vec![TraceProbe::Exec, TraceProbe::TcpConnect]
        );
        assert_eq!(resolved.end, created() + Duration::from_secs(600));
        assert_eq!(resolved.ttl_after_finished, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn the_charts_scheduled_example_runs_five_minutes_at_each_hour() {
        let example = document_as_json(SCHEDULED_EXAMPLE);
        let resolved = TraceSessionSpec::parse(&example["spec"])
            .unwrap()
            .resolve("shop", created())
            .unwrap();
        assert_eq!(resolved.probes, vec![TraceProbe::Exec, TraceProbe::Exit]);
        // created() is 1_800_000_000 s: 08:00:00 UTC, on the hour; its first run is the next.
        let hour = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_003_600);
        assert_eq!(resolved.run_window(hour - Duration::from_secs(1)), None);
        assert_eq!(
            resolved.run_window(hour + Duration::from_secs(60)),
            Some(RunWindow {
                start: hour,
                end: hour + Duration::from_secs(300)
            })
        );
    }

    #[test]
    fn the_crd_lists_every_trace_probe_by_the_protocols_name() {
        let crd = document_as_json(CRD);
        let listed: Vec<String> = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            ["properties"]["spec"]["properties"]["probes"]["items"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let mut every: Vec<String> = super::super::trace::ALL_KERNEL_PROBES
            .iter()
            .chain([TraceProbe::Http, TraceProbe::Top, TraceProbe::Profile].iter())
            .map(|p| probe_name(*p))
            .collect();
        let mut listed_sorted = listed.clone();
        listed_sorted.sort();
        every.sort();
        assert_eq!(listed_sorted, every);
        for name in listed {
            serde_json::from_value::<TraceProbe>(json!(name)).unwrap();
        }
    }

    #[test]
    fn a_pod_of_another_namespace_is_refused_naming_it() {
        let refusal = refused(json!({
            "targets": {"pods": ["web-1", "team-b/web-b"]}, "probes": ["exec"], "duration": "1m"
        }));
        assert_eq!(refusal.reason, "TargetOutsideNamespace");
        assert_eq!(
            refusal.message,
            "spec.targets.pods[1]: pod team-b/web-b is in namespace team-b, outside the session's namespace team-a; a TraceSession traces pods of its own namespace only"
        );
        // Its own namespace spelled out is fine.
        let resolved = TraceSessionSpec::parse(&json!({
            "targets": {"pods": ["team-a/web-1"]}, "probes": ["exec"], "duration": "1m"
        }))
        .unwrap()
        .resolve("team-a", created())
        .unwrap();
        assert_eq!(resolved.pod_names, vec!["web-1"]);
    }

    #[test]
    fn what_is_not_implemented_or_not_valid_is_refused_with_its_path() {
        let cases = [
            (
                json!({"targets": {"pods": ["a"]}, "probes": ["exec"], "deadline": "2027-01-01T00:00:00Z", "schedule": "0 * * * *"}),
                "InvalidSpec",
                "spec: a scheduled session runs for its duration from each firing: give duration (such as 5m), not deadline",
            ),
            (
                json!({"targets": {"pods": ["a"]}, "probes": ["exec"], "duration": "1m", "schedule": "0 25 * * *"}),
                "InvalidSpec",
                "spec.schedule: \"0 25 * * *\" is not a cron pattern (Component error: Number out of bounds.)",
            ),
            (
                json!({"targets": {"pods": ["a"]}, "probes": [], "duration": "1m"}),
                "InvalidSpec",
                "spec.probes: names no probe (give probes, a bpftrace program, or both)",
            ),
            (
                json!({"targets": {"pods": ["a"]}, "bpftrace": " ", "duration": "1m"}),
                "InvalidSpec",
                "spec.bpftrace: the program is empty",
            ),
            (
                json!({"targets": {"pods": ["a"]}, "probes": ["exec"]}),
                "InvalidSpec",
                "spec: give a duration (such as 5m) or a deadline (RFC 3339)",
            ),
            (
                json!({"targets": {"pods": ["a"]}, "probes": ["exec"], "duration": "1m", "deadline": "2027-01-01T00:00:00Z"}),
                "InvalidSpec",
                "spec: give duration or deadline, not both",
            ),
            (
                json!({"targets": {}, "probes": ["exec"], "duration": "1m"}),
                "InvalidSpec",
                "spec.targets: names no pod (give pods, a podSelector, or both)",
            ),
            (
                json!({"targets": {"pods": ["a"]}, "probes": ["exec"], "deadline": "soon"}),
                "InvalidSpec",
                "spec.deadline: \"soon\" is not an RFC 3339 time (timestamp format is invalid)",
            ),
        ];
        for (spec, reason, message) in cases {
            let refusal = refused(spec.clone());
            assert_eq!(
                (refusal.reason, refusal.message.as_str()),
                (reason, message),
                "{spec}"
            );
        }
        let unknown =
            refused(json!({"targets": {"pods": ["a"]}, "probes": ["syscalls"], "duration": "1m"}));
        assert_eq!(unknown.reason, "InvalidSpec");
        assert!(
            unknown
                .message
                .starts_with("spec.probes[0]: unknown variant `syscalls`"),
            "{}",
            unknown.message
        );
    }

    #[test]
    fn http_top_and_profile_are_session_probes() {
        let resolved = TraceSessionSpec::parse(&json!({
            "targets": {"pods": ["a"]}, "probes": ["http", "top", "profile"], "duration": "1m"
        }))
        .unwrap()
        .resolve("team-a", created())
        .unwrap();
        assert_eq!(
            resolved.probes,
            vec![TraceProbe::Http, TraceProbe::Top, TraceProbe::Profile]
        );
    }

    #[test]
    fn export_is_part_of_a_valid_spec() {
        let spec = |export: Value| {
            TraceSessionSpec::parse(&json!({
                "targets": {"pods": ["a"]}, "probes": ["exec"], "duration": "1m", "export": export
            }))
            .unwrap()
            .resolve("team-a", created())
            .unwrap()
            .export
        };
        assert!(spec(json!(true)));
        assert!(!spec(json!(false)));
        assert!(!spec(Value::Null));
    }

    #[test]
    fn a_deadline_ends_the_session_then() {
        let resolved = TraceSessionSpec::parse(&json!({
            "targets": {"podSelector": {"matchLabels": {"app": "web"}}},
            "probes": ["exec", "exit"],
            "deadline": "2027-01-01T00:00:00Z"
        }))
        .unwrap()
        .resolve("team-a", created())
        .unwrap();
        assert_eq!(rfc3339(resolved.end), "2027-01-01T00:00:00Z");
        assert_eq!(resolved.ttl_after_finished, None);
    }
}
