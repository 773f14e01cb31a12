//! The agent's own endpoint at `service.telemetry.metrics.address`: `/metrics` (Prometheus /
//! OpenMetrics text of the agent's metrics), `/healthz` (the process is up) and `/readyz` (every
//! pipeline started and no component is waiting, e.g. for Kubernetes metadata).

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use podscope_core::health::Readiness;
use podscope_core::telemetry::AgentTelemetry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct Endpoints {
    telemetry: AgentTelemetry,
    readiness: Readiness,
}

/// A running telemetry listener.
pub struct TelemetryServer {
    local_addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl TelemetryServer {
    /// Binds `address` and serves until [`TelemetryServer::stop`].
    pub async fn start(
        address: &str,
        telemetry: AgentTelemetry,
        readiness: Readiness,
    ) -> anyhow::Result<TelemetryServer> {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| {
                format!("service.telemetry.metrics.address: cannot listen on {address}")
            })?;
        let local_addr = listener.local_addr()?;
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(ready))
            .with_state(Endpoints {
                telemetry,
                readiness,
            });
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "telemetry endpoint stopped");
                }
            }
        });
        tracing::info!(address = %local_addr, "agent telemetry at /metrics, /healthz, /readyz");
        Ok(TelemetryServer {
            local_addr,
            stop,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn metrics(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        endpoints.telemetry.encode_text(),
    )
}

async fn ready(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    match endpoints.readiness.check() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(reasons) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{reasons}\n"),
        ),
    }
}
