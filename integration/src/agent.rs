//! Running the real `podscope` binary in tests: config in a temp file, readiness polled on the
//! agent's `/readyz`, SIGTERM, and a bounded wait for exit.

use std::io::Write as _;
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The `podscope` binary beside the test's `kubectl-podscope` (`plugin`: its
/// CARGO_BIN_EXE path; `cargo build --bin podscope` puts it there), or $PODSCOPE_BINARY.
pub fn agent_binary_beside(plugin: &str) -> std::path::PathBuf {
    let binary = std::env::var_os("PODSCOPE_BINARY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(plugin).with_file_name("podscope"));
    assert!(
        binary.exists(),
        "{} is missing: `cargo build --bin podscope` (or set PODSCOPE_BINARY)",
        binary.display()
    );
    binary
}

/// A podscope process; killed on drop if still running.
pub struct AgentProcess {
    child: Child,
    _config: tempfile::NamedTempFile,
}

impl AgentProcess {
    /// Starts `binary run --config <config>` and waits until `/readyz` on the telemetry port
    /// answers 200 (at most 60 s), failing the test with the agent's output otherwise.
    pub async fn start(binary: &str, config: &str, telemetry_port: u16) -> AgentProcess {
        Self::start_with_env(binary, config, telemetry_port, &[]).await
    }

    /// [`AgentProcess::start`] with extra environment variables (`KUBECONFIG`, `NODE_NAME`).
    pub async fn start_with_env(
        binary: &str,
        config: &str,
        telemetry_port: u16,
        env: &[(&str, &str)],
    ) -> AgentProcess {
        let mut file = tempfile::Builder::new()
            .suffix(".yaml")
            .tempfile()
            .expect("temp config");
        file.write_all(config.as_bytes()).expect("write config");
        let child = Command::new(binary)
            .args(["run", "--config"])
            .arg(file.path())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .expect("start podscope");
        let mut agent = AgentProcess {
            child,
            _config: file,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = format!("http://127.0.0.1:{telemetry_port}/readyz");
        loop {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("podscope exited before it was ready: {status:?}");
            }
            if let Ok(response) = reqwest::get(&url).await {
                if response.status().is_success() {
                    return agent;
                }
            }
            assert!(Instant::now() < deadline, "podscope not ready after 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn sigterm(&self) {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        let rc = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM)");
    }

    /// Kills it as the OOM killer or a node failure would: no shutdown, no flush. Returns once
    /// it is gone.
    pub fn sigkill(mut self) -> ExitStatus {
        self.child.kill().expect("kill(SIGKILL)");
        self.child.wait().expect("wait for podscope")
    }

    /// Waits for exit, at most `limit`.
    pub async fn wait(mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for podscope") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "podscope did not exit within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
