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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use podscope_core::telemetry::AgentTelemetry;
    use tokio::sync::mpsc;

    use super::super::export::SessionExportSink;
    use super::*;

    fn sink(export: Option<(Arc<SessionExports>, String)>) -> RunSink {
        let logs = Arc::new(SessionLogs::new(1 << 20, 1 << 20));
        RunSink {
            log: logs.open(&("team-a".into(), "requests".into()), "uid-1"),
            logs,
            names: CgroupNames::default(),
            node: "node-1".into(),
            rate: Arc::new(RateCap::new(100)),
            summary: Arc::default(),
            clock_offset: 0,
            session: "team-a/requests".into(),
            export,
        }
    }

    fn http_event(pid: u32) -> Event {
        Event {
            time_unix_nano: 1,
            node: "node-1".into(),
            namespace: "team-a".into(),
            pod: "web-0".into(),
            container: "app".into(),
            probe: TraceProbe::Http,
            pid,
            tid: pid,
            comm: "python3".into(),
            fields: BTreeMap::from([("status".into(), "404".into())]),
        }
    }

    /// The session probes (http, top, profile) keep their events through `keep`: an exported
    /// session's events reach the `trace_sessions` receiver as the trace probes' do, and are
    /// kept in the log either way.
    #[test]
    fn kept_events_of_an_exported_session_reach_the_export_sink_too() {
        let exports = Arc::new(SessionExports::default());
        let (events, mut exported) = mpsc::channel(8);
        exports.register(Arc::new(SessionExportSink {
            receiver: "trace_sessions".into(),
            events: Some(events),
            summaries: None,
            telemetry: AgentTelemetry::new(),
        }));

        let not_exported = sink(None);
        not_exported.keep(&http_event(1));
        assert_eq!(not_exported.log.read(1, 10).records.len(), 1);
        assert!(
            exported.try_recv().is_err(),
            "export: false hands nothing over"
        );

        let exporting = sink(Some((exports.clone(), "requests".into())));
        exporting.keep(&http_event(2));
        exporting.keep(&http_event(3));
        assert_eq!(exporting.log.read(1, 10).records.len(), 2);
        let handed: Vec<(String, u32)> = std::iter::from_fn(|| exported.try_recv().ok())
            .map(|e| (e.session, e.event.pid))
            .collect();
        assert_eq!(
            handed,
            [("requests".to_string(), 2), ("requests".to_string(), 3)]
        );
    }
}
