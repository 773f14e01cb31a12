//! A real Prometheus server for tests: Debian's `prometheus` binary on a free loopback port with
//! a temporary config and data directory, scraping the given targets every second. Killed on
//! drop.

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent::free_port;

pub struct PrometheusServer {
    child: Child,
    pub address: String,
    _dir: tempfile::TempDir,
}

impl PrometheusServer {
    /// Starts Prometheus scraping `targets` (host:port) as job `podscope`, and waits until it is
    /// ready (at most 60 s).
    pub async fn start(targets: &[String]) -> PrometheusServer {
        Self::start_with_scrape_configs(&format!(
            "  - job_name: podscope\n    static_configs:\n      - targets: [{}]\n",
            targets
                .iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .await
    }

    /// Starts Prometheus with `scrape_configs` (the YAML list's items, indented by two spaces),
    /// scraping and evaluating every second, and waits until it is ready (at most 60 s).
    pub async fn start_with_scrape_configs(scrape_configs: &str) -> PrometheusServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{scrape_configs}"
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::File::create(&config_path)
            .unwrap()
            .write_all(config.as_bytes())
            .unwrap();
        let address = format!("127.0.0.1:{}", free_port());
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .arg("--web.enable-remote-write-receiver")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (apt-get install prometheus, or scripts/install-deps.sh)");
        let server = PrometheusServer {
            child,
            address,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = reqwest::get(format!("http://{}/-/ready", server.address)).await {
                if r.status().is_success() {
                    return server;
                }
            }
            assert!(Instant::now() < deadline, "prometheus not ready after 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs an instant query until it returns at least one sample (at most `limit`), and returns
    /// `(labels, value)` of each sample.
    pub async fn query_until_present(
        &self,
        query: &str,
        limit: Duration,
    ) -> Vec<(serde_json::Value, String)> {
        let deadline = Instant::now() + limit;
        loop {
            let response: serde_json::Value = reqwest::Client::new()
                .get(format!("http://{}/api/v1/query", self.address))
                .query(&[("query", query)])
                .send()
                .await
                .expect("query prometheus")
                .json()
                .await
                .expect("prometheus answers JSON");
            let results = response["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !results.is_empty() {
                return results
                    .into_iter()
                    .map(|r| {
                        (
                            r["metric"].clone(),
                            r["value"][1].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "no result for {query} within {limit:?}: {response}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `promtool check metrics` on an exposition; returns its findings (empty when clean).
pub fn promtool_findings(exposition: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (apt-get install prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_string()
}
