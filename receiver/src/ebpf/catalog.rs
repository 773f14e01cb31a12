//! The shape of the metric catalog: each probe lists the metrics it emits (`ProbeKind::METRICS`,
//! in its folder), the single source for the names used in code and for `docs/metrics.md` (a
//! test regenerates the table from the probe table and compares).

/// One emitted metric.
#[derive(Debug, Clone, Copy)]
pub struct MetricDoc {
    pub name: &'static str,
    pub kind: MetricKind,
    pub unit: &'static str,
    pub description: &'static str,
    /// Data point attributes (resource attributes are the cgroup's, or the host's for block_io).
    pub attributes: &'static [&'static str],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Monotonic cumulative sum.
    Counter,
    /// Monotonic delta sum: counts of the last interval only.
    DeltaCounter,
    /// Cumulative exponential histogram, scale 0.
    Distribution,
    /// Delta exponential histogram, scale 0: values sampled at one collection.
    SampledDistribution,
    /// Cumulative exponential histogram of durations in seconds, at the scale the probe chose
    /// (finer than the kernel's scale 0: request durations, whose quantiles users read).
    Duration,
}

impl MetricKind {
    fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "sum (monotonic, cumulative)",
            MetricKind::DeltaCounter => "sum (monotonic, delta)",
            MetricKind::Distribution => "exponential histogram (scale 0, cumulative)",
            MetricKind::SampledDistribution => {
                "exponential histogram (scale 0, delta: sampled at each collection)"
            }
            MetricKind::Duration => "exponential histogram (scale 4, cumulative)",
        }
    }
}

/// Every metric with its probe, in probe table order.
pub fn all() -> impl Iterator<Item = (&'static str, &'static MetricDoc)> {
    super::probes::KINDS
        .iter()
        .flat_map(|(probe, metrics)| metrics.iter().map(move |m| (*probe, m)))
}

/// The metrics table of `docs/metrics.md`.
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| metric | probe | type | unit | attributes | description |\n|---|---|---|---|---|---|\n",
    );
    for (probe, m) in all() {
        let attributes = if m.attributes.is_empty() {
            "—".to_string()
        } else {
            m.attributes
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | `{}` | {} | {} |\n",
            m.name,
            probe,
            m.kind.as_str(),
            m.unit,
            attributes,
            m.description
        ));
    }
    out
}

/// Checks the part of `file` (relative to the repository) between `<!-- marker:begin -->` and
/// `<!-- marker:end -->` against `table`, or rewrites it when `UPDATE_DOCS` is set (the docs
/// tests' generated tables).
pub fn sync_docs_section(file: &str, marker: &str, table: &str) -> Result<(), String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(file);
    let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
    let (begin, end) = (
        format!("<!-- {marker}:begin -->\n"),
        format!("<!-- {marker}:end -->"),
    );
    let (Some(start), Some(stop)) = (text.find(&begin), text.find(&end)) else {
        return Err(format!("{file} has no {marker} markers"));
    };
    let start = start + begin.len();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        let updated = format!("{}{}{}", &text[..start], table, &text[stop..]);
        return std::fs::write(&path, updated).map_err(|e| e.to_string());
    }
    if &text[start..stop] != table {
        return Err(format!(
            "{file} is stale ({marker}): run UPDATE_DOCS=1 cargo test -p podscope-receiver docs_metrics, and as root UPDATE_DOCS=1 cargo test -p podscope-receiver --test ebpf_core kernel_memory for the kernel memory tables\nwant:\n{table}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::ebpf::cgroups::REMOVED_CGROUPS_SPEC;
    use crate::ebpf::object::{MapSize, ProbeSpec};
    use crate::ebpf::probes::SPECS;

    /// Every object the receiver loads: the probes', and its own record of removed cgroups.
    fn objects() -> impl Iterator<Item = (&'static str, ProbeSpec)> {
        SPECS
            .iter()
            .copied()
            .chain([(REMOVED_CGROUPS_SPEC.name, REMOVED_CGROUPS_SPEC)])
    }

    fn check_docs_section(marker: &str, table: &str) {
        if let Err(e) = super::sync_docs_section("docs/metrics.md", marker, table) {
            panic!("{e}");
        }
    }

    /// `docs/metrics.md` holds the table between markers; `UPDATE_DOCS=1 cargo test` rewrites it.
    #[test]
    fn docs_metrics_md_lists_every_metric() {
        check_docs_section("metrics-table", &super::markdown_table());
    }

    fn map_type_name(map_type: u32) -> &'static str {
        match map_type {
            1 => "hash",
            2 => "array",
            5 => "per-CPU hash",
            6 => "per-CPU array",
            9 => "LRU hash",
            27 => "ring buffer",
            29 => "task storage",
            _ => "other",
        }
    }

    /// Every map of every probe, from the compiled objects: the defaults its `max_entries`
    /// settings replace.
    #[test]
    fn docs_metrics_md_lists_every_kernel_map_with_its_default_size() {
        const BPF_F_NO_PREALLOC: u32 = 1;
        let mut table = String::from(
            "| probe | map | type | default `max_entries` | preallocated | `max_entries` setting | failed inserts counted |\n|---|---|---|---|---|---|---|\n",
        );
        for (probe, spec) in objects() {
            let object = aya_obj::Object::parse(spec.object).unwrap();
            for def in spec.maps {
                let map = &object.maps[def.name];
                let hashed = matches!(map.map_type(), 1 | 5 | 9);
                table.push_str(&format!(
                    "| {probe} | `{}` | {} | {} | {} | {} | {} |\n",
                    def.name,
                    map_type_name(map.map_type()),
                    map.max_entries(),
                    if !hashed {
                        "—"
                    } else if map.map_flags() & BPF_F_NO_PREALLOC != 0 {
                        "no"
                    } else {
                        "yes"
                    },
                    match def.size {
                        MapSize::Fixed => "—",
                        MapSize::Entries => "entries",
                        MapSize::RingBytes => "bytes",
                    },
                    if def.full_slot.is_some() {
                        "yes"
                    } else {
                        "—"
                    },
                ));
            }
        }
        check_docs_section("kernel-maps", &table);
    }

    /// The Rust side names every map of each object once, with the kind of size its type takes,
    /// and each counted map has its own slot within the object's `map_full` array.
    #[test]
    fn every_map_of_every_object_has_one_definition_that_fits_its_type() {
        for (probe, spec) in objects() {
            let object = aya_obj::Object::parse(spec.object).unwrap();
            let mut names: Vec<&str> = object
                .maps
                .keys()
                .map(String::as_str)
                .filter(|name| {
                    !name.starts_with('.')
                        && !["cgroup_filter", "cgroup_filter_roots", "map_full"].contains(name)
                })
                .collect();
            names.sort();
            let mut defined: Vec<&str> = spec.maps.iter().map(|m| m.name).collect();
            defined.sort();
            assert_eq!(names, defined, "{probe}: the maps of its object");
            let mut slots = Vec::new();
            for def in spec.maps {
                let map_type = object.maps[def.name].map_type();
                let fits = match def.size {
                    // Hash maps, and tables of slots (arrays) the programs hash into.
                    MapSize::Entries => matches!(map_type, 1 | 2 | 5 | 9),
                    MapSize::RingBytes => map_type == 27,
                    MapSize::Fixed => !matches!(map_type, 1 | 5 | 9 | 27),
                };
                assert!(fits, "{probe}: {} is of type {map_type}", def.name);
                if let Some(slot) = def.full_slot {
                    assert!(
                        slot < podscope_ebpf::abi::PODSCOPE_MAP_SLOTS,
                        "{probe}: {}",
                        def.name
                    );
                    assert!(!slots.contains(&slot), "{probe}: slot {slot} twice");
                    slots.push(slot);
                }
            }
        }
    }
}
