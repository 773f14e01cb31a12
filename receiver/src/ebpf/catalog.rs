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

#[cfg(test)]
mod tests {
    /// `docs/metrics.md` holds the table between markers; `UPDATE_DOCS=1 cargo test` rewrites it.
    #[test]
    fn docs_metrics_md_lists_every_metric() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
        let text = std::fs::read_to_string(&path).unwrap();
        let (begin, end) = (
            "<!-- metrics-table:begin -->\n",
            "<!-- metrics-table:end -->",
        );
        let start = text.find(begin).expect("begin marker") + begin.len();
        let stop = text.find(end).expect("end marker");
        let table = super::markdown_table();
        if std::env::var_os("UPDATE_DOCS").is_some() {
            let updated = format!("{}{}{}", &text[..start], table, &text[stop..]);
            std::fs::write(&path, updated).unwrap();
            return;
        }
        assert_eq!(&text[start..stop], table, "docs/metrics.md is stale: run UPDATE_DOCS=1 cargo test -p podscope-receiver docs_metrics");
    }
}
