//! Which pod a resource belongs to: the `pod_association` rules, tried in order against the
//! resource's attributes and the extension's pod cache. A cgroup id is turned into a path
//! through an index of the cgroup2 mount, a pid through `/proc/<pid>/cgroup`, and a path into
//! container id and pod UID by `podscope_k8s::cgroup`. It reads data and the cache; it changes
//! neither.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use podscope_core::proto::tonic::common::v1::{any_value, KeyValue};
use podscope_k8s::cgroup::{self, CgroupIndex};
use podscope_k8s::k8s_metadata::{Found, PodStore};

use super::config::{Association, K8sAttributesConfig};

/// The rules of one processor, with the cgroup index they need.
pub struct PodAssociation {
    rules: Vec<Association>,
    cgroups: Mutex<CgroupCache>,
    proc_root: PathBuf,
}

/// What association learnt besides the pod.
#[derive(Debug, Default)]
pub struct Identity {
    /// Some attribute named a container, pod or cgroup.
    pub identified: bool,
    /// A container id read from a cgroup path: added as `container.id` when the data has none.
    pub container_id: Option<String>,
}

impl PodAssociation {
    pub fn new(config: &K8sAttributesConfig) -> Result<PodAssociation, String> {
        Ok(PodAssociation {
            rules: config
                .pod_association
                .iter()
                .map(|r| r.resolve())
                .collect::<Result<Vec<_>, String>>()?,
            cgroups: Mutex::new(CgroupCache {
                index: cgroup::cgroup2_mount().map(CgroupIndex::new),
                refreshed: None,
                interval: config.cgroup_refresh_interval,
                min_interval: config.cgroup_refresh_min_interval,
            }),
            proc_root: PathBuf::from("/proc"),
        })
    }

    /// The pod (and container) the attributes name, and what was learnt on the way even when
    /// the pod is unknown.
    pub fn associate(
        &self,
        attributes: &[KeyValue],
        store: &PodStore,
    ) -> (Option<Found>, Identity) {
        let mut identity = Identity::default();
        for rule in &self.rules {
            let found = match rule {
                Association::ContainerId => {
                    string_attr(attributes, "container.id").and_then(|id| {
                        identity.identified = true;
                        store.by_container_id(id)
                    })
                }
                Association::CgroupPath => string_attr(attributes, "podscope.cgroup.path")
                    .and_then(|path| from_cgroup_path(path, store, &mut identity)),
                Association::CgroupId => {
                    int_attr(attributes, "podscope.cgroup.id").and_then(|id| {
                        let path = self
                            .cgroups
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .path(id as u64)?;
                        from_cgroup_path(&path, store, &mut identity)
                    })
                }
                Association::ProcessPid => int_attr(attributes, "process.pid").and_then(|pid| {
                    let pid = u32::try_from(pid).ok()?;
                    let path = cgroup::process_cgroup_path(&self.proc_root, pid)?;
                    from_cgroup_path(&path, store, &mut identity)
                }),
                Association::PodUid => string_attr(attributes, "k8s.pod.uid").and_then(|uid| {
                    identity.identified = true;
                    store.by_pod_uid(uid, None)
                }),
                Association::PodIp => string_attr(attributes, "k8s.pod.ip").and_then(|ip| {
                    identity.identified = true;
                    store.by_ip(ip)
                }),
                Association::PodNameAndNamespace => {
                    match (
                        string_attr(attributes, "k8s.namespace.name"),
                        string_attr(attributes, "k8s.pod.name"),
                    ) {
                        (Some(ns), Some(name)) => {
                            identity.identified = true;
                            store.by_name(ns, name)
                        }
                        _ => None,
                    }
                }
            };
            if found.is_some() {
                return (found, identity);
            }
        }
        (None, identity)
    }
}

/// The cgroup id → path index, walked again on an interval and on a miss (at most once per
/// `min_interval`, so unknown ids cannot make it walk for every batch).
struct CgroupCache {
    index: Option<CgroupIndex>,
    refreshed: Option<Instant>,
    interval: Duration,
    min_interval: Duration,
}

impl CgroupCache {
    fn path(&mut self, id: u64) -> Option<String> {
        let index = self.index.as_mut()?;
        let now = Instant::now();
        let due = |min: Duration| {
            self.refreshed
                .is_none_or(|at| now.duration_since(at) >= min)
        };
        if due(self.interval) || (index.path(id).is_none() && due(self.min_interval)) {
            index.refresh();
            self.refreshed = Some(now);
        }
        index.path(id).map(str::to_string)
    }
}

fn from_cgroup_path(path: &str, store: &PodStore, identity: &mut Identity) -> Option<Found> {
    let parsed = cgroup::parse_container_cgroup(path)?;
    identity.identified = true;
    if let Some(id) = &parsed.container_id {
        identity.container_id.get_or_insert_with(|| id.clone());
        if let Some(found) = store.by_container_id(id) {
            return Some(found);
        }
    }
    let uid = parsed.pod_uid.as_deref()?;
    store.by_pod_uid(uid, parsed.container_id.as_deref())
}

pub fn string_attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) if !s.is_empty() => Some(s.as_str()),
            _ => None,
        }
    })
}

fn int_attr(attributes: &[KeyValue], key: &str) -> Option<i64> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::IntValue(i) => Some(*i),
            // Some SDKs send pids as strings.
            any_value::Value::StringValue(s) => s.parse().ok(),
            _ => None,
        }
    })
}
