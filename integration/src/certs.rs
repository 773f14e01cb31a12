//! Certificates for TLS tests, made fresh per test with rcgen: a CA, a server certificate for
//! `localhost` and `127.0.0.1`, and a client certificate, all signed by the CA, written as PEM
//! files in a directory the test owns. For certificate rotation: more server certificates from
//! the same CA ([`TestPki::server_pair`]), a Secret-volume-like directory whose pair is replaced
//! in one rename ([`SecretVolume`]), and TLS clients that tell which certificate a server
//! presents ([`presented_certificate`], [`KeptHttpsConnection`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// PEM files of a test PKI.
pub struct TestPki {
    pub ca_file: PathBuf,
    pub server_cert_file: PathBuf,
    pub server_key_file: PathBuf,
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    /// A client certificate from another CA, which the server must refuse.
    pub stranger_cert_file: PathBuf,
    pub stranger_key_file: PathBuf,
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl TestPki {
    /// Generates the PKI into `dir`.
    pub fn generate(dir: &Path) -> TestPki {
        let (ca_pem, issuer) = ca("podscope-test-ca");
        let (_, stranger_issuer) = ca("some-other-ca");
        let files = |name: &str| {
            (
                dir.join(format!("{name}.pem")),
                dir.join(format!("{name}.key")),
            )
        };
        let write = |name: &str, sans: Vec<String>, issuer: &Issuer<'_, KeyPair>| {
            let (cert_file, key_file) = files(name);
            issue(name, sans, issuer, &cert_file, &key_file);
            (cert_file, key_file)
        };
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca_pem).expect("write CA");
        let (server_cert_file, server_key_file) = write(
            "server",
            vec!["localhost".to_string(), "127.0.0.1".to_string()],
            &issuer,
        );
        let (client_cert_file, client_key_file) =
            write("client", vec!["client".to_string()], &issuer);
        let (stranger_cert_file, stranger_key_file) =
            write("stranger", vec!["stranger".to_string()], &stranger_issuer);
        TestPki {
            ca_file,
            server_cert_file,
            server_key_file,
            client_cert_file,
            client_key_file,
            stranger_cert_file,
            stranger_key_file,
            dir: dir.to_path_buf(),
            issuer,
        }
    }

    /// Another server certificate for `localhost` and `127.0.0.1` from the same CA, with a
    /// key of its own, written as `<name>.pem` and `<name>.key` beside the others.
    pub fn server_pair(&self, name: &str) -> (PathBuf, PathBuf) {
        let cert_file = self.dir.join(format!("{name}.pem"));
        let key_file = self.dir.join(format!("{name}.key"));
        issue(
            name,
            vec!["localhost".to_string(), "127.0.0.1".to_string()],
            &self.issuer,
            &cert_file,
            &key_file,
        );
        (cert_file, key_file)
    }
}

fn issue(
    name: &str,
    sans: Vec<String>,
    issuer: &Issuer<'_, KeyPair>,
    cert_file: &Path,
    key_file: &Path,
) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(sans).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.signed_by(&key, issuer).expect("sign");
    std::fs::write(cert_file, cert.pem()).expect("write cert");
    std::fs::write(key_file, key.serialize_pem()).expect("write key");
}

/// The DER of the first certificate in a PEM file (a server's leaf).
pub fn leaf_certificate(pem_file: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(pem_file)
        .expect("readable PEM")
        .next()
        .expect("a certificate")
        .expect("a valid PEM certificate")
        .to_vec()
}

/// A certificate and key laid out as the kubelet lays out a Secret volume: `tls.crt` and
/// `tls.key` are symlinks into `..data`, itself a symlink to the current folder, so
/// [`SecretVolume::replace`] swaps both files in one rename, as a Secret update does.
pub struct SecretVolume {
    dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    /// The volume in `dir` (created), holding `cert` and `key` (PEM bytes).
    pub fn new(dir: &Path, cert: &[u8], key: &[u8]) -> SecretVolume {
        std::fs::create_dir_all(dir).expect("volume directory");
        let mut volume = SecretVolume {
            dir: dir.to_path_buf(),
            generation: 0,
        };
        volume.replace(cert, key);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name))
                .expect("file symlink");
        }
        volume
    }

    pub fn cert_file(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.join("tls.key")
    }

    /// Replaces both files at once: a new folder, then `..data` renamed to point at it.
    pub fn replace(&mut self, cert: &[u8], key: &[u8]) {
        self.generation += 1;
        let folder = format!("..generation_{}", self.generation);
        std::fs::create_dir(self.dir.join(&folder)).expect("generation folder");
        std::fs::write(self.dir.join(&folder).join("tls.crt"), cert).expect("write cert");
        std::fs::write(self.dir.join(&folder).join("tls.key"), key).expect("write key");
        let staged = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&folder, &staged).expect("staged symlink");
        std::fs::rename(&staged, self.dir.join("..data")).expect("swap ..data");
    }
}

/// What a certificate-rotation test starts from: a PKI whose server pair (A) is in a
/// [`SecretVolume`], and a second server pair (B) from the same CA to rotate to.
pub struct CertificateRotation {
    pub pki: TestPki,
    pub volume: SecretVolume,
    /// The leaf certificates (DER) of A and B, as a client sees them.
    pub a: Vec<u8>,
    pub b: Vec<u8>,
    pub b_cert_file: PathBuf,
    pub b_key_file: PathBuf,
}

impl CertificateRotation {
    /// Generates it all in `dir`; the volume is `dir/secret`.
    pub fn new(dir: &Path) -> CertificateRotation {
        let pki = TestPki::generate(dir);
        let (b_cert_file, b_key_file) = pki.server_pair("server-b");
        let read = |path: &Path| std::fs::read(path).expect("PEM file");
        let volume = SecretVolume::new(
            &dir.join("secret"),
            &read(&pki.server_cert_file),
            &read(&pki.server_key_file),
        );
        CertificateRotation {
            a: leaf_certificate(&pki.server_cert_file),
            b: leaf_certificate(&b_cert_file),
            pki,
            volume,
            b_cert_file,
            b_key_file,
        }
    }

    /// Puts pair B in the volume.
    pub fn rotate_to_b(&mut self) {
        let read = |path: &Path| std::fs::read(path).expect("PEM file");
        self.volume
            .replace(&read(&self.b_cert_file), &read(&self.b_key_file));
    }
}

/// A client certificate and its key (PEM files).
pub type ClientIdentity<'a> = (&'a Path, &'a Path);

/// A rustls client trusting `ca_file`, offering `alpn`, presenting `identity` when given.
fn client(ca_file: &Path, alpn: &[u8], identity: Option<ClientIdentity<'_>>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).expect("CA file") {
        roots
            .add(cert.expect("CA certificate"))
            .expect("CA accepted");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert_file, key_file)) => {
            let chain = CertificateDer::pem_file_iter(cert_file)
                .expect("client certificate file")
                .collect::<Result<Vec<_>, _>>()
                .expect("client certificate");
            let key = PrivateKeyDer::from_pem_file(key_file).expect("client key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client identity")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(config))
}

async fn handshake(
    addr: SocketAddr,
    ca_file: &Path,
    alpn: &[u8],
    identity: Option<ClientIdentity<'_>>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    client(ca_file, alpn, identity).connect(name, tcp).await
}

fn peer_leaf(tls: &TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server presented a certificate")
        .to_vec()
}

/// The certificate (DER) the TLS server at `addr` presents to a new connection, verified
/// against `ca_file` for the name `localhost`, with `alpn` offered (`h2` for gRPC).
pub async fn presented_certificate(
    addr: SocketAddr,
    ca_file: &Path,
    alpn: &[u8],
) -> std::io::Result<Vec<u8>> {
    let tls = handshake(addr, ca_file, alpn, None).await?;
    Ok(peer_leaf(&tls))
}

/// One HTTPS connection kept open for several HTTP/1.1 requests, to tell that a connection
/// outlives a change on the server (it never reconnects).
pub struct KeptHttpsConnection {
    tls: TlsStream<TcpStream>,
    /// The certificate the server presented when the connection was made (DER).
    pub certificate: Vec<u8>,
}

impl KeptHttpsConnection {
    pub async fn open(addr: SocketAddr, ca_file: &Path) -> std::io::Result<Self> {
        Self::open_as(addr, ca_file, None).await
    }

    /// The same, presenting a client certificate. With TLS 1.3 a server refuses the certificate
    /// after the client's handshake is done: the refusal shows at the first request.
    pub async fn open_as(
        addr: SocketAddr,
        ca_file: &Path,
        identity: Option<ClientIdentity<'_>>,
    ) -> std::io::Result<Self> {
        let tls = handshake(addr, ca_file, b"http/1.1", identity).await?;
        let certificate = peer_leaf(&tls);
        Ok(KeptHttpsConnection { tls, certificate })
    }

    /// Sends a request on this connection and returns the response's status and body; the
    /// response must have a `content-length` (axum's do for bodies it knows the size of).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        self.tls.write_all(head.as_bytes()).await?;
        self.tls.write_all(body).await?;
        self.tls.flush().await?;
        let mut received = Vec::new();
        let head_end = loop {
            if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = self.tls.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::other("connection closed before a response"));
            }
            received.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&received[..head_end]).to_lowercase();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no status line: {head}")))?;
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no content-length: {head}")))?;
        let mut body = received[head_end..].to_vec();
        while body.len() < length {
            let mut chunk = [0u8; 4096];
            let n = self.tls.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::other("connection closed mid-body"));
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(length);
        Ok((status, body))
    }
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("self-signed CA");
    (cert.pem(), Issuer::new(params, key))
}
