//! Which cgroups the probes observe: `cgroup_filter` (path globs, and pods selected through a
//! Kubernetes pod cache), turned into the ids of the kernel's `cgroup_filter` map that every probe
//! object checks, and the subtrees under which the kernel lists new cgroups as they are created. All pod selection of the receiver is here, so that where the pod cache comes
//! from can change in one place.
//!
//! It must not read probe maps or know any probe.

use std::collections::HashSet;
use std::sync::Arc;

use aya::maps::{HashMap, MapData};
use podscope_core::BuildContext;

use super::cgroups::{CgroupGlob, CgroupIndex};
use super::config::{CgroupFilterConfig, PodSource};
use super::object::ProbeObject;

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
    /// Whether the kernel lists new cgroups under the roots at once, before a walk decides
    /// (false for a Probe's instance: nothing outside its pods is ever counted, not even
    /// briefly).
    admit_new: bool,
}

impl CgroupFilter {
    /// Only the cgroups of the pods `pods` selects, minus `exclude` (the agent's own
    /// exclusions), with nothing admitted before a walk: a `Probe`'s instance.
    pub fn only_pods(exclude: &[String], pods: PodSelection) -> CgroupFilter {
        CgroupFilter {
            admit_new: false,
            ..CgroupFilter::new(
                &CgroupFilterConfig {
                    exclude: exclude.to_vec(),
                    ..Default::default()
                },
                Some(pods),
            )
        }
    }

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
            admit_new: true,
        }
    }

    /// Changes of the pod cache the filter selects pods through.
    pub fn pod_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.pods.as_ref().map(|p| p.metadata.changes())
    }

    /// Whether the probes' data for the cgroup at `path` is wanted (always, without a filter).
    pub fn observes(&self, path: &str) -> bool {
        let excluded = || self.exclude.iter().any(|g| g.matches(path));
        match self.mode {
            1 => {
                (self.include.iter().any(|g| g.matches(path))
                    || self.pods.as_ref().is_some_and(|p| p.selects(path)))
                    && !excluded()
            }
            2 => !excluded(),
            _ => true,
        }
    }

    /// The ids to put in the kernel map for the current cgroups: those observed (mode 1) or those
    /// not (mode 2).
    pub fn listed_ids(&self, index: &CgroupIndex) -> HashSet<u64> {
        index
            .iter()
            .filter(|(_, path)| match self.mode {
                1 => self.observes(path),
                2 => !self.observes(path),
                _ => false,
            })
            .map(|(id, _)| id)
            .collect()
    }

    /// The cgroups whose new descendants the kernel lists as they are created (mode 1): for each
    /// include glob, the deepest existing cgroup of its fixed prefix (`/kubepods.slice` for
    /// `/kubepods.slice/**`), and with a pod selection the kubelet's pod tree
    /// (`/kubepods.slice`, `/kubepods`, …) of every pod cgroup.
    pub fn roots(&self, index: &CgroupIndex) -> HashSet<u64> {
        if self.mode != 1 || !self.admit_new {
            return HashSet::new();
        }
        let ids: std::collections::HashMap<&str, u64> =
            index.iter().map(|(id, path)| (path, id)).collect();
        let mut roots = HashSet::new();
        for glob in &self.include {
            let mut prefix = glob.fixed_prefix();
            loop {
                if let Some(&id) = ids.get(prefix.as_str()) {
                    roots.insert(id);
                    break;
                }
                match prefix.rsplit_once('/') {
                    Some(("", _)) if prefix != "/" => prefix = "/".to_string(),
                    Some((parent, _)) if !parent.is_empty() => prefix = parent.to_string(),
                    _ => break,
                }
            }
        }
        if self.pods.is_some() {
            for (_, path) in index.iter() {
                if let Some(tree) = kubelet_pod_tree(path) {
                    roots.extend(ids.get(tree).copied());
                }
            }
        }
        roots
    }

    /// Brings a probe object's `cgroup_filter` map to exactly `ids` for the cgroups walked so far
    /// (up to id `walked_up_to`: newer ones the kernel listed since stay listed until the next
    /// walk decides), and its `cgroup_filter_roots` to `roots`.
    pub fn sync(
        &self,
        object: &mut ProbeObject,
        ids: &HashSet<u64>,
        roots: &HashSet<u64>,
        walked_up_to: u64,
    ) -> Result<(), String> {
        if self.mode == 0 {
            return Ok(());
        }
        sync_set(object.cgroup_filter_mut(), ids, |id| id <= walked_up_to)?;
        sync_set(object.cgroup_filter_roots_mut(), roots, |_| true)
    }
}

/// Brings `map` to `wanted` (value 1), removing only the stale keys `removable` allows.
fn sync_set(
    map: &mut HashMap<MapData, u64, u8>,
    wanted: &HashSet<u64>,
    removable: impl Fn(u64) -> bool,
) -> Result<(), String> {
    let present: HashSet<u64> = map.keys().filter_map(Result::ok).collect();
    for &stale in present.difference(wanted) {
        if removable(stale) {
            let _ = map.remove(&stale);
        }
    }
    for id in wanted.difference(&present) {
        map.insert(id, 1, 0).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The kubelet's pod tree a pod cgroup lies in: its path up to the `kubepods` segment.
fn kubelet_pod_tree(path: &str) -> Option<&str> {
    podscope_k8s::cgroup::parse_container_cgroup(path)?.pod_uid?;
    let end = path
        .match_indices('/')
        .map(|(i, _)| i)
        .chain([path.len()])
        .find(|&end| {
            path[..end]
                .rsplit('/')
                .next()
                .is_some_and(|s| s.contains("kubepods"))
        })?;
    Some(&path[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn new_cgroups_are_admitted_under_each_include_globs_deepest_existing_prefix() {
        let root = tempfile::tempdir().unwrap();
        for dir in ["kubepods.slice/kubepods-besteffort.slice", "system.slice"] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        let id = |dir: &str| std::fs::metadata(root.path().join(dir)).unwrap().ino();
        let mut index = CgroupIndex::new(root.path().to_path_buf());
        index.refresh();
        let filter = CgroupFilter::new(
            &CgroupFilterConfig {
                include: vec![
                    "/kubepods.slice/**".into(),
                    "/system.slice/docker-*.scope".into(),
                    "/kubepods.slice/kubepods-besteffort.slice/not-yet.slice/*".into(),
                ],
                ..Default::default()
            },
            None,
        );
        let want: HashSet<u64> = [
            id("kubepods.slice"),
            id("system.slice"),
            id("kubepods.slice/kubepods-besteffort.slice"),
        ]
        .into_iter()
        .collect();
        assert_eq!(filter.roots(&index), want);
        // Without an include filter the kernel lists nothing itself.
        let exclude_only = CgroupFilter::new(
            &CgroupFilterConfig {
                exclude: vec!["/system.slice/**".into()],
                ..Default::default()
            },
            None,
        );
        assert!(exclude_only.roots(&index).is_empty());
    }

    #[test]
    fn a_pod_cgroups_tree_is_its_path_up_to_the_kubepods_segment() {
        let pod = "kubepods-besteffort-pod0a1b2c3d_0000_0000_0000_000000000001.slice";
        let container = format!("cri-containerd-{}.scope", "ab".repeat(32));
        assert_eq!(
            kubelet_pod_tree(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/{pod}/{container}"
            )),
            Some("/kubepods.slice")
        );
        assert_eq!(
            kubelet_pod_tree(&format!(
                "/kubelet.slice/kubelet-kubepods.slice/kubepods-besteffort.slice/{pod}"
            )),
            Some("/kubelet.slice/kubelet-kubepods.slice")
        );
        assert_eq!(kubelet_pod_tree("/system.slice/cron.service"), None);
    }
}
