//! `block_io`: per device and operation, block request latency and bytes. Requests complete in
//! interrupt context, so the data belongs to the host, not to a cgroup.

mod metrics;

use podscope_ebpf::abi::{BlockKey, BlockStats};
use podscope_ebpf::objects;

use super::{BasicProbeConfig, Collection, LoadContext, Probe, SingleObjectProbe};
use crate::ebpf::catalog::MetricDoc;
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
};

const STATS: MapDef = MapDef::new("block_stats");

pub struct BlockIo;

impl SingleObjectProbe for BlockIo {
    type Config = BasicProbeConfig;
    const NAME: &'static str = "block_io";
    const METRICS: &'static [MetricDoc] = metrics::METRICS;

    fn open(
        _config: &BasicProbeConfig,
        ctx: &mut LoadContext<'_>,
    ) -> Result<Box<dyn Probe>, ProbeError> {
        Ok(Box::new(Loaded::load(ctx)?))
    }
}

struct Loaded {
    object: ProbeObject,
    stats: HashTable<BlockKey, BlockStats>,
}

impl Loaded {
    fn load(ctx: &mut LoadContext<'_>) -> Result<Loaded, ProbeError> {
        let mut object = ctx.object(&SPEC, &ObjectSettings::default())?;
        Ok(Loaded {
            stats: object.hash(&STATS)?,
            object,
        })
    }
}

impl Probe for Loaded {
    fn objects_mut(&mut self) -> Vec<&mut ProbeObject> {
        vec![&mut self.object]
    }

    fn collect(&mut self, out: &mut Collection<'_>) {
        metrics::add(&mut out.metrics, &self.stats.entries());
    }
}
