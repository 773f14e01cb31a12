//! `promote session/NAME`: a TraceSession's probes and targets as a namespaced `Probe`
//! (`podscope.dev/v1alpha1`, helm/podscope/crds/probes.podscope.dev.yaml), so what an
//! investigation traced for a while is measured from then on by the agents' tenant probes
//! (docs/programs.md, "Probes for namespace owners").
//!
//! A trace probe maps to the continuous probe that measures the same hook: the TCP events to
//! `tcp` (connections opened, closed, failed, retransmits), `open` to `files` (opens and their
//! errors), `http` to `http` (requests' spans and RED metrics). Exec/exit are the agent's own
//! `process` probe and OOM kills and signals have no continuous probe: a Probe cannot take
//! them, so a session with one is refused, naming it, rather than promoted in part. `profile`
//! becomes the continuous `profiling` probe; `top` (cgroup CPU and several probes' counters at
//! once) has no single Probe equivalent and is refused the same way.

use clap::Args;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PostParams};
use kube::Api;
use serde_json::{json, Map, Value};

use crate::error::PluginError;
use crate::sessions::{self, DryRun, ObjectFormat, GROUP, VERSION};
use crate::Context;

const PROBE_RESOURCE: &str = "probe.podscope.dev";
/// On the Probe: the session it was promoted from.
pub const PROMOTED_FROM: &str = "podscope.dev/promoted-from";

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// The session: session/NAME (or tracesession/NAME).
    pub session: String,
    /// The Probe's name (default: the session's).
    #[arg(long, value_name = "PROBE_NAME")]
    pub name: Option<String>,
    /// `client`: print the Probe (with -o) instead of creating it.
    #[arg(long = "dry-run", value_enum, value_name = "STRATEGY", num_args = 0..=1,
          require_equals = true, default_missing_value = "client", default_value_t = DryRun::None)]
    pub dry_run: DryRun,
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<ObjectFormat>,
}

/// The continuous probe (a key of the Probe's `spec.probes`) measuring what a trace probe
/// (as the TraceSession CRD names it) traces; `Err` says why there is none.
pub fn continuous_probe(trace_probe: &str) -> Result<&'static str, &'static str> {
    match trace_probe {
        "tcp_connect" | "tcp_accept" | "tcp_close" | "tcp_retransmit" => Ok("tcp"),
        "open" => Ok("files"),
        "http" => Ok("http"),
        "profile" => Ok("profiling"),
        "top" => Err(
            "top's counters come from the pods' cgroups and several probes at once; a Probe names the probes it runs (syscalls, files, sched, tcp, http): write one with those you need",
        ),
        "exec" | "exit" => Err(
            "execs and exits are counted by the agent's own process probe, which a Probe cannot enable",
        ),
        "oom_kill" | "signal" => Err("no continuous probe counts them"),
        _ => Err("this plugin does not know it"),
    }
}

/// The Probe for `session` (a TraceSession as the server returned it), named `name`.
pub fn probe_for(session: &Value, name: &str) -> Result<Value, PluginError> {
    let session_name = session["metadata"]["name"].as_str().unwrap_or_default();
    let namespace = session["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default();
    let spec = &session["spec"];
    let refuse = |why: String| {
        PluginError::Usage(format!(
            "tracesession {session_name:?} in namespace {namespace:?} cannot become a Probe: {why}"
        ))
    };
    let mut probes = Map::new();
    let mut refused = Vec::new();
    for (i, probe) in spec["probes"].as_array().into_iter().flatten().enumerate() {
        let probe = probe.as_str().unwrap_or_default();
        match continuous_probe(probe) {
            Ok(continuous) => {
                probes.insert(continuous.to_string(), json!({}));
            }
            Err(why) => refused.push(format!("spec.probes[{i}] {probe}: {why}")),
        }
    }
    if !refused.is_empty() {
        return Err(refuse(format!(
            "{} (a Probe takes tcp_connect, tcp_accept, tcp_close, tcp_retransmit, open, http and profile)",
            refused.join("; ")
        )));
    }
    if probes.is_empty() {
        return Err(refuse("spec.probes names no probe".into()));
    }
    if spec.get("bpftrace").is_some_and(|b| !b.is_null()) {
        return Err(refuse(
            "spec.bpftrace: a Probe runs built-in probes only, never a bpftrace program".into(),
        ));
    }
    let targets = &spec["targets"];
    if targets["pods"]
        .as_array()
        .is_some_and(|pods| !pods.is_empty())
    {
        return Err(refuse(format!(
            "spec.targets.pods ({}): a Probe selects pods by label only (its podSelector); \
             run the session with -l SELECTOR or deploy/NAME to promote it",
            targets["pods"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let Some(selector) = targets["podSelector"].as_object() else {
        return Err(refuse(
            "spec.targets has no podSelector (a Probe without one would observe every pod of the namespace)".into(),
        ));
    };
    Ok(json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": "Probe",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {PROMOTED_FROM: format!("tracesession/{session_name}")},
        },
        "spec": {"podSelector": selector, "probes": probes},
    }))
}

/// `session/NAME` → NAME.
fn session_name(text: &str) -> Result<&str, PluginError> {
    match text.split_once('/') {
        Some((kind, name))
            if !name.is_empty()
                && !name.contains('/')
                && matches!(
                    kind.to_ascii_lowercase().as_str(),
                    "session" | "tracesession" | "tracesessions" | "tsess"
                ) =>
        {
            Ok(name)
        }
        _ => Err(PluginError::Usage(format!(
            "promote takes session/NAME (a TraceSession of the namespace), not {text:?}"
        ))),
    }
}

pub async fn promote(context: &mut Context, args: PromoteArgs) -> Result<(), PluginError> {
    if args.output == Some(ObjectFormat::Wide) {
        return Err(PluginError::Usage(
            "-o wide is for get; promote prints yaml, json or name".into(),
        ));
    }
    let name = session_name(&args.session)?;
    let probe_name = args.name.clone().unwrap_or_else(|| name.to_string());
    sessions::check_name("Probe name", &probe_name)?;
    let (client, namespace) = context.client().await?;
    let session = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &namespace,
        &sessions::session_resource(),
    )
    .get(name)
    .await
    .map_err(|e| {
        PluginError::from_api(
            e,
            "get",
            "tracesessions.podscope.dev",
            Some(&namespace),
            &format!("tracesession {name:?} in namespace {namespace:?}"),
        )
    })?;
    let session = serde_json::to_value(session)
        .map_err(|e| PluginError::Other(anyhow::anyhow!("reading the TraceSession: {e}")))?;
    let probe = probe_for(&session, &probe_name)?;
    if args.dry_run == DryRun::Client {
        sessions::print_created(
            &probe,
            PROBE_RESOURCE,
            &probe_name,
            args.output,
            " (dry run)",
        );
        return Ok(());
    }
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, VERSION, "Probe"),
        "probes",
    );
    let request: DynamicObject = serde_json::from_value(probe)
        .map_err(|e| PluginError::Other(anyhow::anyhow!("building the Probe: {e}")))?;
    let created = Api::<DynamicObject>::namespaced_with(client, &namespace, &resource)
        .create(&PostParams::default(), &request)
        .await
        .map_err(|e| {
            sessions::already_exists(
                e,
                "probe",
                "probes.podscope.dev",
                &probe_name,
                &namespace,
                " (--name gives the Probe another name)",
            )
        })?;
    let created = serde_json::to_value(created)
        .map_err(|e| PluginError::Other(anyhow::anyhow!("reading the Probe: {e}")))?;
    sessions::print_created(&created, PROBE_RESOURCE, &probe_name, args.output, "");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(spec: Value) -> Value {
        json!({"metadata": {"name": "web-execs", "namespace": "shop"}, "spec": spec})
    }

    #[test]
    fn trace_probes_map_to_the_probes_that_measure_them() {
        let probe = probe_for(
            &session(json!({
                "targets": {"podSelector": {"matchLabels": {"app": "web"}}},
                "probes": ["tcp_connect", "tcp_retransmit", "open", "http", "profile"],
                "duration": "10m"
            })),
            "web",
        )
        .unwrap();
        assert_eq!(
            probe,
            json!({
                "apiVersion": "podscope.dev/v1alpha1", "kind": "Probe",
                "metadata": {"name": "web", "namespace": "shop",
                             "annotations": {"podscope.dev/promoted-from": "tracesession/web-execs"}},
                "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                         "probes": {"tcp": {}, "files": {}, "http": {}, "profiling": {}}}
            })
        );
    }

    #[test]
    fn a_probe_without_an_equivalent_is_refused_by_name() {
        let error = probe_for(
            &session(json!({
                "targets": {"podSelector": {"matchLabels": {"app": "web"}}},
                "probes": ["exec", "tcp_connect", "signal", "top"]
            })),
            "web",
        )
        .unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert_eq!(
            error.to_string(),
            "tracesession \"web-execs\" in namespace \"shop\" cannot become a Probe: spec.probes[0] exec: \
             execs and exits are counted by the agent's own process probe, which a Probe cannot enable; \
             spec.probes[2] signal: no continuous probe counts them; spec.probes[3] top: top's \
             counters come from the pods' cgroups and several probes at once; a Probe names the \
             probes it runs (syscalls, files, sched, tcp, http): write one with those you need \
             (a Probe takes tcp_connect, tcp_accept, tcp_close, tcp_retransmit, open, http and \
             profile)"
        );
        let error = probe_for(
            &session(json!({"targets": {"pods": ["web-0"]}, "probes": ["open"]})),
            "web",
        )
        .unwrap_err();
        assert!(
            error.to_string().ends_with(
                "spec.targets.pods (web-0): a Probe selects pods by label only (its podSelector); \
                 run the session with -l SELECTOR or deploy/NAME to promote it"
            ),
            "{error}"
        );
    }

    #[test]
    fn only_sessions_are_promoted() {
        assert_eq!(session_name("session/web").unwrap(), "web");
        assert_eq!(session_name("tsess/web").unwrap(), "web");
        assert!(matches!(session_name("web"), Err(PluginError::Usage(_))));
        assert!(matches!(
            session_name("pod/web"),
            Err(PluginError::Usage(_))
        ));
    }
}
