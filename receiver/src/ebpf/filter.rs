//! Which cgroups the probes observe: `cgroup_filter` (path globs, and pods selected through a
//! Kubernetes pod cache), turned into the ids of the kernel's `cgroup_filter` map that every probe
//! object checks. All pod selection of the receiver is here, so that where the pod cache comes
//! from can change in one place.
//!
//! It must not read probe maps or know any probe.

use std::collections::HashSet;
use std::sync::Arc;

use aya::maps::{HashMap, MapData};
use podscope_core::BuildContext;

use super::cgroups::{CgroupGlob, CgroupIndex};
use super::config::{CgroupFilterConfig, PodSource};

/// Pods the filter includes, resolved through a `k8s_metadata` extension's cache.
#[derive(Clone)]
pub struct PodSelection {
    pub metadata: Arc<podscope_k8s::K8sMetadata>,
    pub selector: podscope_k8s::PodSelector,
}

impl PodSelection {
    /// `cgroup_filter.pods` resolved to the named extension's pod cache (or the extension of the
    /// named processor); `None` without it.
    pub fn resolve(
        config: &CgroupFilterConfig,
        ctx: &BuildContext,
    ) -> anyhow::Result<Option<PodSelection>> {
        let Some(pods) = &config.pods else {
            return Ok(None);
        };
        let metadata = match pods.source().map_err(|e| anyhow::anyhow!("{e}"))? {
            PodSource::Extension(id) => ctx.extensions.get::<podscope_k8s::K8sMetadata>(&id),
            PodSource::Processor(id) => ctx
                .extensions
                .used_by::<podscope_k8s::K8sMetadata>(podscope_core::ComponentKind::Processor, &id),
        }
        .map_err(|e| anyhow::anyhow!("receiver {}: cgroup_filter.pods: {e}", ctx.id))?;
        let labels = match &pods.labels {
            Some(selector) => {
                podscope_k8s::labels::parse_selector(selector).map_err(anyhow::Error::msg)?
            }
            None => Default::default(),
        };
        Ok(Some(PodSelection {
            metadata,
            selector: podscope_k8s::PodSelector {
                namespaces: pods.namespaces.clone(),
                labels,
            },
        }))
    }

    fn selects(&self, path: &str) -> bool {
        podscope_k8s::cgroup::parse_container_cgroup(path)
            .and_then(|c| c.pod_uid)
            .is_some_and(|uid| self.metadata.pod_selected(&uid, &self.selector))
    }
}

/// The kernel-side cgroup filter: mode 0 (everything), 1 (only listed ids), 2 (all but listed).
#[derive(Clone)]
pub struct CgroupFilter {
    pub mode: u32,
    include: Vec<CgroupGlob>,
    exclude: Vec<CgroupGlob>,
    pods: Option<PodSelection>,
}

impl CgroupFilter {
    pub fn new(config: &CgroupFilterConfig, pods: Option<PodSelection>) -> CgroupFilter {
        let globs = |list: &[String]| {
            list.iter()
                .filter_map(|g| CgroupGlob::new(g).ok())
                .collect::<Vec<_>>()
        };
        let (include, exclude) = (globs(&config.include), globs(&config.exclude));
        let mode = if !include.is_empty() || pods.is_some() {
            1
        } else if !exclude.is_empty() {
            2
        } else {
            0
        };
        CgroupFilter {
            mode,
            include,
            exclude,
            pods,
        }
    }

    /// Changes of the pod cache the filter selects pods through.
    pub fn pod_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.pods.as_ref().map(|p| p.metadata.changes())
    }

    /// The ids to put in the kernel map for the current cgroups.
    pub fn listed_ids(&self, index: &CgroupIndex) -> HashSet<u64> {
        index
            .iter()
            .filter(|(_, path)| match self.mode {
                1 => {
                    (self.include.iter().any(|g| g.matches(path))
                        || self.pods.as_ref().is_some_and(|p| p.selects(path)))
                        && !self.exclude.iter().any(|g| g.matches(path))
                }
                2 => self.exclude.iter().any(|g| g.matches(path)),
                _ => false,
            })
            .map(|(id, _)| id)
            .collect()
    }

    /// Brings a probe object's `cgroup_filter` map to exactly `ids`.
    pub fn sync(
        &self,
        map: &mut HashMap<MapData, u64, u8>,
        ids: &HashSet<u64>,
    ) -> Result<(), String> {
        if self.mode == 0 {
            return Ok(());
        }
        let present: HashSet<u64> = map.keys().filter_map(Result::ok).collect();
        for stale in present.difference(ids) {
            let _ = map.remove(stale);
        }
        for id in ids.difference(&present) {
            map.insert(id, 1, 0).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}
