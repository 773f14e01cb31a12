//! `tls:` of a server endpoint, in the Collector's `configtls` shape: `cert_file`, `key_file`,
//! `client_ca_file` to require and verify client certificates (mutual TLS), and
//! `reload_interval` to pick up rotated files without a restart.
//!
//! [`TlsListener`] accepts TCP connections and runs each TLS handshake in its own task, so a
//! client that stalls its handshake holds neither the accept loop nor other clients.
//!
//! Reloading rebuilds the whole rustls configuration from the files (certificate, key and client
//! CA alike) and swaps it in for the handshakes that follow; a connection keeps the
//! configuration it was handshaken with. A new configuration that cannot be built leaves the
//! current one in force: a rotation gone wrong never takes the endpoint down.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::{Deserialize, Deserializer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::FieldError;
use crate::telemetry::{AgentTelemetry, EndpointLabels};

/// `tls:` of a server endpoint.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTlsSettings {
    /// PEM certificate chain the server presents (leaf first). Required.
    pub cert_file: PathBuf,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1). Required.
    pub key_file: PathBuf,
    /// PEM CA bundle: when set, every client must present a certificate signed by one of these
    /// (mutual TLS); connections without one fail the handshake.
    pub client_ca_file: Option<PathBuf>,
    /// How often to look at the three files again: when their contents changed and make a
    /// usable configuration, new handshakes use it. Default: never (read once, at start).
    #[serde(deserialize_with = "positive_duration")]
    pub reload_interval: Option<Duration>,
}

/// How long a client gets to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const ACCEPTED_BACKLOG: usize = 64;

/// A humantime duration (`30s`, `1h`), refusing a negative one with a message saying so
/// (humantime's own would only point at the `-`).
fn positive_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    use serde::de::Error as _;
    let Some(text) = Option::<String>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let text = text.trim();
    if text.starts_with('-') {
        return Err(D::Error::custom(format!(
            "{text:?} is negative: give a duration greater than 0, such as 1h or 10m"
        )));
    }
    humantime_serde::re::humantime::parse_duration(text)
        .map(Some)
        .map_err(|e| {
            D::Error::custom(format!(
                "{text:?} is not a duration such as 1h or 10m ({e})"
            ))
        })
}

/// The bytes of the files a server's TLS is made from, as read at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TlsFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl ServerTlsSettings {
    /// Checks the required settings; `prefix` is their key path (`…tls`). The files are read
    /// when the server starts (so an example config loads anywhere), with errors naming them.
    pub fn validate(&self, prefix: &str, errors: &mut Vec<FieldError>) {
        for (key, path) in [("cert_file", &self.cert_file), ("key_file", &self.key_file)] {
            if path.as_os_str().is_empty() {
                errors.push(FieldError::new(format!("{prefix}.{key}"), "is required"));
            }
        }
        if let Some(interval) = self.reload_interval {
            if interval.is_zero() {
                errors.push(FieldError::new(
                    format!("{prefix}.reload_interval"),
                    "must be greater than 0 (leave it out to never reload)",
                ));
            }
            if self.cert_file.as_os_str().is_empty() || self.key_file.as_os_str().is_empty() {
                errors.push(FieldError::new(
                    format!("{prefix}.reload_interval"),
                    "reloads cert_file and key_file: set both",
                ));
            }
        }
    }

    /// Reads the files and builds the server's TLS, offering `alpn` protocols (`h2` for gRPC).
    /// Errors name the setting (`where_` is its key path, e.g.
    /// `receivers.otlp.protocols.grpc.tls`) and the file. With `reload_interval`, the
    /// [`TlsListener`] serving it looks at the files again at that interval; its reloads and
    /// failed reloads are counted in `telemetry` under the endpoint's key path.
    pub fn load(
        &self,
        where_: &str,
        alpn: &[&[u8]],
        telemetry: &AgentTelemetry,
    ) -> anyhow::Result<ServerTls> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let files = self.read_files(where_).map_err(anyhow::Error::msg)?;
        let config = self
            .build(&files, where_, &alpn)
            .map_err(anyhow::Error::msg)?;
        let reloader = self.reload_interval.map(|interval| {
            let labels = EndpointLabels {
                endpoint: where_.trim_end_matches(".tls").to_string(),
            };
            CertificateReloader {
                settings: self.clone(),
                where_: where_.to_string(),
                alpn,
                interval,
                seen: Ok(files),
                reloads: telemetry.server_tls_reloads.get_or_create(&labels).clone(),
                failures: telemetry
                    .server_tls_reload_failures
                    .get_or_create(&labels)
                    .clone(),
            }
        });
        Ok(ServerTls {
            current: Arc::new(RwLock::new(config)),
            reloader,
        })
    }

    fn read_files(&self, where_: &str) -> Result<TlsFiles, String> {
        let read = |key: &str, path: &Path, what: &str| {
            std::fs::read(path).map_err(|e| {
                format!(
                    "{where_}.{key}: {}: cannot read {what} ({e})",
                    path.display()
                )
            })
        };
        Ok(TlsFiles {
            cert: read("cert_file", &self.cert_file, "PEM certificates")?,
            key: read("key_file", &self.key_file, "the PEM private key")?,
            client_ca: match &self.client_ca_file {
                Some(path) => Some(read("client_ca_file", path, "PEM certificates")?),
                None => None,
            },
        })
    }

    /// The rustls configuration `files` make, or why they make none.
    fn build(
        &self,
        files: &TlsFiles,
        where_: &str,
        alpn: &[Vec<u8>],
    ) -> Result<Arc<rustls::ServerConfig>, String> {
        let certs = parse_certificates(&files.cert, &self.cert_file)
            .map_err(|e| format!("{where_}.cert_file: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| {
            format!(
                "{where_}.key_file: {}: no usable PEM private key ({e})",
                self.key_file.display()
            )
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("{where_}: {e}"))?;
        let builder = match (&self.client_ca_file, &files.client_ca) {
            (Some(ca_file), Some(ca)) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in parse_certificates(ca, ca_file)
                    .map_err(|e| format!("{where_}.client_ca_file: {e}"))?
                {
                    roots.add(cert).map_err(|e| {
                        format!("{where_}.client_ca_file: {}: {e}", ca_file.display())
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| {
                            format!("{where_}.client_ca_file: {}: {e}", ca_file.display())
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        // rustls checks here that the key is the certificate's.
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            format!(
                "{where_}: {} and {} do not make a usable certificate and key: {e}",
                self.cert_file.display(),
                self.key_file.display()
            )
        })?;
        config.alpn_protocols = alpn.to_vec();
        Ok(Arc::new(config))
    }
}

fn parse_certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: cannot read PEM certificates ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// A server's TLS as loaded: the configuration new handshakes use, and with `reload_interval`
/// what replaces it when the files change. Serve it with a [`TlsListener`].
pub struct ServerTls {
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
    reloader: Option<CertificateReloader>,
}

/// What the files looked like at the last check: their bytes, or why they could not be read.
type Observation = Result<TlsFiles, String>;

/// Looks at an endpoint's TLS files every `reload_interval` and builds a new configuration when
/// their contents changed. Comparing contents (a few kilobytes) rather than modification times
/// catches every rotation: a Kubernetes Secret volume swaps a symlink, `cp` rewrites in place,
/// and two writes can share a timestamp.
struct CertificateReloader {
    settings: ServerTlsSettings,
    where_: String,
    alpn: Vec<Vec<u8>>,
    interval: Duration,
    /// The files as last judged (loaded, or counted as a failure), so a change is acted on once.
    seen: Observation,
    reloads: Counter,
    failures: Counter,
}

impl CertificateReloader {
    async fn run(mut self, current: Arc<RwLock<Arc<rustls::ServerConfig>>>) {
        let start = tokio::time::Instant::now() + self.interval;
        let mut ticks = tokio::time::interval_at(start, self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let where_ = self.where_.clone();
        loop {
            ticks.tick().await;
            // A few small reads, but blocking ones (a slow volume): off the async workers.
            let checked = tokio::task::spawn_blocking(move || {
                let config = self.check();
                (self, config)
            })
            .await;
            let Ok((reloader, config)) = checked else {
                tracing::error!(tls = %where_, "the TLS certificate check panicked; certificates are no longer reloaded");
                return;
            };
            self = reloader;
            if let Some(config) = config {
                *current.write().unwrap_or_else(|e| e.into_inner()) = config;
            }
        }
    }

    /// One look at the files: the new configuration when they changed and make one. A change
    /// that makes none is logged with the setting and file and counted, once per change; the
    /// current configuration stays in force.
    fn check(&mut self) -> Option<Arc<rustls::ServerConfig>> {
        let observed = self.settings.read_files(&self.where_);
        if observed == self.seen {
            return None;
        }
        let built = observed
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|files| self.settings.build(files, &self.where_, &self.alpn));
        match built {
            Ok(config) => {
                self.seen = observed;
                self.reloads.inc();
                tracing::info!(tls = %self.where_, "reloaded the TLS certificate: new connections get the new one");
                Some(config)
            }
            Err(error) => {
                // Caught between the writes of a rotation (the certificate replaced, its key not
                // yet): the files read differently a moment later. Judge them at the next tick.
                if self.settings.read_files(&self.where_) != observed {
                    return None;
                }
                self.seen = observed;
                self.failures.inc();
                tracing::error!(tls = %self.where_, %error, "cannot reload the TLS certificate; new connections keep the previous one");
                None
            }
        }
    }
}

/// TLS connections from a TCP listener, handshaken in the background. Serve it with
/// `axum::serve` (it is an `axum::serve::Listener`) or hand [`TlsListener::into_stream`] to a
/// tonic server.
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
    accept_loop: tokio::task::JoinHandle<()>,
    /// Looks at the files every `reload_interval`, when set.
    reload_loop: Option<tokio::task::JoinHandle<()>>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, tls: ServerTls) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (tx, accepted) = mpsc::channel(ACCEPTED_BACKLOG);
        let ServerTls { current, reloader } = tls;
        let reload_loop = reloader.map(|reloader| tokio::spawn(reloader.run(current.clone())));
        let accept_loop = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors and the like: wait a little rather than spin.
                        tracing::warn!(%local_addr, error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // The configuration of the moment: a reload applies from the next handshake on.
                let config = current.read().unwrap_or_else(|e| e.into_inner()).clone();
                let (acceptor, handshaken) = (TlsAcceptor::from(config), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = handshaken.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, %local_addr, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, %local_addr, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    break;
                }
            }
        });
        Ok(TlsListener {
            accepted,
            local_addr,
            accept_loop,
            reload_loop,
        })
    }

    /// The connections as a stream, for `tonic`'s `serve_with_incoming_shutdown`.
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> {
        futures::stream::unfold(self, |mut listener| async move {
            let (tls, _) = listener.accepted.recv().await?;
            Some((Ok(tls), listener))
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_loop.abort();
        if let Some(reload_loop) = &self.reload_loop {
            reload_loop.abort();
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept loop ended: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(json: serde_json::Value) -> Result<ServerTlsSettings, String> {
        serde_path_to_error::deserialize(json).map_err(|e| format!("{}: {}", e.path(), e.inner()))
    }

    fn errors_of(settings: &ServerTlsSettings) -> Vec<String> {
        let mut errors = Vec::new();
        settings.validate("tls", &mut errors);
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn reload_interval_is_a_positive_duration_and_unset_by_default() {
        let plain = settings(serde_json::json!({"cert_file": "c.pem", "key_file": "k.pem"}));
        assert_eq!(plain.unwrap().reload_interval, None);
        let hourly = settings(serde_json::json!({
            "cert_file": "c.pem", "key_file": "k.pem", "reload_interval": "1h 30m"
        }))
        .unwrap();
        assert_eq!(hourly.reload_interval, Some(Duration::from_secs(5400)));
        assert!(errors_of(&hourly).is_empty());

        let negative = settings(serde_json::json!({
            "cert_file": "c.pem", "key_file": "k.pem", "reload_interval": "-5m"
        }));
        assert_eq!(
            negative.unwrap_err(),
            "reload_interval: \"-5m\" is negative: give a duration greater than 0, such as 1h or 10m"
        );
        let garbage = settings(serde_json::json!({
            "cert_file": "c.pem", "key_file": "k.pem", "reload_interval": "often"
        }));
        assert!(
            garbage
                .as_ref()
                .unwrap_err()
                .starts_with("reload_interval: \"often\" is not a duration such as 1h or 10m"),
            "{garbage:?}"
        );

        let zero = settings(serde_json::json!({
            "cert_file": "c.pem", "key_file": "k.pem", "reload_interval": "0s"
        }))
        .unwrap();
        assert_eq!(
            errors_of(&zero),
            ["tls.reload_interval: must be greater than 0 (leave it out to never reload)"]
        );
    }

    #[test]
    fn reload_interval_without_the_certificate_files_is_refused() {
        let alone = settings(serde_json::json!({"reload_interval": "10m"})).unwrap();
        assert_eq!(
            errors_of(&alone),
            [
                "tls.cert_file: is required",
                "tls.key_file: is required",
                "tls.reload_interval: reloads cert_file and key_file: set both",
            ]
        );
    }
}
