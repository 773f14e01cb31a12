//! The `otlp` receiver: OTLP over gRPC (default `0.0.0.0:4317`) and HTTP (default
//! `0.0.0.0:4318`, `/v1/metrics` and `/v1/traces`, protobuf or JSON, gzip accepted).
//!
//! Each request becomes one batch, handed to the pipelines that list this receiver; the request is
//! acknowledged only once they accepted it. A pipeline that refuses for now (a full queue) makes
//! the client retry (UNAVAILABLE / 503 with `Retry-After`); data that can never be accepted and
//! malformed payloads get INVALID_ARGUMENT / 400. A signal no pipeline takes is UNIMPLEMENTED /
//! 404. Nothing is dropped silently. Every signal goes through the same code, with the signal's
//! OTLP wire format from `podscope_core::otlp`.
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
use std::sync::Mutex;

use anyhow::Context as _;
use async_trait::async_trait;
use podscope_core::component::create_receiver;
use podscope_core::{
    BuildContext, Component, Receiver, ReceiverBuilder, ReceiverConsumers, ReceiverFactory, Signal,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{GrpcSettings, HttpSettings, OtlpReceiverConfig, Protocols};

pub const FACTORY: ReceiverFactory = ReceiverFactory {
    type_name: "otlp",
    description: "Receives OTLP metrics, traces and profiles over gRPC and HTTP (protobuf or JSON)",
    signals: &[Signal::Metrics, Signal::Traces, Signal::Profiles],
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
        }
    }

    /// Where the listeners are, once started.
    pub fn bound_addresses(&self) -> BoundAddresses {
        *self.bound.lock().unwrap_or_else(|e| e.into_inner())
    }
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
            let listener = bind(&self.id, "grpc", &settings.endpoint).await?;
            let address = listener.local_addr()?;
            self.bound.lock().unwrap_or_else(|e| e.into_inner()).grpc = Some(address);
            let max = settings.max_recv_msg_size_mib * 1024 * 1024;
            let routes = grpc::routes(&self.next, max, &self.stop);
            let server = tonic::transport::Server::builder().add_routes(routes);
            let stop = self.stop.clone();
            let id = self.id.clone();
            tasks.push(tokio::spawn(async move {
                let incoming = tonic::transport::server::TcpIncoming::from(listener);
                if let Err(e) = server
                    .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                    .await
                {
                    tracing::error!(receiver = %id, error = %e, "OTLP/gRPC server stopped");
                }
            }));
            tracing::info!(receiver = %self.id, %address, "OTLP/gRPC listening");
        }
        if let Some(settings) = &self.config.protocols.http {
            let listener = bind(&self.id, "http", &settings.endpoint).await?;
            let address = listener.local_addr()?;
            self.bound.lock().unwrap_or_else(|e| e.into_inner()).http = Some(address);
            let app = http::router(&self.next, settings.max_request_body_size, &self.stop);
            let stop = self.stop.clone();
            let id = self.id.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                {
                    tracing::error!(receiver = %id, error = %e, "OTLP/HTTP server stopped");
                }
            }));
            tracing::info!(receiver = %self.id, %address, "OTLP/HTTP listening");
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
