//! A TraceSession's `spec.bpftrace` program run on a node: the real bpftrace (the binary of
//! `bpftrace.path`), as `kubectl podscope bpftrace` runs it, with `$session_cgroups` written into
//! the program as a predicate over the cgroups of the session's pods on this node. Its output
//! lines that are not blank are counted (under the session's event-rate cap); the lines
//! themselves are not kept.
//!
//! It runs only where the cluster admin set `trace_sessions.allow_bpftrace` (the namespace owner
//! who writes a TraceSession gets to run kernel code as root); that check is the caller's.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::bpftrace::{kill_group, next_line};
use super::caps::RateCap;
use super::server::sleep_until;

/// The variable a session's program filters its pods with.
pub const SESSION_CGROUPS: &str = "$session_cgroups";

/// How long bpftrace has to print its maps and exit after SIGINT before it is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(10);

/// `(cgroup == A || cgroup == B …)` for `cgroups` (bpftrace's `cgroup` builtin is the current
/// task's cgroup v2 id); `0` (never) for none.
pub fn cgroup_predicate(cgroups: &[u64]) -> String {
    if cgroups.is_empty() {
        return "0".to_string();
    }
    let terms: Vec<String> = cgroups.iter().map(|id| format!("cgroup == {id}")).collect();
    format!("({})", terms.join(" || "))
}

/// The program with every `$session_cgroups` (the whole name: `$session_cgroups2` is the
/// user's own) replaced by the predicate over `cgroups`.
pub fn substitute(program: &str, cgroups: &[u64]) -> String {
    let predicate = cgroup_predicate(cgroups);
    let mut out = String::with_capacity(program.len());
    let mut rest = program;
    while let Some(at) = rest.find(SESSION_CGROUPS) {
        let after = &rest[at + SESSION_CGROUPS.len()..];
        out.push_str(&rest[..at]);
        if after
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            out.push_str(SESSION_CGROUPS);
        } else {
            out.push_str(&predicate);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// A bpftrace program running for a session.
pub struct BpftraceRun {
    lines: Arc<AtomicU64>,
    /// Why it ended early (it exited by itself with an error), with its last error line.
    failure: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl BpftraceRun {
    /// Starts `binary` on `program` (already substituted); its output lines are counted when
    /// `rate` keeps them.
    pub fn start(
        binary: &std::path::Path,
        program: &str,
        rate: Arc<RateCap>,
        session: String,
    ) -> Result<BpftraceRun, String> {
        let mut command = tokio::process::Command::new(binary);
        command
            // Quiet: no "Attaching N probes" line among the program's own; unbuffered, so lines
            // are counted as they are printed.
            .args(["-q", "-B", "none", "-e", program])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl(2) only, between fork and exec: async-signal-safe, no allocation.
        unsafe {
            command.pre_exec(|| {
                // Killed with the agent, even when the agent is killed (SIGKILL, a crash) and
                // cannot interrupt it: it would otherwise run on, orphaned, in the kernel.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot run bpftrace ({}): {e}", binary.display()))?;
        let lines = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(Mutex::new(None));
        let stop = CancellationToken::new();
        let (counted, failed, stopped) = (lines.clone(), failure.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let pgid = child.id();
            let mut stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
            let mut stderr = child.stderr.take().map(|s| BufReader::new(s).lines());
            let mut last_error = String::new();
            let mut status = None;
            let mut kill_at: Option<tokio::time::Instant> = None;
            let mut interrupted = false;
            while status.is_none() || stdout.is_some() || stderr.is_some() {
                tokio::select! {
                    line = next_line(&mut stdout) => match line {
                        // bpftrace ends with blank lines of its own (around the maps it prints).
                        Some(line) if line.trim().is_empty() => {}
                        Some(_) => {
                            if rate.admit(monotonic_ns()) {
                                counted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        None => stdout = None,
                    },
                    line = next_line(&mut stderr) => match line {
                        Some(line) if !line.trim().is_empty() => last_error = line,
                        Some(_) => {}
                        None => stderr = None,
                    },
                    exited = child.wait(), if status.is_none() => status = Some(exited),
                    _ = stopped.cancelled(), if !interrupted && status.is_none() => {
                        // As at Ctrl-C: it prints its maps, then exits.
                        kill_group(pgid, libc::SIGINT);
                        interrupted = true;
                        kill_at = Some(tokio::time::Instant::now() + INTERRUPT_GRACE);
                    }
                    _ = sleep_until(kill_at), if status.is_none() => {
                        kill_group(pgid, libc::SIGKILL);
                        kill_at = None;
                    }
                }
            }
            // What bpftrace started in its group does not outlive it.
            kill_group(pgid, libc::SIGKILL);
            let why = match status {
                Some(Ok(status)) if status.success() || interrupted => None,
                Some(Ok(status)) => Some(format!("bpftrace exited with {status}: {last_error}")),
                Some(Err(e)) => Some(format!("waiting for bpftrace failed: {e}")),
                None => None,
            };
            if let Some(why) = why {
                tracing::warn!(session = %session, error = %why, "TraceSession: its bpftrace program failed");
                *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
            }
        });
        Ok(BpftraceRun {
            lines,
            failure,
            stop,
            task,
        })
    }

    /// Output lines counted so far.
    pub fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    /// Why it failed, once it exited by itself with an error.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Interrupts it (it prints its maps) and waits for it; the lines it printed in all.
    pub async fn finish(self) -> u64 {
        self.stop.cancel();
        let _ = self.task.await;
        self.lines.load(Ordering::Relaxed)
    }
}

/// The kernel's monotonic clock, which trace events are stamped with (the rate cap's seconds).
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sessions_cgroups_are_written_into_the_program_as_a_predicate() {
        assert_eq!(
            substitute(
                "tracepoint:sched:sched_process_exec /$session_cgroups/ { printf(\"%s\\n\", comm); }",
                &[11, 42]
            ),
            "tracepoint:sched:sched_process_exec /(cgroup == 11 || cgroup == 42)/ { printf(\"%s\\n\", comm); }"
        );
        // Longer names are the user's own; no cgroup here: matches nothing.
        assert_eq!(
            substitute("$session_cgroups2 $session_cgroups_x $session_cgroups", &[]),
            "$session_cgroups2 $session_cgroups_x 0"
        );
    }
}
