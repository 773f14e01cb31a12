//! `kubectl podscope top`: one table per interval of the pods, containers or the node, with the
//! CPU each used (the `usage_usec` delta of its cgroup's `cpu.stat`, the node's from
//! `/proc/stat`), and the kernel columns (run-queue latency, syscalls, opens, TCP retransmits,
//! requests) from the last two collections of the eBPF receivers naming this extension
//! (`figures`): rates over their collection interval, the cgroups at or below the row's
//! directories summed. A kernel column is `None` while its probe is off.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podscope_core::session::{
    write_line, EndReason, ErrorCode, Message, Target, TopRow, TopScope, TopTable,
};
use podscope_k8s::cgroup::{cgroup2_mount, parse_container_cgroup, CgroupIndex};
use tokio::net::tcp::OwnedWriteHalf;
use tokio_util::sync::CancellationToken;

use super::events::clock_offset_ns;
use super::server::{error, write_welcome, Ending, Outcome};
use super::targets::{node_labels, resolve, CgroupLabels};
use super::Shared;

/// The shortest interval served (a table costs a walk of the cgroup tree without targets).
const MIN_INTERVAL: Duration = Duration::from_millis(200);

/// One row: its labels and the cgroup directories whose CPU it sums (none: the node's).
#[derive(Debug, Clone)]
struct RowSource {
    labels: CgroupLabels,
    dirs: Vec<PathBuf>,
}

#[allow(clippy::too_many_arguments)]
pub async fn serve(
    write: &mut OwnedWriteHalf,
    shared: &Shared,
    scope: TopScope,
    targets: &[Target],
    interval: Duration,
    once: bool,
    gone: &CancellationToken,
) -> std::io::Result<Outcome> {
    if interval < MIN_INTERVAL {
        return Ok(Outcome::Refused(error(
            ErrorCode::BadRequest,
            format!("top interval {interval:?} is shorter than {MIN_INTERVAL:?}"),
        )));
    }
    let root = cgroup2_mount().unwrap_or_else(|| "/sys/fs/cgroup".into());
    let mut index = CgroupIndex::new(root);
    let mut sources = match row_sources(&mut index, scope, targets, shared) {
        Ok(sources) => sources,
        Err(e) => return Ok(Outcome::Refused(error(ErrorCode::TargetNotFound, e))),
    };
    write_welcome(write, shared).await?;
    let mut before = sample(&sources);
    let mut taken = Instant::now();
    loop {
        tokio::select! {
            _ = gone.cancelled() => return Ok(Outcome::Ended(None)),
            _ = shared.stopping.cancelled() => return Ok(Outcome::Ended(Some(Ending::of(EndReason::AgentStopping)))),
            _ = tokio::time::sleep(interval) => {}
        }
        let after = sample(&sources);
        let elapsed = taken.elapsed().as_secs_f64();
        taken = Instant::now();
        let rows = sources
            .iter()
            .zip(before.iter().zip(after.iter()))
            .map(|(source, (b, a))| {
                let kernel = shared.kernel_figures.columns(index.root(), &source.dirs);
                TopRow {
                    namespace: source.labels.namespace.clone(),
                    pod: source.labels.pod.clone(),
                    container: source.labels.container.clone(),
                    cpu_cores: match (b, a) {
                        (Some(b), Some(a)) if elapsed > 0.0 => {
                            Some(a.saturating_sub(*b) as f64 / 1e6 / elapsed)
                        }
                        _ => None,
                    },
                    kernel,
                }
            })
            .collect();
        let table = TopTable {
            time_unix_nano: clock_offset_ns() + crate::ebpf::clock::monotonic_now_ns(),
            node: shared.node.clone(),
            rows,
        };
        write_line(write, &Message::Top(table)).await?;
        if once {
            return Ok(Outcome::Ended(Some(Ending::of(EndReason::Duration))));
        }
        // Without targets the node's containers come and go: look again.
        if targets.is_empty() && scope != TopScope::Nodes {
            if let Ok(fresh) = row_sources(&mut index, scope, targets, shared) {
                sources = fresh;
            }
        }
        before = sample(&sources);
    }
}

fn row_sources(
    index: &mut CgroupIndex,
    scope: TopScope,
    targets: &[Target],
    shared: &Shared,
) -> Result<Vec<RowSource>, String> {
    if scope == TopScope::Nodes {
        return Ok(vec![RowSource {
            labels: CgroupLabels::default(),
            dirs: Vec::new(),
        }]);
    }
    index.refresh();
    if !targets.is_empty() {
        let containers = resolve(index, targets, &shared.node)?;
        return Ok(match scope {
            TopScope::Containers => containers
                .into_iter()
                .map(|c| RowSource {
                    labels: c.labels,
                    dirs: vec![c.path],
                })
                .collect(),
            _ => {
                let mut pods: BTreeMap<(String, String), Vec<PathBuf>> = BTreeMap::new();
                for c in containers {
                    pods.entry((c.labels.namespace, c.labels.pod))
                        .or_default()
                        .push(c.path);
                }
                pods.into_iter()
                    .map(|((namespace, pod), dirs)| RowSource {
                        labels: CgroupLabels {
                            namespace,
                            pod,
                            container: String::new(),
                        },
                        dirs,
                    })
                    .collect()
            }
        });
    }
    // The whole node: every container's cgroup, or every pod's.
    let mut rows: Vec<RowSource> = index
        .iter()
        .filter(|(_, path)| {
            let Some(parsed) = parse_container_cgroup(path) else {
                return false;
            };
            match scope {
                // The container's own directory, not the ones its processes made below it.
                TopScope::Containers => {
                    parsed.container_id.is_some()
                        && Path::new(path)
                            .parent()
                            .and_then(|parent| parse_container_cgroup(&parent.to_string_lossy()))
                            .and_then(|c| c.container_id)
                            .is_none()
                }
                _ => parsed.container_id.is_none() && parsed.pod_uid.is_some(),
            }
        })
        .map(|(_, path)| {
            let mut labels = node_labels(path, shared.pod_names.as_deref());
            if scope == TopScope::Pods {
                labels.container.clear();
            }
            RowSource {
                labels,
                dirs: vec![index.root().join(path.trim_start_matches('/'))],
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        (&a.labels.pod, &a.labels.container).cmp(&(&b.labels.pod, &b.labels.container))
    });
    Ok(rows)
}

/// CPU time used so far, in µs, per row (`None` where it cannot be read).
fn sample(sources: &[RowSource]) -> Vec<Option<u64>> {
    sources
        .iter()
        .map(|source| {
            if source.dirs.is_empty() {
                return node_cpu_usec();
            }
            source
                .dirs
                .iter()
                .map(|dir| cgroup_cpu_usec(dir.as_path()))
                .sum::<Option<u64>>()
        })
        .collect()
}

/// `usage_usec` of a cgroup's `cpu.stat`.
pub(super) fn cgroup_cpu_usec(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// Busy CPU time of the whole node from `/proc/stat` (all but idle and iowait), in µs.
fn node_cpu_usec() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_proc_stat_busy_usec(&text, clock_ticks_per_second())
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

fn parse_proc_stat_busy_usec(text: &str, ticks_per_second: u64) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user already)
    let busy: u64 = values
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Some(busy * 1_000_000 / ticks_per_second.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_leaves_out_idle_and_iowait() {
        let text = "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        // 100 + 5 + 50 + 3 + 2 + 1 = 161 ticks at 100 Hz
        assert_eq!(parse_proc_stat_busy_usec(text, 100), Some(1_610_000));
        assert_eq!(parse_proc_stat_busy_usec("intr 1\n", 100), None);
    }

    #[test]
    fn cpu_stat_usage_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cpu.stat"),
            "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\n",
        )
        .unwrap();
        assert_eq!(cgroup_cpu_usec(dir.path()), Some(123456));
        assert_eq!(cgroup_cpu_usec(&dir.path().join("missing")), None);
    }
}
