//! `tcp`: connections opened, failed and closed (bytes, duration, RTT at close) and
//! retransmissions per cgroup (the socket's) and peer, and the RTT of open connections sampled at
//! every collection by an iterator over the kernel's TCP sockets (`iter/tcp`, optional).

mod config;
mod metrics;

use std::collections::{BTreeMap, HashMap, HashSet};

use aya::programs::Iter;
use podscope_core::FieldError;
use podscope_ebpf::abi::{Hist, TcpKey, TcpStats};
use podscope_ebpf::{abi, objects};

pub use config::TcpProbeConfig;

use super::{Collection, LoadContext, Probe, SingleObjectProbe};
use crate::ebpf::catalog::MetricDoc;
use crate::ebpf::kernel_memory::Typical;
use crate::ebpf::object::{
    error_chain, tp_btf, HashTable, KernelFeatures, MapDef, ObjectSettings, ProbeError,
    ProbeObject, ProbeSpec,
};

const SPEC: ProbeSpec = ProbeSpec {
    name: "tcp",
    object: objects::TCP,
    programs: &[
        tp_btf("podscope_tcp_state", "inet_sock_set_state"),
        tp_btf("podscope_tcp_retransmit", "tcp_retransmit_skb"),
    ],
    maps: &[CONN_STATS, LIVE, OPEN_RTT],
};

/// The iterator program sampling open connections' RTT.
const OPEN_RTT_ITERATOR: &str = "podscope_tcp_live_rtt";

const CONN_STATS: MapDef = MapDef::entries("tcp_conn_stats")
    .counted(abi::TCP_MAP_CONN_STATS)
    .typically(Typical::PerCgroup(10));
/// Socket → when it was established, and its role.
const LIVE: MapDef = MapDef::entries("tcp_live")
    .counted(abi::TCP_MAP_LIVE)
    .typically(Typical::PerNode(10_000));
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
    }

    fn open(
        config: &TcpProbeConfig,
        ctx: &mut LoadContext<'_>,
    ) -> Result<Box<dyn Probe>, ProbeError> {
        let mut object = ctx.object(&SPEC, &ObjectSettings::default())?;
        let samples_open_rtt = match load_iterator(&mut object, ctx.features) {
            Ok(()) => true,
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
            stats: object.hash(&CONN_STATS)?,
            open_rtt: object.hash(&OPEN_RTT)?,
            object,
            samples_open_rtt,
            peers: BTreeMap::new(),
            max_peers: config.max_peers,
        }))
    }
}

struct Loaded {
    object: ProbeObject,
    stats: HashTable<TcpKey, TcpStats>,
    open_rtt: HashTable<TcpKey, Hist>,
    /// The iterator over open connections is loaded.
    samples_open_rtt: bool,
    /// Peers kept per cgroup (the cap is sticky: the first `max_peers` seen).
    peers: BTreeMap<u64, HashSet<(String, u16, u8, bool)>>,
    max_peers: usize,
}

impl Loaded {
    /// Runs the iterator once: the smoothed RTT of every open connection the probe saw
    /// established, per connection key. The map is emptied first, so it holds exactly this run's
    /// samples.
    fn sample_open_rtt(&mut self) -> Result<HashMap<TcpKey, Hist>, String> {
        self.open_rtt.remove(self.open_rtt.entries().into_keys());
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

impl Probe for Loaded {
    fn objects_mut(&mut self) -> Vec<&mut ProbeObject> {
        vec![&mut self.object]
    }

    fn collect(&mut self, out: &mut Collection<'_>) {
        let stats = self.stats.entries();
        out.saw(stats.keys().map(|k| k.cgroup_id));
        let series = metrics::tcp_series(&stats, &mut self.peers, self.max_peers);
        metrics::add_tcp(&mut out.metrics, &series);
        if self.samples_open_rtt {
            match self.sample_open_rtt() {
                Ok(samples) => {
                    let series = metrics::tcp_series(&samples, &mut self.peers, self.max_peers);
                    metrics::add_tcp_open_rtt(&mut out.metrics, &series);
                }
                Err(e) => {
                    tracing::warn!(receiver = %out.receiver, error = %e, "cannot sample the RTT of open TCP connections")
                }
            }
        }
    }

    fn forget(&mut self, gone: &HashSet<u64>) {
        self.stats.forget(gone, |k| k.cgroup_id);
        self.peers.retain(|id, _| !gone.contains(id));
    }
}
