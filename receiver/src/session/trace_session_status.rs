//! What goes into a `TraceSession`'s status besides the nodes' own entries: the merge of every
//! node's entry (events, lost, dropped, top keys, durations summed) with the phase, reason,
//! message and times of the whole session. Every agent computes the same merge from the same
//! object, so whichever writes last writes what the others would have.
//!
//! Pure: it reads the object and what the caller says of this node, and neither writes the
//! status nor starts or stops anything (that is `trace_session_runs`).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use podscope_k8s::k8s_metadata::TraceSessionObject;
use serde_json::{json, Map, Value};

use super::schedule::RunWindow;
use super::server::probe_name;
use super::summary;
use super::trace_session_runs::{Refusal, ResolvedSession};

/// The key of a `spec.bpftrace` program's output lines among a status's `events`.
pub(super) const BPFTRACE: &str = "bpftrace";

/// The merged status of a session this agent refuses (its spec, or what the agent allows of
/// it): Failed with the refusal's reason and message, completed when this node first refused it.
pub(super) fn refused_status(refused: &Refusal, failed_at: SystemTime) -> Map<String, Value> {
    let mut merged = Map::new();
    merged.insert("phase".into(), json!("Failed"));
    merged.insert("reason".into(), json!(refused.reason));
    merged.insert("message".into(), json!(refused.message));
    merged.insert("completionTime".into(), json!(rfc3339(failed_at)));
    merged
}

/// Where a scheduled session is in its schedule.
pub(super) struct Scheduled {
    /// Its last (or current) run: its window and number.
    pub(super) last: Option<(RunWindow, u64)>,
    pub(super) next: Option<SystemTime>,
}

/// The merged status: every node's entry (`own_entry`: this node's name and its entry as last
/// written, which the object may not show yet) summed, and the phase. `failed_at`: when this
/// node first saw the session fail. `waiting`: the session waits for a slot of its namespace
/// (the cap, for the message).
pub(super) fn merge(
    session: &TraceSessionObject,
    own_entry: Option<(&str, &Map<String, Value>)>,
    failed_at: Option<SystemTime>,
    resolved: &ResolvedSession,
    now: SystemTime,
    waiting: Option<u32>,
    scheduled: Option<Scheduled>,
) -> Map<String, Value> {
    let mut nodes: BTreeMap<String, Value> = session.status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["node"].as_str()?.to_string(), e.clone())))
        .collect();
    if let Some((node, own)) = own_entry {
        nodes.insert(node.to_string(), Value::Object(own.clone()));
    }
    // A scheduled session's summary is its last run's: the entries of that run.
    if let Some(scheduled) = &scheduled {
        let last = scheduled.last.map(|(_, number)| number);
        nodes.retain(|_, entry| entry["run"].as_u64() == last || entry["phase"] == "Failed");
    }
    let mut events: BTreeMap<String, u64> = resolved
        .probes
        .iter()
        .map(|p| probe_name(*p))
        .chain(resolved.bpftrace.as_ref().map(|_| BPFTRACE.to_string()))
        .map(|name| (name, 0))
        .collect();
    let mut lost = 0;
    let mut dropped = 0;
    let mut failed = None;
    let mut running = false;
    for (node, entry) in &nodes {
        for (probe, count) in entry["events"].as_object().into_iter().flatten() {
            *events.entry(probe.clone()).or_default() += count.as_u64().unwrap_or(0);
        }
        lost += entry["lost"].as_u64().unwrap_or(0);
        dropped += entry["dropped"].as_u64().unwrap_or(0);
        match entry["phase"].as_str() {
            Some("Failed") if failed.is_none() => {
                failed = Some(format!(
                    "node {node}: {}",
                    entry["message"].as_str().unwrap_or("failed")
                ))
            }
            Some("Running") => running = true,
            _ => {}
        }
    }
    let mut merged = Map::new();
    let (phase, reason, message, completion) = if let Some(message) = failed {
        let at = failed_at.unwrap_or(now);
        ("Failed", "NodeFailed", message, Some(at))
    } else if running {
        (
            "Running",
            "Tracing",
            format!("tracing on {} node(s)", nodes.len()),
            None,
        )
    } else if let Some(cap) = waiting {
        (
            "Pending",
            "NamespaceSessionLimit",
            format!(
                "namespace {} runs {cap} TraceSession(s) already, the most the agents allow (trace_sessions.max_running_per_namespace); this one starts when one of them ends",
                session.namespace
            ),
            None,
        )
    } else if let Some(scheduled) = &scheduled {
        let next = scheduled.next.map_or("no next run".to_string(), |at| {
            format!("next run at {}", rfc3339(at))
        });
        let message = match scheduled.last {
            Some((window, number)) if now < window.end => {
                format!("run {number}: no pod of its targets runs; {next}")
            }
            Some((_, number)) => format!("run {number} ended; {next}"),
            None => format!("no run yet; {next}"),
        };
        ("Scheduled", "Scheduled", message, None)
    } else if now >= resolved.end {
        let message = if nodes.is_empty() {
            "the session ended; no pod of its targets ran on any node meanwhile".to_string()
        } else {
            format!("the session ended; traced on {} node(s)", nodes.len())
        };
        ("Completed", "Ended", message, Some(resolved.end))
    } else {
        (
            "Pending",
            "NoTargetPods",
            "no pod of its targets runs yet".to_string(),
            None,
        )
    };
    merged.insert("phase".into(), json!(phase));
    merged.insert("reason".into(), json!(reason));
    merged.insert("message".into(), json!(message));
    match scheduled.as_ref().map(|s| s.last) {
        // A scheduled session: the times of its last run, and how many there were.
        Some(last) => {
            if let Some((window, number)) = last {
                merged.insert("startTime".into(), json!(rfc3339(window.start)));
                merged.insert("endTime".into(), json!(rfc3339(window.end)));
                merged.insert("lastScheduleTime".into(), json!(rfc3339(window.start)));
                merged.insert("runs".into(), json!(number));
            }
        }
        None => {
            merged.insert(
                "startTime".into(),
                json!(rfc3339(session.created.unwrap_or(now))),
            );
            merged.insert("endTime".into(), json!(rfc3339(resolved.end)));
        }
    }
    if let Some(at) = completion {
        merged.insert("completionTime".into(), json!(rfc3339(at)));
    }
    let (top, durations) = summary::merge(nodes.values());
    let mut summary = json!({"nodes": nodes.len(), "events": events, "lost": lost, "dropped": dropped, "top": top, "durations": durations});
    if let Some(pods) = super::session_top::merge_pod_counters(nodes.values()) {
        summary["podCounters"] = pods;
    }
    merged.insert("summary".into(), summary);
    merged
}

/// RFC 3339 in whole seconds, as Kubernetes writes times.
pub(super) fn rfc3339(time: SystemTime) -> String {
    let seconds = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    humantime_serde::re::humantime::format_rfc3339_seconds(
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds),
    )
    .to_string()
}
