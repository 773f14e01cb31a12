//! `tls:` — the TLS settings every network exporter shares (gRPC and HTTP), with their checks.

use std::path::PathBuf;

use podscope_core::FieldError;
use serde::Deserialize;

/// `tls:` — TLS to the backend (rustls).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// Plain text, no TLS (gRPC only; for otlphttp the `http://` scheme says it). Default false.
    pub insecure: bool,
    /// PEM CA bundle to verify the server with (default: the system's roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Server name to verify instead of the endpoint's host.
    pub server_name_override: Option<String>,
    /// Accept any server certificate (testing only: it defeats TLS; the server must still hold
    /// the key of the certificate it shows).
    pub insecure_skip_verify: bool,
}

impl TlsSettings {
    pub fn validate(&self, errors: &mut Vec<FieldError>) {
        if self.cert_file.is_some() != self.key_file.is_some() {
            errors.push(FieldError::new(
                "tls",
                "cert_file and key_file go together (mutual TLS)",
            ));
        }
        for (key, path) in [
            ("tls.ca_file", &self.ca_file),
            ("tls.cert_file", &self.cert_file),
            ("tls.key_file", &self.key_file),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    errors.push(FieldError::new(
                        key,
                        format!("{} is not a readable file", path.display()),
                    ));
                }
            }
        }
    }
}
