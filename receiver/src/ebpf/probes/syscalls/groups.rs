//! Syscall groups, what `by: group` counts syscalls by: the kinds of work a container asks the
//! kernel for (reading, writing, opening files, networking, waiting, …), a dozen series per
//! container where one per syscall would be a hundred. A syscall in no group counts as `other`.
//! Names are x86_64's (the `syscalls` crate's); a test checks each one exists.

use std::str::FromStr as _;

use syscalls::Sysno;

/// Each group's name (the `podscope.syscall.group` value) and its syscalls.
pub const GROUPS: &[(&str, &[&str])] = &[
    ("io.read", &["read", "pread64", "readv", "preadv", "preadv2"]),
    ("io.write", &["write", "pwrite64", "writev", "pwritev", "pwritev2"]),
    (
        "io.transfer",
        &["sendfile", "splice", "tee", "vmsplice", "copy_file_range"],
    ),
    (
        "fd",
        &[
            "open",
            "openat",
            "openat2",
            "creat",
            "open_by_handle_at",
            "name_to_handle_at",
            "close",
            "close_range",
            "dup",
            "dup2",
            "dup3",
            "fcntl",
            "ioctl",
            "lseek",
            "flock",
            "pipe",
            "pipe2",
            "eventfd",
            "eventfd2",
            "memfd_create",
        ],
    ),
    (
        "fs.read",
        &[
            "stat",
            "fstat",
            "lstat",
            "newfstatat",
            "statx",
            "statfs",
            "fstatfs",
            "access",
            "faccessat",
            "faccessat2",
            "readlink",
            "readlinkat",
            "getdents",
            "getdents64",
            "getcwd",
            "chdir",
            "fchdir",
            "getxattr",
            "lgetxattr",
            "fgetxattr",
            "listxattr",
            "llistxattr",
            "flistxattr",
            "inotify_init",
            "inotify_init1",
            "inotify_add_watch",
            "inotify_rm_watch",
            "fanotify_init",
            "fanotify_mark",
        ],
    ),
    (
        "fs.write",
        &[
            "mkdir",
            "mkdirat",
            "rmdir",
            "unlink",
            "unlinkat",
            "rename",
            "renameat",
            "renameat2",
            "link",
            "linkat",
            "symlink",
            "symlinkat",
            "mknod",
            "mknodat",
            "chmod",
            "fchmod",
            "fchmodat",
            "chown",
            "fchown",
            "lchown",
            "fchownat",
            "truncate",
            "ftruncate",
            "fallocate",
            "utime",
            "utimes",
            "utimensat",
            "futimesat",
            "setxattr",
            "lsetxattr",
            "fsetxattr",
            "removexattr",
            "lremovexattr",
            "fremovexattr",
        ],
    ),
    (
        "fs.sync",
        &["fsync", "fdatasync", "sync", "syncfs", "sync_file_range", "msync"],
    ),
    (
        "net.io",
        &[
            "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg",
        ],
    ),
    (
        "net.connection",
        &[
            "socket",
            "socketpair",
            "connect",
            "accept",
            "accept4",
            "bind",
            "listen",
            "shutdown",
            "getsockname",
            "getpeername",
            "setsockopt",
            "getsockopt",
        ],
    ),
    (
        "wait",
        &[
            "poll",
            "ppoll",
            "select",
            "pselect6",
            "epoll_create",
            "epoll_create1",
            "epoll_ctl",
            "epoll_wait",
            "epoll_pwait",
            "epoll_pwait2",
            "futex",
            "futex_waitv",
            "nanosleep",
            "clock_nanosleep",
            "sched_yield",
            "pause",
            "wait4",
            "waitid",
        ],
    ),
    (
        "memory",
        &[
            "mmap",
            "munmap",
            "mprotect",
            "brk",
            "madvise",
            "mremap",
            "mincore",
            "mlock",
            "mlock2",
            "munlock",
            "mlockall",
            "munlockall",
            "membarrier",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
        ],
    ),
    (
        "process",
        &[
            "fork",
            "vfork",
            "clone",
            "clone3",
            "execve",
            "execveat",
            "exit",
            "exit_group",
            "kill",
            "tkill",
            "tgkill",
            "getpid",
            "getppid",
            "gettid",
            "set_tid_address",
            "prctl",
            "arch_prctl",
            "setsid",
            "setpgid",
            "getpgid",
            "getpgrp",
            "getsid",
            "prlimit64",
            "getrlimit",
            "setrlimit",
            "getrusage",
            "sched_getaffinity",
            "sched_setaffinity",
            "rseq",
            "set_robust_list",
            "get_robust_list",
        ],
    ),
    (
        "signal",
        &[
            "rt_sigaction",
            "rt_sigprocmask",
            "rt_sigreturn",
            "rt_sigpending",
            "rt_sigtimedwait",
            "rt_sigqueueinfo",
            "rt_tgsigqueueinfo",
            "rt_sigsuspend",
            "sigaltstack",
            "signalfd",
            "signalfd4",
        ],
    ),
    (
        "time",
        &[
            "clock_gettime",
            "clock_getres",
            "gettimeofday",
            "time",
            "timer_create",
            "timer_settime",
            "timer_gettime",
            "timer_getoverrun",
            "timer_delete",
            "timerfd_create",
            "timerfd_settime",
            "timerfd_gettime",
            "setitimer",
            "getitimer",
            "alarm",
        ],
    ),
];

/// Syscalls in no group.
pub const OTHER: &str = "other";

/// The slot of every syscall number below `nrs`: its group's index in [`GROUPS`], or
/// `GROUPS.len()` for `other`.
pub fn group_slots(nrs: usize) -> Vec<u16> {
    let mut slots = vec![GROUPS.len() as u16; nrs];
    for (index, (_, names)) in GROUPS.iter().enumerate() {
        for name in *names {
            if let Some(nr) = Sysno::from_str(name).ok().map(|s| s.id() as usize) {
                if nr < nrs {
                    slots[nr] = index as u16;
                }
            }
        }
    }
    slots
}

/// The name of group slot `slot`.
pub fn group_name(slot: u32) -> &'static str {
    GROUPS.get(slot as usize).map_or(OTHER, |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_grouped_syscall_exists_and_is_in_one_group_only() {
        let mut seen = std::collections::HashSet::new();
        for (group, names) in GROUPS {
            for name in *names {
                assert!(Sysno::from_str(name).is_ok(), "{group}: no syscall {name}");
                assert!(seen.insert(*name), "{name} is in two groups");
            }
        }
    }

    #[test]
    fn syscalls_map_to_their_group_and_the_rest_to_other() {
        let slots = group_slots(512);
        let slot = |s: Sysno| slots[s.id() as usize] as u32;
        assert_eq!(group_name(slot(Sysno::read)), "io.read");
        assert_eq!(group_name(slot(Sysno::openat)), "fd");
        assert_eq!(group_name(slot(Sysno::epoll_wait)), "wait");
        assert_eq!(group_name(slot(Sysno::bpf)), OTHER);
    }
}
