//! The oteltest OTLP sink (`exporters/tests/oteltest_sink.py`): a receiver this project did not
//! write (grpcio and the official Python OTLP bindings), started for a test and killed when
//! dropped. Each request it decodes comes as one JSON line (`transport`, `signal`, `headers`,
//! `request` in protobuf's JSON mapping).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::agent::free_port;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub struct OteltestSink {
    child: Child,
    /// The decoded requests, one JSON line each.
    pub lines: mpsc::Receiver<String>,
}

impl Drop for OteltestSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl OteltestSink {
    /// The sink, its OTLP/gRPC on `grpc_port` (its HTTP on some free port), once it says it is
    /// ready.
    pub fn start(grpc_port: u16) -> OteltestSink {
        let python = root().join(".cache/oteltest/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run scripts/install-deps.sh",
            python.display()
        );
        let mut child = Command::new(python)
            .arg(root().join("exporters/tests/oteltest_sink.py"))
            .args([grpc_port.to_string(), free_port().to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the oteltest sink");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = crate::lines::lines_of(stdout);
        let sink = OteltestSink { child, lines };
        assert_eq!(
            sink.lines
                .recv_timeout(Duration::from_secs(30))
                .expect("the sink starts within 30 s"),
            "ready"
        );
        sink
    }
}
