//! `tls.insecure_skip_verify` for the gRPC exporter: TLS whose server certificate is not checked
//! against any CA or name (the handshake's signatures still are). tonic's own TLS has no such
//! switch, so the channel gets a connector that does TLS itself; tonic is given the endpoint as
//! `http://` so that it does not try to add its own TLS on top.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Accepts any server certificate; checks that the server holds its key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS connector for tonic's `connect_with_connector_lazy`.
#[derive(Clone)]
pub struct SkipVerifyConnector {
    tls: tokio_rustls::TlsConnector,
    /// The name sent in SNI (`server_name_override`, else the endpoint's host).
    server_name: Option<String>,
}

impl SkipVerifyConnector {
    /// With a client certificate (`cert_file` / `key_file`, PEM) for servers that require one.
    pub fn new(
        client_identity: Option<(Vec<u8>, Vec<u8>)>,
        server_name: Option<String>,
    ) -> anyhow::Result<SkipVerifyConnector> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)));
        let mut config = match client_identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let certs = pem_certificates(&cert)?;
                let key = PrivateKeyDer::from_pem_slice(&key)
                    .map_err(|e| anyhow::anyhow!("tls.key_file: {e}"))?;
                builder.with_client_auth_cert(certs, key)?
            }
        };
        // gRPC is HTTP/2: say so in ALPN, as servers that serve both expect.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(SkipVerifyConnector {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

fn pem_certificates(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("tls.cert_file: {e}"))
}

impl tower::Service<http::Uri> for SkipVerifyConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        let name = self.server_name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or("endpoint without a host")?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let name = ServerName::try_from(name.unwrap_or(host))?;
            let stream = tls.connect(name, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}
