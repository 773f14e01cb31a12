//! `kubectl podscope`: live traces, a top view, bpftrace and profiles from the podscope agents.
//!
//! kubectl runs any `kubectl-NAME` binary on PATH as `kubectl NAME`. This one resolves the user's
//! target through the Kubernetes API (kube-rs, the user's kubeconfig), finds the podscope agent
//! pod on each node the target spans, and talks the session protocol
//! (`podscope_core::session`) to each of them through a port-forward, one connection per node,
//! concurrently. It must not schedule anything in the cluster: the agents already run there.

mod attach;
mod cli;
mod error;
mod merge;
mod output;
mod promote;
mod sessions;
mod targets;
mod top;
mod transport;
mod verbs;

use std::process::ExitCode;

use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::cli::{Cli, ClusterArgs, Command};
use crate::error::PluginError;
use crate::targets::{TargetSpec, TargetsByNode};
use crate::transport::Route;
use podscope_core::session::Target;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("kubectl podscope: cannot start: {error}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(cli));
    // Blocked readers (the top view's key reader) must not keep the process alive.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(1))
        }
    }
}

async fn run(cli: Cli) -> Result<(), PluginError> {
    let mut context = Context::new(cli.cluster);
    match cli.command {
        Command::Trace(args) => verbs::trace(&mut context, args).await,
        Command::Top(args) => top::run(&mut context, args).await,
        Command::Bpftrace(args) => verbs::bpftrace(&mut context, args).await,
        Command::Profile(args) => verbs::profile(&mut context, args).await,
        Command::Status(args) => verbs::status(&mut context, args).await,
        Command::Run(args) => sessions::run(&mut context, args).await,
        Command::Get(args) => sessions::get(&mut context, args).await,
        Command::Describe(args) => sessions::describe(&mut context, args).await,
        Command::Delete(args) => sessions::delete(&mut context, args).await,
        Command::Promote(args) => promote::promote(&mut context, args).await,
        Command::Attach(args) => attach::attach_verb(&mut context, args).await,
        Command::Logs(args) => attach::logs(&mut context, args).await,
    }
}

/// The cluster connection, made on first use: `--agent-address node/N` needs none.
pub struct Context {
    pub cluster: ClusterArgs,
    client: Option<(Client, String)>,
}

impl Context {
    fn new(cluster: ClusterArgs) -> Context {
        Context {
            cluster,
            client: None,
        }
    }

    /// The API client and the namespace of TARGET (`-n`, else the context's).
    pub async fn client(&mut self) -> Result<(Client, String), PluginError> {
        if let Some(made) = &self.client {
            return Ok(made.clone());
        }
        let options = KubeConfigOptions {
            context: self.cluster.context.clone(),
            ..KubeConfigOptions::default()
        };
        let config = match &self.cluster.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path).map_err(|e| {
                    PluginError::Usage(format!("--kubeconfig {}: {e}", path.display()))
                })?;
                Config::from_custom_kubeconfig(kubeconfig, &options).await
            }
            None => Config::from_kubeconfig(&options).await,
        }
        .map_err(|e| PluginError::Usage(format!("cannot read the kubeconfig: {e}")))?;
        let namespace = self
            .cluster
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config)
            .map_err(|e| PluginError::Other(anyhow::anyhow!("cannot build the API client: {e}")))?;
        self.client = Some((client.clone(), namespace.clone()));
        Ok((client, namespace))
    }

    /// The client if one was made (port-forward routes need it).
    pub fn made_client(&self) -> Option<&Client> {
        self.client.as_ref().map(|(client, _)| client)
    }

    /// TARGET's pods by node; `node/N` needs no API call.
    pub async fn resolve(
        &mut self,
        spec: &TargetSpec,
        container: Option<&str>,
    ) -> Result<TargetsByNode, PluginError> {
        if let TargetSpec::Node(_) = spec {
            return targets::group_node(spec, container);
        }
        let (client, namespace) = self.client().await?;
        let scope = (!self.cluster.all_namespaces).then_some(namespace.as_str());
        if self.cluster.all_namespaces && !matches!(spec, TargetSpec::Selector(_)) {
            return Err(PluginError::Usage(
                "-A selects pods in every namespace with -l; a named TARGET is in one namespace (-n)".into(),
            ));
        }
        targets::resolve(&client, spec, scope, container).await
    }

    /// One route per node of `by_node`, with that node's targets; with `--agent-address`, one
    /// route to that agent for every target.
    pub async fn routes(
        &mut self,
        by_node: &TargetsByNode,
    ) -> Result<Vec<(Route, Vec<Target>)>, PluginError> {
        if let Some(address) = self.cluster.agent_address.clone() {
            let node = by_node.keys().cloned().collect::<Vec<_>>().join(",");
            let targets = by_node.values().flatten().cloned().collect();
            return Ok(vec![(Route::Direct { address, node }, targets)]);
        }
        let (client, _) = self.client().await?;
        let lookups = by_node.keys().map(|node| {
            targets::agent_on_node(
                &client,
                &self.cluster.agent_namespace,
                &self.cluster.agent_selector,
                node,
            )
        });
        let agents = futures::future::join_all(lookups).await;
        let mut routes = Vec::new();
        for (agent, targets) in agents.into_iter().zip(by_node.values()) {
            routes.push((Route::PortForward(agent?), targets.clone()));
        }
        Ok(routes)
    }

    /// Every agent (for `status`, and `top` without a target).
    pub async fn every_agent(&mut self) -> Result<Vec<Route>, PluginError> {
        if let Some(address) = self.cluster.agent_address.clone() {
            return Ok(vec![Route::Direct {
                address,
                node: String::new(),
            }]);
        }
        let (client, _) = self.client().await?;
        let agents = targets::all_agents(
            &client,
            &self.cluster.agent_namespace,
            &self.cluster.agent_selector,
        )
        .await?;
        Ok(agents.into_iter().map(Route::PortForward).collect())
    }
}
