//! Cgroups as the eBPF receiver sees them: the cgroup2 mount, an index from cgroup id (the
//! directory's inode number, what `bpf_get_current_cgroup_id()` returns) to path, path globs
//! for the filter, and the container id found in a path.
//!
//! The container id parser here covers the common runtime scope names; the Kubernetes processor
//! resolves pods and containers in full.

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
}

/// A cgroup path glob: `*` matches within one segment, `**` any number of segments.
#[derive(Debug, Clone)]
pub struct CgroupGlob {
    segments: Vec<String>,
}

impl CgroupGlob {
    pub fn new(glob: &str) -> Result<Self, String> {
        if !glob.starts_with('/') {
            return Err(format!(
                "{glob:?}: a cgroup glob starts with '/' (relative to the cgroup2 mount)"
            ));
        }
        Ok(CgroupGlob {
            segments: glob
                .split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match_segments(&self.segments, &parts)
    }
}

fn match_segments(glob: &[String], path: &[&str]) -> bool {
    match glob.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| match_segments(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((segment, path_rest)) => {
                match_one(first, segment) && match_segments(rest, path_rest)
            }
            None => false,
        },
    }
}

/// `*` wildcards within one segment.
fn match_one(pattern: &str, text: &str) -> bool {
    let pieces: Vec<&str> = pattern.split('*').collect();
    if pieces.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (pieces[0], pieces[pieces.len() - 1]);
    if !text.starts_with(first)
        || !text[first.len()..].ends_with(last)
        || text.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for piece in &pieces[1..pieces.len() - 1] {
        match rest.find(piece) {
            Some(i) => rest = &rest[i + piece.len()..],
            None => return false,
        }
    }
    true
}

/// The container id in a cgroup path's last segment: `cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `docker-<id>.scope`, `cri-o-<id>.scope`, or a bare 64-hex id (cgroupfs).
pub fn container_id(path: &str) -> Option<&str> {
    let last = path.rsplit('/').next()?;
    let id = last.strip_suffix(".scope").unwrap_or(last);
    let id = [
        "cri-containerd-",
        "crio-",
        "cri-o-",
        "docker-",
        "containerd-",
    ]
    .iter()
    .find_map(|prefix| id.strip_prefix(prefix))
    .unwrap_or(id);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let g = CgroupGlob::new("/kubepods.slice/**").unwrap();
        assert!(g.matches("/kubepods.slice/kubepods-besteffort.slice/x.scope"));
        assert!(g.matches("/kubepods.slice"));
        assert!(!g.matches("/system.slice/cron.service"));
        let g = CgroupGlob::new("/system.slice/*.service").unwrap();
        assert!(g.matches("/system.slice/cron.service"));
        assert!(!g.matches("/system.slice/cron.service/child"));
        assert!(!g.matches("/system.slice/cron.socket"));
        let g = CgroupGlob::new("/**/cri-containerd-*.scope").unwrap();
        assert!(g.matches("/kubepods.slice/a.slice/cri-containerd-abc.scope"));
        assert!(CgroupGlob::new("kubepods").is_err());
    }

    #[test]
    fn container_ids() {
        let id = "4f1c9b0e2d3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e";
        assert_eq!(
            container_id(&format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-{id}.scope")),
            Some(id)
        );
        assert_eq!(
            container_id(&format!("/system.slice/docker-{id}.scope")),
            Some(id)
        );
        assert_eq!(
            container_id(&format!("/kubepods/burstable/pod1/{id}")),
            Some(id)
        );
        assert_eq!(
            container_id("/user.slice/user-0.slice/session-1.scope"),
            None
        );
        assert_eq!(container_id("/"), None);
    }

    #[test]
    fn the_index_maps_directory_inodes_to_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a.slice/b.scope")).unwrap();
        let mut index = CgroupIndex::new(dir.path().to_path_buf());
        index.refresh();
        let ino = std::fs::metadata(dir.path().join("a.slice/b.scope"))
            .unwrap()
            .ino();
        assert_eq!(index.path(ino), Some("/a.slice/b.scope"));
        assert_eq!(
            index.path(std::fs::metadata(dir.path()).unwrap().ino()),
            Some("/")
        );
    }
}
