//! The profiler's own thread: reads the sample ring buffer (woken by the kernel once enough
//! bytes wait, and on a timer for the rest), unwinds each sample's user stack at once (the copy
//! is not kept), sums the stacks, and at the end of every interval names the frames and hands
//! the interval's profiles over. A thread, not a task: unwinding and reading binaries are CPU
//! and file work that must not hold the runtime's workers.

use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use opentelemetry_proto::tonic::profiles::v1development::ProfilesData;
use podscope_ebpf::abi::{
    ProfileSampleHead, PODSCOPE_PROFILE_USTACK_BYTES, PROFILE_OFF_CPU, PROFILE_ON_CPU,
    PROFILE_USER_REGS,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

use super::modules::ModuleCache;
use super::otlp::{profiles, ProfileContext};
use super::process::{Processes, StackCopy};
use super::stacks::{Frame, SampleKey, StackCounts};
use super::symbolize::Symbolizer;
use super::trace_link::{Held, TraceLinker, TraceLinks};
use crate::ebpf::clock::monotonic_now_ns;
use crate::ebpf::cgroups::CgroupIndex;
use crate::ebpf::collector::unix_nanos;

/// How the profiler runs.
#[derive(Debug, Clone)]
pub struct ProfilerSettings {
    pub frequency_hz: u64,
    /// How often the summed samples become profiles.
    pub interval: Duration,
    /// How often the ring buffer is read when the kernel did not wake the thread.
    pub poll_interval: Duration,
    pub symbol_cache_bytes: usize,
    pub host_name: String,
    /// `/proc`, or another procfs (tests).
    pub proc_root: PathBuf,
    pub cgroup_root: PathBuf,
}

/// The profiler's own counters (in the agent's telemetry for the probe; read by `podscope
/// profile` for its progress line).
#[derive(Clone, Default)]
pub struct ProfilerCounters {
    pub on_cpu_samples: Counter,
    pub off_cpu_samples: Counter,
    /// Stacks whose walk stopped before their root.
    pub truncated_stacks: Counter,
    /// Frames no name was found for (they keep their build id and file offset).
    pub unsymbolized_frames: Counter,
    /// Binaries whose tables were dropped to keep within `symbol_cache_bytes`.
    pub symbol_evictions: Counter,
    /// Bytes the symbol and unwind tables hold.
    pub symbol_cache_bytes: Gauge,
    /// Samples read from the ring buffer (every kind).
    pub ring_events: Counter,
    /// Samples that may have been taken during a request and went out without its span's ids.
    pub trace_link_unresolved: Counter,
    /// Requests whose window the trace link could not keep (too many kept).
    pub trace_link_windows_refused: Counter,
}

/// Tells the thread to flush and stop.
#[derive(Clone, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn stopped(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

pub struct Profiler {
    ring: RingBuf<MapData>,
    settings: ProfilerSettings,
    counters: ProfilerCounters,
    out: mpsc::Sender<ProfilesData>,
    modules: ModuleCache,
    processes: Processes,
    symbolizer: Symbolizer,
    index: CgroupIndex,
    counts: StackCounts,
    evictions_reported: u64,
    unsymbolized_reported: u64,
    /// The trace link, when on: samples wait there for the span their thread was serving.
    linker: Option<TraceLinker<Unlinked>>,
    links_reported: (u64, u64),
    /// Samples handled since the start (for `podscope profile`'s progress line).
    pub handled: Arc<AtomicU64>,
}

/// A sample unwound and keyed, before its trace link is known.
#[derive(Debug)]
struct Unlinked {
    key: SampleKey,
    /// Off-CPU: the time blocked; on-CPU: None.
    off_cpu_ns: Option<u64>,
}

impl Profiler {
    pub fn new(
        ring: RingBuf<MapData>,
        settings: ProfilerSettings,
        counters: ProfilerCounters,
        out: mpsc::Sender<ProfilesData>,
    ) -> Profiler {
        Profiler {
            ring,
            modules: ModuleCache::new(settings.symbol_cache_bytes),
            processes: Processes::new(settings.proc_root.clone()),
            symbolizer: Symbolizer::new(settings.proc_root.clone()),
            index: CgroupIndex::new(settings.cgroup_root.clone()),
            counts: StackCounts {
                start_ns: unix_nanos(),
                ..Default::default()
            },
            settings,
            counters,
            out,
            evictions_reported: 0,
            unsymbolized_reported: 0,
            linker: None,
            links_reported: (0, 0),
            handled: Arc::default(),
        }
    }

    /// Links samples to the http probe's spans through `links`, holding a sample at most
    /// `wait` for its span.
    pub fn link_traces(&mut self, links: TraceLinks, wait: Duration) {
        self.linker = Some(TraceLinker::new(links, wait));
    }

    /// Runs on a thread of its own until `stop`, then flushes once more.
    pub fn spawn(self, stop: StopSignal) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("podscope-profiler".to_string())
            .spawn(move || self.run(stop))
    }

    fn run(mut self, stop: StopSignal) {
        let mut next_flush = Instant::now() + self.settings.interval;
        loop {
            let until_flush = next_flush.saturating_duration_since(Instant::now());
            self.wait_readable(until_flush.min(self.settings.poll_interval));
            let stopping = stop.stopped();
            self.drain(stopping);
            if stopping || Instant::now() >= next_flush {
                self.flush();
                next_flush += self.settings.interval;
                if next_flush < Instant::now() {
                    next_flush = Instant::now() + self.settings.interval;
                }
            }
            if stopping || self.out.is_closed() {
                return;
            }
        }
    }

    /// Sleeps until the kernel wakes the ring buffer's reader or `timeout` passes.
    fn wait_readable(&self, timeout: Duration) {
        let mut fd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call; the fd is the ring's, open.
        unsafe {
            libc::poll(&mut fd, 1, millis);
        }
    }

    /// Reads every waiting sample; with the trace link, sums those whose link is decided (all
    /// of them when `last`).
    fn drain(&mut self, last: bool) {
        let mut read = 0;
        let mut unlinked = Vec::new();
        while let Some(item) = self.ring.next() {
            read += 1;
            let bytes: &[u8] = &item;
            let Some((head, stack)) = ProfileSampleHead::from_bytes(bytes) else {
                continue;
            };
            let key_and_weight = handle(
                &head,
                stack,
                &mut self.processes,
                &mut self.modules,
                &self.counters,
            );
            drop(item);
            let (sample, at_ns) = match (head.kind, key_and_weight) {
                (PROFILE_ON_CPU, Some(key)) => {
                    self.counters.on_cpu_samples.inc();
                    let sample = Unlinked {
                        key,
                        off_cpu_ns: None,
                    };
                    (sample, head.timestamp_ns)
                }
                (PROFILE_OFF_CPU, Some(key)) => {
                    self.counters.off_cpu_samples.inc();
                    let sample = Unlinked {
                        key,
                        off_cpu_ns: Some(head.off_cpu_ns),
                    };
                    // A block belongs to the request its thread served when it blocked.
                    (sample, head.timestamp_ns.saturating_sub(head.off_cpu_ns))
                }
                _ => continue,
            };
            if self.linker.is_some() {
                unlinked.push(Held {
                    tgid: head.pid,
                    tid: head.tid,
                    at_ns,
                    item: sample,
                });
            } else {
                self.counts.add(sample.key, sample.off_cpu_ns);
            }
        }
        self.counters.ring_events.inc_by(read);
        self.handled.fetch_add(read, Ordering::Relaxed);
        if let Some(linker) = &mut self.linker {
            let mut decided = Vec::new();
            linker.settle(unlinked, monotonic_now_ns(), last, &mut decided);
            for (mut sample, link) in decided {
                sample.key.link = link;
                self.counts.add(sample.key, sample.off_cpu_ns);
            }
        }
    }

    /// Names the interval's frames and hands its profiles over.
    fn flush(&mut self) {
        let end_ns = unix_nanos();
        let counts = std::mem::replace(
            &mut self.counts,
            StackCounts {
                start_ns: end_ns,
                ..Default::default()
            },
        );
        if !counts.is_empty() {
            self.index.refresh();
            let names = self
                .symbolizer
                .name_all(&mut self.modules, counts.frames());
            let data = profiles(
                &counts,
                &ProfileContext {
                    host_name: &self.settings.host_name,
                    index: &self.index,
                    modules: &self.modules,
                    names: &names,
                    frequency_hz: self.settings.frequency_hz,
                    end_ns,
                },
            );
            if self.out.blocking_send(data).is_err() {
                tracing::debug!("profiles are no longer wanted; the profiler stops");
            }
        }
        self.processes.prune();
        let evictions = self.modules.evictions();
        self.counters
            .symbol_evictions
            .inc_by(evictions - self.evictions_reported);
        self.evictions_reported = evictions;
        let unsymbolized = self.symbolizer.unsymbolized;
        self.counters
            .unsymbolized_frames
            .inc_by(unsymbolized - self.unsymbolized_reported);
        self.unsymbolized_reported = unsymbolized;
        self.counters
            .symbol_cache_bytes
            .set(self.modules.held_bytes() as i64);
        if let Some(linker) = &self.linker {
            let (unresolved, refused) = (linker.unresolved, linker.windows_refused());
            self.counters
                .trace_link_unresolved
                .inc_by(unresolved - self.links_reported.0);
            self.counters
                .trace_link_windows_refused
                .inc_by(refused.saturating_sub(self.links_reported.1));
            self.links_reported = (unresolved, refused.max(self.links_reported.1));
        }
    }
}

/// One sample's key: its kernel frames, then its user stack unwound.
fn handle(
    head: &ProfileSampleHead,
    stack: &[u8],
    processes: &mut Processes,
    modules: &mut ModuleCache,
    counters: &ProfilerCounters,
) -> Option<SampleKey> {
    let mut frames: Vec<Frame> = head
        .kernel_frames()
        .iter()
        .map(|&address| Frame::Kernel { address })
        .collect();
    if head.flags & PROFILE_USER_REGS != 0 && stack.len() >= PODSCOPE_PROFILE_USTACK_BYTES as usize
    {
        let copy = StackCopy {
            sp: head.user_sp,
            len: (head.ustack_bytes as u64).min(PODSCOPE_PROFILE_USTACK_BYTES as u64),
            bytes: &stack[..PODSCOPE_PROFILE_USTACK_BYTES as usize],
        };
        let unwound = processes.unwind(
            modules,
            (head.pid, head.exec_id),
            (head.user_ip, head.user_sp, head.user_bp),
            &copy,
        );
        if unwound.truncated {
            counters.truncated_stacks.inc();
        }
        frames.extend(unwound.frames);
    }
    if frames.is_empty() {
        return None;
    }
    Some(SampleKey {
        cgroup: head.cgroup_id,
        pid: head.pid,
        thread: head.thread_name(),
        frames: frames.into(),
        link: None,
    })
}

