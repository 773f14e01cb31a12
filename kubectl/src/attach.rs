//! `attach` and `logs`: the events a `TraceSession` recorded, read from the agents that ran
//! it. The session's status says which nodes ran it (`status.nodes`) and holds its attach token
//! (`status.attachToken`, so whoever may `get` the session may read its events); each node's
//! agent keeps that node's events until the session is deleted (or its `ttlAfterFinished`
//! passed). One connection per node, the nodes' records merged by time with the NODE column, as
//! `trace` prints them. A connection cut while following is opened again from the sequence
//! after the last record seen on that node, so nothing is printed twice or skipped.
//!
//! It must not start or change a session: `run` (another module) creates it; [`attach`] is what
//! `run --watch` calls to follow it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use clap::Args;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Api, Client};
use podscope_core::session::{ErrorCode, Event, Message, Request};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::cli::{ClusterArgs, Format};
use crate::error::PluginError;
use crate::merge::TimeMerger;
use crate::output::{self, EventTable};
use crate::targets;
use crate::transport::{Route, Session};
use crate::Context;

/// How long an event from one node waits for the other nodes' streams before it is printed.
const MERGE_LATENESS: Duration = Duration::from_millis(250);
/// How often the session's status is read while waiting for it to start, and while following
/// (its pods may start on more nodes).
const STATUS_POLL: Duration = Duration::from_secs(2);
/// How long to wait before opening a cut connection again.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// How long an agent's `forbidden` is taken for the attach token's race (two agents wrote
/// `status.attachToken` at once; the loser learns the winner's through its watch, about a
/// second later), the token read again and the request retried, before it is the answer.
const TOKEN_RACE: Duration = Duration::from_secs(10);
/// Between those retries.
const TOKEN_RETRY_DELAY: Duration = Duration::from_millis(500);

/// Whether a node's `forbidden` may still be the attach token's race: retried (after the
/// token is read again) until [`TOKEN_RACE`] has passed since the first one.
#[derive(Debug)]
struct TokenRetry {
    limit: Duration,
    first: Option<Instant>,
}

impl TokenRetry {
    fn new(limit: Duration) -> TokenRetry {
        TokenRetry { limit, first: None }
    }

    /// True to retry after `error` at `now`; false when it is not an agent's `forbidden`, or
    /// the race had its time.
    fn retry(&mut self, error: &PluginError, now: Instant) -> bool {
        let forbidden =
            matches!(error, PluginError::Agent { error, .. } if error.code == ErrorCode::Forbidden);
        if !forbidden {
            return false;
        }
        let first = *self.first.get_or_insert(now);
        now.duration_since(first) < self.limit
    }

    /// The agent accepted the token: a later `forbidden` starts a new race.
    fn accepted(&mut self) {
        self.first = None;
    }
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The TraceSession (in -n NAMESPACE).
    pub name: String,
    /// Print what the session recorded before now too, then follow.
    #[arg(long)]
    pub from_start: bool,
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The TraceSession (in -n NAMESPACE).
    pub name: String,
    /// After what was kept, print each new event until the session ends.
    #[arg(short = 'f', long)]
    pub follow: bool,
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// Print only the `profile` probe's stacks, folded (`POD;thread;…;leaf SAMPLES` a line):
    /// a flame graph's input (`inferno-flamegraph`, `flamegraph.pl`).
    #[arg(long, conflicts_with = "output")]
    pub folded: bool,
}

/// What [`attach`] reads and how it prints it.
#[derive(Debug, Clone, Copy)]
pub struct AttachOptions {
    /// Every record kept (else only those recorded from now).
    pub from_start: bool,
    /// Keep reading new records until the session's runs end (else stop after those kept).
    pub follow: bool,
    pub output: Format,
    /// Only the profile probe's stacks, as folded lines (instead of `output`).
    pub folded: bool,
}

/// `attach NAME`: follow from now (or `--from-start`).
pub async fn attach_verb(context: &mut Context, args: AttachArgs) -> Result<(), PluginError> {
    let options = AttachOptions {
        from_start: args.from_start,
        follow: true,
        output: args.output,
        folded: false,
    };
    attach(context, &args.name, options).await
}

/// `logs NAME [-f]`: everything kept, then (with -f) follow.
pub async fn logs(context: &mut Context, args: LogsArgs) -> Result<(), PluginError> {
    let options = AttachOptions {
        from_start: true,
        follow: args.follow,
        output: args.output,
        folded: args.folded,
    };
    attach(context, &args.name, options).await
}

fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("podscope.dev", "v1alpha1", "TraceSession"),
        "tracesessions",
    )
}

/// What `attach` needs of a session's status.
#[derive(Debug, Default, PartialEq)]
struct SessionView {
    token: Option<String>,
    nodes: BTreeSet<String>,
    phase: String,
    message: String,
}

impl SessionView {
    fn of(status: &Value) -> SessionView {
        SessionView {
            token: status["attachToken"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(str::to_string),
            nodes: status["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|entry| entry["node"].as_str().map(str::to_string))
                .collect(),
            phase: status["phase"].as_str().unwrap_or("Pending").to_string(),
            message: status["message"].as_str().unwrap_or("").to_string(),
        }
    }

    fn finished(&self) -> bool {
        matches!(self.phase.as_str(), "Completed" | "Failed")
    }
}

async fn read_status(
    api: &Api<DynamicObject>,
    namespace: &str,
    name: &str,
) -> Result<SessionView, PluginError> {
    let object = api.get(name).await.map_err(|e| {
        PluginError::from_api(
            e,
            "get",
            "tracesessions.podscope.dev",
            Some(namespace),
            &format!("TraceSession {name:?} in namespace {namespace:?}"),
        )
    })?;
    Ok(SessionView::of(
        object.data.get("status").unwrap_or(&Value::Null),
    ))
}

/// Prints the events of TraceSession `name` (in the context's namespace) from every node that
/// ran it, merged by time; follows new ones until every node's run ended when
/// `options.follow`. Waits for a session no agent runs yet when following. Returns at Ctrl-C.
pub async fn attach(
    context: &mut Context,
    name: &str,
    options: AttachOptions,
) -> Result<(), PluginError> {
    let (client, namespace) = context.client().await?;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource());
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut waiting_said = false;
    let (token, nodes) = loop {
        let view = read_status(&api, &namespace, name).await?;
        if let (Some(token), false) = (&view.token, view.nodes.is_empty()) {
            break (token.clone(), view.nodes);
        }
        if view.finished() || !options.follow {
            let message = if view.message.is_empty() {
                String::new()
            } else {
                format!(": {}", view.message)
            };
            return Err(PluginError::TargetNotFound(format!(
                "TraceSession {namespace}/{name} has recorded nothing (phase {}{message})",
                view.phase
            )));
        }
        if !waiting_said {
            eprintln!(
                "waiting for TraceSession {namespace}/{name} to start on a node (phase {})…",
                view.phase
            );
            waiting_said = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(STATUS_POLL) => {}
            _ = &mut interrupted => return Ok(()),
        }
    };
    let (sender, mut items) = mpsc::channel(1024);
    let readers = NodeReader {
        client: context.made_client().cloned(),
        cluster: context.cluster.clone(),
        namespace: namespace.clone(),
        name: name.to_string(),
        token,
        options,
        sender,
        node: String::new(),
    };
    for node in &nodes {
        readers.spawn(node);
    }
    let mut merger = TimeMerger::new(nodes.iter().cloned(), MERGE_LATENESS);
    let mut known_nodes = nodes;
    let mut opened = 0;
    let mut finished = BTreeSet::new();
    let mut table = EventTable::default();
    let mut failure = None;
    let mut poll = tokio::time::interval(STATUS_POLL);
    poll.tick().await;
    loop {
        let deadline = merger
            .next_deadline()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let open = tokio::select! {
            item = items.recv() => match item {
                None => false,
                Some((node, item)) => {
                    match item {
                        NodeItem::Opened => {
                            opened += 1;
                            if opened == known_nodes.len() && options.follow {
                                eprintln!(
                                    "attached to TraceSession {namespace}/{name} on {} node(s); Ctrl-C to stop",
                                    known_nodes.len()
                                );
                            }
                        }
                        NodeItem::Event(event) => merger.push(&node, *event, Instant::now()),
                        NodeItem::Lost { count, reason } => {
                            eprintln!("warning: node {node}: {count} events lost ({reason})")
                        }
                        NodeItem::Reconnecting { reason, after } => eprintln!(
                            "warning: node {node}: {reason}; reading again after sequence {after}"
                        ),
                        NodeItem::Done(result) => {
                            merger.finish(&node);
                            finished.insert(node);
                            if let Err(error) = result {
                                failure.get_or_insert(error);
                            }
                        }
                    }
                    // Every node's reader is done: nothing more comes.
                    finished.len() < known_nodes.len()
                }
            },
            _ = tokio::time::sleep_until(deadline) => true,
            // Following: the session's pods may start on nodes that had none.
            _ = poll.tick(), if options.follow => {
                if let Ok(view) = read_status(&api, &namespace, name).await {
                    for node in view.nodes.difference(&known_nodes.clone()) {
                        merger.add_node(node);
                        readers.spawn(node);
                        known_nodes.insert(node.clone());
                    }
                }
                true
            }
            _ = &mut interrupted => false,
        };
        let ready = merger.release(open);
        let printed = if options.folded {
            output::print_folded(&ready)
        } else {
            output::print_events(&mut table, options.output, &ready)
        };
        if !printed {
            // The reader went away (`| head`): done, not failed.
            return Ok(());
        }
        if !open {
            break;
        }
    }
    failure.map_or(Ok(()), Err)
}

/// What a node's reader tells the printer.
enum NodeItem {
    /// The agent accepted the request (first connection only).
    Opened,
    Event(Box<Event>),
    Lost {
        count: u64,
        reason: String,
    },
    Reconnecting {
        reason: String,
        after: u64,
    },
    /// This node has nothing more (its run ended, or it failed).
    Done(Result<(), PluginError>),
}

/// Reads one node's records, opening the connection again when it is cut while following.
#[derive(Clone)]
struct NodeReader {
    client: Option<Client>,
    cluster: ClusterArgs,
    namespace: String,
    name: String,
    token: String,
    options: AttachOptions,
    sender: mpsc::Sender<(String, NodeItem)>,
    node: String,
}

impl NodeReader {
    /// Starts reading `node` (`self` is the template every node's reader is made from).
    fn spawn(&self, node: &str) {
        let reader = NodeReader {
            node: node.to_string(),
            ..self.clone()
        };
        tokio::spawn(reader.run());
    }

    async fn run(mut self) {
        // The sequence to read from next: 1 from the start, unknown (the agent's "now") else.
        let mut next = self.options.from_start.then_some(1);
        let mut opened = false;
        let mut token_retry = TokenRetry::new(TOKEN_RACE);
        let result = loop {
            let mut accepted = false;
            let result = self.read(&mut next, &mut opened, &mut accepted).await;
            if accepted {
                token_retry.accepted();
            }
            match result {
                Err(error) if token_retry.retry(&error, Instant::now()) => {
                    tokio::time::sleep(TOKEN_RETRY_DELAY).await;
                    self.reread_token().await;
                }
                Err(error @ PluginError::Unreachable { .. }) if self.options.follow && opened => {
                    let item = NodeItem::Reconnecting {
                        reason: error.to_string(),
                        after: next.unwrap_or(1).saturating_sub(1),
                    };
                    if self.send(item).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(RECONNECT_DELAY).await;
                }
                other => break other,
            }
        };
        let _ = self.send(NodeItem::Done(result)).await;
    }

    /// The session's token as its status says now (another agent's claim may have won).
    async fn reread_token(&mut self) {
        let Some(client) = &self.client else {
            return;
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &self.namespace, &resource());
        if let Ok(SessionView {
            token: Some(token), ..
        }) = read_status(&api, &self.namespace, &self.name).await
        {
            self.token = token;
        }
    }

    async fn send(&self, item: NodeItem) -> Result<(), ()> {
        self.sender
            .send((self.node.clone(), item))
            .await
            .map_err(|_| ())
    }

    async fn route(&self) -> Result<Route, PluginError> {
        if let Some(address) = &self.cluster.agent_address {
            return Ok(Route::Direct {
                address: address.clone(),
                node: self.node.clone(),
            });
        }
        let client = self.client.as_ref().ok_or_else(|| {
            PluginError::Other(anyhow::anyhow!(
                "finding an agent pod needs the cluster's API"
            ))
        })?;
        let agent = targets::agent_on_node(
            client,
            &self.cluster.agent_namespace,
            &self.cluster.agent_selector,
            &self.node,
        )
        .await?;
        Ok(Route::PortForward(agent))
    }

    /// One connection: records from `next` until the agent ends the stream.
    /// `accepted`: the agent took the token this time.
    async fn read(
        &self,
        next: &mut Option<u64>,
        opened: &mut bool,
        accepted: &mut bool,
    ) -> Result<(), PluginError> {
        let route = self.route().await?;
        let request = Request::SessionLog {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            token: self.token.clone(),
            from: *next,
            follow: self.options.follow,
        };
        let mut session = Session::open(self.client.as_ref(), &route, request).await?;
        *accepted = true;
        if !*opened {
            *opened = true;
            let _ = self.send(NodeItem::Opened).await;
        }
        while let Some(message) = session.next().await? {
            match message {
                Message::LogStart { sequence } => {
                    next.get_or_insert(sequence);
                }
                Message::Record { sequence, event } => {
                    *next = Some(sequence + 1);
                    if self.send(NodeItem::Event(Box::new(event))).await.is_err() {
                        return Ok(());
                    }
                }
                Message::Lost { count, reason } => {
                    let _ = self.send(NodeItem::Lost { count, reason }).await;
                }
                Message::End {
                    error: Some(error), ..
                } => return Err(PluginError::from_session(&self.node, error)),
                Message::End { .. } => return Ok(()),
                _ => {}
            }
        }
        Err(PluginError::Unreachable {
            agent: format!("on node {}", self.node),
            reason: "the connection closed before the session's end".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn agent_error(code: ErrorCode) -> PluginError {
        PluginError::Agent {
            node: "node-a".into(),
            error: podscope_core::session::SessionError {
                code,
                message: "the attach token given is not the session's".into(),
                protocol: podscope_core::session::PROTOCOL_VERSION,
                agent_version: "0.1.0".into(),
            },
        }
    }

    #[test]
    fn a_forbidden_is_retried_for_the_token_race_then_is_the_answer() {
        let mut retry = TokenRetry::new(Duration::from_secs(10));
        let start = Instant::now();
        let forbidden = agent_error(ErrorCode::Forbidden);
        assert!(retry.retry(&forbidden, start));
        assert!(retry.retry(&forbidden, start + Duration::from_secs(9)));
        assert!(!retry.retry(&forbidden, start + Duration::from_secs(10)));
        // Other errors are never the race.
        assert!(!TokenRetry::new(Duration::from_secs(10))
            .retry(&agent_error(ErrorCode::TargetNotFound), start));
        // Once the token was accepted, a later forbidden has its own time.
        retry.accepted();
        assert!(retry.retry(&forbidden, start + Duration::from_secs(60)));
    }

    #[test]
    fn the_status_gives_the_token_and_the_nodes_that_ran_the_session() {
        let view = SessionView::of(&json!({
            "phase": "Running",
            "attachToken": "00ff",
            "nodes": [{"node": "node-b", "phase": "Running"}, {"node": "node-a", "phase": "Completed"}],
        }));
        assert_eq!(view.token.as_deref(), Some("00ff"));
        assert_eq!(
            view.nodes.into_iter().collect::<Vec<_>>(),
            ["node-a", "node-b"]
        );
        assert!(!SessionView::of(&json!({"phase": "Running"})).finished());
        let pending = SessionView::of(&Value::Null);
        assert_eq!((pending.phase.as_str(), pending.token), ("Pending", None));
        assert!(SessionView::of(&json!({"phase": "Completed"})).finished());
    }
}
