//! CPU time from `getrusage` — what the benchmarks report beside wall-clock figures, because other
//! processes on a shared machine disturb it less (they take CPUs away, not CPU time) — and pinning
//! a workload to one CPU.

/// User + system CPU seconds of `who`: `libc::RUSAGE_SELF` (this process, all its threads) or
/// `libc::RUSAGE_CHILDREN` (its children that were waited for, each with its own waited-for
/// children).
pub fn seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(who, &mut usage), 0);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Pins the calling thread (and the threads and processes it starts afterwards) to the first CPU
/// it may run on. Two ends of a ping-pong on one CPU make every round trip the same two
/// same-CPU context switches; on two CPUs they sometimes share one and sometimes not, and the
/// round trip's time jumps between the two cases. Async-signal-safe (a forked child may call it).
pub fn pin_to_one_cpu() {
    // SAFETY: sched_getaffinity / sched_setaffinity on the calling thread with a cpu_set_t of
    // their size; the CPU_* helpers only touch that set.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, size, &mut allowed) != 0 {
            return;
        }
        let Some(cpu) = (0..libc::CPU_SETSIZE as usize).find(|&c| libc::CPU_ISSET(c, &allowed))
        else {
            return;
        };
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        libc::sched_setaffinity(0, size, &one);
    }
}
