//! Opt-in (`peers.enabled`): who is at the other end of a connection. A cluster-wide index of
//! pod IPs and Service cluster IPs, each trimmed on arrival to namespace, name and workload, so
//! that network data naming a peer address (`network.peer.address` on the TCP probe's data
//! points, or on spans) says which pod or Service it is.
//!
//! Unlike the node's own pods, deleted peers are forgotten at once: pod IPs are reused quickly
//! and a stale peer would name the wrong pod. For the same reason a finished pod (which the API
//! server still lists with its old IP) names no peer, and an IP is removed only by the pod or
//! Service that holds it, not by an older one that had it before.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::watcher::Event;

use super::metadata::{has_finished, owners, pod_ips, Attr, AttrValue, Interner};

/// Who holds an IP and what it is called.
#[derive(Debug, Clone)]
struct Holder {
    /// The object's UID (namespace/name when it has none).
    owner: Arc<str>,
    attrs: Arc<[Attr]>,
}

/// One side of the index (pods or services): live entries, and the entries of a relist in
/// progress, swapped in when it completes.
#[derive(Debug, Default)]
struct Side {
    by_ip: HashMap<Arc<str>, Holder>,
    relisting: Option<HashMap<Arc<str>, Holder>>,
}

impl Side {
    fn map(&mut self, initial: bool) -> &mut HashMap<Arc<str>, Holder> {
        match (&mut self.relisting, initial) {
            (Some(pending), true) => pending,
            _ => &mut self.by_ip,
        }
    }

    /// `holder` holds `ips` now (the latest claim wins: an IP moves to the new holder).
    fn put(&mut self, ips: &[&str], holder: Holder, initial: bool) {
        let map = self.map(initial);
        for ip in ips {
            map.insert(Arc::from(*ip), holder.clone());
        }
    }

    /// `owner` no longer holds `ips`: each is removed unless another object holds it now.
    fn release(&mut self, ips: &[&str], owner: &str, initial: bool) {
        let map = self.map(initial);
        for ip in ips {
            if map.get(*ip).is_some_and(|h| &*h.owner == owner) {
                map.remove(*ip);
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct PeerIndex {
    pods: Side,
    services: Side,
    interner: Interner,
}

/// Attribute names the index adds to a data point or span.
pub const PEER_NAMESPACE: &str = "k8s.peer.namespace.name";
pub const PEER_POD: &str = "k8s.peer.pod.name";
pub const PEER_SERVICE: &str = "k8s.peer.service.name";
pub const PEER_WORKLOAD_NAME: &str = "k8s.peer.workload.name";
pub const PEER_WORKLOAD_KIND: &str = "k8s.peer.workload.kind";

impl PeerIndex {
    fn attr(&mut self, key: &str, value: &str) -> Attr {
        Attr {
            key: self.interner.get(key),
            value: AttrValue::Str(self.interner.get(value)),
        }
    }

    fn service_ips(service: &Service) -> Vec<&str> {
        let spec = service.spec.as_ref();
        let mut ips: Vec<&str> = Vec::new();
        for ip in spec
            .and_then(|s| s.cluster_ip.as_deref())
            .into_iter()
            .chain(
                spec.and_then(|s| s.cluster_ips.as_ref())
                    .into_iter()
                    .flatten()
                    .map(String::as_str),
            )
        {
            // Headless services have no IP of their own.
            if ip != "None" && !ip.is_empty() && !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        ips
    }

    /// The UID, or namespace/name for an object without one.
    fn owner(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Arc<str> {
        match &meta.uid {
            Some(uid) => Arc::from(uid.as_str()),
            None => Arc::from(format!(
                "{}/{}",
                meta.namespace.as_deref().unwrap_or_default(),
                meta.name.as_deref().unwrap_or_default()
            )),
        }
    }

    fn pod_attrs(&mut self, pod: &Pod) -> Option<Arc<[Attr]>> {
        let namespace = pod.metadata.namespace.as_deref()?;
        let name = pod.metadata.name.as_deref()?;
        let owners = owners(pod);
        let workload = [
            ("Deployment", &owners.deployment),
            ("StatefulSet", &owners.statefulset),
            ("DaemonSet", &owners.daemonset),
            ("CronJob", &owners.cronjob),
            ("Job", &owners.job),
            ("ReplicaSet", &owners.replicaset),
        ]
        .into_iter()
        .find_map(|(kind, name)| name.as_deref().map(|n| (kind, n.to_string())));
        let mut attrs = vec![
            self.attr(PEER_NAMESPACE, namespace),
            self.attr(PEER_POD, name),
        ];
        if let Some((kind, workload)) = workload {
            attrs.push(self.attr(PEER_WORKLOAD_NAME, &workload));
            attrs.push(self.attr(PEER_WORKLOAD_KIND, kind));
        }
        Some(attrs.into())
    }

    /// Applies a cluster-wide pod watch event. Returns true at the end of a complete list.
    pub fn apply_pod_event(&mut self, event: Event<Pod>) -> bool {
        match event {
            Event::Init => self.pods.relisting = Some(HashMap::new()),
            Event::InitApply(pod) | Event::Apply(pod) => {
                let initial = self.pods.relisting.is_some();
                let owner = Self::owner(&pod.metadata);
                let ips = pod_ips(&pod);
                match self.pod_attrs(&pod) {
                    Some(attrs) if !has_finished(&pod) => {
                        self.pods.put(&ips, Holder { owner, attrs }, initial)
                    }
                    _ => self.pods.release(&ips, &owner, initial),
                }
            }
            Event::Delete(pod) => {
                let owner = Self::owner(&pod.metadata);
                self.pods.release(&pod_ips(&pod), &owner, false);
            }
            Event::InitDone => {
                if let Some(listed) = self.pods.relisting.take() {
                    self.pods.by_ip = listed;
                    self.interner.shrink();
                }
                return true;
            }
        }
        false
    }

    /// Applies a cluster-wide service watch event. Returns true at the end of a complete list.
    pub fn apply_service_event(&mut self, event: Event<Service>) -> bool {
        match event {
            Event::Init => self.services.relisting = Some(HashMap::new()),
            Event::InitApply(service) | Event::Apply(service) => {
                let initial = self.services.relisting.is_some();
                let (Some(namespace), Some(name)) = (
                    service.metadata.namespace.as_deref(),
                    service.metadata.name.as_deref(),
                ) else {
                    return false;
                };
                let attrs: Arc<[Attr]> = vec![
                    self.attr(PEER_NAMESPACE, namespace),
                    self.attr(PEER_SERVICE, name),
                ]
                .into();
                let owner = Self::owner(&service.metadata);
                self.services.put(
                    &Self::service_ips(&service),
                    Holder { owner, attrs },
                    initial,
                );
            }
            Event::Delete(service) => {
                let owner = Self::owner(&service.metadata);
                self.services
                    .release(&Self::service_ips(&service), &owner, false);
            }
            Event::InitDone => {
                if let Some(listed) = self.services.relisting.take() {
                    self.services.by_ip = listed;
                    self.interner.shrink();
                }
                return true;
            }
        }
        false
    }

    /// The pod or Service at this IP (pods first: a pod IP never is a cluster IP).
    pub fn lookup(&self, ip: &str) -> Option<&Arc<[Attr]>> {
        self.pods
            .by_ip
            .get(ip)
            .or_else(|| self.services.by_ip.get(ip))
            .map(|holder| &holder.attrs)
    }

    /// (pod IPs, service IPs) known.
    pub fn len(&self) -> (usize, usize) {
        (self.pods.by_ip.len(), self.services.by_ip.len())
    }
}
