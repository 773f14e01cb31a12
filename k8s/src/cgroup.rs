//! Container identity from cgroups, shared by the eBPF receiver (which sees cgroup ids) and the
//! Kubernetes processor (which turns them into pods): the cgroup2 mount, an index from cgroup id
//! (the directory's inode number, what `bpf_get_current_cgroup_id()` returns) to path, the one
//! parser from a cgroup path to container id / pod UID / QoS class, and `/proc/<pid>/cgroup`.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones. Read from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        // ... mount-point ... - fstype source options
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// cgroup id → path relative to the cgroup2 mount (`/kubepods.slice/…`), rebuilt by walking the
/// mount.
#[derive(Debug, Default, Clone)]
pub struct CgroupIndex {
    root: PathBuf,
    paths: HashMap<u64, String>,
}

impl CgroupIndex {
    pub fn new(root: PathBuf) -> Self {
        CgroupIndex {
            root,
            paths: HashMap::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Walks the whole mount again (a few thousand directories on a busy node).
    pub fn refresh(&mut self) {
        let mut paths = HashMap::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let relative = dir
                .strip_prefix(&self.root)
                .map(|p| format!("/{}", p.display()))
                .unwrap_or_else(|_| "/".to_string());
            paths.insert(meta.ino(), relative);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
        self.paths = paths;
    }

    pub fn path(&self, cgroup_id: u64) -> Option<&str> {
        self.paths.get(&cgroup_id).map(String::as_str)
    }

    /// Every (id, path) known.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &str)> {
        self.paths.iter().map(|(id, p)| (*id, p.as_str()))
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

/// The container runtime that named a cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    Podman,
    /// The cgroupfs driver names a container's cgroup by its bare id: any runtime.
    Unknown,
}

/// A pod's QoS class, as the kubelet encodes it in the cgroup hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// What a cgroup path says about the container and pod it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerCgroup {
    /// 64 lowercase hex characters, as in `status.containerStatuses[].containerID` after `://`.
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
    /// The pod UID with dashes (`7a1d…-…`), for pods the kubelet placed.
    pub pod_uid: Option<String>,
    pub qos: Option<QosClass>,
}

/// Parses a cgroup path (relative to its mount, as in `/proc/<pid>/cgroup` or the index above)
/// into container id, pod UID and QoS class. One parser for containerd, CRI-O, docker and podman;
/// cgroup v1 and v2; the systemd (`kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`)
/// and cgroupfs (`kubepods/burstable/pod<uid>/<id>`) layouts; kubelets nested under another
/// slice (kind's `kubelet.slice/kubelet-kubepods.slice/…`, docker-in-docker `/docker/<id>/kubepods/…`).
///
/// Cgroups below a container's (a process that made its own child cgroup) belong to that
/// container. Returns `None` when the path names neither a container nor a pod. Never panics.
pub fn parse_container_cgroup(path: &str) -> Option<ContainerCgroup> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // The kubelet's part of the path starts at the last `kubepods` segment: anything before it
    // (a node running inside a container, kind's kubelet.slice) is not ours to read.
    let kubepods = segments.iter().rposition(|s| is_kubepods_root(s));
    match kubepods {
        Some(start) => parse_kubelet_segments(&segments[start + 1..]),
        None => {
            // Not a pod: a container started outside Kubernetes (docker, podman) still has an id.
            let (container_id, runtime) =
                segments.iter().rev().find_map(|s| container_segment(s))?;
            Some(ContainerCgroup {
                container_id: Some(container_id),
                runtime: Some(runtime),
                pod_uid: None,
                qos: None,
            })
        }
    }
}

/// `kubepods` (cgroupfs), `kubepods.slice` (systemd), `kubelet-kubepods.slice` (kind).
fn is_kubepods_root(segment: &str) -> bool {
    segment == "kubepods" || segment == "kubepods.slice" || segment == "kubelet-kubepods.slice"
}

/// The segments below the kubepods root: `[qos]/pod/container/...`.
fn parse_kubelet_segments(rest: &[&str]) -> Option<ContainerCgroup> {
    let (qos, after_qos) = match rest.first().map(|s| qos_segment(s)) {
        Some(Some(qos)) => (qos, &rest[1..]),
        _ => (QosClass::Guaranteed, rest),
    };
    let pod_uid = pod_segment(after_qos.first()?)?;
    let container = after_qos.get(1).and_then(|s| container_segment(s));
    Some(ContainerCgroup {
        container_id: container.as_ref().map(|(id, _)| id.clone()),
        runtime: container.map(|(_, runtime)| runtime),
        pod_uid: Some(pod_uid),
        qos: Some(qos),
    })
}

fn qos_segment(segment: &str) -> Option<QosClass> {
    let name = segment.strip_suffix(".slice").unwrap_or(segment);
    let class = name.rsplit('-').next().unwrap_or(name);
    // `burstable`, `kubepods-burstable.slice`, `kubelet-kubepods-burstable.slice`; a segment
    // holding `-pod` is a pod, never a QoS class.
    if name.contains("-pod") {
        return None;
    }
    match class {
        "burstable" => Some(QosClass::Burstable),
        "besteffort" => Some(QosClass::BestEffort),
        _ => None,
    }
}

/// `pod<uid>` (cgroupfs, dashes) or `…-pod<uid_with_underscores>.slice` (systemd). UIDs are
/// UUIDs, or 32 hex characters for static pods (the kubelet's hash of the manifest).
fn pod_segment(segment: &str) -> Option<String> {
    let uid = match segment.strip_suffix(".slice") {
        Some(slice) => slice.rsplit_once("-pod")?.1.replace('_', "-"),
        None => segment.strip_prefix("pod")?.to_string(),
    };
    is_pod_uid(&uid).then_some(uid)
}

fn is_pod_uid(uid: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let groups: Vec<&str> = uid.split('-').collect();
    match groups.as_slice() {
        [a, b, c, d, e] => hex(a, 8) && hex(b, 4) && hex(c, 4) && hex(d, 4) && hex(e, 12),
        [single] => hex(single, 32),
        _ => false,
    }
}

/// A container's own cgroup: `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`,
/// `libpod-<id>.scope`, or a bare id (cgroupfs). CRI-O's `crio-conmon-<id>.scope` holds the
/// monitor process, not the container, and is not a match.
fn container_segment(segment: &str) -> Option<(String, Runtime)> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    let (id, runtime) = [
        ("cri-containerd-", Runtime::Containerd),
        ("containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("cri-o-", Runtime::CriO),
        ("docker-", Runtime::Docker),
        ("libpod-", Runtime::Podman),
    ]
    .iter()
    .find_map(|(prefix, runtime)| name.strip_prefix(prefix).map(|id| (id, *runtime)))
    .unwrap_or((name, Runtime::Unknown));
    // A bare id only counts where the cgroupfs driver puts it: without `.scope`.
    if runtime == Runtime::Unknown && segment.ends_with(".scope") {
        return None;
    }
    is_container_id(id).then(|| (id.to_ascii_lowercase(), runtime))
}

fn is_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container id in a cgroup path, if it names one.
pub fn container_id(path: &str) -> Option<String> {
    parse_container_cgroup(path)?.container_id
}

/// The cgroup path of a process from `/proc/<pid>/cgroup`: the cgroup v2 line (`0::/path`) when
/// it names a container or pod, else the first v1 line that does (hosts where the kubelet uses
/// cgroup v1), else the v2 path. `None` when the process is gone.
pub fn process_cgroup_path(proc_root: &Path, pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    cgroup_path_from_proc(&text)
}

/// The parsing half of [`process_cgroup_path`], on the file's text.
pub fn cgroup_path_from_proc(text: &str) -> Option<String> {
    let mut v2 = None;
    let mut v1 = None;
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(hierarchy), Some(_controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if hierarchy == "0" {
            v2 = Some(path);
        } else if v1.is_none() && parse_container_cgroup(path).is_some() {
            v1 = Some(path);
        }
    }
    match (v2, v1) {
        (Some(path), _) if parse_container_cgroup(path).is_some() => Some(path.to_string()),
        (_, Some(path)) => Some(path.to_string()),
        (Some(path), None) => Some(path.to_string()),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests;
