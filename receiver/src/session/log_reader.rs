//! The `session_log` request: a `TraceSession`'s events kept on this node ([`SessionLogs`]),
//! read by `kubectl podscope attach` and `logs` with the session's attach token. Records from
//! the asked sequence on, a `Lost` line for those the log's memory bound pushed out before
//! they were read, then (following) each new record until the session's run here ends.
//!
//! [`SessionLogs`]: super::session_log::SessionLogs

use podscope_core::session::{EndReason, ErrorCode, Message};
use tokio::io::AsyncWriteExt as _;
use tokio::net::tcp::OwnedWriteHalf;
use tokio_util::sync::CancellationToken;

use super::server::{error, write_welcome, Ending, Outcome};
use super::session_log::Record;
use super::Shared;

/// Records sent per read of the log (one flush each).
const BATCH: usize = 512;
const GAP_REASON: &str = "pushed out of the session's log on this node by its memory bound before they were read (extensions.session.trace_sessions.log_per_session_mib, log_total_mib)";

/// What a log request asks.
pub struct LogRequest<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub token: &'a str,
    pub from: Option<u64>,
    pub follow: bool,
}

pub async fn serve(
    write: &mut OwnedWriteHalf,
    shared: &Shared,
    request: LogRequest<'_>,
    gone: &CancellationToken,
) -> std::io::Result<Outcome> {
    let session = format!("{}/{}", request.namespace, request.name);
    let key = (request.namespace.to_string(), request.name.to_string());
    let Some(log) = shared.session_logs.get(&key) else {
        return Ok(Outcome::Refused(error(
            ErrorCode::TargetNotFound,
            format!(
                "TraceSession {session} has no events on node {}: none of its pods ran here, or this agent restarted since (it keeps them in memory)",
                shared.node
            ),
        )));
    };
    match log.token_matches(request.token) {
        Some(true) => {}
        Some(false) => {
            return Ok(Outcome::Refused(error(
                ErrorCode::Forbidden,
                format!(
                    "the attach token given for TraceSession {session} is not the session's: it is in the session's status.attachToken, readable by whoever may get the session"
                ),
            )))
        }
        None => {
            return Ok(Outcome::Refused(error(
                ErrorCode::Forbidden,
                format!(
                    "TraceSession {session} has no attach token on node {} yet (the agent gives it one when it starts); try again in a few seconds",
                    shared.node
                ),
            )))
        }
    }
    write_welcome(write, shared).await?;
    let mut next = request.from.unwrap_or_else(|| log.next_sequence()).max(1);
    podscope_core::session::write_line(write, &Message::LogStart { sequence: next }).await?;
    let mut changes = log.subscribe();
    loop {
        // Seen before reading: an append after the read wakes the wait below.
        changes.borrow_and_update();
        let slice = log.read(next, BATCH);
        if slice.gap > 0 {
            let lost = Message::Lost {
                count: slice.gap,
                reason: GAP_REASON.to_string(),
            };
            podscope_core::session::write_line(write, &lost).await?;
        }
        next = slice.next;
        if !slice.records.is_empty() {
            write_records(write, &slice.records).await?;
            continue;
        }
        if slice.ended {
            return Ok(Outcome::Ended(Some(Ending::of(EndReason::Duration))));
        }
        if !request.follow {
            return Ok(Outcome::Ended(Some(Ending::of(EndReason::Exited))));
        }
        tokio::select! {
            _ = gone.cancelled() => return Ok(Outcome::Ended(None)),
            _ = shared.stopping.cancelled() => {
                return Ok(Outcome::Ended(Some(Ending::of(EndReason::AgentStopping))))
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    return Ok(Outcome::Ended(Some(Ending::of(EndReason::Duration))));
                }
            }
        }
    }
}

/// The records as [`Message::Record`] lines, their events written as kept (already JSON).
async fn write_records(write: &mut OwnedWriteHalf, records: &[Record]) -> std::io::Result<()> {
    let mut lines = Vec::new();
    for record in records {
        record_line(&mut lines, record);
    }
    write.write_all(&lines).await?;
    write.flush().await
}

fn record_line(out: &mut Vec<u8>, record: &Record) {
    out.extend_from_slice(b"{\"record\":{\"sequence\":");
    out.extend_from_slice(record.sequence.to_string().as_bytes());
    out.extend_from_slice(b",\"event\":");
    out.extend_from_slice(record.event.as_bytes());
    out.extend_from_slice(b"}}\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use podscope_core::session::{Event, TraceProbe};

    #[test]
    fn a_record_line_is_the_protocols_record_message() {
        let event = Event {
            time_unix_nano: 1_700_000_000_000_000_000,
            node: "node-a".into(),
            namespace: "team-a".into(),
            pod: "web-0".into(),
            container: "app".into(),
            probe: TraceProbe::Exec,
            pid: 42,
            tid: 42,
            comm: "true".into(),
            fields: [("filename".to_string(), "/bin/true".to_string())].into(),
        };
        let record = Record {
            sequence: 7,
            event: serde_json::to_string(&event).unwrap().into(),
        };
        let mut line = Vec::new();
        record_line(&mut line, &record);
        assert_eq!(line.last(), Some(&b'\n'));
        let message: Message = serde_json::from_slice(&line[..line.len() - 1]).unwrap();
        assert_eq!(message, Message::Record { sequence: 7, event });
    }
}
