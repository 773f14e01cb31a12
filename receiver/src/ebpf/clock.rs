//! The kernel's clock for eBPF timestamps (`bpf_ktime_get_ns`: CLOCK_MONOTONIC) and its offset
//! to wall-clock time, for what the kernel stamped and users read as dates (spans, trace events).

fn read(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The kernel's monotonic clock now, as `bpf_ktime_get_ns` reads it.
pub fn monotonic_now_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC)
}

/// Unix time minus the kernel's monotonic clock, now: add it to a kernel timestamp for its date.
pub fn clock_offset_ns() -> u64 {
    let monotonic = monotonic_now_ns();
    read(libc::CLOCK_REALTIME).saturating_sub(monotonic)
}
