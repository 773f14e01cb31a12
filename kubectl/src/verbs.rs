//! `trace`, `bpftrace`, `profile` and `status`: one request per agent, their answers printed.
//! (`top` has its own module: it is a screen, not a stream.)

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use podscope_core::session::{EndReason, Message, ProfileFormat, Request, TraceProbe};
use serde_json::json;

use crate::cli::{self, BpftraceArgs, Format, ProfileArgs, StatusArgs, TraceArgs};
use crate::error::PluginError;
use crate::merge::TimeMerger;
use crate::output::{self, EventTable};
use crate::targets::TargetSpec;
use crate::transport::{open_all, stream_all, Route, Session};
use crate::Context;

/// How long an event from one node waits for the other nodes' streams before it is printed.
const MERGE_LATENESS: Duration = Duration::from_millis(250);

/// `trace [TARGET] PROBE` (PROBE alone with -l).
fn trace_words(args: &TraceArgs) -> Result<(Option<&str>, TraceProbe), PluginError> {
    let words: Vec<&str> = args.words.iter().map(String::as_str).collect();
    let (target, probe) = match (words.as_slice(), &args.selection.selector) {
        ([target, probe], None) => (Some(*target), *probe),
        ([probe], Some(_)) => (None, *probe),
        ([_], None) => return Err(PluginError::Usage(
            "trace needs TARGET and PROBE (e.g. `trace pod/web-0 exec`), or -l SELECTOR and PROBE"
                .into(),
        )),
        _ => {
            return Err(PluginError::Usage(
                "with -l SELECTOR, give only PROBE (e.g. `trace -l app=web exec`)".into(),
            ))
        }
    };
    Ok((target, cli::parse_probe(probe).map_err(PluginError::Usage)?))
}

pub async fn trace(context: &mut Context, args: TraceArgs) -> Result<(), PluginError> {
    let (target, probe) = trace_words(&args)?;
    if let Some(bad) = args.filters.iter().find(|f| !f.contains('=')) {
        return Err(PluginError::Usage(format!(
            "--filter {bad:?} is not FIELD=VALUE (e.g. comm=curl)"
        )));
    }
    let spec = TargetSpec::parse(target, args.selection.selector.as_deref())?;
    let by_node = context
        .resolve(&spec, args.selection.container.as_deref())
        .await?;
    let routes = context.routes(&by_node).await?;
    let (sessions, _) = open_all(
        context.made_client(),
        routes.iter().map(|(route, _)| route.clone()).collect(),
        |route| Request::Trace {
            probe,
            targets: targets_of(&routes, route),
            filters: args.filters.clone(),
            duration: args.duration,
        },
    )
    .await?;
    // Said once every agent has accepted (its kernel filter is in place): what is traced.
    let pods: usize = routes.iter().map(|(_, targets)| targets.len()).sum();
    let probe_name = json!(probe);
    let probe_name = probe_name.as_str().unwrap_or("");
    if pods == 0 {
        eprintln!(
            "tracing {probe_name} on {} node(s), every process; Ctrl-C to stop",
            routes.len()
        );
    } else {
        eprintln!(
            "tracing {probe_name} in {pods} pod(s) on {} node(s); Ctrl-C to stop",
            routes.len()
        );
    }
    let nodes: Vec<String> = sessions.iter().map(|s| s.route_node.clone()).collect();
    let mut merger = TimeMerger::new(nodes, MERGE_LATENESS);
    let mut messages = stream_all(sessions);
    let mut table = EventTable::default();
    let mut failure = None;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let deadline = merger
            .next_deadline()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let open = tokio::select! {
            message = messages.recv() => match message {
                None => false,
                Some((node, Ok(Message::Event(event)))) => {
                    merger.push(&node, event, Instant::now());
                    true
                }
                Some((node, Ok(Message::Lost { count, reason }))) => {
                    eprintln!("warning: node {node}: {count} events lost ({reason})");
                    true
                }
                Some((node, Ok(Message::End { error, .. }))) => {
                    merger.finish(&node);
                    if let Some(error) = error {
                        failure.get_or_insert(PluginError::from_session(&node, error));
                    }
                    true
                }
                Some((_, Ok(_))) => true,
                Some((node, Err(error))) => {
                    merger.finish(&node);
                    failure.get_or_insert(error);
                    true
                }
            },
            _ = tokio::time::sleep_until(deadline) => true,
            _ = &mut interrupted => false,
        };
        let ready = merger.release(open);
        if !output::print_events(&mut table, args.output, &ready) {
            // The reader went away (`| head`): done, not failed.
            return Ok(());
        }
        if !open {
            break;
        }
    }
    failure.map_or(Ok(()), Err)
}

fn targets_of(
    routes: &[(Route, Vec<podscope_core::session::Target>)],
    route: &Route,
) -> Vec<podscope_core::session::Target> {
    routes
        .iter()
        .find(|(r, _)| r == route)
        .map(|(_, targets)| targets.clone())
        .unwrap_or_default()
}

pub async fn bpftrace(context: &mut Context, args: BpftraceArgs) -> Result<(), PluginError> {
    let program = match (&args.program, &args.file) {
        (Some(program), _) => program.clone(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .map_err(|e| PluginError::Usage(format!("-f {}: {e}", file.display())))?,
        (None, None) => return Err(PluginError::Usage("give -e PROGRAM or -f FILE".into())),
    };
    let spec = TargetSpec::parse(args.target.as_deref(), args.selection.selector.as_deref())?;
    let by_node = context
        .resolve(&spec, args.selection.container.as_deref())
        .await?;
    let pods: Vec<_> = by_node.values().flatten().collect();
    let target = match pods.as_slice() {
        [] => None,
        [pod] if pod.containers.len() == 1 => Some((*pod).clone()),
        [pod] => {
            let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
            return Err(PluginError::Usage(format!(
                "pod {} has several containers ({}): name one with -c, $container_pid is one process",
                pod.pod,
                names.join(", ")
            )));
        }
        _ => {
            return Err(PluginError::Usage(format!(
                "bpftrace runs for one container, and the target selects {} pods: name one with pod/NAME",
                pods.len()
            )))
        }
    };
    let routes = context.routes(&by_node).await?;
    let (route, _) = routes
        .first()
        .ok_or_else(|| PluginError::Other(anyhow::anyhow!("no node to run bpftrace on")))?;
    let mut session = Session::open(
        context.made_client(),
        route,
        Request::Bpftrace {
            program,
            target,
            duration: args.duration,
        },
    )
    .await?;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let message = tokio::select! {
            message = session.next() => message?,
            _ = &mut interrupted => return Ok(()),
        };
        match message {
            None => return Ok(()),
            Some(Message::Output { stream, text }) => {
                let written = if stream == "stderr" {
                    std::io::stderr().write_all(text.as_bytes())
                } else {
                    let mut out = std::io::stdout().lock();
                    out.write_all(text.as_bytes()).and_then(|()| out.flush())
                };
                if written.is_err() {
                    return Ok(());
                }
            }
            Some(Message::Lost { count, reason }) => {
                eprintln!("warning: {count} output chunks lost ({reason})")
            }
            Some(Message::End { error, reason }) => {
                return match (error, reason) {
                    (Some(error), _) => Err(PluginError::from_session(&session.node, error)),
                    (None, EndReason::Error) => Err(PluginError::Other(anyhow::anyhow!(
                        "bpftrace on node {} failed (see its output above)",
                        session.node
                    ))),
                    (None, _) => Ok(()),
                };
            }
            Some(_) => {}
        }
    }
}

/// The file formats `profile -o` writes, from the file's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProfileOutput {
    FlameGraph,
    Folded,
    Pprof,
}

fn profile_output(path: &Path) -> Result<ProfileOutput, PluginError> {
    let name = path.to_string_lossy();
    if name.ends_with(".svg") {
        Ok(ProfileOutput::FlameGraph)
    } else if name.ends_with(".folded") || name.ends_with(".txt") {
        Ok(ProfileOutput::Folded)
    } else if name.ends_with(".pb.gz") || name.ends_with(".pprof") {
        Ok(ProfileOutput::Pprof)
    } else {
        Err(PluginError::Usage(format!(
            "-o {name}: the name must end in .svg (flame graph), .folded, .pb.gz or .pprof"
        )))
    }
}

pub async fn profile(context: &mut Context, args: ProfileArgs) -> Result<(), PluginError> {
    let kind = profile_output(&args.output)?;
    let spec = TargetSpec::parse(args.target.as_deref(), args.selection.selector.as_deref())?;
    let by_node = context
        .resolve(&spec, args.selection.container.as_deref())
        .await?;
    if kind == ProfileOutput::Pprof && by_node.len() > 1 {
        return Err(PluginError::Usage(format!(
            "the target spans {} nodes and a pprof file holds one node's profile: write .svg or .folded (merged), or name one pod",
            by_node.len()
        )));
    }
    let format = match kind {
        ProfileOutput::Pprof => ProfileFormat::Pprof,
        _ => ProfileFormat::Folded,
    };
    let routes = context.routes(&by_node).await?;
    let (sessions, _) = open_all(
        context.made_client(),
        routes.iter().map(|(route, _)| route.clone()).collect(),
        |route| Request::Profile {
            targets: targets_of(&routes, route),
            duration: args.duration,
            format,
            frequency_hz: args.frequency,
        },
    )
    .await?;
    eprintln!(
        "profiling {} node(s) for {}…",
        sessions.len(),
        humantime::format_duration(args.duration)
    );
    let mut messages = stream_all(sessions);
    let mut files: Vec<Vec<u8>> = Vec::new();
    while let Some((node, message)) = messages.recv().await {
        match message? {
            Message::File { name, data } => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(data.as_bytes())
                    .map_err(|e| {
                        PluginError::Other(anyhow::anyhow!(
                            "the agent on node {node} sent {name} not in base64: {e}"
                        ))
                    })?;
                files.push(bytes);
            }
            Message::End {
                error: Some(error), ..
            } => return Err(PluginError::from_session(&node, error)),
            _ => {}
        }
    }
    let bytes = match kind {
        ProfileOutput::Pprof => files.into_iter().next().ok_or_else(|| {
            PluginError::Other(anyhow::anyhow!(
                "the agent ended without sending the profile"
            ))
        })?,
        ProfileOutput::Folded => files.concat(),
        ProfileOutput::FlameGraph => flame_graph(&files.concat())?,
    };
    std::fs::write(&args.output, &bytes).map_err(|e| {
        PluginError::Other(anyhow::anyhow!("writing {}: {e}", args.output.display()))
    })?;
    eprintln!("wrote {} ({} bytes)", args.output.display(), bytes.len());
    Ok(())
}

/// An interactive SVG flame graph of folded stacks (`frame;frame count` lines).
fn flame_graph(folded: &[u8]) -> Result<Vec<u8>, PluginError> {
    let text = String::from_utf8_lossy(folded);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return Err(PluginError::Other(anyhow::anyhow!(
            "the profile has no samples: the target used no CPU while it was profiled"
        )));
    }
    let mut options = inferno::flamegraph::Options::default();
    options.title = "kubectl podscope profile".to_string();
    let mut svg = Vec::new();
    inferno::flamegraph::from_lines(&mut options, lines, &mut svg)
        .map_err(|e| PluginError::Other(anyhow::anyhow!("rendering the flame graph: {e}")))?;
    Ok(svg)
}

pub async fn status(context: &mut Context, args: StatusArgs) -> Result<(), PluginError> {
    let routes = context.every_agent().await?;
    let client = context.made_client().cloned();
    let asking = routes.iter().map(|route| {
        let client = client.clone();
        async move {
            let mut session = Session::open(client.as_ref(), route, Request::Status).await?;
            while let Some(message) = session.next().await? {
                match message {
                    Message::Status(status) => return Ok(status),
                    Message::End {
                        error: Some(error), ..
                    } => return Err(PluginError::from_session(&session.node, error)),
                    _ => {}
                }
            }
            Err(PluginError::Other(anyhow::anyhow!(
                "the agent on node {} ended without its status",
                session.node
            )))
        }
    });
    let answers = futures::future::join_all(asking).await;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut failure = None;
    let mut out = String::new();
    for (route, answer) in routes.iter().zip(answers) {
        let agent = match route {
            Route::PortForward(agent) => format!("{}/{}", agent.namespace, agent.pod),
            Route::Direct { address, .. } => address.clone(),
        };
        match answer {
            Ok(status) => {
                // Usable: attached now, or available (attached while a session uses it).
                let usable =
                    |state: &str| state.starts_with("attached") || state.starts_with("available");
                let attached = status.probes.values().filter(|v| usable(v)).count();
                for (probe, state) in &status.probes {
                    if !usable(state) {
                        notes.push(format!("{}: probe {probe}: {state}", status.node));
                    }
                }
                match args.output {
                    Format::Table => rows.push(vec![
                        status.node.clone(),
                        agent,
                        status.agent_version.clone(),
                        status.protocol.to_string(),
                        if status.ready { "yes" } else { "no" }.to_string(),
                        format!("{attached}/{}", status.probes.len()),
                        if status.bpftrace_enabled {
                            "enabled"
                        } else {
                            "disabled"
                        }
                        .to_string(),
                    ]),
                    format => {
                        let mut value = json!(status);
                        value["agent"] = json!(agent);
                        out.push_str(&output::object(format, &value));
                    }
                }
            }
            Err(error) => {
                let node = route.node().to_string();
                if args.output == Format::Table {
                    rows.push(vec![
                        node,
                        agent,
                        "-".into(),
                        "-".into(),
                        "unreachable".into(),
                        "-".into(),
                        "-".into(),
                    ]);
                }
                notes.push(format!("{}: {error}", route.node()));
                failure.get_or_insert(error);
            }
        }
    }
    if args.output == Format::Table {
        out = output::table(
            &[
                "NODE", "AGENT", "VERSION", "PROTOCOL", "READY", "PROBES", "BPFTRACE",
            ],
            &rows,
        );
        for note in &notes {
            out.push_str(note);
            out.push('\n');
        }
    }
    print!("{out}");
    failure.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace_args(words: &[&str], selector: Option<&str>) -> TraceArgs {
        TraceArgs {
            words: words.iter().map(|w| w.to_string()).collect(),
            selection: cli::Selection {
                selector: selector.map(str::to_string),
                container: None,
            },
            duration: None,
            filters: Vec::new(),
            output: Format::Table,
        }
    }

    #[test]
    fn trace_takes_target_and_probe_or_a_selector_and_probe() {
        let args = trace_args(&["pod/web-0", "tcp-connect"], None);
        assert_eq!(
            trace_words(&args).unwrap(),
            (Some("pod/web-0"), TraceProbe::TcpConnect)
        );
        let args = trace_args(&["exec"], Some("app=web"));
        assert_eq!(trace_words(&args).unwrap(), (None, TraceProbe::Exec));
        let args = trace_args(&["exec"], None);
        assert_eq!(trace_words(&args).unwrap_err().exit_code(), 2);
        let args = trace_args(&["pod/a", "exec"], Some("app=web"));
        assert_eq!(trace_words(&args).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn the_profile_format_follows_the_file_name() {
        assert_eq!(
            profile_output(Path::new("flame.svg")).unwrap(),
            ProfileOutput::FlameGraph
        );
        assert_eq!(
            profile_output(Path::new("x.folded")).unwrap(),
            ProfileOutput::Folded
        );
        assert_eq!(
            profile_output(Path::new("profile.pb.gz")).unwrap(),
            ProfileOutput::Pprof
        );
        let error = profile_output(Path::new("p.png")).unwrap_err();
        assert_eq!(error.exit_code(), 2);
    }

    #[test]
    fn folded_stacks_render_as_an_svg_flame_graph() {
        let svg = flame_graph(b"main;work;spin 30\nmain;idle 10\n").unwrap();
        let text = String::from_utf8(svg).unwrap();
        assert!(text.starts_with("<?xml"), "{}", &text[..40]);
        assert!(
            text.contains("spin (30 samples, 75.00%)"),
            "no frame title for spin"
        );
        assert_eq!(flame_graph(b"\n").unwrap_err().exit_code(), 1);
    }
}
