//! What each of this process's eBPF programs costs per run, from the kernel's BPF statistics
//! (`run_time_ns` / `run_cnt`, what `bpftool prog show` prints once `kernel.bpf_stats_enabled` is
//! 1). The statistics are switched on through `BPF_ENABLE_STATS` for as long as [`StatsOn`] lives,
//! so the sysctl goes back to what it was even when the bench is interrupted. They add two clock
//! reads to every program run on the machine: take them in a pass of their own, never while a
//! wall-clock figure is measured.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;

/// The kernel keeps run statistics while this lives.
pub struct StatsOn {
    _enabled: OwnedFd,
}

impl StatsOn {
    /// `None` (with the reason on stderr) when the kernel refuses (no CAP_SYS_ADMIN).
    pub fn enable() -> Option<StatsOn> {
        match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(StatsOn { _enabled: fd }),
            Err(e) => {
                eprintln!("BPF run statistics unavailable ({e}): no ns per program");
                None
            }
        }
    }
}

/// The ids of the eBPF programs this process holds (program and link descriptors both name
/// theirs in `/proc/self/fdinfo`).
fn own_program_ids() -> BTreeSet<u64> {
    let mut ids = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir("/proc/self/fdinfo") else {
        return ids;
    };
    for entry in entries.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        ids.extend(
            info.lines()
                .filter_map(|l| l.strip_prefix("prog_id:"))
                .filter_map(|v| v.trim().parse::<u64>().ok()),
        );
    }
    ids
}

/// Runs and run time, by program name (summed over programs of the same name, such as one
/// program loaded in several objects).
#[derive(Debug, Clone, Default)]
pub struct Runs(BTreeMap<String, (u64, u64)>);

/// This process's programs' runs and run time so far (bpftool gives each program's full name,
/// where the kernel keeps 15 characters).
pub fn snapshot() -> Runs {
    let own = own_program_ids();
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .expect("bpftool (scripts/install-deps.sh installs it)");
    let programs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut runs = Runs::default();
    for p in programs {
        let Some(id) = p["id"].as_u64() else { continue };
        if !own.contains(&id) {
            continue;
        }
        let name = p["name"].as_str().unwrap_or("?").to_string();
        let entry = runs.0.entry(name).or_default();
        entry.0 += p["run_cnt"].as_u64().unwrap_or(0);
        entry.1 += p["run_time_ns"].as_u64().unwrap_or(0);
    }
    runs
}

/// Per program that ran between `before` and `after`: its name, runs and ns per run.
pub fn between(before: &Runs, after: &Runs) -> Vec<(String, u64, f64)> {
    after
        .0
        .iter()
        .filter_map(|(name, &(count, ns))| {
            let (count_before, ns_before) = before.0.get(name).copied().unwrap_or_default();
            let runs = count.saturating_sub(count_before);
            (runs > 0).then(|| {
                (
                    name.clone(),
                    runs,
                    ns.saturating_sub(ns_before) as f64 / runs as f64,
                )
            })
        })
        .collect()
}
