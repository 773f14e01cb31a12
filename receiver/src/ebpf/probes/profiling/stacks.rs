//! Samples summed per interval: each distinct (cgroup, process, thread name, stack, span it
//! links to) counts its samples (on-CPU) or its samples and blocked time (off-CPU). Nothing per sample leaves
//! the profiler; only these sums do.

use std::collections::HashMap;

use super::modules::ModuleId;
use super::trace_link::SpanLink;

/// One frame of a stack, not yet named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Frame {
    Kernel { address: u64 },
    /// Code of a binary: its module and the file offset (the same for every process mapping it).
    User { module: ModuleId, offset: u64 },
    /// Anonymous executable memory of `pid` (JIT code, named by its perf map).
    Jit { pid: u32, address: u64 },
    Unknown { address: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleKey {
    pub cgroup: u64,
    pub pid: u32,
    pub thread: String,
    /// Leaf first: kernel frames, then user frames.
    pub frames: Box<[Frame]>,
    /// The span the thread was serving (the trace link), if known.
    pub link: Option<SpanLink>,
}

/// What a key summed: samples, and for off-CPU the time blocked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Weight {
    pub samples: u64,
    pub off_cpu_ns: u64,
}

/// One interval's samples.
#[derive(Debug, Default)]
pub struct StackCounts {
    pub on_cpu: HashMap<SampleKey, Weight>,
    pub off_cpu: HashMap<SampleKey, Weight>,
    pub start_ns: u64,
}

impl StackCounts {
    pub fn add_on_cpu(&mut self, key: SampleKey) {
        self.on_cpu.entry(key).or_default().samples += 1;
    }

    pub fn add_off_cpu(&mut self, key: SampleKey, blocked_ns: u64) {
        let weight = self.off_cpu.entry(key).or_default();
        weight.samples += 1;
        weight.off_cpu_ns += blocked_ns;
    }

    /// An on-CPU sample, or (with the time blocked) an off-CPU one.
    pub fn add(&mut self, key: SampleKey, off_cpu_ns: Option<u64>) {
        match off_cpu_ns {
            None => self.add_on_cpu(key),
            Some(blocked_ns) => self.add_off_cpu(key, blocked_ns),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.on_cpu.is_empty() && self.off_cpu.is_empty()
    }

    /// Every distinct frame of the interval.
    pub fn frames(&self) -> impl Iterator<Item = &Frame> {
        self.on_cpu
            .keys()
            .chain(self.off_cpu.keys())
            .flat_map(|k| k.frames.iter())
    }
}
