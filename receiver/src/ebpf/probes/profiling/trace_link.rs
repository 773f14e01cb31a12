//! The trace link: the SERVER span of the http probe that a thread was serving when a profile
//! sample was taken, so that a slow span leads to its flame graph.
//!
//! Nothing is added in the kernel: both probes already stamp their records with the kernel's
//! monotonic clock and the thread. The http probe's reader publishes here ([`TraceLinks`]), per
//! (process, thread), the requests the thread read and has not answered yet ("open"), and for
//! each request answered by the thread that read it a window [request head read, response head
//! written] with the span's trace and span id; and up to which kernel time it has read its
//! events. The profiler holds each sample ([`TraceLinker`]) until the http reader has read past
//! the sample's time, then:
//! - inside exactly one window of its thread, and no request of the thread still open since
//!   before it: that span's ids;
//! - inside several windows (a thread interleaving requests, as an event loop does): no ids,
//!   counted, because which request the work was for cannot be told;
//! - a request of the thread open since before the sample: it waits for that request's answer,
//!   at most `trace_link_wait`, then goes out without ids, counted;
//! - else (between two requests, another thread, a process that serves no HTTP): no ids, at once.
//!
//! Memory is bounded: windows are kept only while a sample not yet resolved may fall in them
//! ([`MAX_WINDOWS`] at most), open requests per thread at most [`MAX_OPEN_PER_THREAD`], held
//! samples at most [`MAX_HELD_SAMPLES`] (more go out without ids, counted). Both sides take the
//! one mutex once per drain of their ring buffer, never per sample.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

/// A span as the profiles link to it (OTLP's `Link`, pprof's `trace_id`/`span_id` labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpanLink {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

/// Windows kept at most over all threads; beyond, new ones are refused and counted.
pub const MAX_WINDOWS: usize = 131_072;
/// Requests read and not answered per thread at most (pipelining depth); the oldest is dropped.
pub const MAX_OPEN_PER_THREAD: usize = 64;
/// Samples waiting for their span at most; beyond, a sample goes out without ids, counted.
pub const MAX_HELD_SAMPLES: usize = 16_384;
/// An open request not answered nor dropped for this long is forgotten (its connection's close
/// was lost), as the http tracker forgets idle connections.
const STALE_OPEN_NS: u64 = 600_000_000_000;
/// The profiler reads its ring buffer at least this often in practice (its poll interval is
/// at most a few hundred ms): windows that end this long before its last read can still cover a
/// sample it has not read yet.
const PROFILER_READ_LAG_NS: u64 = 2_000_000_000;

/// What the http reader learned about one server request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestChange {
    /// Thread `tid` read a request's head at `start_ns`; it serves it until it answers.
    Opened {
        tgid: u32,
        tid: u32,
        start_ns: u64,
        span_id: [u8; 8],
    },
    /// The request will get no answer (its connection closed, it was reset or pushed out).
    Dropped { tgid: u32, tid: u32, span_id: [u8; 8] },
    /// Answered: `response_tid` wrote the response head at `end_ns`. `sent` says whether its
    /// span goes out (sampled); only then do samples link to it.
    Answered {
        tgid: u32,
        tid: u32,
        response_tid: u32,
        start_ns: u64,
        end_ns: u64,
        link: SpanLink,
        sent: bool,
    },
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start_ns: u64,
    end_ns: u64,
    link: SpanLink,
}

#[derive(Debug, Default)]
struct ThreadRequests {
    /// (head read at, span id), in the order read.
    open: Vec<(u64, [u8; 8])>,
    /// In the order answered.
    windows: VecDeque<Window>,
}

#[derive(Debug, Default)]
struct LinkIndex {
    /// An http reader publishes (else nothing will ever link: samples are not held).
    readers: usize,
    /// Every http event up to this kernel time has been published.
    read_up_to_ns: u64,
    threads: HashMap<(u32, u32), ThreadRequests>,
    windows: usize,
    windows_refused: u64,
}

/// The index both probes share (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct TraceLinks(Arc<Mutex<LinkIndex>>);

/// How a sample was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Linked(SpanLink),
    /// Not taken while serving a request.
    NoRequest,
    /// In several requests' windows at once.
    Ambiguous,
    /// Not decidable yet: the http reader has not read that far, or a request is open.
    Wait,
}

/// Held by the http reader while it publishes; dropping it says no more will come.
pub struct ReaderAttachment(TraceLinks);

impl Drop for ReaderAttachment {
    fn drop(&mut self) {
        let mut index = self.0.lock();
        index.readers = index.readers.saturating_sub(1);
    }
}

impl TraceLinks {
    fn lock(&self) -> MutexGuard<'_, LinkIndex> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An http reader starts publishing.
    pub fn attach_reader(&self) -> ReaderAttachment {
        self.lock().readers += 1;
        ReaderAttachment(self.clone())
    }

    /// Applies one drain's changes, in the order they happened, and moves the read mark.
    pub fn publish(&self, read_up_to_ns: u64, changes: impl IntoIterator<Item = RequestChange>) {
        let mut index = self.lock();
        for change in changes {
            index.apply(change);
        }
        index.read_up_to_ns = index.read_up_to_ns.max(read_up_to_ns);
    }

    /// Windows refused because [`MAX_WINDOWS`] were kept, since the start.
    pub fn windows_refused(&self) -> u64 {
        self.lock().windows_refused
    }

    /// Windows kept now.
    pub fn windows_kept(&self) -> usize {
        self.lock().windows
    }
}

impl LinkIndex {
    fn apply(&mut self, change: RequestChange) {
        match change {
            RequestChange::Opened {
                tgid,
                tid,
                start_ns,
                span_id,
            } => {
                let thread = self.threads.entry((tgid, tid)).or_default();
                if thread.open.len() >= MAX_OPEN_PER_THREAD {
                    thread.open.remove(0);
                }
                thread.open.push((start_ns, span_id));
            }
            RequestChange::Dropped { tgid, tid, span_id } => {
                if let Some(thread) = self.threads.get_mut(&(tgid, tid)) {
                    thread.open.retain(|(_, id)| *id != span_id);
                }
            }
            RequestChange::Answered {
                tgid,
                tid,
                response_tid,
                start_ns,
                end_ns,
                link,
                sent,
            } => {
                let room = self.windows < MAX_WINDOWS;
                let thread = self.threads.entry((tgid, tid)).or_default();
                thread.open.retain(|(_, id)| *id != link.span_id);
                // Answered by another thread: the work was handed over, and where it ran between
                // the two threads is not known. Such requests link nothing.
                if !sent || response_tid != tid {
                    return;
                }
                if !room {
                    self.windows_refused += 1;
                    return;
                }
                thread.windows.push_back(Window {
                    start_ns,
                    end_ns: end_ns.max(start_ns),
                    link,
                });
                self.windows += 1;
            }
        }
    }

    fn resolve(&self, tgid: u32, tid: u32, at_ns: u64) -> Resolution {
        // Without a reader (none started, or it stopped first at shutdown) nothing more will
        // come: what is known decides.
        let wait = if self.readers == 0 {
            Resolution::NoRequest
        } else {
            Resolution::Wait
        };
        if at_ns > self.read_up_to_ns {
            return wait;
        }
        let Some(thread) = self.threads.get(&(tgid, tid)) else {
            return Resolution::NoRequest;
        };
        // A request read before the sample and not answered yet may still cover it.
        if thread.open.iter().any(|(start, _)| *start <= at_ns) {
            return wait;
        }
        let mut covering = thread
            .windows
            .iter()
            .filter(|w| w.start_ns <= at_ns && at_ns <= w.end_ns);
        match (covering.next(), covering.next()) {
            (Some(window), None) => Resolution::Linked(window.link),
            (Some(_), Some(_)) => Resolution::Ambiguous,
            (None, _) => Resolution::NoRequest,
        }
    }

    /// Forgets windows that end before `needed_from_ns` (no sample left to resolve can fall in
    /// them), open requests gone stale, and threads with neither.
    fn prune(&mut self, needed_from_ns: u64) {
        let stale_before = self.read_up_to_ns.saturating_sub(STALE_OPEN_NS);
        let mut removed = 0;
        self.threads.retain(|_, thread| {
            let before = thread.windows.len();
            thread.windows.retain(|w| w.end_ns >= needed_from_ns);
            removed += before - thread.windows.len();
            thread.open.retain(|(start, _)| *start >= stale_before);
            !thread.windows.is_empty() || !thread.open.is_empty()
        });
        self.windows -= removed;
    }
}

/// A sample the profiler holds until its link is known.
#[derive(Debug)]
pub struct Held<T> {
    pub tgid: u32,
    pub tid: u32,
    /// Kernel monotonic time the sample stands for (an off-CPU block: when it began).
    pub at_ns: u64,
    pub item: T,
}

/// The profiler's side: samples in, samples with their link (or none) out once decided.
pub struct TraceLinker<T> {
    links: TraceLinks,
    wait_ns: u64,
    held: VecDeque<Held<T>>,
    /// Samples that may have been in a request and went out without its ids (timed out, too
    /// many held, in several windows at once), since the start.
    pub unresolved: u64,
}

impl<T> TraceLinker<T> {
    pub fn new(links: TraceLinks, wait: std::time::Duration) -> TraceLinker<T> {
        TraceLinker {
            links,
            wait_ns: wait.as_nanos().min(u64::MAX as u128) as u64,
            held: VecDeque::new(),
            unresolved: 0,
        }
    }

    /// Windows refused since the start (see [`TraceLinks::windows_refused`]).
    pub fn windows_refused(&self) -> u64 {
        self.links.windows_refused()
    }

    /// Samples held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Decides what can be decided: the samples held before, then `new` (in the order read).
    /// `now_ns` is the kernel's monotonic time now; a sample older than `trace_link_wait` goes
    /// out without ids. With `last` (the profiler stops) every sample goes out.
    pub fn settle(
        &mut self,
        new: impl IntoIterator<Item = Held<T>>,
        now_ns: u64,
        last: bool,
        out: &mut Vec<(T, Option<SpanLink>)>,
    ) {
        let mut index = self.links.lock();
        let before = std::mem::take(&mut self.held);
        for held in before.into_iter().chain(new) {
            match index.resolve(held.tgid, held.tid, held.at_ns) {
                Resolution::Linked(link) => out.push((held.item, Some(link))),
                Resolution::NoRequest => out.push((held.item, None)),
                Resolution::Ambiguous => {
                    self.unresolved += 1;
                    out.push((held.item, None));
                }
                Resolution::Wait => {
                    if last
                        || now_ns.saturating_sub(held.at_ns) > self.wait_ns
                        || self.held.len() >= MAX_HELD_SAMPLES
                    {
                        self.unresolved += 1;
                        out.push((held.item, None));
                    } else {
                        self.held.push_back(held);
                    }
                }
            }
        }
        // Samples still to come were taken after the profiler's last read (less its lag); held
        // ones at their own time.
        let needed_from = self
            .held
            .iter()
            .map(|h| h.at_ns)
            .min()
            .unwrap_or(u64::MAX)
            .min(now_ns.saturating_sub(PROFILER_READ_LAG_NS));
        index.prune(needed_from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const PID: u32 = 100;
    const SERVER: u32 = 101;
    const OTHER: u32 = 102;

    fn link(n: u8) -> SpanLink {
        SpanLink {
            trace_id: [n; 16],
            span_id: [n; 8],
        }
    }

    fn opened(tid: u32, start_ns: u64, n: u8) -> RequestChange {
        RequestChange::Opened {
            tgid: PID,
            tid,
            start_ns,
            span_id: [n; 8],
        }
    }

    fn answered(tid: u32, start_ns: u64, end_ns: u64, n: u8) -> RequestChange {
        RequestChange::Answered {
            tgid: PID,
            tid,
            response_tid: tid,
            start_ns,
            end_ns,
            link: link(n),
            sent: true,
        }
    }

    fn sample(tid: u32, at_ns: u64) -> Held<u64> {
        Held {
            tgid: PID,
            tid,
            at_ns,
            item: at_ns,
        }
    }

    /// An index with an http reader attached, and a linker holding samples at most `wait`.
    fn with_reader(wait: Duration) -> (TraceLinks, ReaderAttachment, TraceLinker<u64>) {
        let links = TraceLinks::default();
        let reader = links.attach_reader();
        let linker = TraceLinker::new(links.clone(), wait);
        (links, reader, linker)
    }

    /// Settles `samples` at `now_ns`; (sample time, link number) of those decided.
    fn settle(
        linker: &mut TraceLinker<u64>,
        samples: Vec<Held<u64>>,
        now_ns: u64,
    ) -> Vec<(u64, Option<u8>)> {
        let mut out = Vec::new();
        linker.settle(samples, now_ns, false, &mut out);
        out.into_iter()
            .map(|(at, l)| (at, l.map(|l| l.span_id[0])))
            .collect()
    }

    #[test]
    fn keep_alive_requests_on_one_thread_each_get_their_own_samples() {
        let (links, _reader, mut linker) = with_reader(Duration::from_secs(5));
        links.publish(
            1_000,
            [
                opened(SERVER, 100, 1),
                answered(SERVER, 100, 200, 1),
                opened(SERVER, 300, 2),
                answered(SERVER, 300, 400, 2),
            ],
        );
        let decided = settle(
            &mut linker,
            vec![
                sample(SERVER, 150),
                sample(SERVER, 250),
                sample(SERVER, 350),
                sample(OTHER, 350),
                sample(SERVER, 450),
            ],
            1_000,
        );
        assert_eq!(
            decided,
            vec![
                (150, Some(1)),
                (250, None),
                (350, Some(2)),
                (350, None),
                (450, None)
            ]
        );
        assert_eq!(linker.unresolved, 0);
    }

    #[test]
    fn a_sample_waits_for_the_answer_of_the_request_open_on_its_thread() {
        let (links, _reader, mut linker) = with_reader(Duration::from_secs(5));
        // Read past the sample, request open: held.
        links.publish(500, [opened(SERVER, 100, 1)]);
        assert_eq!(settle(&mut linker, vec![sample(SERVER, 150)], 500), vec![]);
        // Not read that far yet: held too, even on a thread without requests.
        assert_eq!(settle(&mut linker, vec![sample(OTHER, 600)], 500), vec![]);
        assert_eq!(linker.held(), 2);
        links.publish(700, [answered(SERVER, 100, 200, 1)]);
        assert_eq!(
            settle(&mut linker, vec![], 700),
            vec![(150, Some(1)), (600, None)]
        );
        assert_eq!(linker.held(), 0);
    }

    #[test]
    fn held_samples_go_out_without_ids_after_the_wait_and_are_counted() {
        let (links, _reader, mut linker) = with_reader(Duration::from_nanos(1_000));
        links.publish(500, [opened(SERVER, 100, 1)]);
        assert_eq!(settle(&mut linker, vec![sample(SERVER, 150)], 500), vec![]);
        assert_eq!(settle(&mut linker, vec![], 1_150), vec![]);
        assert_eq!(settle(&mut linker, vec![], 1_151), vec![(150, None)]);
        assert_eq!(linker.unresolved, 1);
    }

    #[test]
    fn interleaved_requests_on_one_thread_link_nothing_where_they_overlap() {
        let (links, _reader, mut linker) = with_reader(Duration::from_secs(5));
        // An event loop: reads 1, reads 2, answers 1, answers 2.
        links.publish(
            1_000,
            [
                opened(SERVER, 100, 1),
                opened(SERVER, 200, 2),
                answered(SERVER, 100, 300, 1),
                answered(SERVER, 200, 400, 2),
            ],
        );
        assert_eq!(
            settle(
                &mut linker,
                vec![
                    sample(SERVER, 150),
                    sample(SERVER, 250),
                    sample(SERVER, 350)
                ],
                1_000
            ),
            vec![(150, Some(1)), (250, None), (350, Some(2))]
        );
        assert_eq!(linker.unresolved, 1, "the overlap is counted");
    }

    #[test]
    fn a_request_answered_by_another_thread_or_not_sent_links_nothing() {
        let (links, _reader, mut linker) = with_reader(Duration::from_secs(5));
        links.publish(
            1_000,
            [
                opened(SERVER, 100, 1),
                RequestChange::Answered {
                    tgid: PID,
                    tid: SERVER,
                    response_tid: OTHER,
                    start_ns: 100,
                    end_ns: 200,
                    link: link(1),
                    sent: true,
                },
                opened(SERVER, 300, 2),
                RequestChange::Answered {
                    tgid: PID,
                    tid: SERVER,
                    response_tid: SERVER,
                    start_ns: 300,
                    end_ns: 400,
                    link: link(2),
                    sent: false,
                },
                opened(SERVER, 500, 3),
                RequestChange::Dropped {
                    tgid: PID,
                    tid: SERVER,
                    span_id: [3; 8],
                },
            ],
        );
        assert_eq!(
            settle(
                &mut linker,
                vec![
                    sample(SERVER, 150),
                    sample(OTHER, 150),
                    sample(SERVER, 350),
                    sample(SERVER, 550)
                ],
                1_000
            ),
            vec![(150, None), (150, None), (350, None), (550, None)]
        );
        assert_eq!(linker.unresolved, 0);
    }

    #[test]
    fn without_an_http_reader_nothing_is_held() {
        let links = TraceLinks::default();
        let mut linker = TraceLinker::new(links.clone(), Duration::from_secs(5));
        assert_eq!(
            settle(&mut linker, vec![sample(SERVER, 150)], 100),
            vec![(150, None)]
        );
        let reader = links.attach_reader();
        assert_eq!(settle(&mut linker, vec![sample(SERVER, 150)], 100), vec![]);
        drop(reader);
        assert_eq!(settle(&mut linker, vec![], 100), vec![(150, None)]);
        // A reader that stopped first (shutdown) leaves what it published: still linked.
        let reader = links.attach_reader();
        links.publish(300, [answered(SERVER, 100, 200, 1)]);
        drop(reader);
        assert_eq!(
            settle(&mut linker, vec![sample(SERVER, 150)], 300),
            vec![(150, Some(1))]
        );
    }

    #[test]
    fn windows_no_sample_can_fall_in_are_forgotten() {
        let (links, _reader, mut linker) = with_reader(Duration::from_secs(5));
        links.publish(
            1_000,
            [
                opened(SERVER, 100, 1),
                answered(SERVER, 100, 200, 1),
                opened(SERVER, 5_000_000_000, 2),
                answered(SERVER, 5_000_000_000, 5_000_000_100, 2),
            ],
        );
        assert_eq!(links.windows_kept(), 2);
        // Nothing held; the profiler read up to 5 s: what ended before 3 s is gone.
        settle(&mut linker, vec![], 5_000_000_000);
        assert_eq!(links.windows_kept(), 1);
        // A held sample keeps the windows from its time on.
        links.publish(5_000_000_200, [opened(SERVER, 5_000_000_150, 3)]);
        settle(&mut linker, vec![sample(SERVER, 5_000_000_160)], 5_000_000_200);
        settle(&mut linker, vec![], 9_000_000_000);
        assert_eq!(linker.held(), 1);
        assert_eq!(links.windows_kept(), 0, "window 2 ends before the held sample");
    }

    #[test]
    fn too_many_windows_are_refused_and_counted() {
        let links = TraceLinks::default();
        let _reader = links.attach_reader();
        let changes = (0..MAX_WINDOWS as u64 + 3).map(|i| RequestChange::Answered {
            tgid: PID,
            tid: SERVER,
            response_tid: SERVER,
            start_ns: i * 10,
            end_ns: i * 10 + 5,
            link: link(1),
            sent: true,
        });
        links.publish(0, changes);
        assert_eq!(links.windows_kept(), MAX_WINDOWS);
        assert_eq!(links.windows_refused(), 3);
    }
}
