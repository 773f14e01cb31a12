//! Pods without a cluster: a kubelet-style cgroup (systemd layout, BestEffort) made for one test,
//! with processes moved into it the way the container runtime would, and removed leaf-first
//! when the test ends.

use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_mount() -> PathBuf {
    podscope_k8s::cgroup::cgroup2_mount().expect("a cgroup2 mount")
}

/// A pod UID and a container id no other test uses: from the clock and the process id.
pub fn unique_ids() -> (String, String) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    let unique = format!("{:016x}{:08x}", nanos as u64, std::process::id());
    let uid = format!(
        "{}-{}-{}-{}-{}",
        &unique[0..8],
        &unique[8..12],
        &unique[12..16],
        &unique[16..20],
        "0000000000e2"
    );
    let container = format!("{unique}{unique}{unique}")[..64].to_string();
    (uid, container)
}

pub struct PodCgroup {
    dirs: Vec<PathBuf>,
    leaf: PathBuf,
    /// The path below the cgroup2 mount, as `/proc/<pid>/cgroup` shows it.
    relative: String,
    children: Vec<Child>,
}

impl PodCgroup {
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`.
    pub fn new(pod_uid: &str, container_id: &str) -> PodCgroup {
        assert_eq!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() },
            0,
            "making cgroups needs root"
        );
        let root = cgroup2_mount();
        let pod = format!("kubepods-besteffort-pod{}.slice", pod_uid.replace('-', "_"));
        let relative = format!(
            "/kubepods.slice/kubepods-besteffort.slice/{pod}/cri-containerd-{container_id}.scope"
        );
        let dirs = vec![
            root.join("kubepods.slice"),
            root.join("kubepods.slice/kubepods-besteffort.slice"),
            root.join(format!("kubepods.slice/kubepods-besteffort.slice/{pod}")),
            root.join(relative.trim_start_matches('/')),
        ];
        for dir in &dirs {
            // Parents are shared with other tests running at the same time.
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => panic!("cannot create {}: {e}", dir.display()),
            }
        }
        let leaf = dirs.last().expect("four dirs").clone();
        PodCgroup {
            dirs,
            leaf,
            relative,
            children: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.leaf
    }

    pub fn relative_path(&self) -> &str {
        &self.relative
    }

    /// The cgroup id: the directory's inode, what `bpf_get_current_cgroup_id()` returns.
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.leaf).expect("cgroup dir").ino()
    }

    /// Starts `sh -c script` inside the cgroup (it joins before exec, so everything it runs is
    /// the container's). Killed when the cgroup is dropped.
    pub fn spawn_shell(&mut self, script: &str) -> u32 {
        let procs = std::ffi::CString::new(
            self.leaf
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .expect("no NUL in a cgroup path");
        let mut command = Command::new("sh");
        command
            .args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: between fork and exec the closure only calls open/write/close on memory
        // prepared before the fork: async-signal-safe, no allocation (the parent has threads).
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start a shell in the pod cgroup");
        let pid = child.id();
        self.children.push(child);
        pid
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // Killing the shells is not enough: what they started (a `sleep`) would keep the cgroup
        // busy and the directory could not be removed. cgroup.kill ends every process in it.
        let _ = std::fs::write(self.leaf.join("cgroup.kill"), "1");
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The kernel empties the cgroup asynchronously: wait (bounded) until it says so.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_to_string(self.leaf.join("cgroup.events"))
            .is_ok_and(|events| events.contains("populated 1"))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for dir in self.dirs.iter().rev() {
            // Shared parents stay while another test still uses them.
            let _ = std::fs::remove_dir(dir);
        }
    }
}
