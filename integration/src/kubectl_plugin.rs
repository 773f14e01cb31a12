//! Running the `kubectl podscope` binary as a user does, for the plugin's end-to-end tests
//! (`tests/kubectl_*.rs`, built as tests of podscope-kubectl, which alone know the binary's path).

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The plugin at `plugin` with `kubeconfig`, a clean environment (PATH kept, HOME `home`) and
/// `args`; stdout and stderr piped, no stdin.
pub fn command(
    plugin: impl AsRef<OsStr>,
    home: &Path,
    kubeconfig: &Path,
    args: &[&str],
) -> Command {
    let mut command = Command::new(plugin);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs `command` to its end off the async runtime (where a fake API server may be serving it);
/// panics if it takes longer than `patience`.
pub async fn output(mut command: Command, patience: Duration) -> Output {
    let what = format!("{command:?}");
    tokio::time::timeout(
        patience,
        tokio::task::spawn_blocking(move || command.output()),
    )
    .await
    .unwrap_or_else(|_| panic!("{what} did not finish within {patience:?}"))
    .expect("join")
    .expect("run the plugin")
}
