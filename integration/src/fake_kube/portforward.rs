//! `pods/portforward`, as the API server and the kubelet serve it: the request is upgraded to a
//! stream and each forwarded port is connected to that port of the pod (here: the pod's
//! `status.podIP`, or 127.0.0.1 without one, which is where a test's agent listens).
//!
//! Two wire protocols, the ones real clients speak:
//! - a websocket with the `v4.channel.k8s.io` channel protocol (kube-rs' `Api::portforward`):
//!   every binary message starts with a channel byte, port *i* has data channel `2i` and error
//!   channel `2i+1`, the ports come from the `ports` query parameter, and the server's first
//!   message on each channel is the port number (2 bytes, little endian);
//! - SPDY/3.1 streams (kubectl port-forward: carried in a websocket with the
//!   `SPDY/3.1+portforward.k8s.io` subprotocol by default, or as a plain `SPDY/3.1` upgrade with
//!   `KUBECTL_PORT_FORWARD_WEBSOCKETS=false`), see `spdy.rs`.
//!
//! A port that cannot be connected gets the kubelet's kind of message on its error channel.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::StatusDetails;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::{spdy, status_response, HttpResponse, Kind, Shared};

/// kube-rs' websocket channel protocol.
const CHANNEL_PROTOCOL: &str = "v4.channel.k8s.io";
/// kubectl's SPDY carried in a websocket.
const SPDY_TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

/// Answers an upgrade request for `pods/portforward` of pod `namespace/name` (RBAC already
/// checked), and forwards in a task once the client has switched protocols.
pub(super) fn upgrade(
    shared: &Shared,
    cancel: &CancellationToken,
    namespace: &str,
    name: &str,
    request: Request<Incoming>,
    params: &HashMap<String, String>,
) -> HttpResponse {
    let pod = {
        let state = shared.state.lock().expect("fake API state poisoned");
        state
            .objects
            .get(&(Kind::Pod, namespace.to_string(), name.to_string()))
            .cloned()
    };
    let Some(pod) = pod else {
        return status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("pods \"{name}\" not found"),
            Some(StatusDetails {
                name: Some(name.to_string()),
                kind: Some("pods".into()),
                ..StatusDetails::default()
            }),
        );
    };
    if pod["spec"]["nodeName"].as_str().unwrap_or("").is_empty() {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("pod {name} does not have a host assigned"),
            None,
        );
    }
    let pod = PodAddress::of(&pod);
    let headers = request.headers();
    let header_text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let upgrade = header_text(header::UPGRADE).to_ascii_lowercase();
    let offered: Vec<String> = header_text(header::SEC_WEBSOCKET_PROTOCOL)
        .split(',')
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    let cancel = cancel.clone();
    if upgrade == "websocket" {
        let key = header_text(header::SEC_WEBSOCKET_KEY);
        let protocol = if offered.iter().any(|p| p == CHANNEL_PROTOCOL) {
            CHANNEL_PROTOCOL
        } else if offered.iter().any(|p| p == SPDY_TUNNEL_PROTOCOL) {
            SPDY_TUNNEL_PROTOCOL
        } else {
            return status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!(
                    "unable to upgrade connection: none of the offered subprotocols {offered:?} is served ({CHANNEL_PROTOCOL}, {SPDY_TUNNEL_PROTOCOL})"
                ),
                None,
            );
        };
        let ports = if protocol == CHANNEL_PROTOCOL {
            match query_ports(params) {
                Ok(ports) => ports,
                Err(message) => {
                    return status_response(StatusCode::BAD_REQUEST, "BadRequest", &message, None)
                }
            }
        } else {
            Vec::new()
        };
        tokio::spawn(async move {
            let Ok(upgraded) = hyper::upgrade::on(request).await else {
                return;
            };
            let socket =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            if protocol == CHANNEL_PROTOCOL {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = forward_channels(socket, pod, ports) => {}
                }
            } else {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = spdy::serve(spdy::websocket_bytes(socket), pod) => {}
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header(
                header::SEC_WEBSOCKET_ACCEPT,
                derive_accept_key(key.as_bytes()),
            )
            .header(header::SEC_WEBSOCKET_PROTOCOL, protocol)
            .body(axum::body::Body::empty())
            .expect("upgrade response");
    }
    if upgrade == "spdy/3.1" {
        tokio::spawn(async move {
            let Ok(upgraded) = hyper::upgrade::on(request).await else {
                return;
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = spdy::serve(spdy::stream_bytes(TokioIo::new(upgraded)), pod) => {}
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "SPDY/3.1")
            .header("X-Stream-Protocol-Version", "portforward.k8s.io")
            .body(axum::body::Body::empty())
            .expect("upgrade response");
    }
    status_response(
        StatusCode::BAD_REQUEST,
        "BadRequest",
        "Upgrade request required",
        None,
    )
}

/// Where a pod's ports are reached, and what the kubelet's errors name it by.
#[derive(Clone)]
pub(super) struct PodAddress {
    pub name: String,
    pub uid: String,
    pub ip: IpAddr,
}

impl PodAddress {
    fn of(pod: &Value) -> PodAddress {
        PodAddress {
            name: pod["metadata"]["name"].as_str().unwrap_or("").to_string(),
            uid: pod["metadata"]["uid"].as_str().unwrap_or("").to_string(),
            ip: pod["status"]["podIP"]
                .as_str()
                .and_then(|ip| ip.parse().ok())
                .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        }
    }

    /// Connects to `port` of the pod, or says why not as the kubelet does.
    pub async fn connect(&self, port: u16) -> Result<TcpStream, String> {
        TcpStream::connect(SocketAddr::new(self.ip, port))
            .await
            .map_err(|e| {
                format!(
                    "error forwarding port {port} to pod {}, uid {}: failed to connect to localhost:{port} inside the pod's network namespace: {e}",
                    self.name, self.uid
                )
            })
    }
}

/// `ports=7070,8080` (and repeated `ports` parameters, which the query map has joined).
fn query_ports(params: &HashMap<String, String>) -> Result<Vec<u16>, String> {
    let text = params.get("ports").map(String::as_str).unwrap_or("");
    if text.is_empty() {
        return Err("query parameter \"ports\" is required".into());
    }
    text.split(',')
        .map(|port| {
            port.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("invalid port {port:?}: ports must be 1-65535"))
        })
        .collect()
}

/// The channel protocol: one data and one error channel per port over one websocket.
async fn forward_channels<S>(socket: WebSocketStream<S>, pod: PodAddress, ports: Vec<u16>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut incoming) = socket.split();
    // Everything the pod's ports send, as ready websocket messages.
    let (to_client, mut outgoing) = mpsc::channel::<WsMessage>(64);
    let mut writers: HashMap<u8, tokio::net::tcp::OwnedWriteHalf> = HashMap::new();
    for (index, port) in ports.iter().copied().enumerate() {
        let data = (2 * index) as u8;
        let error = data + 1;
        for channel in [data, error] {
            let mut first = vec![channel];
            first.extend_from_slice(&port.to_le_bytes());
            if sink.send(WsMessage::binary(first)).await.is_err() {
                return;
            }
        }
        match pod.connect(port).await {
            Ok(stream) => {
                let (mut reader, writer) = stream.into_split();
                writers.insert(data, writer);
                let to_client = to_client.clone();
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 32 * 1024];
                    loop {
                        match reader.read(&mut buffer[1..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(read) => {
                                buffer[0] = data;
                                let message =
                                    WsMessage::binary(Bytes::copy_from_slice(&buffer[..=read]));
                                if to_client.send(message).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    // The pod closed the port: so does the connection, as the kubelet's does.
                    let _ = to_client.send(WsMessage::Close(None)).await;
                });
            }
            Err(message) => {
                // As the kubelet: the port's error channel says why; the connection stays until
                // the client closes it (what it sends for that port goes nowhere).
                let mut frame = vec![error];
                frame.extend_from_slice(message.as_bytes());
                if sink.send(WsMessage::binary(frame)).await.is_err() {
                    return;
                }
            }
        }
    }
    drop(to_client);
    // Until the client closes, or every reachable port has closed (none reachable: only the
    // client ends it).
    let mut pod_side_open = !writers.is_empty();
    loop {
        tokio::select! {
            message = outgoing.recv(), if pod_side_open => match message {
                Some(message) => {
                    let closing = message.is_close();
                    if sink.send(message).await.is_err() || closing {
                        return;
                    }
                }
                None => pod_side_open = false,
            },
            message = incoming.next() => match message {
                Some(Ok(WsMessage::Binary(bytes))) if !bytes.is_empty() => {
                    if let Some(writer) = writers.get_mut(&bytes[0]) {
                        if writer.write_all(&bytes[1..]).await.is_err() {
                            writers.remove(&bytes[0]);
                        }
                    }
                }
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => {
                    // The client went away: close our side of every port.
                    for (_, mut writer) in writers.drain() {
                        let _ = writer.shutdown().await;
                    }
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
}
