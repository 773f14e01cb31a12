//! Opt-in (`peers.enabled`): who is at the other end of a connection. A cluster-wide index of
//! pod IPs and Service cluster IPs, each trimmed on arrival to namespace, name and workload, so
//! that network data naming a peer address (`network.peer.address` on the TCP probe's data
//! points, or on spans) says which pod or Service it is.
//!
//! Unlike the node's own pods, deleted peers are forgotten at once: pod IPs are reused quickly
//! and a stale peer would name the wrong pod.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::watcher::Event;

use super::metadata::{owners, Attr, AttrValue, Interner};

/// One side of the index (pods or services): live entries, and the entries of a relist in
/// progress, swapped in when it completes.
#[derive(Debug, Default)]
struct Side {
    by_ip: HashMap<Arc<str>, Arc<[Attr]>>,
    relisting: Option<HashMap<Arc<str>, Arc<[Attr]>>>,
}

impl Side {
    fn put(&mut self, ips: Vec<Arc<str>>, attrs: Arc<[Attr]>, initial: bool) {
        let map = match (&mut self.relisting, initial) {
            (Some(pending), true) => pending,
            _ => &mut self.by_ip,
        };
        for ip in ips {
            map.insert(ip, attrs.clone());
        }
    }

    fn remove(&mut self, ips: &[Arc<str>]) {
        for ip in ips {
            self.by_ip.remove(ip);
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

    fn pod_ips(pod: &Pod) -> Vec<Arc<str>> {
        let status = pod.status.as_ref();
        // Host-network pods have the node's IP: it names the node, not the pod.
        if pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
        {
            return Vec::new();
        }
        let mut ips: Vec<Arc<str>> = Vec::new();
        for ip in status.and_then(|s| s.pod_ip.as_deref()).into_iter().chain(
            status
                .and_then(|s| s.pod_ips.as_ref())
                .into_iter()
                .flatten()
                .map(|i| i.ip.as_str()),
        ) {
            if !ips.iter().any(|known| &**known == ip) {
                ips.push(Arc::from(ip));
            }
        }
        ips
    }

    fn service_ips(service: &Service) -> Vec<Arc<str>> {
        let spec = service.spec.as_ref();
        let mut ips: Vec<Arc<str>> = Vec::new();
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
            if ip != "None" && !ip.is_empty() && !ips.iter().any(|known| &**known == ip) {
                ips.push(Arc::from(ip));
            }
        }
        ips
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
                let ips = Self::pod_ips(&pod);
                if let (false, Some(attrs)) = (ips.is_empty(), self.pod_attrs(&pod)) {
                    self.pods.put(ips, attrs, initial);
                }
            }
            Event::Delete(pod) => self.pods.remove(&Self::pod_ips(&pod)),
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
                self.services
                    .put(Self::service_ips(&service), attrs, initial);
            }
            Event::Delete(service) => self.services.remove(&Self::service_ips(&service)),
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
    }

    /// (pod IPs, service IPs) known.
    pub fn len(&self) -> (usize, usize) {
        (self.pods.by_ip.len(), self.services.by_ip.len())
    }
}
