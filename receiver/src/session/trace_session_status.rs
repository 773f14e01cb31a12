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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::trace_session_runs::TraceSessionSpec;

    /// 2027-01-15T08:00:00Z: the sessions' creation.
    fn created() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn at(seconds_after_creation: u64) -> SystemTime {
        created() + Duration::from_secs(seconds_after_creation)
    }

    /// A ten-minute session of exec and exit events whose status holds `nodes`.
    fn session(nodes: Value) -> (TraceSessionObject, ResolvedSession) {
        let spec =
            json!({"targets": {"pods": ["web-1"]}, "probes": ["exec", "exit"], "duration": "10m"});
        let resolved = TraceSessionSpec::parse(&spec)
            .and_then(|s| s.resolve("shop", created()))
            .expect("a valid session");
        let object = TraceSessionObject {
            namespace: "shop".into(),
            name: "web-execs".into(),
            uid: "7f1c".into(),
            generation: 1,
            resource_version: "42".into(),
            created: Some(created()),
            spec,
            status: json!({"nodes": nodes}),
        };
        (object, resolved)
    }

    fn entry(node: &str, phase: &str, exec: u64, lost: u64, dropped: u64) -> Value {
        json!({"node": node, "phase": phase, "events": {"exec": exec}, "lost": lost, "dropped": dropped,
               "top": {"exec": [{"key": "/bin/sh", "count": exec}]},
               "durations": {}})
    }

    #[test]
    fn nodes_are_summed_with_this_nodes_own_entry_replacing_its_stale_copy() {
        let (object, resolved) = session(json!([
            entry("node-a", "Running", 5, 1, 0),
            entry("node-b", "Running", 7, 0, 2),
        ]));
        // node-a wrote 5 exec events last time; it has seen 9 since.
        let own = entry("node-a", "Running", 9, 1, 0);
        let merged = merge(
            &object,
            Some(("node-a", own.as_object().unwrap())),
            None,
            &resolved,
            at(60),
            None,
            None,
        );
        assert_eq!(merged["phase"], "Running");
        assert_eq!(merged["reason"], "Tracing");
        assert_eq!(merged["message"], "tracing on 2 node(s)");
        assert_eq!(merged["startTime"], "2027-01-15T08:00:00Z");
        assert_eq!(merged["endTime"], "2027-01-15T08:10:00Z");
        assert!(!merged.contains_key("completionTime"));
        let summary = &merged["summary"];
        assert_eq!(summary["nodes"], 2);
        // exit was asked for and no node saw one: it is listed with 0.
        assert_eq!(summary["events"], json!({"exec": 16, "exit": 0}));
        assert_eq!(summary["lost"], 1);
        assert_eq!(summary["dropped"], 2);
        assert_eq!(
            summary["top"]["exec"],
            json!([{"key": "/bin/sh", "count": 16}])
        );
    }

    #[test]
    fn one_failed_node_fails_the_session_naming_it_and_when_it_was_seen() {
        let mut failed = entry("node-b", "Failed", 0, 0, 0);
        failed["message"] = json!("the exec probe could not load: permission denied");
        let (object, resolved) = session(json!([entry("node-a", "Running", 3, 0, 0), failed]));
        let merged = merge(&object, None, Some(at(30)), &resolved, at(45), None, None);
        assert_eq!(merged["phase"], "Failed");
        assert_eq!(merged["reason"], "NodeFailed");
        assert_eq!(
            merged["message"],
            "node node-b: the exec probe could not load: permission denied"
        );
        assert_eq!(merged["completionTime"], "2027-01-15T08:00:30Z");
        // What the running node counted is still summed.
        assert_eq!(merged["summary"]["events"]["exec"], 3);
    }

    #[test]
    fn a_session_past_its_end_completes_saying_whether_it_traced() {
        let (object, resolved) = session(json!([]));
        let merged = merge(&object, None, None, &resolved, at(600), None, None);
        assert_eq!(merged["phase"], "Completed");
        assert_eq!(merged["reason"], "Ended");
        assert_eq!(
            merged["message"],
            "the session ended; no pod of its targets ran on any node meanwhile"
        );
        assert_eq!(merged["completionTime"], "2027-01-15T08:10:00Z");

        let (object, resolved) = session(json!([entry("node-a", "Completed", 4, 0, 0)]));
        let merged = merge(&object, None, None, &resolved, at(601), None, None);
        assert_eq!(merged["message"], "the session ended; traced on 1 node(s)");
        assert_eq!(merged["summary"]["events"]["exec"], 4);
    }

    #[test]
    fn before_any_target_runs_a_session_is_pending_or_waits_for_its_namespaces_slot() {
        let (object, resolved) = session(json!([]));
        let merged = merge(&object, None, None, &resolved, at(10), None, None);
        assert_eq!(merged["phase"], "Pending");
        assert_eq!(merged["reason"], "NoTargetPods");

        let merged = merge(&object, None, None, &resolved, at(10), Some(2), None);
        assert_eq!(merged["reason"], "NamespaceSessionLimit");
        assert_eq!(
            merged["message"],
            "namespace shop runs 2 TraceSession(s) already, the most the agents allow (trace_sessions.max_running_per_namespace); this one starts when one of them ends"
        );
    }

    #[test]
    fn a_scheduled_session_sums_only_its_last_runs_entries_and_keeps_failures() {
        let mut run_2 = entry("node-a", "Completed", 50, 0, 0);
        run_2["run"] = json!(2);
        let mut run_3 = entry("node-b", "Completed", 8, 0, 0);
        run_3["run"] = json!(3);
        let mut failed = entry("node-c", "Failed", 0, 0, 0);
        failed["run"] = json!(1);
        failed["message"] = json!("no BTF");
        let (object, resolved) = session(json!([run_2, run_3.clone()]));
        let window = RunWindow {
            start: at(7200),
            end: at(7500),
        };
        let scheduled = || Scheduled {
            last: Some((window, 3)),
            next: Some(at(10_800)),
        };
        let merged = merge(
            &object,
            None,
            None,
            &resolved,
            at(7600),
            None,
            Some(scheduled()),
        );
        assert_eq!(merged["phase"], "Scheduled");
        assert_eq!(
            merged["message"],
            "run 3 ended; next run at 2027-01-15T11:00:00Z"
        );
        assert_eq!(merged["runs"], 3);
        assert_eq!(merged["startTime"], "2027-01-15T10:00:00Z");
        assert_eq!(merged["endTime"], "2027-01-15T10:05:00Z");
        assert_eq!(merged["lastScheduleTime"], "2027-01-15T10:00:00Z");
        // Run 2's 50 events are not this run's.
        assert_eq!(merged["summary"]["nodes"], 1);
        assert_eq!(merged["summary"]["events"]["exec"], 8);

        // A node that failed, in whichever run, fails the session.
        let (object, resolved) = session(json!([run_3, failed]));
        let merged = merge(
            &object,
            None,
            Some(at(3700)),
            &resolved,
            at(7600),
            None,
            Some(scheduled()),
        );
        assert_eq!(merged["phase"], "Failed");
        assert_eq!(merged["message"], "node node-c: no BTF");
    }
}
