//! `kubectl podscope bpftrace`: the real bpftrace run on the node, when the agent's config
//! enables it, with `$container_pid` (a process of the target container) and
//! `$container_cgroup_id` (its cgroup id, what bpftrace's `cgroup` builtin returns) written into
//! the program. Its output is streamed as it comes; it is stopped (its whole process group) when
//! the client goes away, or interrupted at the duration so that it prints its maps, as at
//! Ctrl-C.

use std::process::Stdio;
use std::time::Duration;

use podscope_core::session::{write_line, EndReason, ErrorCode, Message, Target};
use podscope_k8s::cgroup::{cgroup2_mount, CgroupIndex};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio_util::sync::CancellationToken;

use super::server::{error, sleep_until, write_welcome, Ending, Outcome};
use super::targets::resolve;
use super::Shared;

/// How long bpftrace has to print its maps and exit after SIGINT before it is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(10);

const CONTAINER_PID: &str = "$container_pid";
const CONTAINER_CGROUP_ID: &str = "$container_cgroup_id";

/// The program with every `$container_pid` and `$container_cgroup_id` replaced (whole names
/// only: `$container_pid2` is the user's own variable).
pub fn substitute(program: &str, pid: u32, cgroup_id: u64) -> String {
    let mut out = String::with_capacity(program.len());
    let mut rest = program;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let replaced = [
            (CONTAINER_CGROUP_ID, cgroup_id.to_string()),
            (CONTAINER_PID, pid.to_string()),
        ]
        .into_iter()
        .find(|(name, _)| {
            tail.starts_with(name)
                && !tail[name.len()..]
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        match replaced {
            Some((name, value)) => {
                out.push_str(&value);
                rest = &tail[name.len()..];
            }
            None => {
                out.push('$');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Whether the program uses either of the target's variables.
fn uses_target(program: &str) -> bool {
    substitute(program, 0, 0) != program
}

pub(super) fn kill_group(pgid: Option<u32>, signal: i32) {
    if let Some(pgid) = pgid {
        // SAFETY: kill(2) with a negative pid signals the process group bpftrace leads (it was
        // started in a group of its own).
        unsafe { libc::kill(-(pgid as i32), signal) };
    }
}

pub async fn serve(
    write: &mut OwnedWriteHalf,
    shared: &Shared,
    program: &str,
    target: Option<&Target>,
    duration: Option<Duration>,
    gone: &CancellationToken,
) -> std::io::Result<Outcome> {
    let config = &shared.config.bpftrace;
    if !config.enabled {
        return Ok(Outcome::Refused(error(
            ErrorCode::BpftraceDisabled,
            format!(
                "bpftrace is disabled on node {}: the agent runs it only with extensions.session.bpftrace.enabled: true in its config (a bpftrace program is arbitrary kernel code)",
                shared.node
            ),
        )));
    }
    if program.trim().is_empty() {
        return Ok(Outcome::Refused(error(
            ErrorCode::BadRequest,
            "the bpftrace program is empty",
        )));
    }
    let program = match target {
        Some(target) => {
            let mut index = CgroupIndex::new(cgroup2_mount().unwrap_or_else(|| "/sys/fs/cgroup".into()));
            index.refresh();
            let containers = match resolve(&index, std::slice::from_ref(target), &shared.node) {
                Ok(containers) => containers,
                Err(e) => return Ok(Outcome::Refused(error(ErrorCode::TargetNotFound, e))),
            };
            let container = &containers[0];
            let Some(pid) = first_process(&container.path) else {
                return Ok(Outcome::Refused(error(
                    ErrorCode::TargetNotFound,
                    format!(
                        "container {} of pod {}/{} has no process on node {}",
                        container.labels.container, target.namespace, target.pod, shared.node
                    ),
                )));
            };
            substitute(program, pid, container.cgroup_id)
        }
        None if uses_target(program) => {
            return Ok(Outcome::Refused(error(
                ErrorCode::BadRequest,
                "the program uses $container_pid or $container_cgroup_id but names no target container (give a pod)",
            )))
        }
        None => program.to_string(),
    };
    let limit = config.max_duration;
    let duration = Some(duration.map_or(limit, |d| d.min(limit)));
    let mut command = tokio::process::Command::new(&config.path);
    command
        .arg("-e")
        .arg(&program)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Ok(Outcome::Refused(error(
                ErrorCode::Internal,
                format!(
                    "cannot run bpftrace ({}) on node {}: {e}",
                    config.path.display(),
                    shared.node
                ),
            )))
        }
    };
    let pgid = child.id();
    write_welcome(write, shared).await?;
    let mut stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
    let mut stderr = child.stderr.take().map(|s| BufReader::new(s).lines());
    let deadline = duration.map(|d| tokio::time::Instant::now() + d);
    let mut interrupted: Option<EndReason> = None;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut status = None;
    loop {
        if status.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        tokio::select! {
            line = next_line(&mut stdout) => match line {
                Some(text) => output(write, "stdout", text).await?,
                None => stdout = None,
            },
            line = next_line(&mut stderr) => match line {
                Some(text) => output(write, "stderr", text).await?,
                None => stderr = None,
            },
            exited = child.wait(), if status.is_none() => status = Some(exited),
            _ = gone.cancelled() => {
                kill_group(pgid, libc::SIGKILL);
                let _ = child.wait().await;
                return Ok(Outcome::Ended(None));
            }
            _ = sleep_until(deadline), if interrupted.is_none() && status.is_none() => {
                kill_group(pgid, libc::SIGINT);
                interrupted = Some(EndReason::Duration);
                kill_at = Some(tokio::time::Instant::now() + INTERRUPT_GRACE);
            }
            _ = shared.stopping.cancelled(), if interrupted.is_none() && status.is_none() => {
                kill_group(pgid, libc::SIGINT);
                interrupted = Some(EndReason::AgentStopping);
                kill_at = Some(tokio::time::Instant::now() + INTERRUPT_GRACE);
            }
            _ = sleep_until(kill_at), if status.is_none() => {
                kill_group(pgid, libc::SIGKILL);
                kill_at = None;
            }
        }
    }
    // What bpftrace started in its group (a `system()` call) does not outlive it.
    kill_group(pgid, libc::SIGKILL);
    let ending = match (interrupted, status) {
        (Some(reason), _) => Ending::of(reason),
        (None, Some(Ok(status))) if status.success() => Ending::of(EndReason::Exited),
        (None, Some(Ok(status))) => Ending {
            reason: EndReason::Exited,
            error: Some(error(
                ErrorCode::BadRequest,
                format!("bpftrace exited with {status} (its messages are above)"),
            )),
        },
        (None, Some(Err(e))) => Ending {
            reason: EndReason::Error,
            error: Some(error(
                ErrorCode::Internal,
                format!("waiting for bpftrace failed: {e}"),
            )),
        },
        (None, None) => Ending::of(EndReason::Exited),
    };
    Ok(Outcome::Ended(Some(ending)))
}

/// The next line of an open stream (with its newline); `None` at its end. A closed stream
/// (`None`) never yields.
pub(super) async fn next_line<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut Option<tokio::io::Lines<R>>,
) -> Option<String> {
    match lines {
        Some(lines) => match lines.next_line().await {
            Ok(Some(line)) => Some(line + "\n"),
            _ => None,
        },
        None => std::future::pending().await,
    }
}

async fn output(write: &mut OwnedWriteHalf, stream: &str, text: String) -> std::io::Result<()> {
    write_line(
        write,
        &Message::Output {
            stream: stream.to_string(),
            text,
        },
    )
    .await
}

/// The lowest pid in a cgroup (its first process, usually the container's init).
fn first_process(dir: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .ok()?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_variables_are_written_into_the_program() {
        assert_eq!(
            substitute(
                "tracepoint:syscalls:sys_enter_openat /pid == $container_pid/ { @[$container_cgroup_id] = count(); }",
                1234,
                98765
            ),
            "tracepoint:syscalls:sys_enter_openat /pid == 1234/ { @[98765] = count(); }"
        );
        // Other variables, and longer names, are the user's own.
        assert_eq!(
            substitute("$x = $container_pid2; $container_pid_x; $1", 7, 8),
            "$x = $container_pid2; $container_pid_x; $1"
        );
        assert!(uses_target("/cgroup == $container_cgroup_id/ {}"));
        assert!(!uses_target("BEGIN { $a = 1; }"));
    }
}
