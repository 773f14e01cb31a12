//! The `memory_limiter` processor, as the Collector's: it measures the agent's memory (its
//! resident set, from `/proc/self/status`) every `check_interval` and compares it with a soft and
//! a hard limit (absolute, or percentages of the container's memory limit read from cgroups).
//!
//! - Above the **soft** limit, new data is refused with a retryable error before it enters the
//!   pipeline ([`podscope_core::admission`]): OTLP clients get RESOURCE_EXHAUSTED / HTTP 429 with
//!   `Retry-After` and keep their data; the eBPF receiver cannot make the kernel wait, so its
//!   interval is lost and counted (`podscope_receiver_refused_items_total`). Data already queued
//!   that reaches the processor is refused too, and the pipeline queue retries it later.
//! - Above the **hard** limit, data reaching the processor is dropped and counted
//!   (`podscope_memory_limiter_dropped_items_total`): holding it would grow memory further.
//!
//! - Freed heap is given back to the kernel (glibc's `malloc_trim`) before the limiter decides
//!   it is above its soft limit (at most once per [`PRESSURE_TRIM_GAP`]), as the Collector forces
//!   a garbage collection, and whenever the allocator's freed heap has grown by
//!   `trim_free_heap_mib` since its low point after the last trim (asked every minute, and at
//!   once when the resident set grew by as much).
//!   Otherwise glibc keeps what the agent freed, and RSS (what this limiter and the container's
//!   limit count) grows with memory the agent does not use (BENCHMARKS.md, issue 17, soak).
//!
//! One measurement serves every pipeline the processor is in (the state is shared by id). It
//! must be the first processor of a pipeline, as in the Collector.

mod cgroup_limit;
mod config;
mod heap;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use podscope_core::admission::Admission;
use podscope_core::component::create_processor;
use podscope_core::telemetry::{AgentTelemetry, ComponentLabels, ItemLabels};
use podscope_core::{
    Batch, BuildContext, Capabilities, Component, ComponentId, ConsumeError, Consumer, Processor,
    ProcessorBuilder, ProcessorFactory, Signal,
};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use cgroup_limit::{memory_limit, own_memory_limit, CgroupMemoryLimit};
pub use config::{Limits, MemoryLimiterConfig};
pub use heap::{process_heap, FreeHeap};

/// The shortest time between two trims made because the agent is above its soft limit: a trim
/// that did not bring it below would not do better a second later (the Collector waits 10 s
/// between forced collections too).
pub const PRESSURE_TRIM_GAP: Duration = Duration::from_secs(10);

/// How often the allocator is asked how much freed heap it holds, when the resident set has not
/// grown by `trim_free_heap_mib` meanwhile: memory freed without new growth (after start-up,
/// after a burst) is given back within about this time.
pub const FREE_HEAP_POLL: Duration = Duration::from_secs(60);

pub const FACTORY: ProcessorFactory = ProcessorFactory {
    type_name: "memory_limiter",
    description: "Refuses data above a soft memory limit and drops it above a hard one",
    signals: &[
        Signal::Metrics,
        Signal::Traces,
        Signal::Profiles,
        Signal::Logs,
    ],
    create: create_processor::<MemoryLimiterConfig>,
};

/// Where the agent's memory use comes from: the resident set, or a test's figure.
type UsageSource = Arc<dyn Fn() -> Result<u64, String> + Send + Sync>;

impl ProcessorBuilder for MemoryLimiterConfig {
    fn build(
        &self,
        ctx: BuildContext,
        signal: Signal,
        next: Arc<dyn Consumer>,
    ) -> anyhow::Result<Arc<dyn Processor>> {
        let container_limit = if self.uses_percentages() {
            let found = own_memory_limit().map_err(|e| {
                anyhow::anyhow!(
                    "processors.{}.limit_percentage: cannot read the container's memory limit: {e}",
                    ctx.id
                )
            })?;
            if found.bytes.is_none() {
                anyhow::bail!(
                    "processors.{}.limit_percentage: the agent's cgroup has no memory limit ({} \
                     and its ancestors say unlimited); set a container memory limit or use limit_mib",
                    ctx.id,
                    found.file.display()
                );
            }
            found.bytes
        } else {
            None
        };
        let limits = self
            .limits(container_limit)
            .map_err(|e| anyhow::anyhow!("processors.{}: {e}", ctx.id))?;
        let usage: UsageSource = Arc::new(resident_set_bytes);
        build_processor(self, limits, usage, process_heap(), ctx, signal, next)
    }
}

fn build_processor(
    config: &MemoryLimiterConfig,
    limits: Limits,
    usage: UsageSource,
    heap: Option<Arc<dyn FreeHeap>>,
    ctx: BuildContext,
    signal: Signal,
    next: Arc<dyn Consumer>,
) -> anyhow::Result<Arc<dyn Processor>> {
    let metrics = ctx.shared.get_or_insert(&metrics_key(), || {
        Ok(LimiterMetrics::registered(&ctx.telemetry))
    })?;
    let limiter = ctx.shared.get_or_insert(&ctx.id, || {
        Ok(MemoryLimiter::new(
            ctx.id.to_string(),
            limits,
            config.check_interval,
            usage,
            heap.map(|heap| HeapTrimming {
                heap,
                growth: config.trim_free_heap_mib * 1024 * 1024,
            }),
            metrics.as_ref().clone(),
        ))
    })?;
    Ok(Arc::new(MemoryLimiterProcessor {
        limiter,
        signal,
        next,
    }))
}

/// The shared-state key of the metric families every memory_limiter uses (an uppercase type
/// name, which no configured component id can have).
fn metrics_key() -> ComponentId {
    ComponentId::new("MemoryLimiterMetrics", None)
}

/// The resident set of this process, from `/proc/self/status`.
pub fn resident_set_bytes() -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| "no VmRSS line in /proc/self/status".to_string())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    component: String,
    /// `soft` or `hard`.
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TrimLabels {
    component: String,
    reason: TrimReason,
}

/// Why freed heap was given back (the variants are the label values).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum TrimReason {
    /// The agent measured above its soft limit: trimmed before refusing.
    soft_limit,
    /// The resident set grew by `trim_free_heap_mib` with as much freed heap held.
    free_heap,
}

#[derive(Clone)]
struct LimiterMetrics {
    refused: Family<ItemLabels, Counter>,
    dropped: Family<ItemLabels, Counter>,
    memory: Family<ComponentLabels, Gauge>,
    limit: Family<LimitLabels, Gauge>,
    trims: Family<TrimLabels, Counter>,
    trimmed_bytes: Family<ComponentLabels, Counter>,
    trim_seconds: Family<ComponentLabels, Counter<f64, AtomicU64>>,
}

impl LimiterMetrics {
    fn registered(telemetry: &AgentTelemetry) -> Self {
        let metrics = LimiterMetrics {
            refused: Family::default(),
            dropped: Family::default(),
            memory: Family::default(),
            limit: Family::default(),
            trims: Family::default(),
            trimmed_bytes: Family::default(),
            trim_seconds: Family::default(),
        };
        telemetry.register(
            "memory_limiter_refused_items",
            "Items the memory_limiter refused above its soft limit (the sender was told to retry; \
             each refusal counts)",
            metrics.refused.clone(),
        );
        telemetry.register(
            "memory_limiter_dropped_items",
            "Items the memory_limiter dropped above its hard limit",
            metrics.dropped.clone(),
        );
        telemetry.register(
            "memory_limiter_memory_bytes",
            "The agent's resident memory at the memory_limiter's last check",
            metrics.memory.clone(),
        );
        telemetry.register(
            "memory_limiter_limit_bytes",
            "The memory_limiter's soft and hard limits",
            metrics.limit.clone(),
        );
        telemetry.register(
            "memory_limiter_heap_trims",
            "Times the memory_limiter gave freed heap back to the kernel (malloc_trim), by reason: \
             soft_limit (before refusing), free_heap (resident memory grew with freed heap held)",
            metrics.trims.clone(),
        );
        telemetry.register(
            "memory_limiter_heap_trimmed_bytes",
            "Resident memory the memory_limiter's heap trims gave back (before minus after)",
            metrics.trimmed_bytes.clone(),
        );
        telemetry.register(
            "memory_limiter_heap_trim_seconds",
            "Time spent in the memory_limiter's heap trims",
            metrics.trim_seconds.clone(),
        );
        metrics
    }
}

/// How the last measurement compares with the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Pressure {
    Below,
    AboveSoft,
    AboveHard,
}

/// One memory_limiter id's measurement, shared by the pipelines it is in.
struct MemoryLimiter {
    id: String,
    limits: Limits,
    check_interval: Duration,
    usage: UsageSource,
    /// `None` where the allocator cannot trim (not glibc).
    trimming: Option<HeapTrimming>,
    /// Bytes at the last check.
    current: AtomicU64,
    metrics: LimiterMetrics,
    /// The checking task and how many started processors use it.
    checker: Mutex<Option<Checker>>,
    trim_state: Mutex<TrimState>,
}

struct HeapTrimming {
    heap: Arc<dyn FreeHeap>,
    /// `trim_free_heap_mib` in bytes; 0 = only under pressure.
    growth: u64,
}

struct TrimState {
    /// The lowest resident set measured since the last trim (or the last time its growth was
    /// found to be data rather than freed heap).
    low: u64,
    /// The allocator's lowest freed-heap figure since the last trim (0 before the first: what
    /// was freed at start counts). A trim does not change the figure (the chunks stay free,
    /// their pages are released), so it is growth above this point that may be resident.
    free_low: u64,
    /// When the allocator was last asked how much it holds freed.
    last_free_poll: Option<tokio::time::Instant>,
    /// When the last trim for the soft limit ran.
    last_pressure_trim: Option<tokio::time::Instant>,
}

struct Checker {
    users: usize,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl MemoryLimiter {
    fn new(
        id: String,
        limits: Limits,
        check_interval: Duration,
        usage: UsageSource,
        trimming: Option<HeapTrimming>,
        metrics: LimiterMetrics,
    ) -> Self {
        for (limit, bytes) in [("soft", limits.soft), ("hard", limits.hard)] {
            metrics
                .limit
                .get_or_create(&LimitLabels {
                    component: id.clone(),
                    limit,
                })
                .set(bytes as i64);
        }
        MemoryLimiter {
            id,
            limits,
            check_interval,
            usage,
            trimming,
            current: AtomicU64::new(0),
            metrics,
            checker: Mutex::new(None),
            trim_state: Mutex::new(TrimState {
                low: u64::MAX,
                free_low: 0,
                last_free_poll: None,
                last_pressure_trim: None,
            }),
        }
    }

    /// Measures now, after giving freed heap back if the policy says so. A failed measurement
    /// keeps the last figure (and is logged).
    fn check(&self) {
        match (self.usage)() {
            Ok(bytes) => {
                let bytes = self.trim_when_worthwhile(bytes);
                let before = self.pressure();
                self.current.store(bytes, Ordering::Relaxed);
                self.metrics
                    .memory
                    .get_or_create(&ComponentLabels {
                        component: self.id.clone(),
                    })
                    .set(bytes as i64);
                let after = self.pressure();
                if after != before {
                    tracing::warn!(
                        processor = %self.id,
                        memory_bytes = bytes,
                        soft_limit_bytes = self.limits.soft,
                        hard_limit_bytes = self.limits.hard,
                        pressure = ?after,
                        "memory_limiter pressure changed"
                    );
                }
            }
            Err(e) => tracing::warn!(processor = %self.id, error = %e, "cannot measure memory"),
        }
    }

    /// Gives freed heap back to the kernel before the agent is judged above its soft limit, or
    /// when the allocator's freed heap grew by `trim_free_heap_mib` since its low point after
    /// the last trim (asked every [`FREE_HEAP_POLL`], and at once when the resident set grew by
    /// as much); returns the resident set to judge by (measured again after a trim).
    fn trim_when_worthwhile(&self, resident: u64) -> u64 {
        let Some(trimming) = &self.trimming else {
            return resident;
        };
        let mut state = self.trim_state.lock().unwrap_or_else(|e| e.into_inner());
        let mut free_after = None;
        let reason = if resident > self.limits.soft {
            let due = state
                .last_pressure_trim
                .is_none_or(|at| at.elapsed() >= PRESSURE_TRIM_GAP);
            due.then_some(TrimReason::soft_limit)
        } else if trimming.growth > 0 {
            let grown = resident >= state.low.saturating_add(trimming.growth);
            let poll_due = state
                .last_free_poll
                .is_none_or(|at| at.elapsed() >= FREE_HEAP_POLL);
            // mallinfo2 walks the free lists (up to milliseconds): asked once a minute, or when
            // the resident set has grown.
            let free = if grown || poll_due {
                state.last_free_poll = Some(tokio::time::Instant::now());
                trimming.heap.free_bytes()
            } else {
                None
            };
            match free {
                Some(free) if free.saturating_sub(state.free_low) >= trimming.growth => {
                    free_after = Some(free);
                    Some(TrimReason::free_heap)
                }
                Some(free) => {
                    state.free_low = state.free_low.min(free);
                    if grown {
                        // The growth is data the agent holds, not freed heap: count from here.
                        state.low = resident;
                    }
                    None
                }
                None => None,
            }
        } else {
            None
        };
        let Some(reason) = reason else {
            state.low = state.low.min(resident);
            return resident;
        };
        let started = Instant::now();
        trimming.heap.trim();
        let spent = started.elapsed();
        let after = (self.usage)().unwrap_or(resident);
        let component = ComponentLabels {
            component: self.id.clone(),
        };
        self.metrics
            .trims
            .get_or_create(&TrimLabels {
                component: self.id.clone(),
                reason,
            })
            .inc();
        self.metrics
            .trimmed_bytes
            .get_or_create(&component)
            .inc_by(resident.saturating_sub(after));
        self.metrics
            .trim_seconds
            .get_or_create(&component)
            .inc_by(spent.as_secs_f64());
        tracing::debug!(
            processor = %self.id,
            ?reason,
            before_bytes = resident,
            after_bytes = after,
            micros = spent.as_micros() as u64,
            "gave freed heap back to the kernel"
        );
        if reason == TrimReason::soft_limit {
            state.last_pressure_trim = Some(tokio::time::Instant::now());
        }
        state.low = after;
        if let Some(free) = free_after {
            state.free_low = free;
        }
        after
    }

    fn pressure(&self) -> Pressure {
        let current = self.current.load(Ordering::Relaxed);
        if current > self.limits.hard {
            Pressure::AboveHard
        } else if current > self.limits.soft {
            Pressure::AboveSoft
        } else {
            Pressure::Below
        }
    }

    fn refusal(&self, batch: &Batch) -> ConsumeError {
        self.metrics
            .refused
            .get_or_create(&AgentTelemetry::items(&self.id, batch.signal()))
            .inc_by(batch.item_count() as u64);
        ConsumeError::memory_limited(
            format!(
                "{}: the agent uses {} MiB, above its soft memory limit of {} MiB; retry later",
                self.id,
                self.current.load(Ordering::Relaxed) / (1024 * 1024),
                self.limits.soft / (1024 * 1024)
            ),
            self.check_interval.max(Duration::from_secs(1)),
        )
    }

    /// Starts the checking task for the first processor that starts.
    fn start(self: &Arc<Self>) {
        let mut checker = self.checker.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = checker.as_mut() {
            running.users += 1;
            return;
        }
        self.check();
        let stop = CancellationToken::new();
        let limiter = self.clone();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut ticks = tokio::time::interval(limiter.check_interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = ticks.tick() => limiter.check(),
                    }
                }
            }
        });
        *checker = Some(Checker {
            users: 1,
            stop,
            task,
        });
    }

    /// Stops the checking task when the last processor using it stops.
    fn stop(&self) -> Option<JoinHandle<()>> {
        let mut checker = self.checker.lock().unwrap_or_else(|e| e.into_inner());
        let running = checker.as_mut()?;
        running.users -= 1;
        if running.users > 0 {
            return None;
        }
        let running = checker.take()?;
        running.stop.cancel();
        Some(running.task)
    }
}

/// The memory_limiter in one pipeline.
pub struct MemoryLimiterProcessor {
    limiter: Arc<MemoryLimiter>,
    signal: Signal,
    next: Arc<dyn Consumer>,
}

#[async_trait]
impl Consumer for MemoryLimiterProcessor {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        if batch.signal() != self.signal {
            return Err(ConsumeError::permanent(
                "wrong_signal",
                format!(
                    "{} handles {}, got {}",
                    self.limiter.id,
                    self.signal,
                    batch.signal()
                ),
            ));
        }
        match self.limiter.pressure() {
            Pressure::Below => self.next.consume(batch).await,
            Pressure::AboveSoft => Err(self.limiter.refusal(&batch)),
            Pressure::AboveHard => {
                self.limiter
                    .metrics
                    .dropped
                    .get_or_create(&AgentTelemetry::items(&self.limiter.id, batch.signal()))
                    .inc_by(batch.item_count() as u64);
                Ok(())
            }
        }
    }
}

#[async_trait]
impl Component for MemoryLimiterProcessor {
    async fn start(&self) -> anyhow::Result<()> {
        self.limiter.start();
        Ok(())
    }

    async fn shutdown(&self) -> anyhow::Result<()> {
        if let Some(task) = self.limiter.stop() {
            task.await?;
        }
        Ok(())
    }
}

impl Processor for MemoryLimiterProcessor {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            mutates_data: false,
        }
    }

    fn admission(&self) -> Option<Arc<dyn Admission>> {
        Some(Arc::new(SoftLimitAdmission(self.limiter.clone())))
    }
}

/// Refuses new data above the soft limit, before it enters the pipeline.
struct SoftLimitAdmission(Arc<MemoryLimiter>);

impl Admission for SoftLimitAdmission {
    fn admit(&self, batch: &Batch) -> Result<(), ConsumeError> {
        if self.0.pressure() >= Pressure::AboveSoft {
            return Err(self.0.refusal(batch));
        }
        Ok(())
    }
}
