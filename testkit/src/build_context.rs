//! A build context for a component built by a test or a benchmark rather than by the service.

use podscope_core::component::{Extensions, SharedState};
use podscope_core::health::Readiness;
use podscope_core::telemetry::AgentTelemetry;
use podscope_core::{BuildContext, ComponentId};

/// `BuildContext::for_tests(id)`, with this trait in scope.
pub trait BuildContextForTests {
    /// A context for component `id` (`otlp`, `batch/2`): its own telemetry registry, host name
    /// `test-host`, no pipeline, no extensions.
    fn for_tests(id: &str) -> Self;
}

impl BuildContextForTests for BuildContext {
    fn for_tests(id: &str) -> Self {
        BuildContext {
            id: ComponentId::parse(id).expect("valid test component id"),
            pipeline: None,
            host_name: "test-host".to_string(),
            telemetry: AgentTelemetry::new(),
            readiness: Readiness::default(),
            shared: SharedState::default(),
            extensions: Extensions::default(),
        }
    }
}

/// The value of one series of the agent's own metrics, written as the text format writes it
/// (`podscope_queue_size{queue="exporter/otlp"}`); `None` while the series does not exist.
pub fn agent_metric(telemetry: &AgentTelemetry, series: &str) -> Option<f64> {
    telemetry.encode_text().lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|value| value.parse().ok())
    })
}
