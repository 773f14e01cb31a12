//! How the fake API server admits a pod's service account, as a cluster does: HTTPS with a
//! certificate from a throw-away CA (which the pod trusts through its mounted `ca.crt`), the
//! account's bearer token (401 without it), and the cluster's RBAC objects deciding each request
//! (403 with the real server's message otherwise). Every request for a resource is logged with
//! what was decided, so a test can compare what a client asked with what RBAC grants.
//!
//! RBAC as Kubernetes applies it, for what the fake serves (core and podscope.dev): ClusterRoles
//! bound by ClusterRoleBindings grant cluster-wide; Roles, or ClusterRoles, bound by a RoleBinding
//! grant in its namespace; rules match on API group, resource (with its subresource, as
//! `ebpfprograms/status`) and verb, `*` matching any. A rule
//! with `resourceNames` is treated as granting nothing: no client here needs one.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde::Serialize;
use serde_json::Value;

/// A pod's service account, and the cluster's RBAC objects that decide what it may read.
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
    /// ClusterRole, ClusterRoleBinding, Role and RoleBinding objects as JSON (others are
    /// ignored), as a chart renders them.
    pub rbac: Vec<Value>,
}

/// A verb on a resource in a scope (`cluster` or a namespace), as RBAC grants it and a request
/// uses it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Grant {
    pub verb: String,
    pub resource: String,
    pub scope: String,
}

/// One request for a resource and what the server answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiRequest {
    /// `get`, `list`, `watch`, `create` or `patch`.
    pub verb: String,
    /// The API group ("" for the core group).
    pub group: String,
    /// The resource, with its subresource (`ebpfprograms/status`).
    pub resource: String,
    /// `cluster`, or the namespace of the path.
    pub scope: String,
    /// The object's name for a `get`.
    pub name: Option<String>,
    pub field_selector: Option<String>,
    pub label_selector: Option<String>,
    /// The HTTP status of the answer (401, 403 and the rest as served).
    pub status: u16,
}

impl ApiRequest {
    /// The namespace of the path; `None` cluster-wide.
    pub fn namespace(&self) -> Option<&str> {
        (self.scope != "cluster").then_some(self.scope.as_str())
    }
}

/// What the RBAC objects grant one service account.
pub struct Rbac {
    user: String,
    /// Rules and where they apply: `None` cluster-wide, else in that namespace.
    rules: Vec<(Option<String>, PolicyRule)>,
}

impl Rbac {
    pub fn for_account(account: &ServiceAccount) -> Result<Rbac, String> {
        let parse = |object: &Value| -> Result<Option<Parsed>, String> {
            let kind = object["kind"].as_str().unwrap_or_default();
            let typed = |e: serde_json::Error| format!("{kind}: {e}");
            Ok(Some(match kind {
                "ClusterRole" => {
                    Parsed::ClusterRole(serde_json::from_value(object.clone()).map_err(typed)?)
                }
                "Role" => Parsed::Role(serde_json::from_value(object.clone()).map_err(typed)?),
                "ClusterRoleBinding" => Parsed::ClusterRoleBinding(
                    serde_json::from_value(object.clone()).map_err(typed)?,
                ),
                "RoleBinding" => {
                    Parsed::RoleBinding(serde_json::from_value(object.clone()).map_err(typed)?)
                }
                _ => return Ok(None),
            }))
        };
        let objects = account
            .rbac
            .iter()
            .filter_map(|o| parse(o).transpose())
            .collect::<Result<Vec<_>, String>>()?;
        let binds_account = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
            subjects.iter().flatten().any(|s| {
                s.kind == "ServiceAccount"
                    && s.name == account.name
                    && s.namespace.as_deref() == Some(&account.namespace)
            })
        };
        let cluster_role = |name: &str| {
            objects.iter().find_map(|o| match o {
                Parsed::ClusterRole(role) if role.metadata.name.as_deref() == Some(name) => {
                    Some(role.rules.clone().unwrap_or_default())
                }
                _ => None,
            })
        };
        let role = |namespace: &str, name: &str| {
            objects.iter().find_map(|o| match o {
                Parsed::Role(role)
                    if role.metadata.name.as_deref() == Some(name)
                        && role.metadata.namespace.as_deref() == Some(namespace) =>
                {
                    Some(role.rules.clone().unwrap_or_default())
                }
                _ => None,
            })
        };
        let mut rules = Vec::new();
        for object in &objects {
            match object {
                Parsed::ClusterRoleBinding(binding)
                    if binds_account(&binding.subjects)
                        && binding.role_ref.kind == "ClusterRole" =>
                {
                    for rule in cluster_role(&binding.role_ref.name).unwrap_or_default() {
                        rules.push((None, rule));
                    }
                }
                Parsed::RoleBinding(binding) if binds_account(&binding.subjects) => {
                    let namespace = binding.metadata.namespace.clone().unwrap_or_default();
                    let granted = match binding.role_ref.kind.as_str() {
                        "Role" => role(&namespace, &binding.role_ref.name),
                        _ => cluster_role(&binding.role_ref.name),
                    };
                    for rule in granted.unwrap_or_default() {
                        rules.push((Some(namespace.clone()), rule));
                    }
                }
                _ => {}
            }
        }
        Ok(Rbac {
            user: format!(
                "system:serviceaccount:{}:{}",
                account.namespace, account.name
            ),
            rules,
        })
    }

    /// Whether `verb` on `resource` of API group `group` in `namespace` (`None`:
    /// cluster-wide) is allowed.
    pub fn allows(&self, group: &str, verb: &str, resource: &str, namespace: Option<&str>) -> bool {
        let any_or = |list: &Option<Vec<String>>, want: &str| {
            list.iter()
                .flatten()
                .any(|item| item == "*" || item == want)
        };
        self.rules.iter().any(|(scope, rule)| {
            (scope.is_none() || scope.as_deref() == namespace)
                && rule
                    .api_groups
                    .iter()
                    .flatten()
                    .any(|g| g == group || g == "*")
                && any_or(&rule.resources, resource)
                && rule.verbs.iter().any(|v| v == "*" || v == verb)
                && rule.resource_names.as_ref().is_none_or(Vec::is_empty)
        })
    }

    /// Every (verb, resource, scope) the rules grant, `*` kept as written.
    pub fn grants(&self) -> BTreeSet<Grant> {
        let mut grants = BTreeSet::new();
        for (scope, rule) in &self.rules {
            for verb in &rule.verbs {
                for resource in rule.resources.iter().flatten() {
                    grants.insert(Grant {
                        verb: verb.clone(),
                        resource: resource.clone(),
                        scope: scope.clone().unwrap_or_else(|| "cluster".to_string()),
                    });
                }
            }
        }
        grants
    }

    /// The message of the real server's 403 for `request`.
    pub fn forbidden(&self, request: &ApiRequest) -> String {
        let what = match &request.name {
            Some(name) => format!("{} \"{name}\"", request.resource),
            None => request.resource.clone(),
        };
        let scope = match request.namespace() {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_string(),
        };
        format!(
            "{what} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
            self.user, request.verb, request.resource, request.group
        )
    }
}

enum Parsed {
    ClusterRole(ClusterRole),
    Role(Role),
    ClusterRoleBinding(ClusterRoleBinding),
    RoleBinding(RoleBinding),
}

/// What a server admitting one service account holds: its token, its TLS identity, its RBAC.
pub(super) struct Access {
    pub token: String,
    pub namespace: String,
    pub rbac: Rbac,
    pub ca_pem: String,
    pub tls: tokio_rustls::TlsAcceptor,
}

impl Access {
    pub fn new(account: &ServiceAccount) -> Result<Access, String> {
        let rbac = Rbac::for_account(account)?;
        let (ca_pem, tls) = tls_identity().map_err(|e| format!("TLS identity: {e}"))?;
        Ok(Access {
            token: random_token().map_err(|e| format!("token: {e}"))?,
            namespace: account.namespace.clone(),
            rbac,
            ca_pem,
            tls,
        })
    }

    /// What the kubelet mounts at `/var/run/secrets/kubernetes.io/serviceaccount`.
    pub fn write_files(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("token"), &self.token)?;
        std::fs::write(dir.join("ca.crt"), &self.ca_pem)?;
        std::fs::write(dir.join("namespace"), &self.namespace)
    }
}

/// A CA and a certificate for 127.0.0.1 signed by it (a client refuses a CA certificate as the
/// server's own): the CA in PEM, for the client, and an acceptor serving HTTP/1.1.
fn tls_identity() -> Result<(String, tokio_rustls::TlsAcceptor), Box<dyn std::error::Error>> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "podscope-test-ca");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(vec!["127.0.0.1".to_string()])?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "kubernetes");
    let server_cert = server_params.signed_by(&server_key, &issuer)?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![server_cert.der().clone()], key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((
        ca_cert.pem(),
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    ))
}

/// 32 hex characters from the kernel's random source.
fn random_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
