//! The http probe's exchanges, handed live to `trace … http` sessions: the probe's reader task
//! (one per eBPF receiver naming this extension) publishes each paired request/response it
//! finished, and every session subscribed for that exchange's cgroup (or for the whole node)
//! receives a copy through its own bounded queue.
//!
//! It must never make the reader wait: a full queue drops the exchange for that session and
//! counts it (the session reports it as `Lost`), and with no session subscribed publishing is
//! one atomic load. The kernel side is the http probe's own (its scope is the receiver's
//! config); the per-target filtering happens here, in the agent.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

/// The exchanges one session may have waiting before new ones are dropped (and counted).
const SESSION_QUEUE: usize = 4096;

/// Which end of the exchange the traced process was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeRole {
    /// It read the request and wrote the response.
    Server,
    /// It wrote the request and read the response.
    Client,
}

impl ExchangeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeRole::Server => "server",
            ExchangeRole::Client => "client",
        }
    }
}

/// A gRPC call's name and outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcCall {
    pub service: String,
    pub method: String,
    /// `grpc-status`.
    pub status_code: i64,
}

/// One request and its response as one end saw them: what a `trace … http` event shows.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpExchange {
    /// The cgroup of the process that served or made the request.
    pub cgroup: u64,
    /// Kernel monotonic time of the request's first bytes.
    pub start_ns: u64,
    pub duration_ns: u64,
    pub tgid: u32,
    /// The thread that read (server) or wrote (client) the request.
    pub tid: u32,
    pub role: ExchangeRole,
    pub method: String,
    /// The request's path, redacted as the probe's `redact` settings say, without query string.
    pub path: String,
    /// The server's route (`/users/{id}`), empty when none is known.
    pub route: String,
    /// `1.0`, `1.1` or `2`.
    pub version: &'static str,
    pub tls: bool,
    /// The HTTP status code.
    pub http_status: u16,
    pub grpc: Option<GrpcCall>,
    /// The other end of the connection.
    pub peer: SocketAddr,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

impl HttpExchange {
    /// The status a user filters on: `grpc-status` for a gRPC call, else the HTTP status.
    pub fn status(&self) -> i64 {
        match &self.grpc {
            Some(call) => call.status_code,
            None => i64::from(self.http_status),
        }
    }
}

struct Subscriber {
    /// `None`: every cgroup (a whole-node trace).
    cgroups: Option<HashSet<u64>>,
    sender: mpsc::Sender<HttpExchange>,
    dropped: Arc<AtomicU64>,
}

/// Where the http probes publish and the sessions subscribe.
#[derive(Default)]
pub struct ExchangeTap {
    subscribers: Mutex<HashMap<u64, Subscriber>>,
    /// `subscribers.len()`, read without the lock on every drain of the probe.
    listening: AtomicUsize,
    /// http probe readers publishing now.
    publishers: AtomicUsize,
    next_id: AtomicU64,
}

impl ExchangeTap {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Subscriber>> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether an http probe is running and publishing here.
    pub fn has_publisher(&self) -> bool {
        self.publishers.load(Ordering::Acquire) > 0
    }

    /// Counts a publisher while the guard lives (an http probe's reader task).
    pub fn attach_publisher(self: &Arc<Self>) -> PublisherGuard {
        self.publishers.fetch_add(1, Ordering::AcqRel);
        PublisherGuard { tap: self.clone() }
    }

    /// Starts delivering the exchanges of `cgroups` (`None`: of every cgroup).
    pub fn subscribe(self: &Arc<Self>, cgroups: Option<HashSet<u64>>) -> ExchangeSubscription {
        let (sender, exchanges) = mpsc::channel(SESSION_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut subscribers = self.lock();
        subscribers.insert(
            id,
            Subscriber {
                cgroups,
                sender,
                dropped: dropped.clone(),
            },
        );
        self.listening.store(subscribers.len(), Ordering::Release);
        ExchangeSubscription {
            exchanges,
            id,
            tap: self.clone(),
            dropped,
            reported: 0,
        }
    }

    /// What a publisher holds while it hands over one drain's exchanges; `None` (one atomic
    /// load) when no session listens.
    pub fn publishing(&self) -> Option<Publishing<'_>> {
        if self.listening.load(Ordering::Acquire) == 0 {
            return None;
        }
        Some(Publishing {
            subscribers: self.lock(),
        })
    }
}

/// The subscribers, locked for one drain.
pub struct Publishing<'a> {
    subscribers: MutexGuard<'a, HashMap<u64, Subscriber>>,
}

impl Publishing<'_> {
    /// Whether some session wants the exchanges of `cgroup` (so that one is worth building).
    pub fn wants(&self, cgroup: u64) -> bool {
        self.subscribers
            .values()
            .any(|s| s.cgroups.as_ref().is_none_or(|c| c.contains(&cgroup)))
    }

    /// Hands `exchange` to every session that wants it, never waiting: a full queue counts it
    /// as dropped for that session.
    pub fn publish(&self, exchange: &HttpExchange) {
        for subscriber in self.subscribers.values() {
            if !subscriber
                .cgroups
                .as_ref()
                .is_none_or(|c| c.contains(&exchange.cgroup))
            {
                continue;
            }
            if subscriber.sender.try_send(exchange.clone()).is_err() {
                subscriber.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Held by a publisher; uncounts it when dropped.
pub struct PublisherGuard {
    tap: Arc<ExchangeTap>,
}

impl Drop for PublisherGuard {
    fn drop(&mut self) {
        self.tap.publishers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One session's exchanges; unsubscribes when dropped.
pub struct ExchangeSubscription {
    pub exchanges: mpsc::Receiver<HttpExchange>,
    id: u64,
    tap: Arc<ExchangeTap>,
    dropped: Arc<AtomicU64>,
    reported: u64,
}

impl ExchangeSubscription {
    /// From now on delivers the exchanges of `cgroups` (a TraceSession's pods came or went).
    pub fn retarget(&self, cgroups: HashSet<u64>) {
        if let Some(subscriber) = self.tap.lock().get_mut(&self.id) {
            subscriber.cgroups = Some(cgroups);
        }
    }

    /// Exchanges this session's queue could not take since the last call.
    pub fn lost_since(&mut self) -> u64 {
        let total = self.dropped.load(Ordering::Relaxed);
        let new = total.saturating_sub(self.reported);
        self.reported = total.max(self.reported);
        new
    }
}

impl Drop for ExchangeSubscription {
    fn drop(&mut self) {
        let mut subscribers = self.tap.lock();
        subscribers.remove(&self.id);
        self.tap
            .listening
            .store(subscribers.len(), Ordering::Release);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A GET of `/` served in `cgroup`, answered `status`.
    pub(in crate::session) fn exchange(cgroup: u64, status: u16) -> HttpExchange {
        HttpExchange {
            cgroup,
            start_ns: 1,
            duration_ns: 2,
            tgid: 3,
            tid: 3,
            role: ExchangeRole::Server,
            method: "GET".into(),
            path: "/".into(),
            route: String::new(),
            version: "1.1",
            tls: false,
            http_status: status,
            grpc: None,
            peer: "127.0.0.1:9".parse().unwrap(),
            trace_id: [1; 16],
            span_id: [2; 8],
        }
    }

    #[test]
    fn each_session_gets_its_cgroups_exchanges_and_a_full_queue_is_counted() {
        let tap = Arc::new(ExchangeTap::default());
        assert!(tap.publishing().is_none());
        let mut pod = tap.subscribe(Some(HashSet::from([7])));
        let mut node = tap.subscribe(None);
        let publishing = tap.publishing().expect("sessions listen");
        assert!(publishing.wants(7) && publishing.wants(8));
        publishing.publish(&exchange(7, 200));
        publishing.publish(&exchange(8, 404));
        drop(publishing);
        assert_eq!(pod.exchanges.try_recv().unwrap().http_status, 200);
        assert!(pod.exchanges.try_recv().is_err());
        assert_eq!(node.exchanges.try_recv().unwrap().http_status, 200);
        assert_eq!(node.exchanges.try_recv().unwrap().http_status, 404);
        drop(node);
        let publishing = tap.publishing().unwrap();
        assert!(!publishing.wants(8));
        for _ in 0..SESSION_QUEUE + 5 {
            publishing.publish(&exchange(7, 200));
        }
        drop(publishing);
        assert_eq!(pod.lost_since(), 5);
        assert_eq!(pod.lost_since(), 0);
        // Retargeted (its queue read empty first): the other cgroup's exchanges from now on.
        while pod.exchanges.try_recv().is_ok() {}
        pod.retarget(HashSet::from([8]));
        let publishing = tap.publishing().unwrap();
        publishing.publish(&exchange(7, 200));
        publishing.publish(&exchange(8, 201));
        drop(publishing);
        assert_eq!(pod.exchanges.try_recv().unwrap().http_status, 201);
        assert!(pod.exchanges.try_recv().is_err());
        drop(pod);
        assert!(tap.publishing().is_none());
    }

    #[test]
    fn publishers_are_counted_while_they_run() {
        let tap = Arc::new(ExchangeTap::default());
        assert!(!tap.has_publisher());
        let guard = tap.attach_publisher();
        assert!(tap.has_publisher());
        drop(guard);
        assert!(!tap.has_publisher());
    }
}
