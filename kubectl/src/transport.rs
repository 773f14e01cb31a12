//! The byte stream to an agent's session endpoint and one session over it: a port-forward into
//! the agent pod through the API server (what a user has), or a direct TCP connection
//! (`--agent-address`). One connection per node; the protocol is `podscope_core::session`.

use k8s_openapi::api::core::v1::Pod;
use kube::api::Portforwarder;
use kube::{Api, Client};
use podscope_core::session::{
    read_line, write_line, Hello, Message, ReadError, Request, Welcome, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

use crate::error::{mismatch_message, PluginError};
use crate::targets::AgentPod;

/// How one agent is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `--agent-address HOST:PORT`; `node` is what the user's target resolved to (the agent
    /// names its own node in its welcome).
    Direct {
        address: String,
        node: String,
    },
    PortForward(AgentPod),
}

impl Route {
    /// The node this route serves, as resolved (before the agent's welcome).
    pub fn node(&self) -> &str {
        match self {
            Route::Direct { node, .. } => node,
            Route::PortForward(agent) => &agent.node,
        }
    }

    fn describe(&self) -> String {
        match self {
            Route::Direct { address, .. } => format!("at {address}"),
            Route::PortForward(agent) => format!(
                "pod {}/{} (port-forward to port {})",
                agent.namespace, agent.pod, agent.port
            ),
        }
    }
}

trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

type Stream = Box<dyn ByteStream>;

/// One open session: the agent accepted the request and streams its messages.
pub struct Session {
    /// The agent's own node name, from its welcome.
    pub node: String,
    /// The node as the route was resolved from the API (unique per session of one command).
    pub route_node: String,
    reader: BufReader<ReadHalf<Stream>>,
    // Kept so the stream stays open both ways until the session is dropped: closing our half
    // tells the agent to stop.
    _writer: WriteHalf<Stream>,
    _forwarder: Option<Portforwarder>,
    buffer: Vec<u8>,
    agent: String,
}

impl Session {
    /// Connects along `route`, says hello with `request` and reads the agent's welcome.
    pub async fn open(
        client: Option<&Client>,
        route: &Route,
        request: Request,
    ) -> Result<Session, PluginError> {
        let agent = route.describe();
        let (stream, mut forwarder) = connect(client, route).await?;
        let (read, mut writer) = tokio::io::split(stream);
        let mut reader = BufReader::new(read);
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            client_version: env!("CARGO_PKG_VERSION").to_string(),
            request,
        };
        let unreachable = |reason: String| PluginError::Unreachable {
            agent: agent.clone(),
            reason,
        };
        // Through a port-forward, a port that cannot be reached is said on the port's error
        // channel (the stream itself may stay open): watched while the welcome is awaited.
        let port_error = forwarder
            .as_mut()
            .and_then(|f| f.take_error(route_port(route)));
        let port_error = async move {
            match port_error {
                Some(error) => match error.await {
                    Some(message) => message,
                    // The channel ended without an error: only the stream can say more.
                    None => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        let mut buffer = Vec::new();
        let exchange = async {
            write_line(&mut writer, &hello)
                .await
                .map_err(|e| unreachable(format!("sending the request: {e}")))?;
            Ok::<_, PluginError>(read_line::<_, Welcome>(&mut reader, &mut buffer).await)
        };
        let welcome = tokio::select! {
            result = exchange => result?,
            message = port_error => return Err(unreachable(message)),
        };
        let welcome = match welcome {
            Ok(Some(welcome)) => welcome,
            Ok(None) | Err(ReadError::Io(_)) => {
                return Err(unreachable(
                    "the connection closed before the agent answered (is its session extension enabled? chart value session.enabled)".into(),
                ));
            }
            Err(ReadError::Json(error)) => {
                // A welcome this build cannot read comes from an agent of another protocol.
                return Err(PluginError::ProtocolMismatch(format!(
                    "{} (its first line was not a welcome this plugin understands: {error})",
                    mismatch_message(route.node(), 0, "of unknown version")
                )));
            }
            Err(error) => return Err(unreachable(error.to_string())),
        };
        match welcome {
            Welcome::Refused(error) => Err(PluginError::from_session(route.node(), error)),
            Welcome::Accepted {
                protocol,
                agent_version,
                node,
            } => {
                if protocol != PROTOCOL_VERSION {
                    return Err(PluginError::ProtocolMismatch(mismatch_message(
                        &node,
                        protocol,
                        &agent_version,
                    )));
                }
                Ok(Session {
                    node,
                    route_node: route.node().to_string(),
                    reader,
                    _writer: writer,
                    _forwarder: forwarder,
                    buffer,
                    agent,
                })
            }
        }
    }

    /// The next message; `None` when the agent closed the stream.
    pub async fn next(&mut self) -> Result<Option<Message>, PluginError> {
        read_line(&mut self.reader, &mut self.buffer)
            .await
            .map_err(|e| PluginError::Unreachable {
                agent: self.agent.clone(),
                reason: format!("the session broke: {e}"),
            })
    }
}

fn route_port(route: &Route) -> u16 {
    match route {
        Route::PortForward(agent) => agent.port,
        Route::Direct { .. } => 0,
    }
}

async fn connect(
    client: Option<&Client>,
    route: &Route,
) -> Result<(Stream, Option<Portforwarder>), PluginError> {
    match route {
        Route::Direct { address, .. } => {
            let stream = tokio::net::TcpStream::connect(address.as_str())
                .await
                .map_err(|e| PluginError::Unreachable {
                    agent: route.describe(),
                    reason: e.to_string(),
                })?;
            Ok((Box::new(stream), None))
        }
        Route::PortForward(agent) => {
            let client = client.ok_or_else(|| {
                PluginError::Other(anyhow::anyhow!("a port-forward needs the cluster's API"))
            })?;
            let pods: Api<Pod> = Api::namespaced(client.clone(), &agent.namespace);
            let mut forwarder = pods
                .portforward(&agent.pod, &[agent.port])
                .await
                .map_err(|e| {
                    PluginError::from_api(
                        e,
                        "create",
                        "pods/portforward",
                        Some(&agent.namespace),
                        &format!("agent pod {}/{}", agent.namespace, agent.pod),
                    )
                })?;
            let stream = forwarder.take_stream(agent.port).ok_or_else(|| {
                PluginError::Other(anyhow::anyhow!("the port-forward has no stream"))
            })?;
            Ok((Box::new(stream), Some(forwarder)))
        }
    }
}

/// A message from one node's session, or how that session failed.
pub type NodeMessage = (String, Result<Message, PluginError>);

/// Opens one session per route, concurrently, and streams every message into one channel
/// tagged with the route's node; a route's stream ends with its last message (or its error).
/// Errors opening any session are returned before anything streams, so a command fails whole.
pub async fn open_all(
    client: Option<&Client>,
    routes: Vec<Route>,
    request: impl Fn(&Route) -> Request,
) -> Result<(Vec<Session>, Vec<String>), PluginError> {
    let opening = routes
        .iter()
        .map(|route| Session::open(client, route, request(route)));
    let results = futures::future::join_all(opening).await;
    let mut sessions = Vec::new();
    for result in results {
        sessions.push(result?);
    }
    let nodes = routes.iter().map(|r| r.node().to_string()).collect();
    Ok((sessions, nodes))
}

/// Streams every session's messages into one channel, each tagged with its route's node.
pub fn stream_all(sessions: Vec<Session>) -> mpsc::Receiver<NodeMessage> {
    let (sender, receiver) = mpsc::channel(1024);
    for mut session in sessions {
        let sender = sender.clone();
        tokio::spawn(async move {
            loop {
                let next = session.next().await;
                let done = !matches!(next, Ok(Some(_)));
                let item = match next {
                    Ok(Some(message)) => Ok(message),
                    Ok(None) => break,
                    Err(error) => Err(error),
                };
                if sender
                    .send((session.route_node.clone(), item))
                    .await
                    .is_err()
                    || done
                {
                    break;
                }
            }
        });
    }
    receiver
}
