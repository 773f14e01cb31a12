//! Where the `TraceSession`s of this node hand what they record when their spec says
//! `export: true`: each event, and the node's summary at every tick and at the end of a run.
//! The `trace_sessions` receiver (`crate::trace_sessions`) registers a [`SessionExportSink`]
//! here when it is built; without one, a session asking for export is refused
//! (`ExportUnavailable`) rather than run without it.
//!
//! Handing over never waits: a session's probe task must keep up with the kernel. What does not
//! fit a sink's bounded channel is counted as refused by that receiver, as the pipelines'
//! refusals are (`podscope_receiver_refused_items_total`).
//!
//! When the agent stops, its receivers stop first, then the pipelines drain, and extensions
//! stop last. The runs' last summaries must reach the pipelines before they drain, so the first
//! `trace_sessions` receiver to stop ends the runs here ([`SessionExports::end_runs`]) and waits
//! for their last summaries before it sends what its queue holds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use podscope_core::session::Event;
use podscope_core::telemetry::AgentTelemetry;
use podscope_core::Signal;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

/// One event of an exported session.
#[derive(Debug, Clone)]
pub struct ExportedEvent {
    /// The `TraceSession`'s name (its namespace is the event's).
    pub session: String,
    pub event: Event,
}

/// A session's summary on this node at one moment: its status entry for this node (events per
/// probe, `lost`, `dropped`, `durations`, …, as `status.nodes[]` has it).
#[derive(Debug, Clone)]
pub struct ExportedSummary {
    pub namespace: String,
    pub session: String,
    pub node: String,
    /// When the run started (the start of the cumulative sums).
    pub start: SystemTime,
    pub time: SystemTime,
    pub entry: Map<String, Value>,
}

/// What one `trace_sessions` receiver takes: events while it is in a logs pipeline, summaries
/// while it is in a metrics pipeline.
pub struct SessionExportSink {
    /// The receiver's id, for its telemetry.
    pub receiver: String,
    pub events: Option<mpsc::Sender<ExportedEvent>>,
    pub summaries: Option<mpsc::Sender<ExportedSummary>>,
    pub telemetry: AgentTelemetry,
}

impl SessionExportSink {
    fn refused(&self, signal: Signal, items: u64) {
        self.telemetry
            .receiver_refused
            .get_or_create(&AgentTelemetry::items(&self.receiver, signal))
            .inc_by(items);
    }
}

/// The `TraceSession` runner as the receivers see it: how to end its runs, and whether it has.
struct RunnerStop {
    /// Cancelled to end the runs (and the runner).
    stop: CancellationToken,
    /// Cancelled once the runner has ended its runs and handed their last summaries over.
    ended: CancellationToken,
}

/// The sinks of this extension's `trace_sessions` receivers.
#[derive(Default)]
pub struct SessionExports {
    sinks: Mutex<Vec<Arc<SessionExportSink>>>,
    runner: Mutex<Option<RunnerStop>>,
}

impl SessionExports {
    /// The runner starts: it ends its runs when the returned token is cancelled (by `agent`,
    /// the extension's stop, or by [`Self::end_runs`]), and drops the guard once their last
    /// summaries are handed over.
    pub fn runner_started(&self, agent: &CancellationToken) -> (CancellationToken, DropGuard) {
        let stop = agent.child_token();
        let ended = CancellationToken::new();
        *self.runner.lock().unwrap_or_else(|e| e.into_inner()) = Some(RunnerStop {
            stop: stop.clone(),
            ended: ended.clone(),
        });
        (stop, ended.drop_guard())
    }

    /// Ends this node's `TraceSession` runs and waits, at most `within`, until the runner has
    /// handed their last summaries to the sinks. Returns whether it did in time (no runner:
    /// nothing to wait for).
    pub async fn end_runs(&self, within: Duration) -> bool {
        let ended = {
            let runner = self.runner.lock().unwrap_or_else(|e| e.into_inner());
            let Some(runner) = runner.as_ref() else {
                return true;
            };
            runner.stop.cancel();
            runner.ended.clone()
        };
        tokio::time::timeout(within, ended.cancelled())
            .await
            .is_ok()
    }

    pub fn register(&self, sink: Arc<SessionExportSink>) {
        self.lock().push(sink);
    }

    /// Whether a session may export here: some receiver takes what it records. `None` when
    /// one does; else what the agent lacks, for the session's status.
    pub fn unavailable(&self) -> Option<&'static str> {
        let sinks = self.lock();
        let takes_any = sinks
            .iter()
            .any(|s| s.events.is_some() || s.summaries.is_some());
        (!takes_any).then_some(
            "no trace_sessions receiver naming this session extension is in a logs or metrics pipeline of the agent",
        )
    }

    /// Hands `event` of session `session` to every sink in a logs pipeline.
    pub fn event(&self, session: &str, event: &Event) {
        for sink in self.lock().iter() {
            let Some(events) = &sink.events else {
                continue;
            };
            let exported = ExportedEvent {
                session: session.to_string(),
                event: event.clone(),
            };
            if events.try_send(exported).is_err() {
                sink.refused(Signal::Logs, 1);
            }
        }
    }

    /// Hands a summary to every sink in a metrics pipeline.
    pub fn summary(&self, summary: ExportedSummary) {
        for sink in self.lock().iter() {
            let Some(summaries) = &sink.summaries else {
                continue;
            };
            if summaries.try_send(summary.clone()).is_err() {
                // As many data points as the summary would have made.
                let points = crate::trace_sessions::summary_points(&summary.entry);
                sink.refused(Signal::Metrics, points as u64);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<SessionExportSink>>> {
        self.sinks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use podscope_core::session::TraceProbe;

    use super::*;

    fn event() -> Event {
        Event {
            time_unix_nano: 1,
            node: "node-1".into(),
            namespace: "team-a".into(),
            pod: "web-1".into(),
            container: "app".into(),
            probe: TraceProbe::Exec,
            pid: 7,
            tid: 7,
            comm: "sh".into(),
            fields: BTreeMap::new(),
        }
    }

    #[test]
    fn without_a_sink_export_is_unavailable_and_what_does_not_fit_is_counted() {
        let exports = SessionExports::default();
        assert!(exports.unavailable().is_some());
        // Nothing to hand to: no panic, nothing kept.
        exports.event("execs", &event());

        let telemetry = AgentTelemetry::new();
        let (events, mut queued) = mpsc::channel(2);
        exports.register(Arc::new(SessionExportSink {
            receiver: "trace_sessions".into(),
            events: Some(events),
            summaries: None,
            telemetry: telemetry.clone(),
        }));
        assert_eq!(exports.unavailable(), None);
        for _ in 0..5 {
            exports.event("execs", &event());
        }
        let refused = telemetry
            .receiver_refused
            .get_or_create(&AgentTelemetry::items("trace_sessions", Signal::Logs))
            .get();
        assert_eq!(refused, 3, "two fit the queue, three are counted");
        let first = queued.try_recv().unwrap();
        assert_eq!((first.session.as_str(), first.event.pid), ("execs", 7));
        // In no metrics pipeline: summaries are not this sink's, and not counted as refused.
        exports.summary(ExportedSummary {
            namespace: "team-a".into(),
            session: "execs".into(),
            node: "node-1".into(),
            start: SystemTime::UNIX_EPOCH,
            time: SystemTime::UNIX_EPOCH,
            entry: Map::new(),
        });
        let refused_points = telemetry
            .receiver_refused
            .get_or_create(&AgentTelemetry::items("trace_sessions", Signal::Metrics))
            .get();
        assert_eq!(refused_points, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopping_receiver_ends_the_runs_and_waits_for_the_runner_until_its_bound() {
        let exports = SessionExports::default();
        // No runner (no API server): nothing to wait for.
        assert!(exports.end_runs(Duration::from_secs(5)).await);

        let agent = CancellationToken::new();
        let (stop, ended) = exports.runner_started(&agent);
        let runner = tokio::spawn(async move {
            stop.cancelled().await;
            // Ending its runs (a bpftrace program printing its maps) takes a while.
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(ended);
        });
        let asked = tokio::time::Instant::now();
        assert!(exports.end_runs(Duration::from_secs(5)).await);
        assert_eq!(
            asked.elapsed(),
            Duration::from_secs(2),
            "waited for the runner"
        );
        assert!(!agent.is_cancelled(), "the extension itself still runs");
        runner.await.unwrap();

        // A runner that does not end in time: the receiver goes on after the bound.
        let (_stop, _never_dropped) = exports.runner_started(&agent);
        let asked = tokio::time::Instant::now();
        assert!(!exports.end_runs(Duration::from_secs(5)).await);
        assert_eq!(asked.elapsed(), Duration::from_secs(5));
    }
}
