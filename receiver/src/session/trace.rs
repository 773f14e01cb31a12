//! The trace object (`ebpf/src/bpf/trace.bpf.c`) shared by every trace session of the agent:
//! loaded when the first trace session starts, each program attached while some session asks
//! for its probe and detached when the last such session ends, the whole object unloaded when no
//! trace session is left (so the default costs nothing).
//!
//! Each session holds a slot (one bit); the kernel filters events to the sessions' cgroups and
//! tags each with the sessions it is for; one reader task drains the ring buffer and hands every
//! event to its sessions' channels. What the kernel could not write (full ring buffer) and what
//! a slow session's channel could not take are both counted per session, and become
//! `Message::Lost`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::maps::{Array, HashMap as KernelHashMap, MapData, RingBuf};
use aya::programs::links::FdLink;
use aya::programs::BtfTracePoint;
use aya::Btf;
use podscope_core::session::TraceProbe;
use podscope_ebpf::abi::{
    self, TraceEvent, TraceProbeSessions, PODSCOPE_TRACE_MAX_SESSIONS, TRACE_PROBES,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ebpf::object::{
    error_chain, Global, KernelFeatures, MapDef, ObjectSettings, PerCpuCounters, ProbeObject,
    ProbeSpec,
};

/// Events waiting for one session before the agent counts further ones as lost (the client or
/// its port-forward reads too slowly).
const SESSION_QUEUE: usize = 8192;
/// How often the reader drains the ring buffer when the kernel has not woken it (it wakes the
/// reader only once `wakeup_bytes` wait, to spare a wake-up per event).
const POLL: Duration = Duration::from_millis(50);

const CGROUPS_MAP: MapDef = MapDef::entries("trace_cgroups");
const PROBE_SESSIONS_MAP: MapDef = MapDef::fixed("trace_probe_sessions");
const EVENTS_MAP: MapDef = MapDef::ring("trace_events");
const LOST_MAP: MapDef = MapDef::fixed("trace_lost");

const SPEC: ProbeSpec = ProbeSpec {
    name: "trace",
    object: podscope_ebpf::objects::TRACE,
    // Attached one by one by this module, not by the loader.
    programs: &[],
    maps: &[
        CGROUPS_MAP,
        PROBE_SESSIONS_MAP,
        EVENTS_MAP,
        LOST_MAP,
        MapDef::entries("trace_open_args").counted(abi::TRACE_MAP_OPEN_ARGS),
        MapDef::entries("trace_tcp_live").counted(abi::TRACE_MAP_TCP_LIVE),
        MapDef::entries("trace_tcp_connecting").counted(abi::TRACE_MAP_TCP_CONNECTING),
    ],
};

/// One program of the trace object and its tp_btf hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelProgram {
    pub function: &'static str,
    pub hook: &'static str,
}

const fn program(function: &'static str, hook: &'static str) -> KernelProgram {
    KernelProgram { function, hook }
}

/// The programs a probe needs (the three tcp probes share one), or `None` for a probe the trace
/// object does not have.
pub fn programs_of(probe: TraceProbe) -> Option<&'static [KernelProgram]> {
    const EXEC: &[KernelProgram] = &[program("podscope_trace_exec", "sched_process_exec")];
    const EXIT: &[KernelProgram] = &[program("podscope_trace_exit", "sched_process_exit")];
    const OPEN: &[KernelProgram] = &[
        program("podscope_trace_open_enter", "sys_enter"),
        program("podscope_trace_open_exit", "sys_exit"),
    ];
    const TCP_STATE: &[KernelProgram] =
        &[program("podscope_trace_tcp_state", "inet_sock_set_state")];
    const RETRANSMIT: &[KernelProgram] = &[program(
        "podscope_trace_tcp_retransmit",
        "tcp_retransmit_skb",
    )];
    const OOM: &[KernelProgram] = &[program("podscope_trace_oom_kill", "mark_victim")];
    const SIGNAL: &[KernelProgram] = &[program("podscope_trace_signal", "signal_generate")];
    Some(match probe {
        TraceProbe::Exec => EXEC,
        TraceProbe::Exit => EXIT,
        TraceProbe::Open => OPEN,
        TraceProbe::TcpConnect | TraceProbe::TcpAccept | TraceProbe::TcpClose => TCP_STATE,
        TraceProbe::TcpRetransmit => RETRANSMIT,
        TraceProbe::OomKill => OOM,
        TraceProbe::Signal => SIGNAL,
        TraceProbe::Http | TraceProbe::Top | TraceProbe::Profile => return None,
    })
}

/// The kernel's number for a probe (`enum trace_probe`).
pub fn kernel_index(probe: TraceProbe) -> Option<u32> {
    Some(match probe {
        TraceProbe::Exec => abi::TRACE_EXEC,
        TraceProbe::Exit => abi::TRACE_EXIT,
        TraceProbe::Open => abi::TRACE_OPEN,
        TraceProbe::TcpConnect => abi::TRACE_TCP_CONNECT,
        TraceProbe::TcpAccept => abi::TRACE_TCP_ACCEPT,
        TraceProbe::TcpClose => abi::TRACE_TCP_CLOSE,
        TraceProbe::TcpRetransmit => abi::TRACE_TCP_RETRANSMIT,
        TraceProbe::OomKill => abi::TRACE_OOM_KILL,
        TraceProbe::Signal => abi::TRACE_SIGNAL,
        TraceProbe::Http | TraceProbe::Top | TraceProbe::Profile => return None,
    })
}

/// The probe of the kernel's number.
pub fn probe_of_index(index: u32) -> Option<TraceProbe> {
    ALL_KERNEL_PROBES
        .iter()
        .copied()
        .find(|p| kernel_index(*p) == Some(index))
}

/// Every probe the trace object has.
pub const ALL_KERNEL_PROBES: [TraceProbe; 9] = [
    TraceProbe::Exec,
    TraceProbe::Exit,
    TraceProbe::Open,
    TraceProbe::TcpConnect,
    TraceProbe::TcpAccept,
    TraceProbe::TcpClose,
    TraceProbe::TcpRetransmit,
    TraceProbe::OomKill,
    TraceProbe::Signal,
];

/// Why a trace cannot start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceRefusal {
    /// The kernel lacks the probe's hook or refuses its program.
    Unavailable(String),
    Internal(String),
}

/// What one session's subscription delivers.
pub struct Subscription {
    pub events: mpsc::Receiver<TraceEvent>,
    slot: u32,
    kernel: Arc<TraceKernel>,
    /// Events the session's channel could not take.
    dropped: Arc<AtomicU64>,
    /// Lost events already reported (kernel and agent), so `lost_since` reports the new ones.
    reported: u64,
}

impl Subscription {
    /// Events lost for this session since the last call: the kernel's (no room in the ring
    /// buffer) and the agent's (the session's queue was full).
    pub fn lost_since(&mut self) -> u64 {
        let kernel = self.kernel.kernel_lost(self.slot);
        let total = kernel + self.dropped.load(Ordering::Relaxed);
        let new = total.saturating_sub(self.reported);
        self.reported = total.max(self.reported);
        new
    }

    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Follows another set of cgroups from now on (a `TraceSession`'s pods came or went): the
    /// kernel filter is changed in place, the slot and what it counted are kept.
    pub fn retarget(&self, cgroups: Vec<u64>) -> Result<(), TraceRefusal> {
        self.kernel.retarget(self.slot, cgroups)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.kernel.unsubscribe(self.slot);
    }
}

struct SessionEntry {
    probe: TraceProbe,
    cgroups: Vec<u64>,
    whole_node: bool,
}

/// The senders of the live sessions by slot, read by the ring-buffer reader.
type Routes = Arc<Mutex<HashMap<u32, (mpsc::Sender<TraceEvent>, Arc<AtomicU64>)>>>;

struct Loaded {
    object: ProbeObject,
    cgroups: KernelHashMap<MapData, u64, u64>,
    probe_sessions: Array<MapData, TraceProbeSessions>,
    lost: PerCpuCounters,
    /// Attached programs and their links (dropping a link detaches it).
    links: HashMap<KernelProgram, FdLink>,
    reader: CancellationToken,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        self.reader.cancel();
    }
}

#[derive(Default)]
struct State {
    loaded: Option<Loaded>,
    sessions: HashMap<u32, SessionEntry>,
    /// Lost counts of slots whose sessions ended, per slot: the kernel's counters are not reset
    /// when a slot is reused, so a new session starts from what it finds.
    baseline: HashMap<u32, u64>,
}

/// The trace object and its sessions.
pub struct TraceKernel {
    btf_path: PathBuf,
    btf: Mutex<Option<Arc<Btf>>>,
    state: Mutex<State>,
    routes: Routes,
}

impl TraceKernel {
    pub fn new(btf_path: &Path) -> TraceKernel {
        TraceKernel {
            btf_path: btf_path.to_path_buf(),
            btf: Mutex::new(None),
            state: Mutex::new(State::default()),
            routes: Arc::default(),
        }
    }

    fn kernel_btf(&self) -> Result<Arc<Btf>, String> {
        let mut btf = self.btf.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(btf) = btf.as_ref() {
            return Ok(btf.clone());
        }
        let parsed = Btf::parse_file(&self.btf_path, aya::Endianness::default()).map_err(|e| {
            format!(
                "kernel BTF is not available at {} ({e}); the trace probes need it (extensions.session.btf_path)",
                self.btf_path.display()
            )
        })?;
        let parsed = Arc::new(parsed);
        *btf = Some(parsed.clone());
        Ok(parsed)
    }

    /// Whether this kernel has `probe`'s hooks (their `btf_trace_<hook>` types), or why not.
    pub fn availability(&self, probe: TraceProbe) -> Result<(), String> {
        let Some(programs) = programs_of(probe) else {
            return Err(format!("{probe:?} is not a kernel trace probe"));
        };
        let btf = self.kernel_btf()?;
        for program in programs {
            let type_name = format!("btf_trace_{}", program.hook);
            if btf
                .id_by_type_name_kind(&type_name, aya_obj::btf::BtfKind::Typedef)
                .is_err()
            {
                return Err(format!(
                    "this kernel has no tracepoint {} (hook tp_btf/{})",
                    program.hook, program.hook
                ));
            }
        }
        Ok(())
    }

    /// Sessions holding a slot now.
    pub fn sessions(&self) -> usize {
        self.lock().sessions.len()
    }

    /// The programs attached now, by C function name (for status and tests).
    pub fn attached(&self) -> Vec<&'static str> {
        let state = self.lock();
        let mut attached: Vec<&'static str> = state
            .loaded
            .as_ref()
            .map(|l| l.links.keys().map(|p| p.function).collect())
            .unwrap_or_default();
        attached.sort_unstable();
        attached
    }

    /// The kernel ids of the programs attached now (`bpftool prog show id N`).
    pub fn attached_program_ids(&self) -> Vec<u32> {
        let mut state = self.lock();
        let Some(loaded) = state.loaded.as_mut() else {
            return Vec::new();
        };
        let functions: Vec<&'static str> = loaded.links.keys().map(|p| p.function).collect();
        functions
            .into_iter()
            .filter_map(|function| {
                let program = loaded.object.program_mut(function).ok()?;
                program.info().ok().map(|info| info.id())
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts delivering `probe`'s events in `cgroups` (or, with `whole_node`, in every cgroup)
    /// to a new session. Loads the object and attaches the probe's programs if no session had.
    pub fn subscribe(
        self: &Arc<Self>,
        probe: TraceProbe,
        cgroups: Vec<u64>,
        whole_node: bool,
    ) -> Result<Subscription, TraceRefusal> {
        self.availability(probe)
            .map_err(TraceRefusal::Unavailable)?;
        let mut state = self.lock();
        let slot = (0..PODSCOPE_TRACE_MAX_SESSIONS)
            .find(|slot| !state.sessions.contains_key(slot))
            .ok_or_else(|| {
                TraceRefusal::Internal(format!(
                    "every one of the {PODSCOPE_TRACE_MAX_SESSIONS} trace slots is taken"
                ))
            })?;
        if state.loaded.is_none() {
            state.loaded = Some(self.load().map_err(TraceRefusal::Internal)?);
        }
        let (sender, events) = mpsc::channel(SESSION_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        state.sessions.insert(
            slot,
            SessionEntry {
                probe,
                cgroups,
                whole_node,
            },
        );
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(slot, (sender, dropped.clone()));
        if let Err(e) = self.apply(&mut state) {
            state.sessions.remove(&slot);
            self.routes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&slot);
            let _ = self.apply(&mut state);
            return Err(e);
        }
        let reported = self.kernel_lost_locked(&state, slot);
        drop(state);
        Ok(Subscription {
            events,
            slot,
            kernel: self.clone(),
            dropped,
            reported,
        })
    }

    fn retarget(&self, slot: u32, cgroups: Vec<u64>) -> Result<(), TraceRefusal> {
        let mut state = self.lock();
        match state.sessions.get_mut(&slot) {
            Some(session) if session.cgroups == cgroups => return Ok(()),
            Some(session) => session.cgroups = cgroups,
            None => {
                return Err(TraceRefusal::Internal(format!(
                    "trace: slot {slot} is not held"
                )))
            }
        }
        self.apply(&mut state)
    }

    fn unsubscribe(&self, slot: u32) {
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&slot);
        let mut state = self.lock();
        state.sessions.remove(&slot);
        if let Err(e) = self.apply(&mut state) {
            tracing::warn!(slot, error = ?e, "trace: updating the kernel filter after a session ended failed");
        }
    }

    /// The kernel's lost count of `slot` (the ring buffer had no room), since its session began.
    fn kernel_lost(&self, slot: u32) -> u64 {
        let state = self.lock();
        self.kernel_lost_locked(&state, slot)
    }

    fn kernel_lost_locked(&self, state: &State, slot: u32) -> u64 {
        let total = state.loaded.as_ref().map(|l| l.lost.get(slot)).unwrap_or(0);
        total.saturating_sub(state.baseline.get(&slot).copied().unwrap_or(0))
    }

    fn load(&self) -> Result<Loaded, String> {
        let btf = self.kernel_btf()?;
        let features = KernelFeatures {
            btf: Ok((*btf).clone()),
        };
        let globals = [
            Global::U32("agent_tgid", std::process::id()),
            Global::U32("filter_mode", 0),
            Global::U32("nr_openat", syscalls::Sysno::openat.id() as u32),
        ];
        let mut object = ProbeObject::load(
            &SPEC,
            &features,
            &globals,
            &Default::default(),
            &ObjectSettings::default(),
        )
        .map_err(|e| e.to_string())?;
        let describe = |e: crate::ebpf::object::ProbeError| e.to_string();
        let cgroups = object.hash_map(&CGROUPS_MAP).map_err(describe)?;
        let probe_sessions = object.array(&PROBE_SESSIONS_MAP).map_err(describe)?;
        let lost = object.per_cpu_counters(&LOST_MAP).map_err(describe)?;
        let ring = object.ring_buf(&EVENTS_MAP).map_err(describe)?;
        let reader = CancellationToken::new();
        // SAFETY: the ring buffer's descriptor stays open while the AsyncFd owns it (it moves
        // into the reader task and is dropped there).
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| format!("trace: cannot poll the ring buffer: {e}"))?;
        tokio::spawn(read_events(ring, self.routes.clone(), reader.clone()));
        tracing::info!("trace: object loaded");
        Ok(Loaded {
            object,
            cgroups,
            probe_sessions,
            lost,
            links: HashMap::new(),
            reader,
        })
    }

    /// Makes the kernel's maps and attached programs what the sessions ask for; unloads the
    /// object when no session is left.
    fn apply(&self, state: &mut State) -> Result<(), TraceRefusal> {
        if state.sessions.is_empty() {
            if state.loaded.take().is_some() {
                tracing::info!("trace: last session ended, object unloaded");
            }
            state.baseline.clear();
            return Ok(());
        }
        let btf = self.kernel_btf().map_err(TraceRefusal::Unavailable)?;
        let Some(loaded) = state.loaded.as_mut() else {
            return Ok(());
        };
        // Cgroup masks.
        let mut masks: HashMap<u64, u64> = HashMap::new();
        let mut per_probe = [TraceProbeSessions::default(); TRACE_PROBES as usize];
        let mut needed = BTreeSet::new();
        for (slot, session) in &state.sessions {
            let bit = 1u64 << slot;
            for cgroup in &session.cgroups {
                *masks.entry(*cgroup).or_default() |= bit;
            }
            if let Some(index) = kernel_index(session.probe) {
                let entry = &mut per_probe[index as usize];
                entry.subscribed |= bit;
                if session.whole_node {
                    entry.whole_node |= bit;
                }
            }
            needed.extend(
                programs_of(session.probe)
                    .unwrap_or_default()
                    .iter()
                    .copied(),
            );
        }
        let stale: Vec<u64> = loaded
            .cgroups
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !masks.contains_key(k))
            .collect();
        for key in stale {
            let _ = loaded.cgroups.remove(&key);
        }
        for (cgroup, mask) in &masks {
            loaded.cgroups.insert(cgroup, mask, 0).map_err(|e| {
                TraceRefusal::Internal(format!(
                    "trace: cannot list cgroup {cgroup} in the kernel filter: {}",
                    error_chain(&e)
                ))
            })?;
        }
        for (index, sessions) in per_probe.iter().enumerate() {
            loaded
                .probe_sessions
                .set(index as u32, sessions, 0)
                .map_err(|e| TraceRefusal::Internal(format!("trace: {}", error_chain(&e))))?;
        }
        // Programs: detach what no session needs, attach what is missing.
        let unneeded: Vec<KernelProgram> = loaded
            .links
            .keys()
            .filter(|p| !needed.contains(p))
            .copied()
            .collect();
        for program in unneeded {
            loaded.links.remove(&program);
            tracing::info!(program = program.function, "trace: detached");
        }
        for program in needed {
            if loaded.links.contains_key(&program) {
                continue;
            }
            let link = attach(&mut loaded.object, program, &btf).map_err(|reason| {
                TraceRefusal::Unavailable(format!(
                    "the kernel refuses the program for tp_btf/{}: {reason}",
                    program.hook
                ))
            })?;
            tracing::info!(program = program.function, "trace: attached");
            loaded.links.insert(program, link);
        }
        // The lost counts of slots now free: a session taking one later starts from there.
        let free: Vec<u32> = (0..PODSCOPE_TRACE_MAX_SESSIONS)
            .filter(|slot| !state.sessions.contains_key(slot))
            .collect();
        for slot in free {
            let total = loaded.lost.get(slot);
            state.baseline.insert(slot, total);
        }
        Ok(())
    }
}

/// Loads `program` (once) and attaches it; the link detaches it when dropped.
fn attach(object: &mut ProbeObject, program: KernelProgram, btf: &Btf) -> Result<FdLink, String> {
    let prog: &mut BtfTracePoint = object
        .program_mut(program.function)?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| error_chain(&e))?;
    if prog.fd().is_err() {
        prog.load(program.hook, btf).map_err(|e| error_chain(&e))?;
    }
    let id = prog.attach().map_err(|e| error_chain(&e))?;
    let link = prog.take_link(id).map_err(|e| error_chain(&e))?;
    Ok(link.into())
}

/// Drains the ring buffer into the sessions' channels until cancelled (the object unloaded).
async fn read_events(
    mut ring: AsyncFd<RingBuf<MapData>>,
    routes: Routes,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            readable = ring.readable_mut() => match readable {
                Ok(mut guard) => {
                    drain(guard.get_inner_mut(), &routes);
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::error!(error = %e, "trace: ring buffer cannot be polled; reading on the timer only");
                    ticker.tick().await;
                    drain(ring.get_mut(), &routes);
                }
            },
            _ = ticker.tick() => drain(ring.get_mut(), &routes),
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>, routes: &Routes) {
    let routes = routes.lock().unwrap_or_else(|e| e.into_inner());
    while let Some(item) = ring.next() {
        let Some(event) = TraceEvent::from_bytes(&item) else {
            continue;
        };
        let mut sessions = event.sessions;
        while sessions != 0 {
            let slot = sessions.trailing_zeros();
            sessions &= sessions - 1;
            if let Some((sender, dropped)) = routes.get(&slot) {
                if sender.try_send(event).is_err() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
