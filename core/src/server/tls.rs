//! `tls:` of a server endpoint, in the Collector's `configtls` shape: `cert_file`, `key_file`,
//! and `client_ca_file` to require and verify client certificates (mutual TLS).
//!
//! [`TlsListener`] accepts TCP connections and runs each TLS handshake in its own task, so a
//! client that stalls its handshake holds neither the accept loop nor other clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::FieldError;

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
}

/// How long a client gets to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const ACCEPTED_BACKLOG: usize = 64;

impl ServerTlsSettings {
    /// Checks the required settings; `prefix` is their key path (`…tls`). The files are read
    /// when the server starts (so an example config loads anywhere), with errors naming them.
    pub fn validate(&self, prefix: &str, errors: &mut Vec<FieldError>) {
        for (key, path) in [("cert_file", &self.cert_file), ("key_file", &self.key_file)] {
            if path.as_os_str().is_empty() {
                errors.push(FieldError::new(format!("{prefix}.{key}"), "is required"));
            }
        }
    }

    /// The rustls server configuration, offering `alpn` protocols (`h2` for gRPC). Errors name
    /// the setting (`where_` is its key path, e.g. `receivers.otlp.protocols.grpc.tls`) and file.
    pub fn server_config(
        &self,
        where_: &str,
        alpn: &[&[u8]],
    ) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let certs = read_certificates(&self.cert_file)
            .map_err(|e| anyhow::anyhow!("{where_}.cert_file: {e}"))?;
        let key = PrivateKeyDer::from_pem_file(&self.key_file).map_err(|e| {
            anyhow::anyhow!(
                "{where_}.key_file: {}: no usable PEM private key ({e})",
                self.key_file.display()
            )
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("{where_}: {e}"))?;
        let builder = match &self.client_ca_file {
            Some(ca_file) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certificates(ca_file)
                    .map_err(|e| anyhow::anyhow!("{where_}.client_ca_file: {e}"))?
                {
                    roots.add(cert).map_err(|e| {
                        anyhow::anyhow!("{where_}.client_ca_file: {}: {e}", ca_file.display())
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| {
                            anyhow::anyhow!("{where_}.client_ca_file: {}: {e}", ca_file.display())
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            anyhow::anyhow!(
                "{where_}: {} and {} do not make a usable certificate and key: {e}",
                self.cert_file.display(),
                self.key_file.display()
            )
        })?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: cannot read PEM certificates ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// TLS connections from a TCP listener, handshaken in the background. Serve it with
/// `axum::serve` (it is an `axum::serve::Listener`) or hand [`TlsListener::into_stream`] to a
/// tonic server.
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (tx, accepted) = mpsc::channel(ACCEPTED_BACKLOG);
        let acceptor = TlsAcceptor::from(config);
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
                let (acceptor, handshaken) = (acceptor.clone(), tx.clone());
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
