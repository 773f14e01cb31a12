//! `tcp`: connections opened, failed and closed (bytes, duration, RTT at close) and
//! retransmissions per cgroup (the socket's) and peer, and the RTT of open connections sampled at
//! every collection by an iterator over the kernel's TCP sockets (`iter/tcp`, optional).
//!
//! The kernel keeps counters and distributions for at most `max_peers` peers per cgroup and counts
//! the rest (and whatever a full map refused) in the cgroup's `other` entry. Distributions are
//! series per cgroup, role and server port: this module adds the peers' up (the kernel keeps them
//! beside each peer's counters so that a closing connection costs one hash lookup). It caps
//! nothing itself.

mod config;
mod metrics;

use std::collections::{BTreeMap, HashMap, HashSet};

use aya::maps::{Array, MapData};
use aya::programs::Iter;
use podscope_core::FieldError;
use podscope_ebpf::abi::{
    Hist, TcpDistKey, TcpDists, TcpKey, TcpOpenMode, TcpOtherKey, TcpStats,
};
use podscope_ebpf::{abi, objects};

pub use config::TcpProbeConfig;

use super::{Collection, LoadContext, Probe, SingleObjectProbe};
use crate::ebpf::catalog::MetricDoc;
use crate::ebpf::kernel_memory::Typical;
use crate::ebpf::object::{
    error_chain, tp_btf, Global, HashTable, KernelFeatures, MapDef, ObjectSettings, ProbeError,
    ProbeObject, ProbeSpec,
};

const SPEC: ProbeSpec = ProbeSpec {
    name: "tcp",
    object: objects::TCP,
    programs: &[
        tp_btf("podscope_tcp_state", "inet_sock_set_state"),
        tp_btf("podscope_tcp_retransmit", "tcp_retransmit_skb"),
    ],
    maps: &[CONN_STATS, OTHER, CGROUP_PEERS, LIVE, OPEN_RTT, OPEN_MODE],
};

/// The iterator program sampling open connections' RTT.
const OPEN_RTT_ITERATOR: &str = "podscope_tcp_live_rtt";

/// Peer → counters, and duration and RTT at close; at most `max_peers` peers per cgroup.
const CONN_STATS: MapDef = MapDef::entries("tcp_conn_stats")
    .counted(abi::TCP_MAP_CONN_STATS)
    .typically(Typical::PerCgroup(10));
/// (cgroup, address family, role) → counters and distributions of peer `other` (entries only
/// where a cgroup has more than `max_peers` peers; one per cgroup bounds it from above).
const OTHER: MapDef = MapDef::entries("tcp_other").counted(abi::TCP_MAP_OTHER);
/// Cgroup → its peers in `tcp_conn_stats`.
const CGROUP_PEERS: MapDef =
    MapDef::entries("tcp_cgroup_peers").counted(abi::TCP_MAP_CGROUP_PEERS);
/// Open sockets being timed (one in `duration_sample_one_in`) → when each was established, its
/// role and server port: a table of slots (an array, all of it allocated at load), sized by
/// `max_entries.tcp_live`.
const LIVE: MapDef = MapDef::entries("tcp_live")
    .counted(abi::TCP_MAP_LIVE)
    .typically(Typical::Full);
/// The sparsest duration sampling `duration_sample_one_in` takes.
const MAX_DURATION_SAMPLE_ONE_IN: u32 = 1 << 16;
/// `tcp_live`'s size compiled into the object, when `max_entries` does not set it.
const LIVE_SLOTS: u32 = 8_192;
/// How connections are counted as opened: the iterator's run, or 0 (as they open).
const OPEN_MODE: MapDef = MapDef::fixed("tcp_open_mode");
/// Filled by the iterator, emptied before each run.
const OPEN_RTT: MapDef = MapDef::entries("tcp_live_rtt")
    .counted(abi::TCP_MAP_LIVE_RTT)
    .typically(Typical::PerCgroup(10));

pub struct Tcp;

impl SingleObjectProbe for Tcp {
    type Config = TcpProbeConfig;
    const SPEC: ProbeSpec = SPEC;
    const METRICS: &'static [MetricDoc] = metrics::METRICS;

    fn validate(config: &TcpProbeConfig, prefix: &str, errors: &mut Vec<FieldError>) {
        if config.max_peers == 0 {
            errors.push(FieldError::new(
                format!("{prefix}.max_peers"),
                "must be at least 1",
            ));
        }
        let one_in = config.duration_sample_one_in;
        if !one_in.is_power_of_two() || one_in > MAX_DURATION_SAMPLE_ONE_IN {
            errors.push(FieldError::new(
                format!("{prefix}.duration_sample_one_in"),
                format!(
                    "must be a power of two from 1 to {MAX_DURATION_SAMPLE_ONE_IN} (one connection in that many is timed), not {one_in}"
                ),
            ));
        }
    }

    fn open(
        config: &TcpProbeConfig,
        ctx: &mut LoadContext<'_>,
    ) -> Result<Box<dyn Probe>, ProbeError> {
        let settings = ObjectSettings {
            globals: vec![
                Global::U32("max_peers", config.max_peers),
                // The kernel keeps a socket when its hash has these bits clear.
                Global::U32(
                    "duration_sample_mask",
                    config.duration_sample_one_in - 1,
                ),
                // The programs hash sockets into the table at its size.
                Global::U32(
                    "live_slots",
                    config
                        .max_entries
                        .0
                        .get(LIVE.name)
                        .copied()
                        .unwrap_or(LIVE_SLOTS),
                ),
            ],
            skip: &[],
        };
        let mut object = ctx.object(&SPEC, &settings)?;
        let mut open_mode: Array<MapData, TcpOpenMode> = object.array(&OPEN_MODE)?;
        let samples_open_rtt = match load_iterator(&mut object, ctx.features) {
            // From now on the state-change program leaves opens to the iterator; what it
            // counted before this is never read (see `Loaded::open_generation`).
            Ok(()) => match open_mode.set(0, TcpOpenMode { generation: 1 }, 0) {
                Ok(()) => true,
                Err(e) => {
                    tracing::info!(
                        receiver = %ctx.receiver,
                        error = %error_chain(&e),
                        "tcp: cannot hand the counting of opened connections to the iterator; the RTT of open connections is not sampled"
                    );
                    false
                }
            },
            Err(reason) => {
                tracing::info!(
                    receiver = %ctx.receiver,
                    reason = %reason,
                    "tcp: the RTT of open connections is not sampled (iter/tcp cannot be loaded); RTT at close still is"
                );
                false
            }
        };
        Ok(Box::new(Loaded {
            open_mode,
            open_generation: 1,
            reported_opened: HashMap::new(),
            reported_other_opened: HashMap::new(),
            peers: object.hash(&CONN_STATS)?,
            other: object.hash(&OTHER)?,
            cgroup_peers: object.hash(&CGROUP_PEERS)?,
            open_rtt: object.hash(&OPEN_RTT)?,
            object,
            samples_open_rtt,
            duration_sample_one_in: config.duration_sample_one_in,
        }))
    }
}

struct Loaded {
    object: ProbeObject,
    /// `tcp_open_mode`: the iterator's run (`open_generation`), set before each.
    open_mode: Array<MapData, TcpOpenMode>,
    /// The iterator's run now. With the iterator (`samples_open_rtt`), a peer's connections
    /// opened are those closed (read before the run) plus those the run found open: the
    /// state-change program does not count opens then, which spares every connection's open a
    /// hash lookup and a write (BENCHMARKS.md, issue 11).
    open_generation: u64,
    /// The opened counts last reported, per peer and per `other` entry: a connection that closes
    /// between the read of `closed` and the iterator's visit is in neither that collection's
    /// closed nor its open, so the sum can dip by a few for one collection; the counter never
    /// does (it is never above the connections that opened, as no connection is in both).
    reported_opened: HashMap<TcpKey, u64>,
    reported_other_opened: HashMap<TcpOtherKey, u64>,
    peers: HashTable<TcpKey, TcpStats>,
    other: HashTable<TcpOtherKey, TcpStats>,
    cgroup_peers: HashTable<u64, u64>,
    open_rtt: HashTable<TcpDistKey, Hist>,
    /// The iterator over open connections is loaded (and counts them).
    samples_open_rtt: bool,
    /// One connection in this many is timed (`podscope.sampling.one_in` on the durations).
    duration_sample_one_in: u32,
}

impl Loaded {
    /// Runs the iterator once, as run `open_generation + 1`: it counts each peer's open
    /// connections (`open_now`) and returns the smoothed RTT of the established ones per (cgroup,
    /// role, server port). The RTT map is emptied first, so it holds exactly this run's samples.
    fn sample_open_rtt(&mut self) -> Result<HashMap<TcpDistKey, Hist>, String> {
        self.open_rtt.remove(self.open_rtt.entries().into_keys());
        self.open_generation += 1;
        self.open_mode
            .set(
                0,
                TcpOpenMode {
                    generation: self.open_generation,
                },
                0,
            )
            .map_err(|e| error_chain(&e))?;
        let program: &mut Iter = self
            .object
            .program_mut(OPEN_RTT_ITERATOR)?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| error_chain(&e))?;
        let link = program.attach().map_err(|e| error_chain(&e))?;
        let link = program.take_link(link).map_err(|e| error_chain(&e))?;
        let mut output = link.into_file().map_err(|e| error_chain(&e))?;
        // Reading runs the program over every socket; it writes nothing.
        std::io::copy(&mut output, &mut std::io::sink()).map_err(|e| e.to_string())?;
        Ok(self.open_rtt.entries())
    }
}

fn load_iterator(object: &mut ProbeObject, features: &KernelFeatures) -> Result<(), String> {
    let btf = features.btf.as_ref().map_err(Clone::clone)?;
    let program: &mut Iter = object
        .program_mut(OPEN_RTT_ITERATOR)?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| error_chain(&e))?;
    program.load("tcp", btf).map_err(|e| error_chain(&e))
}

/// The connections of an entry that iterator run `run` found open (0 if it found none, or did
/// not run).
fn open_count(run: Option<u64>, stats: Option<&TcpStats>) -> u64 {
    match (run, stats) {
        (Some(run), Some(stats)) if stats.counts.open_generation == run => stats.counts.open_now,
        _ => 0,
    }
}

/// A distribution series' identity, in output order.
fn dist_order(key: &TcpDistKey) -> (u64, u8, u16) {
    (key.cgroup_id, key.role, key.server_port)
}

/// The distribution series of one collection, in output order.
type DistSeries = BTreeMap<(u64, u8, u16), (TcpDistKey, TcpDists)>;

/// Adds `dists` to the series of (`cgroup_id`, `role`, `server_port`).
fn add_to_series(
    series: &mut DistSeries,
    cgroup_id: u64,
    role: u8,
    server_port: u16,
    dists: &TcpDists,
) {
    let key = TcpDistKey {
        cgroup_id,
        server_port,
        role,
        ..Default::default()
    };
    series
        .entry(dist_order(&key))
        .or_insert((key, TcpDists::default()))
        .1
        .merge(dists);
}

impl Probe for Loaded {
    fn objects_mut(&mut self) -> Vec<&mut ProbeObject> {
        vec![&mut self.object]
    }

    fn collect(&mut self, out: &mut Collection<'_>) {
        // Closed first, then the iterator's count of those open: no connection is in both.
        let mut peers = self.peers.entries();
        let mut other = self.other.entries();
        let open_rtt = if self.samples_open_rtt {
            match self.sample_open_rtt() {
                Ok(samples) => Some(samples),
                Err(e) => {
                    tracing::warn!(receiver = %out.receiver, error = %e, "cannot sample the RTT and count the open TCP connections");
                    None
                }
            }
        } else {
            None
        };
        if self.samples_open_rtt {
            // Without a run this collection (None), only the closed count: the report keeps the
            // last value until that is passed.
            let run = open_rtt.as_ref().map(|_| self.open_generation);
            let open_peers = self.peers.entries();
            let open_other = self.other.entries();
            // Entries the run made (peers of connections it found open, whose opens wrote
            // nothing): nothing of them was closed at the first read, and the rest of their
            // figures wait for the next collection.
            if run.is_some() {
                for key in open_peers.keys() {
                    peers.entry(*key).or_default();
                }
                for key in open_other.keys() {
                    other.entry(*key).or_default();
                }
            }
            for (key, stats) in &mut peers {
                let open = open_count(run, open_peers.get(key));
                let opened = self.reported_opened.entry(*key).or_default();
                *opened = (*opened).max(stats.counts.closed + open);
                stats.counts.opened = *opened;
            }
            for (key, stats) in &mut other {
                let open = open_count(run, open_other.get(key));
                let opened = self.reported_other_opened.entry(*key).or_default();
                *opened = (*opened).max(stats.counts.closed + open);
                stats.counts.opened = *opened;
            }
        }
        out.saw(peers.keys().map(|k| k.cgroup_id));
        out.saw(other.keys().map(|k| k.cgroup_id));

        let mut peers: Vec<(&TcpKey, &TcpStats)> = peers.iter().collect();
        peers.sort_by_key(|(k, _)| (k.cgroup_id, k.peer, k.server_port, k.family, k.role));
        // Distributions are series per cgroup, role and server port: the peers' added up. A
        // series exists once a connection of it closed (a peer whose connections are all still
        // open adds none).
        let mut by_series = DistSeries::new();
        for (key, stats) in peers {
            metrics::add_counts(&mut out.metrics, &metrics::Peer::of(key), &stats.counts);
            if !stats.dists.is_empty() {
                add_to_series(&mut by_series, key.cgroup_id, key.role, key.server_port, &stats.dists);
            }
        }
        // A cgroup's `other` distributions have no server port: both address families' entries
        // are one series.
        let mut others: Vec<(&TcpOtherKey, &TcpStats)> = other.iter().collect();
        others.sort_by_key(|(k, _)| (k.cgroup_id, k.family, k.role));
        for (key, other) in others {
            metrics::add_counts(&mut out.metrics, &metrics::Peer::other(key), &other.counts);
            add_to_series(&mut by_series, key.cgroup_id, key.role, 0, &other.dists);
        }
        for (key, dists) in by_series.values() {
            metrics::add_dists(&mut out.metrics, key, dists, self.duration_sample_one_in);
        }

        if let Some(samples) = open_rtt {
            let mut samples: Vec<_> = samples.into_iter().collect();
            samples.sort_by_key(|(key, _)| dist_order(key));
            for (key, hist) in &samples {
                metrics::add_open_rtt(&mut out.metrics, key, hist);
            }
        }
    }

    fn forget(&mut self, gone: &HashSet<u64>) {
        self.reported_opened.retain(|k, _| !gone.contains(&k.cgroup_id));
        self.reported_other_opened
            .retain(|k, _| !gone.contains(&k.cgroup_id));
        self.peers.forget(gone, |k| k.cgroup_id);
        self.other.forget(gone, |k| k.cgroup_id);
        self.cgroup_peers.forget(gone, |k| *k);
    }
}
