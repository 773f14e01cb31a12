//! The node's pods, trimmed, with the indexes lookups need (container id, pod UID, pod IP,
//! namespace/name). Filled by applying watch events; a deleted pod stays findable for
//! `delete_delay` so that data collected just before its deletion is still enriched.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::metadata::{Attr, Interner, PodMeta};

/// What a lookup found: the attributes to add, pod (and container) first, then the namespace's
/// and node's extracted labels.
#[derive(Debug, Clone)]
pub struct Found {
    pub pod: Arc<PodMeta>,
    /// Index into `pod.containers`, when the data named a container the pod status lists.
    pub container: Option<usize>,
}

impl Found {
    /// The pod's attributes, then the container's.
    pub fn attributes(&self) -> impl Iterator<Item = &Attr> {
        let container = self
            .container
            .map(|i| &*self.pod.containers[i].attributes)
            .unwrap_or_default();
        self.pod.attributes.iter().chain(container)
    }
}

#[derive(Debug)]
struct Entry {
    pod: Arc<PodMeta>,
    /// When the API server said it was deleted (or a relist no longer listed it).
    deleted_at: Option<Instant>,
}

#[derive(Debug)]
pub struct PodStore {
    delete_delay: Duration,
    by_uid: HashMap<Arc<str>, Entry>,
    by_container: HashMap<Arc<str>, (Arc<str>, usize)>,
    by_ip: HashMap<Arc<str>, Arc<str>>,
    by_name: HashMap<(Arc<str>, Arc<str>), Arc<str>>,
    namespaces: HashMap<String, Arc<[Attr]>>,
    node: Option<Arc<[Attr]>>,
    /// UIDs listed since the current relist began (`None` outside a relist).
    relisting: Option<HashSet<Arc<str>>>,
    /// Strings shared between pods (namespaces, workloads, images, label keys).
    pub interner: Interner,
}

impl PodStore {
    pub fn new(delete_delay: Duration) -> PodStore {
        PodStore {
            delete_delay,
            by_uid: HashMap::new(),
            by_container: HashMap::new(),
            by_ip: HashMap::new(),
            by_name: HashMap::new(),
            namespaces: HashMap::new(),
            node: None,
            relisting: None,
            interner: Interner::default(),
        }
    }

    /// A pod was added or changed.
    pub fn apply(&mut self, pod: PodMeta) {
        let uid = pod.uid.clone();
        if let Some(seen) = &mut self.relisting {
            seen.insert(uid.clone());
        }
        if let Some(old) = self.by_uid.remove(&uid) {
            self.unindex(&old.pod);
        }
        for (i, container) in pod.containers.iter().enumerate() {
            if let Some(id) = &container.id {
                self.by_container.insert(id.clone(), (uid.clone(), i));
            }
        }
        // A new pod may take the IP of one deleted but still kept for the delay: the index points
        // at the newest, and the old pod's purge removes only what it still owns (`unindex`).
        for ip in &pod.ips {
            self.by_ip.insert(ip.clone(), uid.clone());
        }
        self.by_name
            .insert((pod.namespace.clone(), pod.name.clone()), uid.clone());
        self.by_uid.insert(
            uid,
            Entry {
                pod: Arc::new(pod),
                deleted_at: None,
            },
        );
    }

    /// A pod was deleted: it stays findable until `delete_delay` has passed.
    pub fn delete(&mut self, uid: &str, now: Instant) {
        if let Some(entry) = self.by_uid.get_mut(uid) {
            entry.deleted_at.get_or_insert(now);
        }
    }

    /// A relist begins (the watch started or restarted after `410 Gone` or an error).
    pub fn relist_started(&mut self) {
        self.relisting = Some(HashSet::new());
    }

    /// The relist is complete: pods it did not list were deleted while the watch was down.
    pub fn relist_done(&mut self, now: Instant) {
        let Some(seen) = self.relisting.take() else {
            return;
        };
        for (uid, entry) in &mut self.by_uid {
            if !seen.contains(&**uid) {
                entry.deleted_at.get_or_insert(now);
            }
        }
    }

    /// Forgets pods deleted more than `delete_delay` ago. Returns how many.
    pub fn purge(&mut self, now: Instant) -> usize {
        let expired: Vec<Arc<str>> = self
            .by_uid
            .iter()
            .filter(|(_, e)| {
                e.deleted_at
                    .is_some_and(|at| now.saturating_duration_since(at) >= self.delete_delay)
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in &expired {
            if let Some(entry) = self.by_uid.remove(uid) {
                self.unindex(&entry.pod);
            }
        }
        if !expired.is_empty() {
            self.interner.shrink();
        }
        expired.len()
    }

    /// Removes index entries that still point at this pod (a newer pod may own them now).
    fn unindex(&mut self, pod: &PodMeta) {
        for container in &pod.containers {
            if let Some(id) = &container.id {
                if self
                    .by_container
                    .get(id)
                    .is_some_and(|(uid, _)| *uid == pod.uid)
                {
                    self.by_container.remove(id);
                }
            }
        }
        for ip in &pod.ips {
            if self.by_ip.get(ip) == Some(&pod.uid) {
                self.by_ip.remove(ip);
            }
        }
        let key = (pod.namespace.clone(), pod.name.clone());
        if self.by_name.get(&key) == Some(&pod.uid) {
            self.by_name.remove(&key);
        }
    }

    pub fn set_namespace(&mut self, name: String, attributes: Arc<[Attr]>) {
        self.namespaces.insert(name, attributes);
    }

    pub fn remove_namespace(&mut self, name: &str) {
        self.namespaces.remove(name);
    }

    pub fn set_node(&mut self, attributes: Option<Arc<[Attr]>>) {
        self.node = attributes;
    }

    /// The namespace's and node's extracted attributes for a pod.
    pub fn context_attributes(&self, pod: &PodMeta) -> [Option<&Arc<[Attr]>>; 2] {
        [self.namespaces.get(&*pod.namespace), self.node.as_ref()]
    }

    fn found(&self, uid: &str, container: Option<usize>) -> Option<Found> {
        self.by_uid.get(uid).map(|e| Found {
            pod: e.pod.clone(),
            container,
        })
    }

    pub fn by_container_id(&self, container_id: &str) -> Option<Found> {
        let (uid, i) = self.by_container.get(container_id)?;
        self.found(uid, Some(*i))
    }

    /// The pod by UID, and the container when `container_id` names one of its containers.
    pub fn by_pod_uid(&self, uid: &str, container_id: Option<&str>) -> Option<Found> {
        let entry = self.by_uid.get(uid)?;
        let container = container_id.and_then(|id| {
            entry
                .pod
                .containers
                .iter()
                .position(|c| c.id.as_deref() == Some(id))
        });
        self.found(uid, container)
    }

    pub fn by_ip(&self, ip: &str) -> Option<Found> {
        self.found(self.by_ip.get(ip)?, None)
    }

    pub fn by_name(&self, namespace: &str, name: &str) -> Option<Found> {
        let uid = self
            .by_name
            .get(&(Arc::<str>::from(namespace), Arc::<str>::from(name)))?;
        self.found(uid, None)
    }

    /// The pod with this UID, unless it was deleted.
    pub fn live_pod(&self, uid: &str) -> Option<&Arc<PodMeta>> {
        self.by_uid
            .get(uid)
            .filter(|e| e.deleted_at.is_none())
            .map(|e| &e.pod)
    }

    /// Pods kept, including deleted ones still within the delay.
    pub fn len(&self) -> usize {
        self.by_uid.len()
    }

    /// (live, deleted but still kept) pods.
    pub fn counts(&self) -> (usize, usize) {
        let deleted = self
            .by_uid
            .values()
            .filter(|e| e.deleted_at.is_some())
            .count();
        (self.by_uid.len() - deleted, deleted)
    }

    pub fn is_empty(&self) -> bool {
        self.by_uid.is_empty()
    }
}
