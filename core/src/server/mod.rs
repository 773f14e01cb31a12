//! What every network endpoint the agent serves shares (the `otlp` receiver's gRPC and HTTP
//! servers, the `prometheus` exporter's scrape endpoint): TLS with optional client certificates
//! ([`tls`]), and bearer-token or basic authentication ([`auth`]).
//!
//! The settings and their checks live here; each server applies them in its own protocol's
//! terms (an HTTP 401 with `WWW-Authenticate`, a gRPC UNAUTHENTICATED status).

pub mod auth;
pub mod tls;

pub use auth::{AuthSettings, Authenticator, Unauthorized};
pub use tls::{ServerTls, ServerTlsSettings, TlsListener};
