//! The kernel's tracing filesystem, which classic tracepoints (the per-syscall
//! `syscalls:sys_enter_<name>` ones above all) need to be attached: it holds their ids. tp_btf
//! programs do not need it. Machines without systemd may boot without it mounted; the receiver
//! mounts it where it may, once, at `/sys/kernel/tracing` (the kernel's own mount point for it),
//! and leaves it mounted (as systemd would).
//!
//! It must not attach anything: probes ask [`available`] and choose their hooks.

use std::path::Path;
use std::sync::OnceLock;

/// Where tracefs is found, in the order aya looks.
const MOUNT_POINTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Whether classic tracepoints can be attached: `Ok` with how tracefs was found, or why not.
/// Decided once per process (aya, too, looks for tracefs once).
pub fn available() -> Result<&'static str, &'static str> {
    static STATE: OnceLock<Result<&'static str, String>> = OnceLock::new();
    match STATE.get_or_init(find_or_mount) {
        Ok(how) => Ok(how),
        Err(why) => Err(why.as_str()),
    }
}

fn mounted(dir: &str) -> bool {
    Path::new(dir).join("events").is_dir()
}

fn find_or_mount() -> Result<&'static str, String> {
    if MOUNT_POINTS.iter().any(|dir| mounted(dir)) {
        return Ok("tracefs mounted");
    }
    let target = MOUNT_POINTS[0];
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in a constant");
    let (source, dir, fstype) = (c("tracefs"), c(target), c("tracefs"));
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call and no data.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            dir.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 && mounted(target) {
        return Ok("tracefs mounted by podscope at /sys/kernel/tracing");
    }
    Err(format!(
        "tracefs is not mounted and mounting it at {target} failed ({})",
        std::io::Error::last_os_error()
    ))
}
