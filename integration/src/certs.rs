//! Certificates for TLS tests, made fresh per test with rcgen: a CA, a server certificate for
//! `localhost` and `127.0.0.1`, and a client certificate, all signed by the CA, written as PEM
//! files in a directory the test owns.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

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
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(sans).expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.signed_by(&key, issuer).expect("sign");
            let (cert_file, key_file) = files(name);
            std::fs::write(&cert_file, cert.pem()).expect("write cert");
            std::fs::write(&key_file, key.serialize_pem()).expect("write key");
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
        }
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
