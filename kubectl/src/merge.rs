//! Merging live event streams of several nodes into one in time order.
//!
//! Each node's agent sends its events in time order; the nodes' streams interleave arbitrarily.
//! An event is released once every node still streaming has sent one at least as late (nothing
//! earlier can come), or once it has waited `lateness` (a quiet node must not hold the output
//! back forever; an event later than that from a slow node prints out of order rather than
//! never).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use podscope_core::session::Event;

pub struct TimeMerger {
    lateness: Duration,
    /// (time, arrival order) → event and when it arrived.
    waiting: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, (Event, Instant)>,
    next_sequence: u64,
    /// The latest event time of each node still streaming (0 before its first event).
    open: BTreeMap<String, u64>,
}

impl TimeMerger {
    /// `nodes`: every node whose stream will be merged.
    pub fn new(nodes: impl IntoIterator<Item = String>, lateness: Duration) -> TimeMerger {
        TimeMerger {
            lateness,
            waiting: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_sequence: 0,
            open: nodes.into_iter().map(|node| (node, 0)).collect(),
        }
    }

    pub fn push(&mut self, node: &str, event: Event, arrived: Instant) {
        let time = event.time_unix_nano;
        if let Some(latest) = self.open.get_mut(node) {
            *latest = (*latest).max(time);
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.waiting.push(Reverse((time, sequence)));
        self.events.insert(sequence, (event, arrived));
    }

    /// A node whose stream joins later (a session's pods appeared on another node).
    pub fn add_node(&mut self, node: &str) {
        self.open.entry(node.to_string()).or_insert(0);
    }

    /// `node`'s stream ended: it no longer holds others back.
    pub fn finish(&mut self, node: &str) {
        self.open.remove(node);
    }

    /// The events that can be printed now, in time order.
    pub fn ready(&mut self, now: Instant) -> Vec<Event> {
        let watermark = self.open.values().copied().min();
        let mut ready = Vec::new();
        while let Some(Reverse((time, sequence))) = self.waiting.peek().copied() {
            let arrived = self.events[&sequence].1;
            let safe = watermark.is_none_or(|watermark| time <= watermark);
            if !safe && now.duration_since(arrived) < self.lateness {
                break;
            }
            self.waiting.pop();
            if let Some((event, _)) = self.events.remove(&sequence) {
                ready.push(event);
            }
        }
        ready
    }

    /// What can be printed now; every waiting event once nothing more will come.
    pub fn release(&mut self, more_coming: bool) -> Vec<Event> {
        let now = Instant::now();
        if more_coming {
            self.ready(now)
        } else {
            self.ready(now + self.lateness)
        }
    }

    /// When the oldest waiting event will be released by its lateness, if any waits.
    pub fn next_deadline(&self) -> Option<Instant> {
        let Reverse((_, sequence)) = self.waiting.peek()?;
        Some(self.events[sequence].1 + self.lateness)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podscope_core::session::TraceProbe;

    fn event(node: &str, time: u64) -> Event {
        Event {
            time_unix_nano: time,
            node: node.into(),
            namespace: "ns".into(),
            pod: "p".into(),
            container: "c".into(),
            probe: TraceProbe::Exec,
            pid: time as u32,
            tid: time as u32,
            comm: "x".into(),
            fields: Default::default(),
        }
    }

    fn times(events: &[Event]) -> Vec<(String, u64)> {
        events
            .iter()
            .map(|e| (e.node.clone(), e.time_unix_nano))
            .collect()
    }

    #[test]
    fn events_wait_until_every_open_node_has_passed_them() {
        let start = Instant::now();
        let mut merger =
            TimeMerger::new(["a".to_string(), "b".to_string()], Duration::from_secs(1));
        merger.push("a", event("a", 10), start);
        merger.push("a", event("a", 30), start);
        // b has said nothing yet: a's events may still be preceded by b's.
        assert!(merger.ready(start).is_empty());
        merger.push("b", event("b", 20), start);
        assert_eq!(
            times(&merger.ready(start)),
            [("a".into(), 10), ("b".into(), 20)]
        );
        merger.push("b", event("b", 40), start);
        assert_eq!(times(&merger.ready(start)), [("a".into(), 30)]);
        merger.finish("a");
        assert_eq!(times(&merger.ready(start)), [("b".into(), 40)]);
    }

    #[test]
    fn a_quiet_node_holds_events_back_only_for_the_lateness() {
        let start = Instant::now();
        let mut merger = TimeMerger::new(
            ["a".to_string(), "b".to_string()],
            Duration::from_millis(300),
        );
        merger.push("a", event("a", 10), start);
        assert!(merger.ready(start + Duration::from_millis(299)).is_empty());
        assert_eq!(
            merger.next_deadline(),
            Some(start + Duration::from_millis(300))
        );
        assert_eq!(
            times(&merger.ready(start + Duration::from_millis(300))),
            [("a".into(), 10)]
        );
        assert_eq!(merger.next_deadline(), None);
    }

    #[test]
    fn equal_times_keep_arrival_order() {
        let start = Instant::now();
        let mut merger = TimeMerger::new(["a".to_string()], Duration::from_secs(1));
        let mut first = event("a", 5);
        first.pid = 1;
        let mut second = event("a", 5);
        second.pid = 2;
        merger.push("a", first, start);
        merger.push("a", second, start);
        let pids: Vec<u32> = merger.ready(start).iter().map(|e| e.pid).collect();
        assert_eq!(pids, [1, 2]);
    }
}
