//! The process probe's exec/exit event stream: a task that reads the ring buffer (woken by the
//! kernel once enough bytes wait, and on a timer for the rest) into the [`ProcessTable`], and
//! tells the collection task when a process starts in a cgroup not seen before (a new container).
//!
//! It must not read the counting maps: those are read by the collection task.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use podscope_ebpf::abi::{ProcessEvent, PROCESS_EXEC, PROCESS_EXIT};
use prometheus_client::metrics::counter::Counter;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What the process probe knows of a live process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub cgroup_id: u64,
    pub ppid: u32,
    pub comm: String,
}

/// pid → process, kept from the exec/exit event stream (later features resolve pids with it).
#[derive(Clone, Default)]
pub struct ProcessTable(Arc<Mutex<HashMap<u32, ProcessInfo>>>);

/// Entries at most: a bound against a fork bomb, not a limit real nodes reach.
const PROCESS_TABLE_LIMIT: usize = 1 << 20;

impl ProcessTable {
    pub fn get(&self, pid: u32) -> Option<ProcessInfo> {
        self.lock().get(&pid).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, ProcessInfo>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, event: &ProcessEvent) {
        let mut table = self.lock();
        match event.kind {
            PROCESS_EXEC if table.len() < PROCESS_TABLE_LIMIT || table.contains_key(&event.pid) => {
                table.insert(
                    event.pid,
                    ProcessInfo {
                        cgroup_id: event.cgroup_id,
                        ppid: event.ppid,
                        comm: event.comm(),
                    },
                );
            }
            PROCESS_EXIT => {
                table.remove(&event.pid);
            }
            _ => {}
        }
    }
}

/// Reads exec/exit events: woken by the kernel once enough bytes wait, and on a timer for the rest.
pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    table: ProcessTable,
    events: Counter,
    poll: Duration,
    /// Told when a process starts in a cgroup not seen before (a new container), for
    /// `container:` uprobes.
    new_cgroup: Option<Arc<Notify>>,
    seen_cgroups: HashSet<u64>,
}

/// Cgroups the event reader remembers before it starts over (each new one costs a /proc scan).
const SEEN_CGROUPS_LIMIT: usize = 100_000;

impl EventReader {
    pub fn new(
        ring: RingBuf<MapData>,
        table: ProcessTable,
        events: Counter,
        poll: Duration,
        new_cgroup: Option<Arc<Notify>>,
    ) -> std::io::Result<EventReader> {
        // SAFETY: the RingBuf owns its map fd, which stays open and unchanged for as long as the
        // AsyncFd (its only owner) lives.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }?;
        Ok(EventReader {
            ring,
            table,
            events,
            poll,
            new_cgroup,
            seen_cgroups: HashSet::new(),
        })
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(self.poll);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.drain();
                    return;
                }
                readable = self.ring.readable_mut() => match readable {
                    Ok(mut guard) => {
                        let ring = guard.get_inner_mut();
                        let (n, execs) = drain_ring(ring, &self.table);
                        self.events.inc_by(n);
                        guard.clear_ready();
                        self.note_execs(execs);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "process event ring buffer cannot be polled; reading on the timer only");
                        ticker.tick().await;
                        self.drain();
                    }
                },
                _ = ticker.tick() => self.drain(),
            }
        }
    }

    fn drain(&mut self) {
        let (n, execs) = drain_ring(self.ring.get_mut(), &self.table);
        self.events.inc_by(n);
        self.note_execs(execs);
    }

    fn note_execs(&mut self, exec_cgroups: Vec<u64>) {
        let Some(notify) = &self.new_cgroup else {
            return;
        };
        if self.seen_cgroups.len() > SEEN_CGROUPS_LIMIT {
            self.seen_cgroups.clear();
        }
        let mut new = false;
        for cgroup in exec_cgroups {
            new |= self.seen_cgroups.insert(cgroup);
        }
        if new {
            notify.notify_one();
        }
    }
}

/// Applies every event in the ring to the table; returns how many, and the cgroups of execs.
fn drain_ring(ring: &mut RingBuf<MapData>, table: &ProcessTable) -> (u64, Vec<u64>) {
    let mut n = 0;
    let mut exec_cgroups = Vec::new();
    while let Some(item) = ring.next() {
        if let Some(event) = ProcessEvent::from_bytes(&item) {
            table.apply(&event);
            if event.kind == PROCESS_EXEC {
                exec_cgroups.push(event.cgroup_id);
            }
        }
        n += 1;
    }
    (n, exec_cgroups)
}
