//! The `otlp` receiver: OTLP over gRPC (default `0.0.0.0:4317`) and HTTP (default
//! `0.0.0.0:4318`, `/v1/metrics` and `/v1/traces`, protobuf or JSON, gzip accepted).
//!
//! Each request becomes one batch, handed to the pipelines that list this receiver; the request is
//! acknowledged only once they accepted it. A pipeline that refuses for now (a full queue) makes
//! the client retry (UNAVAILABLE / 503 with `Retry-After`; above the `memory_limiter`'s soft
//! limit RESOURCE_EXHAUSTED with `RetryInfo` / 429 with `Retry-After`); data that can never be accepted and
//! malformed payloads get INVALID_ARGUMENT / 400. A signal no pipeline takes is UNIMPLEMENTED /
//! 404. Nothing is dropped silently. Every signal goes through the same code, with the signal's
//! OTLP wire format from `podscope_core::otlp`.
//!
//! Each protocol may have `tls:` (with client certificates) and `auth:` (bearer token, basic
//! auth): a call without valid credentials gets UNAUTHENTICATED / 401 with `WWW-Authenticate`.
//!
//! Shutdown stops accepting connections and answers requests still being received with
//! UNAVAILABLE / 503, so that a stalled client cannot hold the agent's shutdown; requests already
//! received are finished and answered.

mod config;
mod grpc;
mod http;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use async_trait::async_trait;
use podscope_core::component::create_receiver;
use podscope_core::server::{
    AuthSettings, Authenticator, ServerTls, ServerTlsSettings, TlsListener,
};
use podscope_core::telemetry::AgentTelemetry;
use podscope_core::{
    BuildContext, Component, Receiver, ReceiverBuilder, ReceiverConsumers, ReceiverFactory, Signal,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{GrpcSettings, HttpSettings, OtlpReceiverConfig, Protocols};

pub const FACTORY: ReceiverFactory = ReceiverFactory {
    type_name: "otlp",
    description:
        "Receives OTLP metrics, traces, logs and profiles over gRPC and HTTP (protobuf or JSON)",
    signals: &[
        Signal::Metrics,
        Signal::Traces,
        Signal::Profiles,
        Signal::Logs,
    ],
    create: create_receiver::<OtlpReceiverConfig>,
};

impl ReceiverBuilder for OtlpReceiverConfig {
    fn build(
        self: Box<Self>,
        ctx: BuildContext,
        next: ReceiverConsumers,
    ) -> anyhow::Result<Box<dyn Receiver>> {
        Ok(Box::new(OtlpReceiver::new(*self, &ctx, next)))
    }
}

/// Where the listeners actually are (useful with port 0).
#[derive(Debug, Clone, Copy, Default)]
pub struct BoundAddresses {
    pub grpc: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
}

pub struct OtlpReceiver {
    id: String,
    config: OtlpReceiverConfig,
    next: ReceiverConsumers,
    stop: CancellationToken,
    tasks: tokio::sync::Mutex<Vec<JoinHandle<()>>>,
    bound: Mutex<BoundAddresses>,
    /// Where TLS reloads are counted.
    telemetry: AgentTelemetry,
}

impl OtlpReceiver {
    /// The receiver with its concrete type, for callers that want [`Self::bound_addresses`].
    pub fn new(config: OtlpReceiverConfig, ctx: &BuildContext, next: ReceiverConsumers) -> Self {
        OtlpReceiver {
            id: ctx.id.to_string(),
            config,
            next,
            stop: CancellationToken::new(),
            tasks: tokio::sync::Mutex::new(Vec::new()),
            bound: Mutex::new(BoundAddresses::default()),
            telemetry: ctx.telemetry.clone(),
        }
    }

    /// Where the listeners are, once started.
    pub fn bound_addresses(&self) -> BoundAddresses {
        *self.bound.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A protocol's TLS and authenticator, when set.
type Protection = (Option<ServerTls>, Option<Arc<Authenticator>>);

/// A protocol's TLS and authenticator, loaded now so that a bad file stops the start with its
/// setting and path named.
fn protection(
    telemetry: &AgentTelemetry,
    id: &str,
    protocol: &str,
    tls: Option<&ServerTlsSettings>,
    auth: Option<&AuthSettings>,
) -> anyhow::Result<Protection> {
    let prefix = format!("receivers.{id}.protocols.{protocol}");
    // gRPC needs HTTP/2; the HTTP server speaks HTTP/1.1.
    let alpn: &[&[u8]] = if protocol == "grpc" {
        &[b"h2"]
    } else {
        &[b"http/1.1"]
    };
    let tls = tls
        .map(|tls| tls.load(&format!("{prefix}.tls"), alpn, telemetry))
        .transpose()?;
    let auth = auth
        .map(|auth| Authenticator::new(auth, &format!("{prefix}.auth")).map(Arc::new))
        .transpose()?;
    Ok((tls, auth))
}

async fn bind(id: &str, protocol: &str, endpoint: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(endpoint).await.with_context(|| {
        format!("receivers.{id}.protocols.{protocol}.endpoint: cannot listen on {endpoint}")
    })
}

#[async_trait]
impl Component for OtlpReceiver {
    async fn start(&self) -> anyhow::Result<()> {
        let mut tasks = self.tasks.lock().await;
        if let Some(settings) = &self.config.protocols.grpc {
            let (tls, auth) = protection(
                &self.telemetry,
                &self.id,
                "grpc",
                settings.tls.as_ref(),
                settings.auth.as_ref(),
            )?;
            let listener = bind(&self.id, "grpc", &settings.endpoint).await?;
            let address = listener.local_addr()?;
            self.bound.lock().unwrap_or_else(|e| e.into_inner()).grpc = Some(address);
            let max = settings.max_recv_msg_size_mib * 1024 * 1024;
            let routes = grpc::routes(&self.next, max, &self.stop, auth);
            let server = tonic::transport::Server::builder().add_routes(routes);
            let stop = self.stop.clone();
            let id = self.id.clone();
            let secured = tls.is_some();
            tasks.push(tokio::spawn(async move {
                let served = match tls {
                    Some(tls) => {
                        let incoming = TlsListener::new(listener, tls).map(TlsListener::into_stream);
                        match incoming {
                            Ok(incoming) => {
                                server
                                    .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                                    .await
                            }
                            Err(e) => {
                                tracing::error!(receiver = %id, error = %e, "OTLP/gRPC TLS listener failed");
                                return;
                            }
                        }
                    }
                    None => {
                        let incoming = tonic::transport::server::TcpIncoming::from(listener);
                        server
                            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                            .await
                    }
                };
                if let Err(e) = served {
                    tracing::error!(receiver = %id, error = %e, "OTLP/gRPC server stopped");
                }
            }));
            tracing::info!(receiver = %self.id, %address, tls = secured, "OTLP/gRPC listening");
        }
        if let Some(settings) = &self.config.protocols.http {
            let (tls, auth) = protection(
                &self.telemetry,
                &self.id,
                "http",
                settings.tls.as_ref(),
                settings.auth.as_ref(),
            )?;
            let listener = bind(&self.id, "http", &settings.endpoint).await?;
            let address = listener.local_addr()?;
            self.bound.lock().unwrap_or_else(|e| e.into_inner()).http = Some(address);
            let app = http::router(&self.next, settings.max_request_body_size, &self.stop, auth);
            let stop = self.stop.clone();
            let id = self.id.clone();
            let secured = tls.is_some();
            tasks.push(tokio::spawn(async move {
                let served = match tls {
                    Some(tls) => match TlsListener::new(listener, tls) {
                        Ok(listener) => {
                            axum::serve(listener, app)
                                .with_graceful_shutdown(stop.cancelled_owned())
                                .await
                        }
                        Err(e) => Err(e),
                    },
                    None => {
                        axum::serve(listener, app)
                            .with_graceful_shutdown(stop.cancelled_owned())
                            .await
                    }
                };
                if let Err(e) = served {
                    tracing::error!(receiver = %id, error = %e, "OTLP/HTTP server stopped");
                }
            }));
            tracing::info!(receiver = %self.id, %address, tls = secured, "OTLP/HTTP listening");
        }
        Ok(())
    }

    /// Stops accepting connections and requests, and returns once in-flight requests have been
    /// answered (those still sending their body are refused with UNAVAILABLE / 503).
    async fn shutdown(&self) -> anyhow::Result<()> {
        self.stop.cancel();
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock().await);
        for task in tasks {
            task.await?;
        }
        Ok(())
    }
}

impl Receiver for OtlpReceiver {}
