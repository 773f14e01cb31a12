//! What can go wrong, said so a user knows what to do, and the exit code of each (documented in
//! `--help` and docs/kubectl.md; scripts rely on them).

use podscope_core::session::{ErrorCode, SessionError, PROTOCOL_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    TargetNotFound(String),
    #[error(
        "no podscope agent runs on node {node}: no running pod labelled {selector} in namespace \
         {namespace} (is the chart installed there, does its DaemonSet tolerate the node? \
         --agent-namespace and --agent-selector say where to look)"
    )]
    NoAgent {
        node: String,
        namespace: String,
        selector: String,
    },
    #[error(
        "RBAC denied: you may not {verb} {resource}{scope}. The API server said: {message}\n{hint}"
    )]
    Forbidden {
        verb: String,
        resource: String,
        scope: String,
        message: String,
        /// Which of the chart's roles grants it.
        hint: &'static str,
    },
    #[error("{0}")]
    ProtocolMismatch(String),
    /// The agent on `node` refused the request or ended it with an error.
    #[error("agent on node {node}: {}", .error.message)]
    Agent { node: String, error: SessionError },
    #[error("cannot reach the podscope agent {agent}: {reason}")]
    Unreachable { agent: String, reason: String },
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl PluginError {
    /// The process exit code: one per kind of failure, so scripts can tell them apart.
    pub fn exit_code(&self) -> i32 {
        match self {
            PluginError::Other(_) => 1,
            PluginError::Usage(_) => 2,
            PluginError::TargetNotFound(_) => 3,
            PluginError::NoAgent { .. } => 4,
            PluginError::Forbidden { .. } => 5,
            PluginError::ProtocolMismatch(_) => 6,
            PluginError::Agent { error, .. } => match error.code {
                ErrorCode::ProtocolMismatch => 6,
                ErrorCode::TargetNotFound => 3,
                ErrorCode::ProbeUnavailable => 7,
                ErrorCode::BpftraceDisabled => 8,
                ErrorCode::Busy => 9,
                ErrorCode::Forbidden => 5,
                ErrorCode::BadRequest | ErrorCode::Internal => 11,
            },
            PluginError::Unreachable { .. } => 10,
        }
    }

    /// A failed request to the API server, for `verb` on `resource` (`pods`, `pods/portforward`,
    /// `deployments.apps`) in `namespace` (`None`: cluster-wide); `what` names the object for a
    /// 404 (`deployment "web" in namespace "shop"`).
    pub fn from_api(
        error: kube::Error,
        verb: &str,
        resource: &str,
        namespace: Option<&str>,
        what: &str,
    ) -> PluginError {
        let scope = match namespace {
            Some(namespace) => format!(" in namespace {namespace}"),
            None => " at the cluster scope".to_string(),
        };
        match error {
            kube::Error::Api(status) if status.code == 403 => {
                // The real server names the verb and resource it refused; ours are what we asked.
                let (verb, resource) = refused_verb_and_resource(&status.message)
                    .unwrap_or_else(|| (verb.to_string(), resource.to_string()));
                // TraceSessions and Probes are the namespace's own objects, not the agents'.
                let hint = if resource.starts_with("tracesessions") {
                    "The chart's ClusterRole podscope-tracesession-editor, bound with a RoleBinding \
                     in the namespace, grants what sessions need (docs/kubectl.md, \"Trace sessions\")."
                } else if resource.starts_with("probes") {
                    "The chart's ClusterRole podscope-probe-editor (aggregated into admin and edit) \
                     grants writing Probes in a namespace (docs/programs.md, \"RBAC\")."
                } else {
                    "The chart's ClusterRole podscope-kubectl grants what the plugin needs (docs/kubectl.md)."
                };
                PluginError::Forbidden {
                    verb,
                    resource,
                    scope,
                    message: status.message.clone(),
                    hint,
                }
            }
            kube::Error::Api(status) if status.code == 404 => {
                PluginError::TargetNotFound(format!("{what} not found"))
            }
            kube::Error::Api(status) if status.code == 401 => PluginError::Other(anyhow::anyhow!(
                "the API server refused your credentials (401 {}): log in again or check --kubeconfig/--context",
                status.message
            )),
            other => PluginError::Other(anyhow::anyhow!(
                "{verb} {resource}{scope} for {what}: {other}"
            )),
        }
    }

    /// An agent's refusal or error. A protocol mismatch says which side to upgrade.
    pub fn from_session(node: &str, error: SessionError) -> PluginError {
        if error.code == ErrorCode::ProtocolMismatch {
            return PluginError::ProtocolMismatch(mismatch_message(
                node,
                error.protocol,
                &error.agent_version,
            ));
        }
        PluginError::Agent {
            node: node.to_string(),
            error,
        }
    }
}

/// Which side to upgrade when the plugin and an agent speak different protocol versions.
pub fn mismatch_message(node: &str, agent_protocol: u32, agent_version: &str) -> String {
    let plugin_version = env!("CARGO_PKG_VERSION");
    let upgrade = if agent_protocol > PROTOCOL_VERSION {
        "upgrade kubectl-podscope"
    } else {
        "upgrade the podscope agents (the chart)"
    };
    format!(
        "protocol mismatch with the agent on node {node}: kubectl-podscope {plugin_version} speaks \
         session protocol {PROTOCOL_VERSION}, the agent {agent_version} speaks {agent_protocol}: {upgrade}"
    )
}

/// `… User "u" cannot create resource "pods/portforward" in API group "" …` → (create,
/// pods/portforward).
fn refused_verb_and_resource(message: &str) -> Option<(String, String)> {
    let after = message.split_once(" cannot ")?.1;
    let (verb, rest) = after.split_once(" resource \"")?;
    let (resource, _) = rest.split_once('"')?;
    Some((verb.to_string(), resource.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: message.into(),
            ..kube::core::Status::failure(message, "")
        }))
    }

    #[test]
    fn a_403_names_the_verb_and_resource_the_server_refused() {
        let error = PluginError::from_api(
            status(
                403,
                "pods \"agent-x\" is forbidden: User \"system:serviceaccount:dev:alice\" cannot \
                 create resource \"pods/portforward\" in API group \"\" in the namespace \"podscope\"",
            ),
            "create",
            "pods/portforward",
            Some("podscope"),
            "agent pod agent-x",
        );
        assert_eq!(error.exit_code(), 5);
        let text = error.to_string();
        assert!(
            text.starts_with(
                "RBAC denied: you may not create pods/portforward in namespace podscope. The API server said: pods \"agent-x\" is forbidden"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_404_is_target_not_found() {
        let error = PluginError::from_api(
            status(404, "deployments.apps \"web\" not found"),
            "get",
            "deployments.apps",
            Some("shop"),
            "deployment \"web\" in namespace \"shop\"",
        );
        assert_eq!(error.exit_code(), 3);
        assert_eq!(
            error.to_string(),
            "deployment \"web\" in namespace \"shop\" not found"
        );
    }

    #[test]
    fn a_mismatch_says_which_side_to_upgrade() {
        let newer_agent = PluginError::from_session(
            "n1",
            SessionError {
                code: ErrorCode::ProtocolMismatch,
                message: "x".into(),
                protocol: PROTOCOL_VERSION + 1,
                agent_version: "9.0.0".into(),
            },
        );
        assert_eq!(newer_agent.exit_code(), 6);
        assert!(
            newer_agent.to_string().ends_with(&format!(
                "the agent 9.0.0 speaks {}: upgrade kubectl-podscope",
                PROTOCOL_VERSION + 1
            )),
            "{newer_agent}"
        );
        let older_agent = mismatch_message("n1", 0, "0.0.1");
        assert!(
            older_agent.ends_with("speaks 0: upgrade the podscope agents (the chart)"),
            "{older_agent}"
        );
    }

    #[test]
    fn each_agent_error_has_its_exit_code() {
        let code = |code| {
            PluginError::from_session(
                "n1",
                SessionError {
                    code,
                    message: "m".into(),
                    protocol: PROTOCOL_VERSION,
                    agent_version: String::new(),
                },
            )
            .exit_code()
        };
        assert_eq!(code(ErrorCode::TargetNotFound), 3);
        assert_eq!(code(ErrorCode::ProbeUnavailable), 7);
        assert_eq!(code(ErrorCode::BpftraceDisabled), 8);
        assert_eq!(code(ErrorCode::Busy), 9);
        assert_eq!(code(ErrorCode::Internal), 11);
        assert_eq!(code(ErrorCode::BadRequest), 11);
    }
}
