//! What a namespace's TraceSessions may take of a node: how many run at once per namespace
//! (the rest wait their turn, like pods over a ResourceQuota wait for room, but queued rather
//! than refused), and how many events per second a session counts (the rest are dropped and
//! counted, never silently).
//!
//! Every agent decides which sessions run from the same objects and the same setting, so the
//! nodes agree without talking to each other. It must not look at which pods run on this node:
//! that differs between nodes.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

/// A session that wants to run now (its spec is valid, its time has come, it has not failed).
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub created: SystemTime,
}

/// The uids of the sessions that may run: per namespace the `per_namespace` oldest candidates
/// (by creation time, then name, as every node orders them alike).
pub fn admitted<'a>(candidates: &[Candidate<'a>], per_namespace: u32) -> HashSet<&'a str> {
    let mut by_namespace: BTreeMap<&str, Vec<&Candidate<'a>>> = BTreeMap::new();
    for candidate in candidates {
        by_namespace
            .entry(candidate.namespace)
            .or_default()
            .push(candidate);
    }
    let mut admitted = HashSet::new();
    for (_, mut sessions) in by_namespace {
        sessions.sort_by(|a, b| (a.created, a.name).cmp(&(b.created, b.name)));
        admitted.extend(
            sessions
                .into_iter()
                .take(per_namespace as usize)
                .map(|c| c.uid),
        );
    }
    admitted
}

/// A session's events-per-second cap on this node, shared by its probes' counting tasks.
///
/// Seconds are those of the events' own kernel timestamps (the monotonic clock), so what is
/// kept depends on when things happened, not on when the agent got to read them. An event of a
/// second already left behind (another probe's queue was behind) counts against the current one.
#[derive(Debug)]
pub struct RateCap {
    per_second: u64,
    /// The current second (timestamp / 1e9) and the events kept in it.
    window: Mutex<(u64, u64)>,
    dropped: AtomicU64,
}

impl RateCap {
    pub fn new(per_second: u64) -> RateCap {
        RateCap {
            per_second,
            window: Mutex::new((0, 0)),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether the event at `timestamp_ns` is kept; when not, it is counted as dropped.
    pub fn admit(&self, timestamp_ns: u64) -> bool {
        let second = timestamp_ns / 1_000_000_000;
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if second > window.0 {
            *window = (second, 0);
        }
        if window.1 < self.per_second {
            window.1 += 1;
            true
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Events dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn a_namespace_runs_its_oldest_sessions_up_to_the_cap_and_others_are_not_counted_against_it() {
        let candidates = [
            Candidate {
                namespace: "a",
                name: "late",
                uid: "a-late",
                created: at(30),
            },
            Candidate {
                namespace: "a",
                name: "first",
                uid: "a-first",
                created: at(10),
            },
            Candidate {
                namespace: "b",
                name: "only",
                uid: "b-only",
                created: at(40),
            },
            // Same second: ordered by name, as on every node.
            Candidate {
                namespace: "a",
                name: "y",
                uid: "a-y",
                created: at(20),
            },
            Candidate {
                namespace: "a",
                name: "x",
                uid: "a-x",
                created: at(20),
            },
        ];
        let mut runs: Vec<&str> = admitted(&candidates, 2).into_iter().collect();
        runs.sort_unstable();
        assert_eq!(runs, vec!["a-first", "a-x", "b-only"]);
        let mut runs: Vec<&str> = admitted(&candidates, 3).into_iter().collect();
        runs.sort_unstable();
        assert_eq!(runs, vec!["a-first", "a-x", "a-y", "b-only"]);
    }

    #[test]
    fn events_over_the_rate_are_dropped_and_counted_per_second_of_their_timestamps() {
        let cap = RateCap::new(3);
        let second = 1_000_000_000;
        let kept: Vec<bool> = [0, 1, 2, 3, 4]
            .iter()
            .map(|ms| cap.admit(7 * second + ms * 1_000_000))
            .collect();
        assert_eq!(kept, vec![true, true, true, false, false]);
        assert_eq!(cap.dropped(), 2);
        // The next second starts afresh; an event late from the one before counts against it.
        assert!(cap.admit(8 * second));
        assert!(cap.admit(7 * second + 999_000_000));
        assert!(cap.admit(8 * second + 5));
        assert!(!cap.admit(8 * second + 6));
        assert_eq!(cap.dropped(), 3);
    }
}
