//! The probes of a `TraceSession` that are not the trace object's: `http` (the http probes'
//! exchanges), `top` (its pods' counters each interval) and `profile` (an on-CPU profile of
//! its pods). Each runs beside the kernel trace probes of the run, counts its events under the
//! run's event-rate cap, keeps them in the session's log and feeds the run's summary; each
//! follows the run's cgroups when pods come or go.
//!
//! They must not write the session's status themselves: the runner (`trace_sessions`) asks
//! them for their counts; what they summarize goes to the run's [`RunSummary`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use podscope_core::session::{Event, TraceProbe};
use podscope_k8s::cgroup::CgroupIndex;

use super::caps::RateCap;
use super::export::SessionExports;
use super::session_http::HttpRun;
use super::session_log::{SessionLog, SessionLogs};
use super::session_profile::ProfileRun;
use super::session_top::TopRun;
use super::summary::RunSummary;
use super::targets::CgroupLabels;

/// Names (namespace, pod, container) of a run's cgroups, shared with its probes' tasks.
pub type CgroupNames = Arc<RwLock<HashMap<u64, CgroupLabels>>>;

/// Where a run's probes put what they count: its log, summary, rate cap and cgroup names.
#[derive(Clone)]
pub struct RunSink {
    pub log: Arc<SessionLog>,
    pub logs: Arc<SessionLogs>,
    pub names: CgroupNames,
    /// The node name on the kept events.
    pub node: String,
    pub rate: Arc<RateCap>,
    pub summary: Arc<Mutex<RunSummary>>,
    /// Kernel monotonic time to Unix time.
    pub clock_offset: u64,
    /// `namespace/name`, for the agent's own log lines.
    pub session: String,
    /// With `export: true`: where the events go besides the log, and the session's name.
    pub export: Option<(Arc<SessionExports>, String)>,
}

impl RunSink {
    /// The names of `cgroup` (empty when it is not one of the run's).
    pub fn labels(&self, cgroup: u64) -> CgroupLabels {
        self.names
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&cgroup)
            .cloned()
            .unwrap_or_default()
    }

    /// Keeps `event` in the session's log (the node's total bound may push old ones out).
    /// An exported session's event is handed to the pipelines too.
    pub fn keep(&self, event: &Event) {
        self.log.append(event);
        self.logs.enforce_total();
        if let Some((export, name)) = &self.export {
            export.event(name, event);
        }
    }

    pub fn summary(&self) -> std::sync::MutexGuard<'_, RunSummary> {
        self.summary.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One running probe of a session that is not the trace object's.
pub enum SessionProbeRun {
    Http(HttpRun),
    Top(TopRun),
    Profile(ProfileRun),
}

impl SessionProbeRun {
    pub fn probe(&self) -> TraceProbe {
        match self {
            SessionProbeRun::Http(_) => TraceProbe::Http,
            SessionProbeRun::Top(_) => TraceProbe::Top,
            SessionProbeRun::Profile(_) => TraceProbe::Profile,
        }
    }

    /// Events counted so far (a profile's: its samples).
    pub fn count(&self) -> u64 {
        match self {
            SessionProbeRun::Http(run) => run.count(),
            SessionProbeRun::Top(run) => run.count(),
            SessionProbeRun::Profile(run) => run.count(),
        }
    }

    /// What could not be counted since the last call (full queues or buffers).
    pub fn lost_since(&mut self) -> u64 {
        match self {
            SessionProbeRun::Http(run) => run.lost_since(),
            SessionProbeRun::Top(_) => 0,
            SessionProbeRun::Profile(run) => run.lost_since(),
        }
    }

    /// Follows the run's cgroups (`cgroups`, sorted) after pods came or went.
    pub fn retarget(&mut self, cgroups: &[u64], index: &CgroupIndex) {
        match self {
            SessionProbeRun::Http(run) => run.retarget(cgroups),
            SessionProbeRun::Top(run) => run.retarget(cgroups, index),
            SessionProbeRun::Profile(run) => run.retarget(cgroups, index),
        }
    }

    /// Ends it: what was still queued is counted and kept. Its final count.
    pub async fn finish(self) -> (u64, u64) {
        match self {
            SessionProbeRun::Http(run) => run.finish().await,
            SessionProbeRun::Top(run) => run.finish().await,
            SessionProbeRun::Profile(run) => run.finish().await,
        }
    }
}
