//! `podscope-fake-apiserver`: the fake Kubernetes API server of `podscope_integration::fake_kube`
//! as a process, for the tests that are not Rust (the Helm chart's agent runs,
//! `helm/podscope/tests/check_manifests.py`): HTTPS to one service account, the cluster's RBAC
//! enforced, a fixed set of objects.
//!
//! ```text
//! podscope-fake-apiserver --service-account NAMESPACE/NAME --rbac RBAC.json --objects OBJECTS.json
//!                         --secrets DIR --log REQUESTS.jsonl
//! ```
//!
//! - `--rbac`: a JSON list of ClusterRole, ClusterRoleBinding, Role and RoleBinding objects;
//! - `--objects`: a JSON object of lists `pods`, `services`, `namespaces`, `nodes`,
//!   `configmaps`, `ebpfprograms`, `tracesessions`, `workloads` (Deployments, ReplicaSets, StatefulSets,
//!   DaemonSets, Jobs), served as they are (uids kept, resourceVersions the
//!   server's);
//! - `--secrets`: where to write what the kubelet mounts for the service account (`token`,
//!   `ca.crt`, `namespace`);
//! - `--log`: every request for a resource, appended as a JSON line as it is answered (`verb`,
//!   `resource`, `scope`, `name`, `fieldSelector`, `labelSelector`, `status`).
//!
//! Once serving it prints one JSON line on stdout, `{"url": …, "grants": [{"verb", "resource",
//! "scope"}, …]}` (what the RBAC grants the account), and serves until SIGTERM or SIGINT.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use podscope_integration::fake_kube::{FakeApiServer, ServiceAccount};
use serde_json::Value;

struct Args {
    account: (String, String),
    rbac: PathBuf,
    objects: PathBuf,
    secrets: PathBuf,
    log: PathBuf,
}

fn args() -> Result<Args, String> {
    let mut given: HashMap<String, String> = HashMap::new();
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        given.insert(flag, value);
    }
    let mut take = |flag: &str| given.remove(flag).ok_or_else(|| format!("missing {flag}"));
    let account = take("--service-account")?;
    let account = account
        .split_once('/')
        .map(|(ns, name)| (ns.to_string(), name.to_string()))
        .ok_or_else(|| format!("--service-account {account:?}: expected NAMESPACE/NAME"))?;
    let args = Args {
        account,
        rbac: take("--rbac")?.into(),
        objects: take("--objects")?.into(),
        secrets: take("--secrets")?.into(),
        log: take("--log")?.into(),
    };
    if let Some(flag) = given.keys().next() {
        return Err(format!("unknown option {flag}"));
    }
    Ok(args)
}

fn read_json(path: &PathBuf) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Applies `objects[kind]`, each as it is.
fn apply_objects(server: &FakeApiServer, objects: &Value) -> Result<(), String> {
    let list = |kind: &str| objects[kind].as_array().cloned().unwrap_or_default();
    let typed = |kind: &str, e: serde_json::Error| format!("--objects {kind}: {e}");
    for object in list("namespaces") {
        server.apply_namespace(serde_json::from_value(object).map_err(|e| typed("namespaces", e))?);
    }
    for object in list("nodes") {
        server.apply_node(serde_json::from_value(object).map_err(|e| typed("nodes", e))?);
    }
    for object in list("pods") {
        server.apply_pod(serde_json::from_value(object).map_err(|e| typed("pods", e))?);
    }
    for object in list("services") {
        server.apply_service(serde_json::from_value(object).map_err(|e| typed("services", e))?);
    }
    for object in list("configmaps") {
        server
            .apply_config_map(serde_json::from_value(object).map_err(|e| typed("configmaps", e))?);
    }
    for object in list("ebpfprograms")
        .into_iter()
        .chain(list("tracesessions"))
    {
        server.apply_custom(object);
    }
    for object in list("workloads") {
        server.apply_workload(object);
    }
    Ok(())
}

async fn run(args: Args) -> Result<(), String> {
    let rbac = match read_json(&args.rbac)? {
        Value::Array(objects) => objects,
        _ => return Err(format!("{}: expected a JSON list", args.rbac.display())),
    };
    let account = ServiceAccount {
        namespace: args.account.0,
        name: args.account.1,
        rbac,
    };
    let server = FakeApiServer::start_for(&account).await?;
    apply_objects(&server, &read_json(&args.objects)?)?;
    server
        .write_service_account_files(&args.secrets)
        .map_err(|e| format!("{}: {e}", args.secrets.display()))?;
    let mut log =
        std::fs::File::create(&args.log).map_err(|e| format!("{}: {e}", args.log.display()))?;
    let ready = serde_json::json!({"url": server.url(), "grants": server.grants()});
    println!("{ready}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut written = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        let stop = tokio::select! {
            _ = term.recv() => true,
            _ = int.recv() => true,
            _ = tick.tick() => false,
        };
        let requests = server.access_log();
        for request in &requests[written..] {
            let line = serde_json::to_string(request).map_err(|e| e.to_string())?;
            writeln!(log, "{line}").map_err(|e| format!("{}: {e}", args.log.display()))?;
        }
        written = requests.len();
        if stop {
            server.stop().await;
            return Ok(());
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let result = match args() {
        Ok(args) => run(args).await,
        Err(e) => Err(format!("{e}\nusage: podscope-fake-apiserver --service-account NAMESPACE/NAME --rbac RBAC.json --objects OBJECTS.json --secrets DIR --log REQUESTS.jsonl")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podscope-fake-apiserver: {e}");
            ExitCode::FAILURE
        }
    }
}
