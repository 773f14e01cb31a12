//! The http probe tests' `status_server.py` (receiver/tests/http) as a pod's workload: a real
//! HTTP/1.1 server whose requests the end-to-end tests trace.

use podscope_testkit::pod_cgroup::{wait_listening, PodCgroup};

use crate::agent::free_port;

/// The script, from this crate's directory (which stays beside `receiver/` in the workspace).
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../receiver/tests/http/status_server.py"
);

/// Starts `status_server.py` in `pod` on a free loopback port and returns that port once
/// the server listens. Debian's python3 (`/usr/bin/python3`), not the PATH one (a pyenv
/// shim).
pub fn start_in(pod: &mut PodCgroup) -> u16 {
    let port = free_port();
    pod.spawn_shell(&format!("exec /usr/bin/python3 {SCRIPT} {port}"));
    wait_listening(port);
    port
}
