//! The task that keeps a receiver's users' programs in step with the cluster: `EbpfProgram`
//! objects selected for this node are loaded (a new generation loaded before the old one is
//! taken out), those deleted or no longer selected are detached, each outcome is written to the
//! object's `status.nodes` entry of this node (and a failure to an Event), and every program
//! that declares the pod filter map gets the cgroup ids of the pods its `podSelector` and
//! `namespaceSelector` pick, kept current as pods come and go.
//!
//! It must not read the programs' metric maps: the collection task does.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use podscope_k8s::cgroup::CgroupIndex;
use podscope_k8s::k8s_metadata::{ClusterProgram, ClusterPrograms, NodeProgramStatus};
use podscope_k8s::K8sMetadata;
use tokio_util::sync::CancellationToken;

use super::spec::ProgramSpec;
use super::{load, object_bytes, Limits, LoadSettings, Phase, ProgramSet, ProgramStatus};

/// How long changes are gathered before acting on them (a rollout changes many pods at once).
const SETTLE: Duration = Duration::from_millis(200);

/// The label every namespace carries with its own name; without a namespace watch, the only
/// namespace label a `namespaceSelector` can read.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

pub struct ProgramSync {
    pub receiver: String,
    pub set: ProgramSet,
    pub limits: Limits,
    pub kernel_btf: Result<aya::Btf, String>,
    /// The extension's `EbpfProgram` watch (none in host mode).
    pub cluster: Option<ClusterPrograms>,
    /// The pod cache podSelectors read.
    pub metadata: Arc<K8sMetadata>,
    pub index: CgroupIndex,
    /// Local programs' specs (for their pod selectors).
    pub local: BTreeMap<String, ProgramSpec>,
    /// Cluster programs running (or failed) here, by name: (uid, generation) and spec.
    pub applied: BTreeMap<String, ((String, i64), ProgramSpec)>,
}

impl ProgramSync {
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut program_changes = self.cluster.as_ref().map(ClusterPrograms::changes);
        let mut pod_changes = self.metadata.changes();
        loop {
            self.reconcile().await;
            self.sync_pod_filters();
            tokio::select! {
                _ = cancel.cancelled() => return,
                Some(()) = changed(&mut program_changes) => {}
                Ok(()) = pod_changes.changed() => {}
            }
            tokio::time::sleep(SETTLE).await;
            if let Some(changes) = &mut program_changes {
                changes.mark_unchanged();
            }
            pod_changes.mark_unchanged();
        }
    }

    async fn reconcile(&mut self) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        let node_labels = cluster.node_labels();
        let mut wanted = HashSet::new();
        for program in cluster.programs() {
            let version = (program.uid.clone(), program.generation);
            let spec = match parse_spec(&program) {
                Ok(spec) => spec,
                Err(message) => {
                    // Without a readable spec nothing says whether it runs here: say why.
                    wanted.insert(program.name.clone());
                    if self.applied.get(&program.name).map(|(v, _)| v) != Some(&version) {
                        let status = self.set.install(&program.name, Err(message));
                        self.applied
                            .insert(program.name.clone(), (version, placeholder_spec()));
                        self.report(&cluster, &program, Some(&status)).await;
                    }
                    continue;
                }
            };
            let selected = spec
                .node_selector
                .as_ref()
                .and_then(|s| s.selector().ok())
                .is_none_or(|selector| kube_matches(&selector, &node_labels));
            if !selected {
                continue;
            }
            wanted.insert(program.name.clone());
            if self.applied.get(&program.name).map(|(v, _)| v) == Some(&version) {
                continue;
            }
            let result = self.load(&cluster, &program.name, &spec).await;
            let status = self.set.install(&program.name, result);
            log(&self.receiver, &program.name, &status);
            self.applied.insert(program.name.clone(), (version, spec));
            // Its pods are in its filter before its status says it is loaded.
            self.sync_pod_filters();
            self.report(&cluster, &program, Some(&status)).await;
        }
        let gone: Vec<String> = self
            .applied
            .keys()
            .filter(|name| !wanted.contains(*name))
            .cloned()
            .collect();
        for name in gone {
            self.applied.remove(&name);
            self.set.remove(&name);
            tracing::info!(receiver = %self.receiver, program = %name, "user program detached: deleted, or this node is no longer selected");
            // Still there but no longer for this node: its entry for this node goes.
            if let Some(program) = cluster.programs().into_iter().find(|p| p.name == name) {
                self.report(&cluster, &program, None).await;
            }
        }
    }

    async fn load(
        &self,
        cluster: &ClusterPrograms,
        name: &str,
        spec: &ProgramSpec,
    ) -> Result<load::LoadedProgram, String> {
        let btf = self.kernel_btf.as_ref().map_err(Clone::clone)?;
        let bytes = match &spec.object.config_map {
            Some(key) => {
                cluster
                    .config_map_bytes(&key.namespace, &key.name, &key.key)
                    .await?
            }
            None => object_bytes(spec, &self.limits)?,
        };
        load::load(
            name,
            spec,
            &bytes,
            &LoadSettings {
                kernel_btf: btf,
                limits: &self.limits,
                map_memory_in_use: self.set.map_memory_except(name),
            },
        )
    }

    async fn report(
        &self,
        cluster: &ClusterPrograms,
        program: &ClusterProgram,
        status: Option<&ProgramStatus>,
    ) {
        let node_status = status.map(|s| NodeProgramStatus {
            phase: s.phase.as_str().to_string(),
            attached: s.attached.clone(),
            message: s.message.clone(),
            observed_generation: program.generation,
            time: s.time,
        });
        if let Err(e) = cluster.report(&program.name, node_status.as_ref()).await {
            tracing::warn!(receiver = %self.receiver, program = %program.name, error = %e, "cannot write the program's status");
        }
        if let Some(s) = status.filter(|s| s.phase == Phase::Failed) {
            if let Err(e) = cluster
                .warn(
                    program,
                    "LoadFailed",
                    &format!("node {}: {}", cluster.node(), s.message),
                )
                .await
            {
                tracing::warn!(receiver = %self.receiver, program = %program.name, error = %e, "cannot record the failure as an Event");
            }
        }
    }

    /// Fills each loaded program's pod filter map with the cgroups of the pods it selects.
    fn sync_pod_filters(&mut self) {
        self.index.refresh();
        let specs: BTreeMap<String, ProgramSpec> = self
            .local
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .chain(
                self.applied
                    .iter()
                    .map(|(n, (_, s))| (n.clone(), s.clone())),
            )
            .collect();
        let pods = self.metadata.pods();
        let index = &self.index;
        self.set.with_pod_filters(|name, program| {
            let Some(spec) = specs.get(name) else { return };
            let pod_selector = spec.pod_selector.as_ref().and_then(|s| s.selector().ok());
            let namespace_selector = spec.namespace_selector.as_ref().and_then(|s| s.selector().ok());
            let wanted: HashSet<u64> = index
                .iter()
                .filter(|(_, path)| {
                    let Some(uid) = podscope_k8s::cgroup::parse_container_cgroup(path).and_then(|c| c.pod_uid) else {
                        return false;
                    };
                    let Some(pod) = pods.live_pod(&uid) else { return false };
                    let labels: BTreeMap<String, String> =
                        pod.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                    let namespace = BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), pod.namespace.to_string())]);
                    pod_selector.as_ref().is_none_or(|s| kube_matches(s, &labels))
                        && namespace_selector.as_ref().is_none_or(|s| kube_matches(s, &namespace))
                })
                .map(|(id, _)| id)
                .collect();
            if let Some(map) = &program.pods {
                let present: HashSet<u64> = map
                    .entries()
                    .iter()
                    .filter_map(|e| e.key.as_slice().try_into().ok().map(u64::from_ne_bytes))
                    .collect();
                for stale in present.difference(&wanted) {
                    map.remove(&stale.to_ne_bytes());
                }
                for id in wanted.difference(&present) {
                    if let Err(e) = map.insert(&id.to_ne_bytes(), &[1]) {
                        tracing::warn!(program = %name, error = %e, "cannot update the program's pod filter");
                    }
                }
            }
        });
    }
}

fn kube_matches(
    selector: &podscope_k8s::labels::Selector,
    labels: &BTreeMap<String, String>,
) -> bool {
    podscope_k8s::labels::matches(selector, labels)
}

fn parse_spec(program: &ClusterProgram) -> Result<ProgramSpec, String> {
    let spec: ProgramSpec = serde_path_to_error::deserialize(program.spec.clone())
        .map_err(|e| format!("invalid spec: spec.{}: {}", e.path(), e.inner()))?;
    let mut errors = Vec::new();
    spec.validate("spec", &mut errors);
    match errors.first() {
        Some(first) => Err(format!("invalid spec: {first}")),
        None => Ok(spec),
    }
}

fn placeholder_spec() -> ProgramSpec {
    ProgramSpec {
        object: Default::default(),
        sha256: None,
        globals: Default::default(),
        attach: Vec::new(),
        node_selector: None,
        pod_selector: None,
        namespace_selector: None,
        metrics: Default::default(),
    }
}

fn log(receiver: &str, name: &str, status: &ProgramStatus) {
    match status.phase {
        Phase::Loaded => {
            tracing::info!(receiver, program = %name, attached = ?status.attached, "user program loaded")
        }
        Phase::Failed => {
            tracing::warn!(receiver, program = %name, error = %status.message, "user program failed; the others go on")
        }
    }
}

async fn changed(changes: &mut Option<tokio::sync::watch::Receiver<u64>>) -> Option<()> {
    match changes {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(()),
            Err(_) => {
                *changes = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}
