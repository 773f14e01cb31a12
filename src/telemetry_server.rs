//! The agent telemetry listener: `/metrics`, `/healthz`, `/readyz`.
