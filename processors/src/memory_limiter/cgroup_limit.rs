//! The container's memory limit: cgroups v2 `memory.max` or v1 `memory.limit_in_bytes` of the
//! cgroup this process runs in (and of its ancestors, whose limits apply too), as
//! `/proc/self/cgroup` names it. Used by `limit_percentage`.

use std::path::{Path, PathBuf};

/// v1 writes "no limit" as the largest page-aligned signed 64-bit number; anything this large
/// is no limit on any machine.
const V1_UNLIMITED_FROM: u64 = 1 << 62;

/// What the lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMemoryLimit {
    /// The smallest limit of the cgroup and its ancestors; `None` when none is limited.
    pub bytes: Option<u64>,
    /// The agent's own cgroup's limit file (for messages).
    pub file: PathBuf,
}

/// The memory limit of this process's cgroup.
pub fn own_memory_limit() -> Result<CgroupMemoryLimit, String> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    memory_limit(&cgroups, Path::new("/sys/fs/cgroup"))
}

/// The memory limit of the cgroup that `proc_cgroup` (the text of a `/proc/<pid>/cgroup`) names,
/// with cgroupfs mounted at `root`. cgroups v2 when `root` holds the unified hierarchy with the
/// memory controller, else v1's `memory` hierarchy at `root/memory`.
pub fn memory_limit(proc_cgroup: &str, root: &Path) -> Result<CgroupMemoryLimit, String> {
    let mut v2_path = None;
    let mut v1_path = None;
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(hierarchy), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if hierarchy == "0" && controllers.is_empty() {
            v2_path = Some(path);
        } else if controllers.split(',').any(|c| c == "memory") {
            v1_path = Some(path);
        }
    }
    if let Some(path) = v2_path {
        if root.join("cgroup.controllers").is_file() {
            let mount = root.to_path_buf();
            return smallest_limit(&mount, path, "memory.max");
        }
    }
    if let Some(path) = v1_path {
        return smallest_limit(&root.join("memory"), path, "memory.limit_in_bytes");
    }
    Err(format!(
        "no memory cgroup for this process: /proc/self/cgroup names no cgroups v2 path with \
         {}/cgroup.controllers present, nor a v1 memory hierarchy",
        root.display()
    ))
}

/// The smallest limit in `file_name` along `path` (the cgroup, then each ancestor) under
/// `mount`. A container that sees only its own cgroup (a cgroup namespace) has `path` "/" and
/// its limit at the mount's top.
fn smallest_limit(mount: &Path, path: &str, file_name: &str) -> Result<CgroupMemoryLimit, String> {
    let mut own = mount.join(path.trim_start_matches('/'));
    let mut own_file = own.join(file_name);
    if !own_file.is_file() && mount.join(file_name).is_file() {
        // A container runtime that mounts only the container's own cgroup, while
        // /proc/self/cgroup names its full host path (cgroups v1 without a cgroup namespace).
        own = mount.to_path_buf();
        own_file = own.join(file_name);
    }
    if !own_file.is_file() {
        return Err(format!(
            "{} does not exist (is the memory controller enabled for this cgroup?)",
            own_file.display()
        ));
    }
    let mut smallest: Option<u64> = None;
    let mut dir = own.as_path();
    loop {
        let file = dir.join(file_name);
        if file.is_file() {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            if let Some(limit) =
                parse_limit(&text).map_err(|e| format!("{}: {e}", file.display()))?
            {
                smallest = Some(smallest.map_or(limit, |s| s.min(limit)));
            }
        }
        if dir == mount {
            break;
        }
        match dir.parent() {
            Some(parent) if parent.starts_with(mount) => dir = parent,
            _ => break,
        }
    }
    Ok(CgroupMemoryLimit {
        bytes: smallest,
        file: own_file,
    })
}

/// `max` (v2) or a huge number (v1) is no limit.
fn parse_limit(text: &str) -> Result<Option<u64>, String> {
    let text = text.trim();
    if text == "max" {
        return Ok(None);
    }
    let bytes: u64 = text
        .parse()
        .map_err(|_| format!("{text:?} is neither a number of bytes nor \"max\""))?;
    Ok((bytes < V1_UNLIMITED_FROM).then_some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_limit("max\n"), Ok(None));
        assert_eq!(parse_limit("9223372036854771712\n"), Ok(None));
        assert_eq!(parse_limit("268435456\n"), Ok(Some(268_435_456)));
        assert!(parse_limit("lots").unwrap_err().contains("\"lots\""));
    }

    /// cgroups v2 files laid out as the kernel does. This machine's memory controller is on
    /// the v1 hierarchy (hybrid layout: the unified one has no memory controller), so no real v2
    /// `memory.max` can be made here; the v1 test below uses real cgroups.
    #[test]
    fn v2_memory_max_of_the_cgroup_and_its_ancestors() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
        let pod = root.path().join("kubepods.slice/pod1");
        let container = pod.join("cri-containerd-abc.scope");
        std::fs::create_dir_all(&container).unwrap();
        std::fs::write(root.path().join("kubepods.slice/memory.max"), "max\n").unwrap();
        std::fs::write(pod.join("memory.max"), "536870912\n").unwrap();
        std::fs::write(container.join("memory.max"), "max\n").unwrap();
        let found = memory_limit(
            "0::/kubepods.slice/pod1/cri-containerd-abc.scope\n",
            root.path(),
        )
        .unwrap();
        assert_eq!(found.bytes, Some(536_870_912));
        assert_eq!(found.file, container.join("memory.max"));

        std::fs::write(container.join("memory.max"), "268435456\n").unwrap();
        let found = memory_limit(
            "0::/kubepods.slice/pod1/cri-containerd-abc.scope\n",
            root.path(),
        );
        assert_eq!(found.unwrap().bytes, Some(268_435_456));

        // A cgroup namespace: the container sees itself at "/".
        let unlimited = memory_limit("0::/\n", root.path()).unwrap_err();
        assert!(
            unlimited.contains("memory.max does not exist"),
            "{unlimited}"
        );
        std::fs::write(root.path().join("memory.max"), "max\n").unwrap();
        assert_eq!(memory_limit("0::/\n", root.path()).unwrap().bytes, None);
        std::fs::write(root.path().join("memory.max"), "1073741824\n").unwrap();
        assert_eq!(
            memory_limit("0::/\n", root.path()).unwrap().bytes,
            Some(1_073_741_824)
        );
    }

    /// A runtime that mounts only the container's cgroup while /proc/self/cgroup names its host
    /// path: the mount's top is the container's cgroup.
    #[test]
    fn only_the_containers_own_cgroup_mounted() {
        let root = tempfile::tempdir().unwrap();
        let memory = root.path().join("memory");
        std::fs::create_dir(&memory).unwrap();
        std::fs::write(memory.join("memory.limit_in_bytes"), "536870912\n").unwrap();
        let found = memory_limit("4:memory:/kubepods/burstable/pod1/abc\n", root.path()).unwrap();
        assert_eq!(found.bytes, Some(536_870_912));
        assert_eq!(found.file, memory.join("memory.limit_in_bytes"));
    }

    #[test]
    fn no_memory_cgroup_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let error = memory_limit("0::/x\n", root.path()).unwrap_err();
        assert!(error.contains("no memory cgroup"), "{error}");
    }

    /// Real v1 cgroups (root only): a limit set on a parent applies to its child.
    #[test]
    fn v1_memory_limit_in_bytes_of_real_cgroups() {
        let memory = Path::new("/sys/fs/cgroup/memory");
        if !memory.join("memory.limit_in_bytes").is_file() || not_root() {
            eprintln!("skipped: needs root and a cgroups v1 memory hierarchy");
            return;
        }
        let parent_name = format!("podscope-test-memlimit-{}", std::process::id());
        let parent = RemovedOnDrop(memory.join(&parent_name));
        std::fs::create_dir(&parent.0).unwrap();
        let child = RemovedOnDrop(parent.0.join("agent"));
        std::fs::create_dir(&child.0).unwrap();
        let proc_cgroup = format!("5:devices:/\n4:memory:/{parent_name}/agent\n0::/\n");
        let root = Path::new("/sys/fs/cgroup");

        let found = memory_limit(&proc_cgroup, root).unwrap();
        assert_eq!(found.file, child.0.join("memory.limit_in_bytes"));
        let ancestors_limit = found.bytes;

        std::fs::write(parent.0.join("memory.limit_in_bytes"), "268435456").unwrap();
        let found = memory_limit(&proc_cgroup, root).unwrap();
        assert_eq!(
            found.bytes,
            Some(ancestors_limit.map_or(268_435_456, |a| a.min(268_435_456)))
        );

        std::fs::write(child.0.join("memory.limit_in_bytes"), "134217728").unwrap();
        let found = memory_limit(&proc_cgroup, root).unwrap();
        assert_eq!(found.bytes, Some(134_217_728));
        drop(child);
    }

    fn not_root() -> bool {
        std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) != 0)
            .unwrap_or(true)
    }

    struct RemovedOnDrop(PathBuf);

    impl Drop for RemovedOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
}
