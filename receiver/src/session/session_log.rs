//! What each `TraceSession` recorded on this node, kept in memory for `kubectl podscope attach`
//! and `logs`: every event of the session, as the JSON line `trace` would send, numbered in
//! order. A log lives from the session's start on this node until the session object is gone
//! (deleted by someone, or by an agent once `ttlAfterFinished` passed): the run ending does not
//! free it, so `logs` works after the run.
//!
//! Memory is bounded twice: each log by `max_bytes_per_session`, every log of the node together
//! by `max_bytes_total`. What does not fit pushes out the oldest records (of the same log, or of
//! the largest log when the node's total is over), and every record pushed out is counted in
//! its log's `dropped` (the node's status entry says it). Readers learn of a gap by sequence.
//!
//! It must not decide who may read a log: the server checks the token given here by the runner
//! (taken from the session's status).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use podscope_core::session::Event;
use tokio::sync::watch;

/// What one kept record costs beyond its JSON text (the deque slot and the string's header).
const RECORD_OVERHEAD: usize = 48;

/// `(namespace, name)` of a session.
pub type SessionKey = (String, String);

/// One event of a session's log.
#[derive(Debug, Clone)]
pub struct Record {
    pub sequence: u64,
    /// The event as one JSON object (what [`Event`] serializes to).
    pub event: Arc<str>,
}

impl Record {
    fn cost(&self) -> usize {
        self.event.len() + RECORD_OVERHEAD
    }
}

#[derive(Debug, Default)]
struct LogState {
    records: VecDeque<Record>,
    bytes: usize,
    /// The sequence the next record gets (the first is 1).
    next: u64,
    /// Records pushed out by the memory bounds, ever.
    dropped: u64,
    /// The session's run on this node ended: followers stop after the last record.
    ended: bool,
    /// The session object is gone and the records with it (not a loss to report).
    released: bool,
}

/// One session's log on this node.
#[derive(Debug)]
pub struct SessionLog {
    /// The session object's UID: a new object of the same name gets a new log.
    pub uid: String,
    state: Mutex<LogState>,
    /// The session's `status.attachToken`, once the runner has seen it.
    token: Mutex<Option<String>>,
    /// Bumped on every append and at the end, so followers wake.
    changed: watch::Sender<u64>,
    max_bytes: usize,
    /// The node's total of every log, shared with the registry.
    total: Arc<AtomicU64>,
}

/// What a reader gets from one read: records from a sequence on, and how many before them were
/// pushed out before they could be read.
#[derive(Debug, Default)]
pub struct Slice {
    pub records: Vec<Record>,
    /// Records between the asked sequence and the first returned that are gone.
    pub gap: u64,
    /// The sequence to ask for next.
    pub next: u64,
    pub ended: bool,
}

impl SessionLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        // Each change is a push or pop with its byte count: a poisoned lock still holds a
        // consistent log.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends one event, pushing out the oldest records while the log is over its bound.
    pub fn append(&self, event: &Event) {
        let Ok(text) = serde_json::to_string(event) else {
            return;
        };
        let mut state = self.lock();
        state.next = state.next.max(1);
        let record = Record {
            sequence: state.next,
            event: Arc::from(text),
        };
        state.next += 1;
        let cost = record.cost();
        state.bytes += cost;
        state.records.push_back(record);
        self.total.fetch_add(cost as u64, Ordering::Relaxed);
        while state.bytes > self.max_bytes && state.records.len() > 1 {
            self.pop_oldest(&mut state);
        }
        let next = state.next;
        drop(state);
        self.changed.send_replace(next);
    }

    fn pop_oldest(&self, state: &mut LogState) -> usize {
        let Some(oldest) = state.records.pop_front() else {
            return 0;
        };
        let cost = oldest.cost();
        state.bytes -= cost;
        state.dropped += 1;
        self.total.fetch_sub(cost as u64, Ordering::Relaxed);
        cost
    }

    /// Records from sequence `from` on (at most `limit`).
    pub fn read(&self, from: u64, limit: usize) -> Slice {
        let state = self.lock();
        let from = from.max(1);
        let first = state
            .records
            .front()
            .map_or(state.next.max(1), |r| r.sequence);
        let gap = if state.released {
            0
        } else {
            first.saturating_sub(from)
        };
        let start = from.max(first);
        let skip = (start - first) as usize;
        let records: Vec<Record> = state
            .records
            .iter()
            .skip(skip)
            .take(limit)
            .cloned()
            .collect();
        let next = records.last().map_or(start, |r| r.sequence + 1);
        Slice {
            records,
            gap,
            next,
            ended: state.ended,
        }
    }

    /// The sequence the next record will get: where "from now" starts.
    pub fn next_sequence(&self) -> u64 {
        self.lock().next.max(1)
    }

    /// Records pushed out by the memory bounds so far.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Bytes kept now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// The run on this node ended: no more records; followers finish.
    pub fn end(&self) {
        let next = {
            let mut state = self.lock();
            state.ended = true;
            state.next
        };
        self.changed.send_replace(next);
    }

    /// Wakes when a record is appended or the log ends.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn set_token(&self, token: &str) {
        let mut known = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if known.as_deref() != Some(token) {
            *known = Some(token.to_string());
        }
    }

    /// Whether `given` is the session's token (compared in constant time); `None` while the
    /// token is not known here yet.
    pub fn token_matches(&self, given: &str) -> Option<bool> {
        let known = self.token.lock().unwrap_or_else(|e| e.into_inner());
        let token = known.as_deref()?;
        let same_length = token.len() == given.len();
        let differing = token
            .bytes()
            .zip(given.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        Some(same_length && differing == 0)
    }
}

/// Every session log of the node, under the node's total bound.
#[derive(Debug)]
pub struct SessionLogs {
    logs: Mutex<HashMap<SessionKey, Arc<SessionLog>>>,
    max_bytes_per_session: usize,
    max_bytes_total: usize,
    total: Arc<AtomicU64>,
}

impl SessionLogs {
    pub fn new(max_bytes_per_session: usize, max_bytes_total: usize) -> SessionLogs {
        SessionLogs {
            logs: Mutex::default(),
            max_bytes_per_session,
            max_bytes_total,
            total: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionKey, Arc<SessionLog>>> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The log of the session object `uid` named `key`: the existing one, or a new empty one
    /// (replacing the log of an older object of that name).
    pub fn open(&self, key: &SessionKey, uid: &str) -> Arc<SessionLog> {
        let mut logs = self.lock();
        if let Some(log) = logs.get(key).filter(|log| log.uid == uid) {
            return log.clone();
        }
        let log = Arc::new(SessionLog {
            uid: uid.to_string(),
            state: Mutex::default(),
            token: Mutex::default(),
            changed: watch::Sender::new(0),
            max_bytes: self.max_bytes_per_session,
            total: self.total.clone(),
        });
        if let Some(old) = logs.insert(key.clone(), log.clone()) {
            release(&old);
        }
        log
    }

    pub fn get(&self, key: &SessionKey) -> Option<Arc<SessionLog>> {
        self.lock().get(key).cloned()
    }

    /// Frees a session's log (its object is gone).
    pub fn remove(&self, key: &SessionKey) {
        if let Some(log) = self.lock().remove(key) {
            release(&log);
        }
    }

    /// The sessions that have a log here.
    pub fn keys(&self) -> Vec<SessionKey> {
        self.lock().keys().cloned().collect()
    }

    /// Bytes kept by every log of the node.
    pub fn total_bytes(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// While the node's total is over its bound, the largest log gives up its oldest record.
    /// Called after appends.
    pub fn enforce_total(&self) {
        if self.total_bytes() <= self.max_bytes_total as u64 {
            return;
        }
        let logs: Vec<Arc<SessionLog>> = self.lock().values().cloned().collect();
        while self.total_bytes() > self.max_bytes_total as u64 {
            let Some(largest) = logs.iter().max_by_key(|log| log.bytes()) else {
                return;
            };
            let mut state = largest.lock();
            if largest.pop_oldest(&mut state) == 0 {
                return;
            }
        }
    }
}

/// A log leaving the registry: its bytes leave the node's total, its followers stop.
fn release(log: &SessionLog) {
    let mut state = log.lock();
    log.total.fetch_sub(state.bytes as u64, Ordering::Relaxed);
    state.bytes = 0;
    state.records.clear();
    state.ended = true;
    state.released = true;
    let next = state.next;
    drop(state);
    log.changed.send_replace(next);
}

#[cfg(test)]
mod tests {
    use super::*;
    use podscope_core::session::TraceProbe;

    fn event(pid: u32) -> Event {
        Event {
            time_unix_nano: u64::from(pid),
            node: "n".into(),
            namespace: "ns".into(),
            pod: "p".into(),
            container: "c".into(),
            probe: TraceProbe::Exec,
            pid,
            tid: pid,
            comm: "true".into(),
            fields: Default::default(),
        }
    }

    fn key(name: &str) -> SessionKey {
        ("team-a".into(), name.into())
    }

    fn pids(slice: &Slice) -> Vec<u32> {
        slice
            .records
            .iter()
            .map(|r| serde_json::from_str::<Event>(&r.event).unwrap().pid)
            .collect()
    }

    fn cost_of(pid: u32) -> usize {
        serde_json::to_string(&event(pid)).unwrap().len() + RECORD_OVERHEAD
    }

    #[test]
    fn records_are_numbered_from_one_and_read_from_any_sequence() {
        let logs = SessionLogs::new(1 << 20, 1 << 20);
        let log = logs.open(&key("s"), "uid-1");
        assert_eq!(log.next_sequence(), 1);
        for pid in 10..15 {
            log.append(&event(pid));
        }
        let all = log.read(0, 100);
        assert_eq!(pids(&all), [10, 11, 12, 13, 14]);
        assert_eq!(all.records[0].sequence, 1);
        assert_eq!((all.gap, all.next, all.ended), (0, 6, false));
        let rest = log.read(4, 100);
        assert_eq!(pids(&rest), [13, 14]);
        assert_eq!(log.read(6, 100).records.len(), 0);
        assert_eq!(log.read(6, 100).next, 6);
        // Paged.
        let page = log.read(1, 2);
        assert_eq!((pids(&page), page.next), (vec![10, 11], 3));
    }

    #[test]
    fn a_full_log_pushes_out_its_oldest_and_counts_them_as_a_gap() {
        // Room for three records of the same size (pids of two digits).
        let logs = SessionLogs::new(3 * cost_of(10), 1 << 20);
        let log = logs.open(&key("s"), "uid-1");
        for pid in 10..15 {
            log.append(&event(pid));
        }
        assert_eq!(log.dropped(), 2);
        let all = log.read(1, 100);
        assert_eq!(pids(&all), [12, 13, 14]);
        assert_eq!(all.gap, 2, "sequences 1 and 2 are gone");
        assert_eq!(log.read(2, 100).gap, 1);
        assert_eq!(log.read(4, 100).gap, 0);
        assert_eq!(logs.total_bytes(), 3 * cost_of(10) as u64);
    }

    #[test]
    fn the_nodes_total_takes_from_the_largest_log_and_a_removed_log_frees_its_bytes() {
        let logs = SessionLogs::new(1 << 20, 5 * cost_of(10));
        let big = logs.open(&key("big"), "uid-1");
        let small = logs.open(&key("small"), "uid-2");
        for pid in 10..14 {
            big.append(&event(pid));
            logs.enforce_total();
        }
        small.append(&event(50));
        logs.enforce_total();
        small.append(&event(51));
        logs.enforce_total();
        assert_eq!(logs.total_bytes(), 5 * cost_of(10) as u64);
        assert_eq!(big.dropped(), 1);
        assert_eq!(small.dropped(), 0);
        assert_eq!(pids(&big.read(1, 100)), [11, 12, 13]);
        logs.remove(&key("big"));
        assert_eq!(logs.total_bytes(), 2 * cost_of(10) as u64);
        let freed = big.read(1, 100);
        assert!(freed.ended, "followers of a freed log stop");
        assert_eq!(
            freed.gap, 0,
            "what a deleted session kept is not reported lost"
        );
        // A new object of the same name starts a new log.
        let again = logs.open(&key("small"), "uid-3");
        assert_eq!(again.next_sequence(), 1);
        assert_eq!(logs.total_bytes(), 0);
    }

    #[test]
    fn the_token_must_be_known_and_equal() {
        let logs = SessionLogs::new(1024, 1024);
        let log = logs.open(&key("s"), "uid-1");
        assert_eq!(log.token_matches("abc"), None);
        log.set_token("0123abcd");
        assert_eq!(log.token_matches("0123abcd"), Some(true));
        assert_eq!(log.token_matches("0123abce"), Some(false));
        assert_eq!(log.token_matches("0123abc"), Some(false));
        assert_eq!(log.token_matches(""), Some(false));
    }
}
