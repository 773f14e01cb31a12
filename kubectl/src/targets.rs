//! From what the user typed (`pod/web-0 -c app`, `deploy/web`, `-l app=web`, `node/n1`) to what
//! the agents need: the running pods with their containers' runtime ids, grouped by node, and the
//! agent pod on each of those nodes.
//!
//! Workloads are followed through their owner references (a Deployment's ReplicaSets, then their
//! pods), not only their selectors: two workloads whose selectors overlap must not trace each
//! other's pods.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::ListParams;
use kube::{Api, Client};
use podscope_core::session::{ContainerRef, Target, DEFAULT_PORT};

use crate::error::PluginError;

/// What the user named, before it is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    Node(String),
    Pod(String),
    Deployment(String),
    StatefulSet(String),
    DaemonSet(String),
    Job(String),
    Selector(String),
}

impl TargetSpec {
    /// `KIND/NAME` with kubectl's names and short names for each kind, or `-l SELECTOR`.
    pub fn parse(target: Option<&str>, selector: Option<&str>) -> Result<TargetSpec, PluginError> {
        match (target, selector) {
            (Some(_), Some(_)) => Err(PluginError::Usage(
                "give either TARGET or -l SELECTOR, not both".into(),
            )),
            (None, Some(selector)) => Ok(TargetSpec::Selector(selector.to_string())),
            (None, None) => Err(PluginError::Usage(
                "name a TARGET (node/NAME, pod/NAME, deploy/NAME, sts/NAME, ds/NAME, job/NAME) or -l SELECTOR".into(),
            )),
            (Some(text), None) => {
                let Some((kind, name)) = text.split_once('/').filter(|(_, n)| !n.is_empty()) else {
                    return Err(PluginError::Usage(format!(
                        "TARGET {text:?} is not KIND/NAME (e.g. pod/web-0, deploy/web, node/worker-1)"
                    )));
                };
                let name = name.to_string();
                Ok(match kind.to_ascii_lowercase().as_str() {
                    "node" | "nodes" | "no" => TargetSpec::Node(name),
                    "pod" | "pods" | "po" => TargetSpec::Pod(name),
                    "deploy" | "deployment" | "deployments" => TargetSpec::Deployment(name),
                    "sts" | "statefulset" | "statefulsets" => TargetSpec::StatefulSet(name),
                    "ds" | "daemonset" | "daemonsets" => TargetSpec::DaemonSet(name),
                    "job" | "jobs" => TargetSpec::Job(name),
                    _ => {
                        return Err(PluginError::Usage(format!(
                            "TARGET kind {kind:?} is not one of node, pod, deploy, sts, ds, job"
                        )))
                    }
                })
            }
        }
    }
}

/// The targets of each node: empty for `node/N` (the whole node).
pub type TargetsByNode = BTreeMap<String, Vec<Target>>;

/// Resolves `spec` in `namespace` (`None`: every namespace, for `-l` with `-A`). `container`
/// (`-c`) selects one container of each pod.
pub async fn resolve(
    client: &Client,
    spec: &TargetSpec,
    namespace: Option<&str>,
    container: Option<&str>,
) -> Result<TargetsByNode, PluginError> {
    let ns = namespace.unwrap_or("default");
    let pods: Vec<Pod> = match spec {
        TargetSpec::Node(_) => return group_node(spec, container),
        TargetSpec::Pod(name) => vec![get_named::<Pod>(client, ns, name, "pod", "pods").await?.0],
        TargetSpec::Selector(selector) => {
            let api: Api<Pod> = match namespace {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            let listed = api
                .list(&ListParams::default().labels(selector))
                .await
                .map_err(|e| {
                    PluginError::from_api(
                        e,
                        "list",
                        "pods",
                        namespace,
                        &format!("pods matching {selector:?}"),
                    )
                })?;
            listed.items
        }
        TargetSpec::Deployment(name) => {
            let (deployment, what) =
                get_named::<Deployment>(client, ns, name, "deployment", "deployments.apps").await?;
            let selector = deployment.spec.as_ref().map(|s| &s.selector);
            let owner = deployment.metadata.uid.clone().unwrap_or_default();
            let replica_sets = Api::<ReplicaSet>::namespaced(client.clone(), ns)
                .list(&ListParams::default().labels(&selector_text(selector, &what)?))
                .await
                .map_err(|e| {
                    PluginError::from_api(e, "list", "replicasets.apps", Some(ns), &what)
                })?;
            let owners: BTreeSet<String> = replica_sets
                .items
                .iter()
                .filter(|rs| owned_by(&rs.metadata, &owner))
                .filter_map(|rs| rs.metadata.uid.clone())
                .collect();
            owned_pods(client, ns, selector, &owners, &what).await?
        }
        TargetSpec::StatefulSet(name) => {
            let (object, what) =
                get_named::<StatefulSet>(client, ns, name, "statefulset", "statefulsets.apps")
                    .await?;
            let selector = object.spec.as_ref().map(|s| &s.selector);
            pods_owned_by(client, ns, &object.metadata, selector, &what).await?
        }
        TargetSpec::DaemonSet(name) => {
            let (object, what) =
                get_named::<DaemonSet>(client, ns, name, "daemonset", "daemonsets.apps").await?;
            let selector = object.spec.as_ref().map(|s| &s.selector);
            pods_owned_by(client, ns, &object.metadata, selector, &what).await?
        }
        TargetSpec::Job(name) => {
            let (object, what) = get_named::<Job>(client, ns, name, "job", "jobs.batch").await?;
            let selector = object.spec.as_ref().and_then(|s| s.selector.as_ref());
            pods_owned_by(client, ns, &object.metadata, selector, &what).await?
        }
    };
    group_by_node(spec, &pods, container)
}

/// A namespaced object by name, and how errors name it (`statefulset "db" in namespace "shop"`).
pub(crate) async fn get_named<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    singular: &str,
    resource: &str,
) -> Result<(K, String), PluginError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let what = format!("{singular} {name:?} in namespace {namespace:?}");
    let object = Api::<K>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|e| PluginError::from_api(e, "get", resource, Some(namespace), &what))?;
    Ok((object, what))
}

/// The pods a workload (`owner`) owns directly, among those its selector selects.
async fn pods_owned_by(
    client: &Client,
    namespace: &str,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    selector: Option<&LabelSelector>,
    what: &str,
) -> Result<Vec<Pod>, PluginError> {
    let owners = owner.uid.clone().into_iter().collect();
    owned_pods(client, namespace, selector, &owners, what).await
}

/// `node/N`: the whole node, no pod targets.
pub fn group_node(
    spec: &TargetSpec,
    container: Option<&str>,
) -> Result<TargetsByNode, PluginError> {
    let TargetSpec::Node(node) = spec else {
        return Err(PluginError::Usage(format!(
            "{} is not a node",
            describe(spec)
        )));
    };
    if container.is_some() {
        return Err(PluginError::Usage(
            "-c names a container of pod/NAME, not of a node".into(),
        ));
    }
    Ok(BTreeMap::from([(node.clone(), Vec::new())]))
}

/// The pods of `selector` in `namespace` owned by one of `owners` (uids).
async fn owned_pods(
    client: &Client,
    namespace: &str,
    selector: Option<&LabelSelector>,
    owners: &BTreeSet<String>,
    what: &str,
) -> Result<Vec<Pod>, PluginError> {
    let labels = selector_text(selector, what)?;
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&labels))
        .await
        .map_err(|e| PluginError::from_api(e, "list", "pods", Some(namespace), what))?;
    Ok(pods
        .items
        .into_iter()
        .filter(|pod| owners.iter().any(|owner| owned_by(&pod.metadata, owner)))
        .collect())
}

fn owned_by(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    uid: &str,
) -> bool {
    metadata
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.uid == uid)
}

/// A workload's `spec.selector` as a label selector string.
fn selector_text(selector: Option<&LabelSelector>, what: &str) -> Result<String, PluginError> {
    let selector = selector
        .ok_or_else(|| PluginError::TargetNotFound(format!("{what} has no pod selector")))?;
    let mut terms: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    for expression in selector.match_expressions.iter().flatten() {
        let values = expression.values.clone().unwrap_or_default().join(",");
        terms.push(match expression.operator.as_str() {
            "In" => format!("{} in ({values})", expression.key),
            "NotIn" => format!("{} notin ({values})", expression.key),
            "Exists" => expression.key.clone(),
            "DoesNotExist" => format!("!{}", expression.key),
            other => {
                return Err(PluginError::Usage(format!(
                    "{what}: selector operator {other:?} is not one Kubernetes defines"
                )))
            }
        });
    }
    Ok(terms.join(","))
}

/// The running pods among `pods`, each with its selected running containers, grouped by node.
/// Pods not running (pending, finished, not yet scheduled) are left out; none left is "not found".
pub fn group_by_node(
    spec: &TargetSpec,
    pods: &[Pod],
    container: Option<&str>,
) -> Result<TargetsByNode, PluginError> {
    let mut by_node: TargetsByNode = BTreeMap::new();
    let mut skipped = Vec::new();
    for pod in pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Unknown");
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let (Some(node), "Running") = (node, phase) else {
            skipped.push(format!("{namespace}/{name} ({phase})"));
            continue;
        };
        let statuses = status
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default();
        if let Some(wanted) = container {
            if !statuses.iter().any(|s| s.name == wanted) {
                let names: Vec<&str> = statuses.iter().map(|s| s.name.as_str()).collect();
                return Err(PluginError::TargetNotFound(format!(
                    "container {wanted:?} not found in pod {namespace}/{name} (its containers: {})",
                    names.join(", ")
                )));
            }
        }
        let containers: Vec<ContainerRef> = statuses
            .iter()
            .filter(|s| container.is_none_or(|wanted| s.name == wanted))
            .filter(|s| {
                s.state
                    .as_ref()
                    .is_some_and(|state| state.running.is_some())
            })
            .filter_map(|s| {
                Some(ContainerRef {
                    name: s.name.clone(),
                    id: s.container_id.clone().filter(|id| !id.is_empty())?,
                })
            })
            .collect();
        if containers.is_empty() {
            skipped.push(format!(
                "{namespace}/{name} (no running container selected)"
            ));
            continue;
        }
        by_node.entry(node).or_default().push(Target {
            namespace,
            pod: name,
            pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
            containers,
        });
    }
    if by_node.is_empty() {
        let what = describe(spec);
        return Err(PluginError::TargetNotFound(if skipped.is_empty() {
            format!("{what}: no pods found")
        } else {
            format!("{what}: no running pods (found {})", skipped.join(", "))
        }));
    }
    Ok(by_node)
}

fn describe(spec: &TargetSpec) -> String {
    match spec {
        TargetSpec::Node(name) => format!("node/{name}"),
        TargetSpec::Pod(name) => format!("pod/{name}"),
        TargetSpec::Deployment(name) => format!("deploy/{name}"),
        TargetSpec::StatefulSet(name) => format!("sts/{name}"),
        TargetSpec::DaemonSet(name) => format!("ds/{name}"),
        TargetSpec::Job(name) => format!("job/{name}"),
        TargetSpec::Selector(selector) => format!("-l {selector}"),
    }
}

/// One agent: its pod (or a direct address) and the node it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPod {
    pub node: String,
    pub namespace: String,
    pub pod: String,
    /// The container port named `session`, else the protocol's default.
    pub port: u16,
}

/// The running agent pod on `node`.
pub async fn agent_on_node(
    client: &Client,
    namespace: &str,
    selector: &str,
    node: &str,
) -> Result<AgentPod, PluginError> {
    let params = ListParams::default()
        .labels(selector)
        .fields(&format!("spec.nodeName={node}"));
    running_agents(
        &list_agent_pods(client, namespace, &params).await?,
        namespace,
    )
    .into_iter()
    .find(|agent| agent.node == node)
    .ok_or_else(|| PluginError::NoAgent {
        node: node.to_string(),
        namespace: namespace.to_string(),
        selector: selector.to_string(),
    })
}

/// Every running agent pod, one per node (for `status` and `top` without a target).
pub async fn all_agents(
    client: &Client,
    namespace: &str,
    selector: &str,
) -> Result<Vec<AgentPod>, PluginError> {
    let params = ListParams::default().labels(selector);
    let agents = running_agents(
        &list_agent_pods(client, namespace, &params).await?,
        namespace,
    );
    if agents.is_empty() {
        return Err(PluginError::NoAgent {
            node: "any node".into(),
            namespace: namespace.to_string(),
            selector: selector.to_string(),
        });
    }
    Ok(agents)
}

async fn list_agent_pods(
    client: &Client,
    namespace: &str,
    params: &ListParams,
) -> Result<Vec<Pod>, PluginError> {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(params)
        .await
        .map_err(|e| {
            let what = format!("the agent pods in {namespace:?}");
            PluginError::from_api(e, "list", "pods", Some(namespace), &what)
        })?;
    Ok(pods.items)
}

/// The running agents among `pods`, the first by name on each node.
fn running_agents(pods: &[Pod], namespace: &str) -> Vec<AgentPod> {
    let mut by_node: BTreeMap<String, AgentPod> = BTreeMap::new();
    for pod in pods {
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let (Some(node), Some(name), true) = (
            pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            pod.metadata.name.clone(),
            running,
        ) else {
            continue;
        };
        let port = pod
            .spec
            .iter()
            .flat_map(|spec| spec.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some("session"))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .unwrap_or(DEFAULT_PORT);
        let agent = AgentPod {
            node: node.clone(),
            namespace: namespace.to_string(),
            pod: name,
            port,
        };
        by_node
            .entry(node)
            .and_modify(|kept| {
                if agent.pod < kept.pod {
                    *kept = agent.clone();
                }
            })
            .or_insert(agent);
    }
    by_node.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, node: Option<&str>, phase: &str, containers: &[(&str, &str, bool)]) -> Pod {
        let statuses: Vec<_> = containers
            .iter()
            .map(|(name, id, running)| {
                let state = if *running {
                    json!({"running": {"startedAt": "2026-01-01T00:00:00Z"}})
                } else {
                    json!({"waiting": {"reason": "CrashLoopBackOff"}})
                };
                json!({"name": name, "containerID": id, "ready": *running, "restartCount": 0,
                       "image": "x", "imageID": "", "state": state})
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": phase, "containerStatuses": statuses}
        }))
        .unwrap()
    }

    #[test]
    fn targets_parse_with_kubectl_kind_names() {
        let parse = |t| TargetSpec::parse(Some(t), None);
        assert_eq!(
            parse("deploy/web").unwrap(),
            TargetSpec::Deployment("web".into())
        );
        assert_eq!(
            parse("statefulset/db").unwrap(),
            TargetSpec::StatefulSet("db".into())
        );
        assert_eq!(parse("no/n1").unwrap(), TargetSpec::Node("n1".into()));
        assert_eq!(
            parse("ds/agent").unwrap(),
            TargetSpec::DaemonSet("agent".into())
        );
        assert_eq!(parse("job/j").unwrap(), TargetSpec::Job("j".into()));
        assert!(
            matches!(parse("web-0"), Err(PluginError::Usage(m)) if m.contains("is not KIND/NAME"))
        );
        assert!(
            matches!(parse("svc/web"), Err(PluginError::Usage(m)) if m.contains("\"svc\" is not one of"))
        );
        assert!(matches!(
            TargetSpec::parse(Some("pod/a"), Some("x=y")),
            Err(PluginError::Usage(_))
        ));
        assert_eq!(
            TargetSpec::parse(None, Some("app=web")).unwrap(),
            TargetSpec::Selector("app=web".into())
        );
    }

    #[test]
    fn running_pods_are_grouped_by_node_with_their_running_containers() {
        let pods = [
            pod(
                "a",
                Some("n1"),
                "Running",
                &[
                    ("app", "containerd://a1", true),
                    ("side", "containerd://a2", false),
                ],
            ),
            pod(
                "b",
                Some("n2"),
                "Running",
                &[("app", "containerd://b1", true)],
            ),
            pod(
                "c",
                Some("n1"),
                "Running",
                &[("app", "containerd://c1", true)],
            ),
            pod("d", None, "Pending", &[]),
            pod(
                "e",
                Some("n2"),
                "Succeeded",
                &[("app", "containerd://e1", false)],
            ),
        ];
        let spec = TargetSpec::Selector("app=web".into());
        let grouped = group_by_node(&spec, &pods, None).unwrap();
        let summary: Vec<(String, Vec<String>)> = grouped
            .iter()
            .map(|(node, targets)| {
                (
                    node.clone(),
                    targets
                        .iter()
                        .map(|t| {
                            format!(
                                "{}:{}",
                                t.pod,
                                t.containers
                                    .iter()
                                    .map(|c| c.id.as_str())
                                    .collect::<Vec<_>>()
                                    .join("+")
                            )
                        })
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "n1".to_string(),
                    vec![
                        "a:containerd://a1".to_string(),
                        "c:containerd://c1".to_string()
                    ]
                ),
                ("n2".to_string(), vec!["b:containerd://b1".to_string()]),
            ]
        );
    }

    #[test]
    fn a_named_container_is_selected_or_reported_missing() {
        let pods = [pod(
            "a",
            Some("n1"),
            "Running",
            &[
                ("app", "containerd://a1", true),
                ("side", "containerd://a2", true),
            ],
        )];
        let spec = TargetSpec::Pod("a".into());
        let grouped = group_by_node(&spec, &pods, Some("side")).unwrap();
        assert_eq!(
            grouped["n1"][0].containers,
            vec![ContainerRef {
                name: "side".into(),
                id: "containerd://a2".into()
            }]
        );
        let error = group_by_node(&spec, &pods, Some("db")).unwrap_err();
        assert_eq!(error.exit_code(), 3);
        assert_eq!(
            error.to_string(),
            "container \"db\" not found in pod shop/a (its containers: app, side)"
        );
    }

    #[test]
    fn no_running_pod_is_target_not_found_and_says_what_was_seen() {
        let pods = [pod("d", None, "Pending", &[])];
        let error = group_by_node(&TargetSpec::Deployment("web".into()), &pods, None).unwrap_err();
        assert_eq!(
            error.to_string(),
            "deploy/web: no running pods (found shop/d (Pending))"
        );
        let error = group_by_node(&TargetSpec::Selector("app=x".into()), &[], None).unwrap_err();
        assert_eq!(error.to_string(), "-l app=x: no pods found");
    }

    #[test]
    fn a_workload_selector_becomes_label_selector_text() {
        let selector: LabelSelector = serde_json::from_value(json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]},
                                 {"key": "canary", "operator": "DoesNotExist"}]
        }))
        .unwrap();
        assert_eq!(
            selector_text(Some(&selector), "deploy").unwrap(),
            "app=web,tier in (a,b),!canary"
        );
    }
}
