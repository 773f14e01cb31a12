//! The files probe's metrics and how its map entries become data points.

use std::collections::{BTreeMap, HashMap};

use podscope_ebpf::abi::{OpenKey, OpenPathCgroup, OpenPathCgroupKey, OpenPathKey};

use crate::ebpf::builder::{string_attr, MetricsBuilder, Owner};
use crate::ebpf::catalog::{MetricDoc, MetricKind};

pub const OPENS: MetricDoc = MetricDoc {
    name: "podscope.files.opens",
    kind: MetricKind::Counter,
    unit: "{open}",
    description: "File opens (open, creat, openat, openat2, open_by_handle_at), successful or not",
    attributes: &[],
};
pub const OPEN_ERRORS: MetricDoc = MetricDoc {
    name: "podscope.files.open_errors",
    kind: MetricKind::Counter,
    unit: "{open}",
    description: "File opens that failed, by errno name",
    attributes: &["error.type"],
};
pub const PATH_OPENS: MetricDoc = MetricDoc {
    name: "podscope.files.path_opens",
    kind: MetricKind::DeltaCounter,
    unit: "{open}",
    description: "Successful opens over one collection interval (reported at the end of the next) for the top `top_paths` paths of each cgroup, the rest as `other` (with `capture_paths: true`)",
    attributes: &["file.path"],
};

pub const METRICS: &[MetricDoc] = &[OPENS, OPEN_ERRORS, PATH_OPENS];

pub fn errno_name(errno: u32) -> String {
    syscalls::Errno::new(errno as i32)
        .name()
        .map(str::to_string)
        .unwrap_or_else(|| format!("errno_{errno}"))
}

pub fn add_opens(b: &mut MetricsBuilder<'_>, opens: &HashMap<OpenKey, u64>) {
    let mut totals: BTreeMap<u64, u64> = BTreeMap::new();
    for (key, &count) in opens {
        *totals.entry(key.cgroup_id).or_default() += count;
        if key.err != 0 {
            b.count(
                Owner::Cgroup(key.cgroup_id),
                &OPEN_ERRORS,
                vec![string_attr("error.type", errno_name(key.err))],
                count,
            );
        }
    }
    for (cgroup, total) in totals {
        b.count(Owner::Cgroup(cgroup), &OPENS, vec![], total);
    }
}

/// Opens by path over one interval (`start_ns` to `end_ns`): per cgroup, the `top` most opened,
/// the rest and the kernel's `other` (paths beyond what it tracks) as `other`.
pub fn add_top_paths(
    b: &mut MetricsBuilder<'_>,
    paths: &HashMap<OpenPathKey, u64>,
    cgroups: &HashMap<OpenPathCgroupKey, OpenPathCgroup>,
    top: usize,
    start_ns: u64,
    end_ns: u64,
) {
    let mut per_cgroup: BTreeMap<u64, (Vec<(String, u64)>, u64)> = BTreeMap::new();
    for (key, &count) in paths {
        let end = key
            .path
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(key.path.len());
        let path = String::from_utf8_lossy(&key.path[..end]).into_owned();
        per_cgroup
            .entry(key.cgroup_id)
            .or_default()
            .0
            .push((path, count));
    }
    for (key, cgroup) in cgroups {
        per_cgroup.entry(key.cgroup_id).or_default().1 += cgroup.other;
    }
    for (cgroup, (mut list, kernel_other)) in per_cgroup {
        list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let other: u64 = list.iter().skip(top).map(|(_, c)| c).sum::<u64>() + kernel_other;
        let owner = Owner::Cgroup(cgroup);
        for (path, count) in list.into_iter().take(top) {
            let attributes = vec![string_attr("file.path", path)];
            b.count_over(owner, &PATH_OPENS, attributes, count, (start_ns, end_ns));
        }
        if other > 0 {
            let attributes = vec![string_attr("file.path", "other")];
            b.count_over(owner, &PATH_OPENS, attributes, other, (start_ns, end_ns));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use opentelemetry_proto::tonic::metrics::v1::{
        metric, number_data_point, AggregationTemporality,
    };

    #[test]
    fn names_come_from_the_errno_table() {
        assert_eq!(errno_name(2), "ENOENT");
        assert_eq!(errno_name(13), "EACCES");
    }

    #[test]
    fn top_paths_keep_the_most_opened_and_sum_the_rest_with_the_kernels_other() {
        let key = |path: &str| {
            let mut k = OpenPathKey {
                cgroup_id: 9,
                epoch: 1,
                _pad: 0,
                path: [0; podscope_ebpf::abi::PODSCOPE_PATH_LEN as usize],
            };
            k.path[..path.len()].copy_from_slice(path.as_bytes());
            k
        };
        let paths: HashMap<_, _> = [
            (key("/a"), 5),
            (key("/b"), 9),
            (key("/c"), 1),
            (key("/d"), 2),
        ]
        .into_iter()
        .collect();
        let cgroup = OpenPathCgroupKey {
            cgroup_id: 9,
            epoch: 1,
            _pad: 0,
        };
        let beyond_tracked = OpenPathCgroup {
            distinct: 6,
            _pad: 0,
            other: 4,
        };
        let cgroups: HashMap<_, _> = [(cgroup, beyond_tracked)].into_iter().collect();
        let mut b = MetricsBuilder::new("h", 30);
        add_top_paths(&mut b, &paths, &cgroups, 2, 10, 20);
        let rms = b.finish(|_| {
            Some(crate::ebpf::builder::Identity {
                path: None,
                start_ns: 1,
            })
        });
        let Some(metric::Data::Sum(sum)) = &rms[0].scope_metrics[0].metrics[0].data else {
            panic!()
        };
        let got: Vec<(String, i64, u64, u64)> = sum
            .data_points
            .iter()
            .map(|p| {
                let Some(any_value::Value::StringValue(path)) =
                    p.attributes[0].value.clone().unwrap().value
                else {
                    panic!()
                };
                let Some(number_data_point::Value::AsInt(v)) = p.value else {
                    panic!()
                };
                (path, v, p.start_time_unix_nano, p.time_unix_nano)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("/b".into(), 9, 10, 20),
                ("/a".into(), 5, 10, 20),
                ("other".into(), 3 + 4, 10, 20)
            ]
        );
        assert_eq!(
            sum.aggregation_temporality,
            AggregationTemporality::Delta as i32
        );
    }
}
