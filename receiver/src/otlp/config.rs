use podscope_core::server::{AuthSettings, ServerTlsSettings};
use podscope_core::{ComponentConfig, FieldError};
use serde::{Deserialize, Deserializer};

/// `receivers: otlp:` settings, in the Collector's shape.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpReceiverConfig {
    /// Which protocols to serve. A protocol is on when its key is present, even empty
    /// (`grpc:`), and at least one must be.
    pub protocols: Protocols,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Protocols {
    #[serde(deserialize_with = "present_means_on")]
    pub grpc: Option<GrpcSettings>,
    #[serde(deserialize_with = "present_means_on")]
    pub http: Option<HttpSettings>,
}

/// `protocols.grpc:`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcSettings {
    /// host:port to listen on. Default `0.0.0.0:4317`.
    pub endpoint: String,
    /// Largest request accepted, in MiB. Default 4.
    pub max_recv_msg_size_mib: usize,
    /// TLS (`cert_file`, `key_file`, `client_ca_file` for client certificates). Default: plain.
    pub tls: Option<ServerTlsSettings>,
    /// Bearer token and/or basic auth every call must carry. Default: none.
    pub auth: Option<AuthSettings>,
}

impl Default for GrpcSettings {
    fn default() -> Self {
        GrpcSettings {
            endpoint: "0.0.0.0:4317".to_string(),
            max_recv_msg_size_mib: 4,
            tls: None,
            auth: None,
        }
    }
}

/// `protocols.http:` — `POST /v1/metrics` and `/v1/traces`, protobuf or JSON, gzip accepted.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// host:port to listen on. Default `0.0.0.0:4318`.
    pub endpoint: String,
    /// Largest request body accepted, in bytes, after decompression. Default 20971520 (20 MiB).
    pub max_request_body_size: usize,
    /// TLS (`cert_file`, `key_file`, `client_ca_file` for client certificates). Default: plain.
    pub tls: Option<ServerTlsSettings>,
    /// Bearer token and/or basic auth every request must carry. Default: none.
    pub auth: Option<AuthSettings>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            endpoint: "0.0.0.0:4318".to_string(),
            max_request_body_size: 20 * 1024 * 1024,
            tls: None,
            auth: None,
        }
    }
}

/// `grpc:` with nothing after it means "on, with defaults", as in the Collector.
fn present_means_on<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Some(
        Option::<T>::deserialize(deserializer)?.unwrap_or_default(),
    ))
}

fn check_protection(
    protocol: &str,
    tls: Option<&ServerTlsSettings>,
    auth: Option<&AuthSettings>,
    errors: &mut Vec<FieldError>,
) {
    if let Some(tls) = tls {
        tls.validate(&format!("protocols.{protocol}.tls"), errors);
    }
    if let Some(auth) = auth {
        auth.validate(&format!("protocols.{protocol}.auth"), errors);
    }
}

fn check_endpoint(path: &str, endpoint: &str, errors: &mut Vec<FieldError>) {
    let port_ok = endpoint
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !port_ok {
        errors.push(FieldError::new(
            path,
            format!("{endpoint:?} is not host:port (e.g. 0.0.0.0:4317)"),
        ));
    }
}

impl ComponentConfig for OtlpReceiverConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.protocols.grpc.is_none() && self.protocols.http.is_none() {
            errors.push(FieldError::new(
                "protocols",
                "enable at least one protocol: protocols.grpc and/or protocols.http",
            ));
        }
        if let Some(grpc) = &self.protocols.grpc {
            check_endpoint("protocols.grpc.endpoint", &grpc.endpoint, &mut errors);
            if grpc.max_recv_msg_size_mib == 0 {
                errors.push(FieldError::new(
                    "protocols.grpc.max_recv_msg_size_mib",
                    "must be at least 1",
                ));
            }
            check_protection("grpc", grpc.tls.as_ref(), grpc.auth.as_ref(), &mut errors);
        }
        if let Some(http) = &self.protocols.http {
            check_endpoint("protocols.http.endpoint", &http.endpoint, &mut errors);
            if http.max_request_body_size == 0 {
                errors.push(FieldError::new(
                    "protocols.http.max_request_body_size",
                    "must be at least 1",
                ));
            }
            check_protection("http", http.tls.as_ref(), http.auth.as_ref(), &mut errors);
        }
        errors
    }
}
