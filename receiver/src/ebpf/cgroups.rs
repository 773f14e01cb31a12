//! Cgroups as the eBPF receiver sees them: the cgroup2 mount, an index from cgroup id (the
//! directory's inode number, what `bpf_get_current_cgroup_id()` returns) to path, path globs
//! for the filter, and the container id found in a path.
//!
//! The index and the container id parser live in `podscope_k8s::cgroup`, shared with the
//! Kubernetes processor; the globs of `cgroup_filter` are here.

pub use podscope_k8s::cgroup::{cgroup2_mount, container_id, CgroupIndex};

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
}
