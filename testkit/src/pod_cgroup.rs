//! Pods without a cluster: a kubelet-style cgroup (systemd layout, BestEffort) made for one
//! test, with processes moved into it the way a container runtime would, removed leaf-first
//! (its processes ended first) when the test is done with it, also when it fails.

use std::ffi::CString;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// A container's cgroup in a BestEffort pod,
/// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`.
pub struct PodCgroup {
    /// The directories made for it, removed leaf-first on drop; empty for a handle to a cgroup
    /// made elsewhere ([`PodCgroup::existing`]).
    dirs: Vec<PathBuf>,
    leaf: PathBuf,
    /// The path below the cgroup2 mount, as `/proc/<pid>/cgroup` shows it.
    relative: String,
    children: Vec<Child>,
}

#[allow(
    clippy::new_without_default,
    reason = "making a cgroup is not a default value"
)]
impl PodCgroup {
    /// A pod cgroup with ids no other test uses.
    pub fn new() -> PodCgroup {
        let (pod_uid, container_id) = unique_ids();
        PodCgroup::with_ids(&pod_uid, &container_id)
    }

    /// The cgroup of container `container_id` in pod `pod_uid`.
    pub fn with_ids(pod_uid: &str, container_id: &str) -> PodCgroup {
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
            // Parents are shared with tests running at the same time: another test's drop may
            // remove one between our create and our child's, so retry a few times.
            let mut attempts = 0;
            loop {
                match std::fs::create_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => break,
                    Err(e) if attempts == 50 => panic!("cannot create {}: {e}", dir.display()),
                    Err(_) => {
                        attempts += 1;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
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

    /// A handle to the cgroup at `leaf`, made by another `PodCgroup` (for a thread that runs
    /// work in it): dropping the handle removes nothing and ends only what it spawned.
    pub fn existing(leaf: PathBuf) -> PodCgroup {
        let relative = format!(
            "/{}",
            leaf.strip_prefix(cgroup2_mount())
                .expect("a cgroup below the cgroup2 mount")
                .display()
        );
        PodCgroup {
            dirs: Vec::new(),
            leaf,
            relative,
            children: Vec::new(),
        }
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.leaf
    }

    /// The path below the cgroup2 mount, as the receiver reports it (`podscope.cgroup.path`).
    pub fn relative_path(&self) -> &str {
        &self.relative
    }

    /// The cgroup directory's name, `cri-containerd-<container id>.scope`.
    pub fn name(&self) -> &str {
        self.leaf
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a UTF-8 cgroup name")
    }

    /// The container id the cgroup's name carries.
    pub fn container_id(&self) -> String {
        self.name()
            .trim_start_matches("cri-containerd-")
            .trim_end_matches(".scope")
            .to_string()
    }

    /// The cgroup id: the directory's inode, what `bpf_get_current_cgroup_id()` returns.
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.leaf).expect("cgroup dir").ino()
    }

    /// Forks a child that joins this cgroup, runs `work` and exits with its return value.
    /// `work` must only make raw syscalls (it runs between fork and exit of a threaded process).
    pub fn run(&self, work: impl FnOnce() -> i32) -> i32 {
        run_in_cgroup(&self.leaf, work)
    }

    /// Runs `program args…` `n` times, one after the other, each a fork and an exec from
    /// inside the cgroup (exactly `n` execs of it there); true when every run exited 0.
    pub fn exec_times(&self, program: &str, args: &[&str], n: usize) -> bool {
        let path = CString::new(program).expect("a program path without NUL");
        let args: Vec<CString> = args
            .iter()
            .map(|a| CString::new(*a).expect("an argument without NUL"))
            .collect();
        let mut argv = vec![path.as_ptr()];
        argv.extend(args.iter().map(|a| a.as_ptr()));
        argv.push(std::ptr::null());
        let exit = self.run(|| {
            for _ in 0..n {
                // SAFETY: fork, execv, _exit and waitpid on memory prepared before the fork: no
                // allocation in the children.
                unsafe {
                    let child = libc::fork();
                    if child == 0 {
                        libc::execv(path.as_ptr(), argv.as_ptr());
                        libc::_exit(127);
                    }
                    let mut status = 0;
                    if child < 0 || libc::waitpid(child, &mut status, 0) != child || status != 0 {
                        return 1;
                    }
                }
            }
            0
        });
        exit == 0
    }

    /// Starts `sh -c script` inside the cgroup (it joins before exec, so everything it runs is
    /// the container's). Ended when the cgroup is dropped.
    pub fn spawn_shell(&mut self, script: &str) -> u32 {
        let procs = cgroup_procs(&self.leaf);
        let mut command = Command::new("sh");
        command
            .args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: between fork and exec the closure only calls open/write/close on memory
        // prepared before the fork: async-signal-safe, no allocation (the parent has threads).
        unsafe {
            command.pre_exec(move || {
                if join_cgroup(&procs) {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
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
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.dirs.is_empty() {
            return; // a handle: the owner cleans up
        }
        // Killing the shells is not enough: what they started (a `sleep`) would keep the cgroup
        // busy and the directory could not be removed. cgroup.kill ends every process in it.
        let _ = std::fs::write(self.leaf.join("cgroup.kill"), "1");
        // The kernel empties the cgroup asynchronously: wait (bounded) until it says so.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(self.leaf.join("cgroup.events"))
            .is_ok_and(|events| events.contains("populated 1"))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        for dir in self.dirs.iter().rev() {
            // Shared parents stay while another test still uses them.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `dir/cgroup.procs` as a C string, made before a fork (the child must not allocate).
fn cgroup_procs(dir: &Path) -> CString {
    CString::new(
        dir.join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("no NUL in a cgroup path")
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs`, with raw
/// syscalls only (callable between fork and exec or exit). False if that failed.
///
/// # Safety
/// Only async-signal-safe calls: fine in a forked child of a threaded process.
unsafe fn join_cgroup(procs: &CString) -> bool {
    // SAFETY: open/write/close on a C string prepared by the caller.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
        if fd < 0 {
            return false;
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        libc::close(fd);
        written == 1
    }
}

/// Forks a child that joins the cgroup at `dir`, runs `work` and exits with its return value
/// (asserted normal). `work` must only make raw syscalls (it runs between fork and exit of a
/// threaded process).
pub fn run_in_cgroup(dir: &Path, work: impl FnOnce() -> i32) -> i32 {
    let procs = cgroup_procs(dir);
    // SAFETY: the child only calls async-signal-safe functions before _exit.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            if !join_cgroup(&procs) {
                libc::_exit(99);
            }
            libc::_exit(work());
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        assert!(
            libc::WIFEXITED(status),
            "child did not exit normally: {status}"
        );
        libc::WEXITSTATUS(status)
    }
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port` (a server started in a pod
/// is up), at most 30 s: the readiness check before a test sends it requests.
pub fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on 127.0.0.1:{port} after 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_cgroup_holds_its_processes_and_is_gone_after_drop() {
        let mut pod = PodCgroup::new();
        let shell = pod.spawn_shell("sleep 600");
        let membership = std::fs::read_to_string(format!("/proc/{shell}/cgroup")).unwrap();
        // The cgroup v2 line; hybrid hosts list the v1 hierarchies before it.
        let v2 = membership.lines().find_map(|l| l.strip_prefix("0::"));
        assert_eq!(v2, Some(pod.relative_path()));
        assert_eq!(pod.run(|| 7), 7);
        assert_eq!(pod.container_id().len(), 64);
        assert_eq!(
            pod.name(),
            format!("cri-containerd-{}.scope", pod.container_id())
        );

        // A handle removes nothing when dropped.
        drop(PodCgroup::existing(pod.path().to_path_buf()));
        assert!(pod.path().is_dir());

        let leaf = pod.path().to_path_buf();
        drop(pod);
        assert!(!leaf.exists(), "{} is left behind", leaf.display());
        assert!(
            !Path::new(&format!("/proc/{shell}")).exists(),
            "the shell outlived its cgroup"
        );
    }
}
