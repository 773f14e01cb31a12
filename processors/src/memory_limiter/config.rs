use std::time::Duration;

use podscope_core::{ComponentConfig, FieldError};
use serde::Deserialize;

/// `processors: memory_limiter:` settings, as in the OpenTelemetry Collector.
///
/// The hard limit is `limit_mib` (or `limit_percentage` of the container's memory limit); the
/// soft limit is the hard limit minus `spike_limit_mib` (or `spike_limit_percentage`). Above the
/// soft limit new data is refused with a retryable error; above the hard limit data already
/// accepted is dropped and counted.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryLimiterConfig {
    /// How often the agent's memory (its resident set) is measured. Default 1s.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// The hard limit in MiB. Takes precedence over `limit_percentage`. 0 = unset.
    pub limit_mib: u64,
    /// How far below the hard limit the soft limit is, in MiB. Default (0): 20% of the hard limit.
    pub spike_limit_mib: u64,
    /// The hard limit as a percentage (1–100) of the container's memory limit (cgroups v2
    /// `memory.max`, v1 `memory.limit_in_bytes` of the agent's own cgroup). 0 = unset.
    pub limit_percentage: u64,
    /// The gap between the limits as a percentage of the container's memory limit; must be
    /// below `limit_percentage`. Default (0): 20% of the hard limit.
    pub spike_limit_percentage: u64,
    /// Give freed heap back to the kernel (glibc's `malloc_trim`) when the allocator's freed heap
    /// has grown by this many MiB since its low point after the last trim (asked every minute,
    /// and at once when the resident set grew by as much). Default 4. 0 = only before refusing
    /// (above the soft limit).
    pub trim_free_heap_mib: u64,
}

impl Default for MemoryLimiterConfig {
    fn default() -> Self {
        MemoryLimiterConfig {
            check_interval: Duration::from_secs(1),
            limit_mib: 0,
            spike_limit_mib: 0,
            limit_percentage: 0,
            spike_limit_percentage: 0,
            trim_free_heap_mib: 4,
        }
    }
}

/// The limits in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub soft: u64,
    pub hard: u64,
}

const MIB: u64 = 1024 * 1024;

impl MemoryLimiterConfig {
    /// True when the limits are percentages of the container's memory limit.
    pub fn uses_percentages(&self) -> bool {
        self.limit_mib == 0
    }

    /// The limits, given the container's memory limit (needed only with percentages).
    pub fn limits(&self, container_limit: Option<u64>) -> Result<Limits, String> {
        let (hard, spike) = if self.limit_mib > 0 {
            let spike = if self.spike_limit_mib > 0 {
                self.spike_limit_mib * MIB
            } else {
                self.limit_mib * MIB / 5
            };
            (self.limit_mib * MIB, spike)
        } else {
            let Some(total) = container_limit else {
                return Err("limit_percentage needs a container memory limit".to_string());
            };
            let hard = total / 100 * self.limit_percentage;
            let spike = if self.spike_limit_percentage > 0 {
                total / 100 * self.spike_limit_percentage
            } else {
                hard / 5
            };
            (hard, spike)
        };
        Ok(Limits {
            soft: hard.saturating_sub(spike),
            hard,
        })
    }
}

impl ComponentConfig for MemoryLimiterConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.check_interval.is_zero() {
            errors.push(FieldError::new("check_interval", "must be greater than 0"));
        }
        if self.limit_mib == 0 && self.limit_percentage == 0 {
            errors.push(FieldError::new(
                "limit_mib",
                "set limit_mib, or limit_percentage (of the container's memory limit)",
            ));
        }
        if self.limit_mib > 0 && self.spike_limit_mib >= self.limit_mib {
            errors.push(FieldError::new(
                "spike_limit_mib",
                format!("must be below limit_mib ({})", self.limit_mib),
            ));
        }
        if self.limit_percentage > 100 {
            errors.push(FieldError::new(
                "limit_percentage",
                "must be between 1 and 100",
            ));
        }
        if self.limit_percentage > 0 && self.spike_limit_percentage >= self.limit_percentage {
            errors.push(FieldError::new(
                "spike_limit_percentage",
                format!("must be below limit_percentage ({})", self.limit_percentage),
            ));
        }
        if self.limit_mib > 0 && (self.limit_percentage > 0 || self.spike_limit_percentage > 0) {
            errors.push(FieldError::new(
                "limit_percentage",
                "set either limit_mib/spike_limit_mib or limit_percentage/spike_limit_percentage, not both",
            ));
        }
        errors
    }
}
