//! `run`, `get`, `describe` and `delete`: `TraceSession` objects (`podscope.dev/v1alpha1`,
//! namespaced), written and read through the API server as kubectl does for any resource. The
//! agents run the sessions (receiver/src/session/trace_sessions.rs); the plugin only writes the
//! object and shows its status, so these verbs need the `tracesessions` RBAC of the session's
//! namespace and nothing of the agents' namespace.
//!
//! It must not interpret a session's results beyond showing them: the status is the agents'.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use clap::{Args, ValueEnum};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use kube::{Api, Client};
use serde_json::{json, Map, Value};

use crate::cli;
use crate::error::PluginError;
use crate::output::{self, table};
use crate::targets::{self, TargetSpec};
use crate::Context;

pub const GROUP: &str = "podscope.dev";
pub const VERSION: &str = "v1alpha1";
/// How kubectl names the resource in its messages (`tracesession.podscope.dev/web created`).
pub const SESSION_RESOURCE: &str = "tracesession.podscope.dev";
/// How long a session runs when neither `--duration` nor `--deadline` is given.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(300);

/// How an object is printed: kubectl's `-o` values these verbs support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ObjectFormat {
    /// More columns (get only).
    Wide,
    Yaml,
    Json,
    /// `KIND.GROUP/NAME` only.
    Name,
}

/// kubectl's `--dry-run`: `client` prints the object instead of creating it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DryRun {
    None,
    Client,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The session's name (metadata.name).
    pub name: String,
    /// TARGET then PROBE… (PROBE… alone with -l): pod/NAME, deploy/NAME, sts/NAME, ds/NAME or
    /// job/NAME of the session's namespace (-n); the probes of `trace`, or top, or profile.
    #[arg(value_name = "TARGET PROBE", num_args = 1.., required = true)]
    pub words: Vec<String>,
    /// Trace the namespace's pods whose labels match (e.g. app=web,tier!=db) instead of TARGET.
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// How long it runs from its creation (e.g. 30s, 10m); default 5m.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "deadline")]
    pub duration: Option<Duration>,
    /// When it ends (RFC 3339, e.g. 2026-12-03T18:00:00Z), instead of --duration.
    #[arg(long, value_name = "TIME")]
    pub deadline: Option<String>,
    /// Delete it this long after it ended (spec.ttlAfterFinished); default: kept.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// Run it on this cron schedule (spec.schedule), each run lasting --duration.
    #[arg(long, value_name = "CRON")]
    pub schedule: Option<String>,
    /// Send its results through the agents' pipelines too (spec.export).
    #[arg(long)]
    pub export: bool,
    /// `client`: print the object (with -o) instead of creating it.
    #[arg(long = "dry-run", value_enum, value_name = "STRATEGY", num_args = 0..=1,
          require_equals = true, default_missing_value = "client", default_value_t = DryRun::None)]
    pub dry_run: DryRun,
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<ObjectFormat>,
    /// Then print its events as `attach --from-start` does (with -o json|yaml, as JSON or YAML
    /// records); a cut connection resumes where it stopped, and Ctrl-C leaves the session
    /// running in the cluster.
    #[arg(short = 'w', long, conflicts_with = "dry_run")]
    pub watch: bool,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Sessions to show; none: every session of the namespace (-n, or -A for all).
    pub names: Vec<String>,
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<ObjectFormat>,
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    pub name: String,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Sessions to delete (their traces stop on every node).
    #[arg(required = true)]
    pub names: Vec<String>,
}

pub fn session_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, VERSION, "TraceSession"),
        "tracesessions",
    )
}

fn sessions_api(client: &Client, namespace: Option<&str>) -> Api<DynamicObject> {
    match namespace {
        Some(namespace) => Api::namespaced_with(client.clone(), namespace, &session_resource()),
        None => Api::all_with(client.clone(), &session_resource()),
    }
}

fn session_named(name: &str, namespace: &str) -> String {
    format!("tracesession {name:?} in namespace {namespace:?}")
}

/// A failed request for TraceSessions, said as the plugin says API errors.
fn api_error(error: kube::Error, verb: &str, namespace: Option<&str>, what: &str) -> PluginError {
    PluginError::from_api(error, verb, "tracesessions.podscope.dev", namespace, what)
}

/// A creation the server refused because the name is taken: exit 1, as kubectl.
pub fn already_exists(
    error: kube::Error,
    resource: &str,
    plural: &str,
    name: &str,
    namespace: &str,
    hint: &str,
) -> PluginError {
    match error {
        kube::Error::Api(status) if status.code == 409 => PluginError::Other(anyhow::anyhow!(
            "{plural} {name:?} already exists in namespace {namespace:?}{hint}"
        )),
        other => PluginError::from_api(
            other,
            "create",
            plural,
            Some(namespace),
            &format!("{resource} {name:?} in namespace {namespace:?}"),
        ),
    }
}

/// A DNS subdomain name, as the API server requires of metadata.name.
pub fn check_name(what: &str, name: &str) -> Result<(), PluginError> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(PluginError::Usage(format!(
            "{what} {name:?} is not a valid name: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"
        )))
    }
}

/// `run NAME [TARGET] PROBE…`: TARGET (or -l) and the probes' names as the CRD spells them
/// (`tcp_connect`), each once, in the order given.
fn run_words(args: &RunArgs) -> Result<(Option<&str>, Vec<String>), PluginError> {
    let words: Vec<&str> = args.words.iter().map(String::as_str).collect();
    let (target, probes) = match (args.selector.is_some(), words.as_slice()) {
        (true, probes) => (None, probes),
        (false, [_]) => {
            return Err(PluginError::Usage(
                "run needs NAME, TARGET and PROBE… (e.g. `run web-execs deploy/web exec`), or NAME, -l SELECTOR and PROBE…".into(),
            ))
        }
        (false, [target, probes @ ..]) => (Some(*target), probes),
        (false, []) => return Err(PluginError::Usage("run needs TARGET and PROBE…".into())),
    };
    let mut names = Vec::new();
    for probe in probes {
        let probe = cli::parse_session_probe(probe).map_err(PluginError::Usage)?;
        let name = json!(probe).as_str().unwrap_or_default().to_string();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Ok((target, names))
}

/// TARGET as `spec.targets`, within `namespace`: a pod by name, or a workload's pod selector.
/// A target of another namespace (`pod/OTHER/NAME`), a node, or -A is a usage error.
async fn session_targets(
    context: &mut Context,
    target: Option<&str>,
    selector: Option<&str>,
    namespace: &str,
) -> Result<Value, PluginError> {
    if context.cluster.all_namespaces {
        return Err(PluginError::Usage(format!(
            "-A: a TraceSession traces pods of its own namespace only; name it with -n (now {namespace:?})"
        )));
    }
    // `pod/NAMESPACE/NAME`: accepted for this namespace only, as the CRD's `namespace/name`.
    let target = match target.map(|t| t.splitn(3, '/').collect::<Vec<_>>()) {
        Some(parts) if parts.len() == 3 => {
            let (kind, other, name) = (parts[0], parts[1], parts[2]);
            if other != namespace {
                return Err(PluginError::Usage(format!(
                    "TARGET {kind}/{other}/{name} is in namespace {other:?}, but the session is in namespace {namespace:?}: a TraceSession traces pods of its own namespace only (run it with -n {other})"
                )));
            }
            Some(format!("{kind}/{name}"))
        }
        _ => target.map(str::to_string),
    };
    let spec = TargetSpec::parse(target.as_deref(), selector)?;
    let client = context.client().await?.0;
    let workload_selector = |selector: Option<
        &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    >,
                             what: &str| {
        let selector = selector
            .filter(|s| s.match_labels.is_some() || s.match_expressions.is_some())
            .ok_or_else(|| PluginError::TargetNotFound(format!("{what} has no pod selector")))?;
        Ok::<_, PluginError>(json!({ "podSelector": selector }))
    };
    match spec {
        TargetSpec::Node(name) => Err(PluginError::Usage(format!(
            "TARGET node/{name}: a TraceSession traces pods of its namespace, not a node (use `kubectl podscope trace node/{name}`)"
        ))),
        TargetSpec::Pod(name) => {
            check_name("pod", &name)?;
            Ok(json!({ "pods": [name] }))
        }
        TargetSpec::Selector(selector) => Ok(json!({ "podSelector": parse_selector(&selector)? })),
        TargetSpec::Deployment(name) => {
            let (object, what) = targets::get_named::<Deployment>(
                &client, namespace, &name, "deployment", "deployments.apps",
            )
            .await?;
            workload_selector(object.spec.as_ref().map(|s| &s.selector), &what)
        }
        TargetSpec::StatefulSet(name) => {
            let (object, what) = targets::get_named::<StatefulSet>(
                &client, namespace, &name, "statefulset", "statefulsets.apps",
            )
            .await?;
            workload_selector(object.spec.as_ref().map(|s| &s.selector), &what)
        }
        TargetSpec::DaemonSet(name) => {
            let (object, what) = targets::get_named::<DaemonSet>(
                &client, namespace, &name, "daemonset", "daemonsets.apps",
            )
            .await?;
            workload_selector(object.spec.as_ref().map(|s| &s.selector), &what)
        }
        TargetSpec::Job(name) => {
            let (object, what) =
                targets::get_named::<Job>(&client, namespace, &name, "job", "jobs.batch").await?;
            workload_selector(
                object.spec.as_ref().and_then(|s| s.selector.as_ref()),
                &what,
            )
        }
    }
}

/// `app=web,tier!=db,env in (a,b),canary,!legacy` as a LabelSelector (matchLabels for `=`,
/// matchExpressions for the rest), as the CRD's podSelector holds it.
pub fn parse_selector(text: &str) -> Result<Value, PluginError> {
    let bad = |term: &str, why: &str| PluginError::Usage(format!("-l {text:?}: {term:?} {why}"));
    let mut labels = Map::new();
    let mut expressions = Vec::new();
    for term in split_terms(text) {
        let term = term.trim();
        if term.is_empty() {
            return Err(bad(term, "is an empty term"));
        }
        let set = |op: &str, key: &str, rest: &str| -> Result<Value, PluginError> {
            let values = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| bad(term, "needs its values in parentheses, e.g. env in (a,b)"))?;
            let values: Vec<&str> = values.split(',').map(str::trim).collect();
            Ok(json!({"key": key.trim(), "operator": op, "values": values}))
        };
        if let Some((key, rest)) = term.split_once(" notin ") {
            expressions.push(set("NotIn", key, rest)?);
        } else if let Some((key, rest)) = term.split_once(" in ") {
            expressions.push(set("In", key, rest)?);
        } else if let Some((key, value)) = term.split_once("!=") {
            expressions
                .push(json!({"key": key.trim(), "operator": "NotIn", "values": [value.trim()]}));
        } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels.insert(key.trim().to_string(), json!(value.trim()));
        } else if let Some(key) = term.strip_prefix('!') {
            expressions.push(json!({"key": key.trim(), "operator": "DoesNotExist"}));
        } else if term.contains(|c: char| c.is_whitespace() || "()<>".contains(c)) {
            return Err(bad(
                term,
                "is not key=value, key!=value, key in (…), key notin (…), key or !key",
            ));
        } else {
            expressions.push(json!({"key": term, "operator": "Exists"}));
        }
    }
    let mut selector = Map::new();
    if !labels.is_empty() {
        selector.insert("matchLabels".into(), Value::Object(labels));
    }
    if !expressions.is_empty() {
        selector.insert("matchExpressions".into(), Value::Array(expressions));
    }
    Ok(Value::Object(selector))
}

/// The selector's terms: split on commas outside parentheses.
fn split_terms(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
}

/// The TraceSession `run` creates.
fn session_object(
    args: &RunArgs,
    namespace: &str,
    targets: Value,
    probes: Vec<String>,
    now: SystemTime,
) -> Result<Value, PluginError> {
    let mut spec = Map::new();
    spec.insert("targets".into(), targets);
    spec.insert("probes".into(), json!(probes));
    match &args.deadline {
        Some(deadline) => {
            let end = humantime::parse_rfc3339_weak(deadline).map_err(|e| {
                PluginError::Usage(format!(
                    "--deadline {deadline:?} is not an RFC 3339 time such as 2026-12-03T18:00:00Z ({e})"
                ))
            })?;
            if args.schedule.is_some() {
                return Err(PluginError::Usage(
                    "--schedule runs the session for --duration at each firing: give --duration, not --deadline".into(),
                ));
            }
            if end <= now {
                return Err(PluginError::Usage(format!(
                    "--deadline {deadline} has passed already"
                )));
            }
            spec.insert("deadline".into(), json!(deadline));
        }
        None => {
            let duration = args.duration.unwrap_or(DEFAULT_DURATION);
            if duration.is_zero() {
                return Err(PluginError::Usage("--duration must be above 0".into()));
            }
            spec.insert(
                "duration".into(),
                json!(humantime::format_duration(duration).to_string()),
            );
        }
    }
    if let Some(ttl) = args.ttl {
        spec.insert(
            "ttlAfterFinished".into(),
            json!(humantime::format_duration(ttl).to_string()),
        );
    }
    if let Some(schedule) = &args.schedule {
        if schedule.trim().is_empty() {
            return Err(PluginError::Usage("--schedule is empty".into()));
        }
        spec.insert("schedule".into(), json!(schedule));
    }
    if args.export {
        spec.insert("export".into(), json!(true));
    }
    Ok(json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": "TraceSession",
        "metadata": {"name": args.name, "namespace": namespace},
        "spec": spec,
    }))
}

pub async fn run(context: &mut Context, args: RunArgs) -> Result<(), PluginError> {
    if args.output == Some(ObjectFormat::Wide) {
        return Err(PluginError::Usage(
            "-o wide is for get; run prints yaml, json or name".into(),
        ));
    }
    check_name("session name", &args.name)?;
    let (target, probes) = run_words(&args)?;
    if probes.is_empty() {
        return Err(PluginError::Usage(
            "name at least one PROBE (e.g. exec, tcp-connect)".into(),
        ));
    }
    let (client, namespace) = context.client().await?;
    let targets = session_targets(context, target, args.selector.as_deref(), &namespace).await?;
    let object = session_object(&args, &namespace, targets, probes, SystemTime::now())?;
    if args.dry_run == DryRun::Client {
        print_created(
            &object,
            SESSION_RESOURCE,
            &args.name,
            args.output,
            " (dry run)",
        );
        return Ok(());
    }
    let request: DynamicObject = serde_json::from_value(object)
        .map_err(|e| PluginError::Other(anyhow::anyhow!("building the TraceSession: {e}")))?;
    let created = sessions_api(&client, Some(&namespace))
        .create(&PostParams::default(), &request)
        .await
        .map_err(|e| {
            already_exists(
                e,
                "tracesession",
                "tracesessions.podscope.dev",
                &args.name,
                &namespace,
                "",
            )
        })?;
    let created = serde_json::to_value(created)
        .map_err(|e| PluginError::Other(anyhow::anyhow!("reading the TraceSession: {e}")))?;
    if !args.watch {
        print_created(&created, SESSION_RESOURCE, &args.name, args.output, "");
        return Ok(());
    }
    // The events follow on stdout: the object's line goes to stderr so that a JSON or YAML
    // stream stays one format.
    eprintln!("{SESSION_RESOURCE}/{} created", args.name);
    let format = match args.output {
        Some(ObjectFormat::Json) => cli::Format::Json,
        Some(ObjectFormat::Yaml) => cli::Format::Yaml,
        None | Some(ObjectFormat::Wide) | Some(ObjectFormat::Name) => cli::Format::Table,
    };
    let options = crate::attach::AttachOptions {
        from_start: true,
        follow: true,
        output: format,
        folded: false,
    };
    crate::attach::attach(context, &args.name, options).await
}

/// What kubectl prints for an object it created: `KIND.GROUP/NAME created`, or the object.
pub fn print_created(
    object: &Value,
    resource: &str,
    name: &str,
    format: Option<ObjectFormat>,
    dry_run: &str,
) {
    match format {
        None | Some(ObjectFormat::Wide) => println!("{resource}/{name} created{dry_run}"),
        Some(ObjectFormat::Name) => println!("{resource}/{name}"),
        Some(ObjectFormat::Json) => print!("{}", pretty_json(object)),
        Some(ObjectFormat::Yaml) => print!("{}", output::yaml_document(object)),
    }
}

/// JSON as kubectl prints it: indented, with a final newline.
fn pretty_json(value: &Value) -> String {
    format!(
        "{}\n",
        serde_json::to_string_pretty(value).unwrap_or_default()
    )
}

pub async fn get(context: &mut Context, args: GetArgs) -> Result<(), PluginError> {
    let (client, namespace) = context.client().await?;
    let all = context.cluster.all_namespaces;
    let scope = (!all).then_some(namespace.as_str());
    if all && !args.names.is_empty() {
        return Err(PluginError::Usage(
            "a session NAME is in one namespace: give -n, not -A".into(),
        ));
    }
    let (objects, single) = if args.names.is_empty() {
        let listed = sessions_api(&client, scope)
            .list(&Default::default())
            .await
            .map_err(|e| api_error(e, "list", scope, "the TraceSessions"))?;
        (listed.items, false)
    } else {
        let api = sessions_api(&client, Some(&namespace));
        let mut objects = Vec::new();
        for name in &args.names {
            let object = api.get(name).await.map_err(|e| {
                api_error(e, "get", Some(&namespace), &session_named(name, &namespace))
            })?;
            objects.push(object);
        }
        (objects, args.names.len() == 1)
    };
    // A list's items come without apiVersion and kind (the list has them): kubectl puts them
    // back, so each printed object can be applied as it is.
    let values: Vec<Value> = objects
        .into_iter()
        .map(|o| {
            let mut value = serde_json::to_value(o).unwrap_or(Value::Null);
            value["apiVersion"] = json!(format!("{GROUP}/{VERSION}"));
            value["kind"] = json!("TraceSession");
            value
        })
        .collect();
    let now = SystemTime::now();
    match args.output {
        None | Some(ObjectFormat::Wide) => {
            if values.is_empty() {
                match scope {
                    Some(namespace) => eprintln!("No resources found in {namespace} namespace."),
                    None => eprintln!("No resources found"),
                }
                return Ok(());
            }
            let wide = args.output == Some(ObjectFormat::Wide);
            print!("{}", session_table(&values, all, wide, now));
        }
        Some(ObjectFormat::Name) => {
            for value in &values {
                println!(
                    "{SESSION_RESOURCE}/{}",
                    value["metadata"]["name"].as_str().unwrap_or("")
                );
            }
        }
        Some(format) => {
            let document = if single {
                values[0].clone()
            } else {
                json!({"apiVersion": "v1", "kind": "List", "items": values, "metadata": {"resourceVersion": ""}})
            };
            match format {
                ObjectFormat::Json => print!("{}", pretty_json(&document)),
                _ => print!("{}", output::yaml_document(&document)),
            }
        }
    }
    Ok(())
}

/// `get`'s table: the CRD's printer columns, as kubectl would print them, with the events
/// summed over probes.
pub fn session_table(sessions: &[Value], namespaces: bool, wide: bool, now: SystemTime) -> String {
    let mut header = Vec::new();
    if namespaces {
        header.push("NAMESPACE");
    }
    header.extend(["NAME", "PHASE", "PROBES", "NODES", "EVENTS", "AGE"]);
    if wide {
        header.extend(["REASON", "LOST", "END", "MESSAGE"]);
    }
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|session| {
            let status = &session["status"];
            let mut row = Vec::new();
            if namespaces {
                row.push(text_or_none(&session["metadata"]["namespace"]));
            }
            row.push(text_or_none(&session["metadata"]["name"]));
            row.push(text_or_none(&status["phase"]));
            row.push(list_or_none(&session["spec"]["probes"], |p| p.as_str()));
            row.push(list_or_none(&status["nodes"], |n| n["node"].as_str()));
            row.push(match status["summary"]["events"].as_object() {
                Some(events) => events
                    .values()
                    .filter_map(Value::as_u64)
                    .sum::<u64>()
                    .to_string(),
                None => "<none>".into(),
            });
            row.push(age(&session["metadata"]["creationTimestamp"], now));
            if wide {
                row.push(text_or_none(&status["reason"]));
                row.push(match status["summary"]["lost"].as_u64() {
                    Some(lost) => lost.to_string(),
                    None => "<none>".into(),
                });
                row.push(text_or_none(&status["endTime"]));
                row.push(text_or_none(&status["message"]));
            }
            row
        })
        .collect();
    table(&header, &rows)
}

fn text_or_none(value: &Value) -> String {
    match value {
        Value::String(text) if !text.is_empty() => text.clone(),
        Value::Null | Value::String(_) => "<none>".into(),
        other => other.to_string(),
    }
}

fn list_or_none<'a>(value: &'a Value, item: impl Fn(&'a Value) -> Option<&'a str>) -> String {
    let items: Vec<&str> = value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(item)
        .collect();
    if items.is_empty() {
        "<none>".into()
    } else {
        items.join(",")
    }
}

/// The AGE column: how long ago `timestamp` (RFC 3339) was.
fn age(timestamp: &Value, now: SystemTime) -> String {
    let Some(created) = timestamp
        .as_str()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
    else {
        return "<unknown>".into();
    };
    match now.duration_since(created) {
        Ok(elapsed) => human_duration(elapsed),
        // A clock behind the server's by a little: as kubectl, no negative ages.
        Err(_) => "0s".into(),
    }
}

/// A duration as kubectl's AGE column writes it: two units at most, coarser as it grows
/// (`45s`, `3m20s`, `25m`, `5h10m`, `20h`, `3d4h`, `45d`, `2y10d`).
pub fn human_duration(elapsed: Duration) -> String {
    let seconds = elapsed.as_secs();
    let minutes = seconds / 60;
    let hours = minutes / 60;
    let days = hours / 24;
    let years = days / 365;
    let pair = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit}{small}{small_unit}")
        }
    };
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        pair(minutes, "m", seconds % 60, "s")
    } else if minutes < 180 {
        format!("{minutes}m")
    } else if hours < 8 {
        pair(hours, "h", minutes % 60, "m")
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        pair(days, "d", hours % 24, "h")
    } else if days < 365 * 2 {
        format!("{days}d")
    } else if days < 365 * 8 {
        pair(years, "y", days % 365, "d")
    } else {
        format!("{years}y")
    }
}

pub async fn describe(context: &mut Context, args: DescribeArgs) -> Result<(), PluginError> {
    let (client, namespace) = context.client().await?;
    let object = sessions_api(&client, Some(&namespace))
        .get(&args.name)
        .await
        .map_err(|e| {
            api_error(
                e,
                "get",
                Some(&namespace),
                &session_named(&args.name, &namespace),
            )
        })?;
    let value = serde_json::to_value(object)
        .map_err(|e| PluginError::Other(anyhow::anyhow!("reading the TraceSession: {e}")))?;
    print!("{}", describe_text(&value));
    Ok(())
}

/// `describe`'s text: kubectl's `Field:  value` layout, values aligned, sections indented.
pub fn describe_text(session: &Value) -> String {
    let mut out = Describer::default();
    let metadata = &session["metadata"];
    let spec = &session["spec"];
    let status = &session["status"];
    out.field(0, "Name", &text_or_none(&metadata["name"]));
    out.field(0, "Namespace", &text_or_none(&metadata["namespace"]));
    out.field(0, "Created", &text_or_none(&metadata["creationTimestamp"]));
    out.section(0, "Targets");
    if let Some(pods) = spec["targets"]["pods"].as_array() {
        out.field(
            1,
            "Pods",
            &list_or_none(&Value::Array(pods.clone()), Value::as_str),
        );
    }
    if spec["targets"]["podSelector"].is_object() {
        out.field(
            1,
            "Pod Selector",
            &selector_text(&spec["targets"]["podSelector"]),
        );
    }
    out.field(
        0,
        "Probes",
        &list_or_none(&spec["probes"], Value::as_str).replace(',', ", "),
    );
    let known = [
        "targets",
        "probes",
        "duration",
        "deadline",
        "ttlAfterFinished",
        "schedule",
        "export",
    ];
    for (key, label) in [
        ("duration", "Duration"),
        ("deadline", "Deadline"),
        ("ttlAfterFinished", "TTL After Finished"),
        ("schedule", "Schedule"),
        ("export", "Export"),
    ] {
        if !spec[key].is_null() {
            out.field(0, label, &text_or_none(&spec[key]));
        }
    }
    // Spec fields this plugin does not know (a newer CRD): shown as written.
    for (key, value) in spec.as_object().into_iter().flatten() {
        if !known.contains(&key.as_str()) {
            out.field(0, key, &compact(value));
        }
    }
    out.field(0, "Phase", &text_or_none(&status["phase"]));
    out.field(0, "Reason", &text_or_none(&status["reason"]));
    out.field(0, "Message", &text_or_none(&status["message"]));
    for (key, label) in [
        ("startTime", "Start Time"),
        ("endTime", "End Time"),
        ("completionTime", "Completion Time"),
    ] {
        if !status[key].is_null() {
            out.field(0, label, &text_or_none(&status[key]));
        }
    }
    // Other merged fields the agents write (newer agents): shown as written.
    let merged_known = [
        "phase",
        "reason",
        "message",
        "startTime",
        "endTime",
        "completionTime",
        "summary",
        "nodes",
    ];
    for (key, value) in status.as_object().into_iter().flatten() {
        if !merged_known.contains(&key.as_str()) {
            out.field(0, key, &compact(value));
        }
    }
    if let Some(summary) = status["summary"].as_object() {
        out.section(0, "Summary");
        out.field(1, "Nodes", &text_or_none(&status["summary"]["nodes"]));
        out.field(1, "Lost", &text_or_none(&status["summary"]["lost"]));
        if let Some(events) = summary.get("events").and_then(Value::as_object) {
            out.section(1, "Events");
            for (probe, count) in events {
                out.field(2, probe, &text_or_none(count));
            }
        }
        for (key, value) in summary {
            if !["nodes", "lost", "events"].contains(&key.as_str()) {
                out.field(1, key, &compact(value));
            }
        }
    }
    let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
    if nodes.is_empty() {
        out.field(0, "Nodes", "<none>");
    } else {
        out.section(0, "Nodes");
        // One column per probe any node counted, in the spec's order, then the others.
        let mut probes: Vec<String> = spec["probes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().map(str::to_string))
            .collect();
        let counted: BTreeSet<String> = nodes
            .iter()
            .flat_map(|n| {
                n["events"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k.clone())
            })
            .collect();
        probes.extend(
            counted
                .into_iter()
                .filter(|p| !probes.contains(p))
                .collect::<Vec<_>>(),
        );
        let mut header = vec!["NODE".to_string(), "PHASE".into(), "PODS".into()];
        header.extend(probes.iter().map(|p| p.to_ascii_uppercase()));
        header.extend(["LOST".to_string(), "MESSAGE".into()]);
        let rows: Vec<Vec<String>> = nodes
            .iter()
            .map(|node| {
                let mut row = vec![
                    text_or_none(&node["node"]),
                    text_or_none(&node["phase"]),
                    list_or_none(&node["pods"], Value::as_str),
                ];
                for probe in &probes {
                    row.push(match node["events"][probe].as_u64() {
                        Some(count) => count.to_string(),
                        None => "-".into(),
                    });
                }
                row.push(match node["lost"].as_u64() {
                    Some(lost) => lost.to_string(),
                    None => "-".into(),
                });
                row.push(node["message"].as_str().unwrap_or("").to_string());
                row
            })
            .collect();
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        for line in table(&header, &rows).lines() {
            out.text.push_str("  ");
            out.text.push_str(line);
            out.text.push('\n');
        }
    }
    out.text
}

/// A LabelSelector as `-l` text: `app=web,tier in (a,b),!canary`.
fn selector_text(selector: &Value) -> String {
    let mut terms: Vec<String> = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    for expression in selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let key = expression["key"].as_str().unwrap_or("");
        let values: Vec<&str> = expression["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        terms.push(match expression["operator"].as_str().unwrap_or("") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_string(),
            "DoesNotExist" => format!("!{key}"),
            other => format!("{key} {other} ({})", values.join(",")),
        });
    }
    if terms.is_empty() {
        "<every pod>".into()
    } else {
        terms.join(",")
    }
}

fn compact(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// kubectl describe's layout: `Label:` then the value at a column shared by the whole text.
#[derive(Default)]
struct Describer {
    text: String,
}

/// The column describe's values start at (kubectl aligns them per block; one column reads as well).
const VALUE_COLUMN: usize = 22;

impl Describer {
    fn field(&mut self, depth: usize, label: &str, value: &str) {
        let indent = "  ".repeat(depth);
        let head = format!("{indent}{label}:");
        let width = VALUE_COLUMN.max(head.len() + 1);
        self.text.push_str(&format!("{head:<width$}{value}\n"));
    }

    fn section(&mut self, depth: usize, label: &str) {
        self.text
            .push_str(&format!("{}{label}:\n", "  ".repeat(depth)));
    }
}

pub async fn delete(context: &mut Context, args: DeleteArgs) -> Result<(), PluginError> {
    let (client, namespace) = context.client().await?;
    let api = sessions_api(&client, Some(&namespace));
    for name in &args.names {
        api.delete(name, &DeleteParams::default())
            .await
            .map_err(|e| {
                api_error(
                    e,
                    "delete",
                    Some(&namespace),
                    &session_named(name, &namespace),
                )
            })?;
        println!("{SESSION_RESOURCE} {name:?} deleted");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectls() {
        let at = |s: u64| human_duration(Duration::from_secs(s));
        assert_eq!(at(45), "45s");
        assert_eq!(at(119), "119s");
        assert_eq!(at(200), "3m20s");
        assert_eq!(at(300), "5m");
        assert_eq!(at(25 * 60 + 10), "25m");
        assert_eq!(at(5 * 3600 + 10 * 60), "5h10m");
        assert_eq!(at(20 * 3600), "20h");
        assert_eq!(at(3 * 86400 + 4 * 3600), "3d4h");
        assert_eq!(at(45 * 86400), "45d");
        assert_eq!(at(740 * 86400), "2y10d");
        assert_eq!(at(3000 * 86400), "8y");
    }

    #[test]
    fn label_selectors_become_the_crds_pod_selector() {
        assert_eq!(
            parse_selector("app=web,tier!=db,env in (a, b),canary,!legacy").unwrap(),
            json!({
                "matchLabels": {"app": "web"},
                "matchExpressions": [
                    {"key": "tier", "operator": "NotIn", "values": ["db"]},
                    {"key": "env", "operator": "In", "values": ["a", "b"]},
                    {"key": "canary", "operator": "Exists"},
                    {"key": "legacy", "operator": "DoesNotExist"},
                ]
            })
        );
        let error = parse_selector("app=web,,x").unwrap_err();
        assert_eq!(
            error.to_string(),
            "-l \"app=web,,x\": \"\" is an empty term"
        );
        assert_eq!(
            selector_text(&parse_selector("app=web,env notin (a,b),!legacy").unwrap()),
            "app=web,env notin (a,b),!legacy"
        );
    }

    #[test]
    fn names_are_checked_as_the_api_server_would() {
        assert!(check_name("session name", "web-execs.v2").is_ok());
        let error = check_name("session name", "Web_Execs").unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert!(error
            .to_string()
            .starts_with("session name \"Web_Execs\" is not a valid name"));
    }
}
