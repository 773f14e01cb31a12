//! The block_io probe's metrics and how its map entries become data points.

use std::collections::HashMap;

use podscope_ebpf::abi::{
    BlockKey, BlockStats, BLOCK_DISCARD, BLOCK_FLUSH, BLOCK_READ, BLOCK_WRITE,
};

use crate::ebpf::builder::{string_attr, MetricsBuilder, Owner};
use crate::ebpf::catalog::{MetricDoc, MetricKind};

pub const BLOCK_LATENCY: MetricDoc = MetricDoc {
    name: "podscope.block.latency",
    kind: MetricKind::Distribution,
    unit: "ns",
    description: "Block request latency from issue to completion, by device and operation",
    attributes: &["system.device", "podscope.block.operation"],
};
pub const BLOCK_BYTES: MetricDoc = MetricDoc {
    name: "podscope.block.io",
    kind: MetricKind::Counter,
    unit: "By",
    description: "Bytes completed by block requests, by device and operation",
    attributes: &["system.device", "podscope.block.operation"],
};

pub const METRICS: &[MetricDoc] = &[BLOCK_LATENCY, BLOCK_BYTES];

pub fn block_operation(op: u32) -> &'static str {
    match op {
        BLOCK_READ => "read",
        BLOCK_WRITE => "write",
        BLOCK_FLUSH => "flush",
        BLOCK_DISCARD => "discard",
        _ => "other",
    }
}

/// The device name for a kernel dev_t (major << 20 | minor), from sysfs; `major:minor` if unknown.
pub fn device_name(dev: u32) -> String {
    let (major, minor) = (dev >> 20, dev & 0xfffff);
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))
        .ok()
        .and_then(|uevent| {
            uevent
                .lines()
                .find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_string))
        })
        .unwrap_or_else(|| format!("{major}:{minor}"))
}

pub fn add(b: &mut MetricsBuilder<'_>, stats: &HashMap<BlockKey, BlockStats>) {
    for (key, s) in stats {
        let attributes = vec![
            string_attr("system.device", device_name(key.dev)),
            string_attr("podscope.block.operation", block_operation(key.op)),
        ];
        b.count(Owner::Host, &BLOCK_BYTES, attributes.clone(), s.bytes);
        b.distribution(Owner::Host, &BLOCK_LATENCY, attributes, &s.latency_ns);
    }
}
