//! `block_io`: per device and operation, block request latency and bytes. Requests complete in
//! interrupt context, so the data belongs to the host, not to a cgroup.

mod metrics;

use podscope_ebpf::abi::{BlockKey, BlockStats};
use podscope_ebpf::{abi, objects};

use super::{BasicProbeConfig, Collection, LoadContext, Probe, SingleObjectProbe};
use crate::ebpf::catalog::MetricDoc;
use crate::ebpf::kernel_memory::Typical;
use crate::ebpf::object::{
    tp_btf, HashTable, MapDef, ObjectSettings, ProbeError, ProbeObject, ProbeSpec,
};

const SPEC: ProbeSpec = ProbeSpec {
    name: "block_io",
    object: objects::BLOCK_IO,
    programs: &[
        tp_btf("podscope_block_issue", "block_rq_issue"),
        tp_btf("podscope_block_complete", "block_rq_complete"),
    ],
    maps: &[STATS, START],
};

const STATS: MapDef = MapDef::entries("block_stats")
    .counted(abi::BLOCK_IO_MAP_STATS)
    .typically(Typical::PerNode(16));
/// Request → issue time.
const START: MapDef = MapDef::entries("block_start")
    .counted(abi::BLOCK_IO_MAP_START)
    .typically(Typical::PerNode(64));

pub struct BlockIo;

impl SingleObjectProbe for BlockIo {
    type Config = BasicProbeConfig;
    const SPEC: ProbeSpec = SPEC;
    const METRICS: &'static [MetricDoc] = metrics::METRICS;

    fn open(
        _config: &BasicProbeConfig,
        ctx: &mut LoadContext<'_>,
    ) -> Result<Box<dyn Probe>, ProbeError> {
        let mut object = ctx.object(&SPEC, &ObjectSettings::default())?;
        Ok(Box::new(Loaded {
            stats: object.hash(&STATS)?,
            object,
        }))
    }
}

struct Loaded {
    object: ProbeObject,
    stats: HashTable<BlockKey, BlockStats>,
}

impl Probe for Loaded {
    fn objects_mut(&mut self) -> Vec<&mut ProbeObject> {
        vec![&mut self.object]
    }

    fn collect(&mut self, out: &mut Collection<'_>) {
        metrics::add(&mut out.metrics, &self.stats.entries());
    }
}
