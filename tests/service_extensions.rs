//! Extensions, the fourth kind of component: defined under `extensions:`, run when
//! `service.extensions` lists them or a processor makes one for itself, looked up by the
//! components that use them, started before every pipeline and stopped after them; and the
//! loader's refusals, each with its position.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use podscope::config::load_with;
use podscope::registry::Registry;
use podscope::service::Service;
use podscope_core::component::{create_extension, create_processor};
use podscope_core::health::Readiness;
use podscope_core::telemetry::AgentTelemetry;
use podscope_core::{
    Batch, BuildContext, Capabilities, Component, ComponentConfig, ComponentId, ComponentKind,
    ComponentReference, ConsumeError, Consumer, Extension, ExtensionBuilder, ExtensionFactory,
    FieldError, Processor, ProcessorBuilder, ProcessorFactory, Signal,
};
use serde::Deserialize;

/// What happened, in order: builds, starts and shutdowns of the test components.
static EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn event(what: String) {
    EVENTS.lock().unwrap().push(what);
}

/// `extensions: recorder[/name]:` — an extension that records its lifecycle.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecorderConfig {}

impl ComponentConfig for RecorderConfig {}

impl ExtensionBuilder for RecorderConfig {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Extension>> {
        Ok(Arc::new(Recorder { id: ctx.id }))
    }
}

struct Recorder {
    id: ComponentId,
}

#[async_trait]
impl Component for Recorder {
    async fn start(&self) -> anyhow::Result<()> {
        event(format!("start extension {}", self.id));
        Ok(())
    }

    async fn shutdown(&self) -> anyhow::Result<()> {
        event(format!("shutdown extension {}", self.id));
        Ok(())
    }
}

impl Extension for Recorder {}

static RECORDER: ExtensionFactory = ExtensionFactory {
    type_name: "recorder",
    description: "test extension",
    signals: &[],
    create: create_extension::<RecorderConfig>,
};

/// `processors: user:` — uses the recorder its `extension` names, or makes its own.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct UserConfig {
    extension: Option<String>,
}

impl ComponentConfig for UserConfig {
    fn validate(&self) -> Vec<FieldError> {
        match self.extension.as_deref().map(ComponentId::parse) {
            Some(Err(e)) => vec![FieldError::new("extension", e)],
            _ => Vec::new(),
        }
    }
}

impl ProcessorBuilder for UserConfig {
    fn build(
        &self,
        ctx: BuildContext,
        _: Signal,
        next: Arc<dyn Consumer>,
    ) -> anyhow::Result<Arc<dyn Processor>> {
        let recorder = ctx
            .extensions
            .used_by::<Recorder>(ComponentKind::Processor, &ctx.id)?;
        event(format!("build processor {} with {}", ctx.id, recorder.id));
        Ok(Arc::new(User { id: ctx.id, next }))
    }

    fn references(&self) -> Vec<ComponentReference> {
        ComponentReference::extension_setting("extension", self.extension.as_deref())
            .into_iter()
            .collect()
    }

    fn implicit_extension(
        &self,
        own: &ComponentId,
    ) -> Option<(ComponentId, Box<dyn ExtensionBuilder>)> {
        if self.extension.is_some() {
            return None;
        }
        let id = ComponentId::new("recorder", Some(own.to_string().replace('/', ".")));
        Some((id, Box::new(RecorderConfig {})))
    }
}

struct User {
    id: ComponentId,
    next: Arc<dyn Consumer>,
}

#[async_trait]
impl Consumer for User {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        self.next.consume(batch).await
    }
}

#[async_trait]
impl Component for User {
    async fn start(&self) -> anyhow::Result<()> {
        event(format!("start processor {}", self.id));
        Ok(())
    }

    async fn shutdown(&self) -> anyhow::Result<()> {
        event(format!("shutdown processor {}", self.id));
        Ok(())
    }
}

impl Processor for User {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
}

static USER: ProcessorFactory = ProcessorFactory {
    type_name: "user",
    description: "test processor using a recorder extension",
    signals: &[Signal::Traces],
    create: create_processor::<UserConfig>,
};

fn registry() -> Registry {
    let mut registry = Registry::builtin();
    registry.extensions.push(&RECORDER);
    registry.processors.push(&USER);
    registry
}

fn no_env(_: &str) -> Option<String> {
    None
}

const PIPELINE: &str =
    "receivers:\n  otlp: {protocols: {grpc: {endpoint: \"127.0.0.1:0\"}}}\nexporters:\n  nop:\n";

#[tokio::test]
async fn extensions_start_before_the_pipelines_and_stop_after_them() {
    let text = format!(
        "{PIPELINE}extensions:\n  recorder/shared:\n  recorder/idle:\nprocessors:\n  user/named: {{extension: recorder/shared}}\n  user:\nservice:\n  extensions: [recorder/shared]\n  pipelines:\n    traces: {{receivers: [otlp], processors: [user/named, user], exporters: [nop]}}\n"
    );
    let config = load_with(&text, "x.yaml", &registry(), &no_env).unwrap();
    assert_eq!(
        config.warnings,
        vec!["extensions.recorder/idle is defined but is not in service.extensions"]
    );
    let ids: Vec<String> = config
        .service
        .extensions
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(ids, vec!["recorder/shared", "recorder/user"]);
    let mut service = Service::build(config, AgentTelemetry::new(), Readiness::default()).unwrap();
    service.start().await.unwrap();
    let report = service.shutdown().await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        *EVENTS.lock().unwrap(),
        vec![
            "build processor user with recorder/user",
            "build processor user/named with recorder/shared",
            "start extension recorder/shared",
            "start extension recorder/user",
            "start processor user",
            "start processor user/named",
            "shutdown processor user/named",
            "shutdown processor user",
            "shutdown extension recorder/user",
            "shutdown extension recorder/shared",
        ]
    );
}

#[test]
fn extension_refusals_name_the_key() {
    let cases = [
        (
            "extensions:\n  recorder/a:\n  nosuch:\nservice:\n  extensions: [recorder/b, recorder/a, recorder/a]\n  pipelines:\n    traces: {receivers: [otlp], exporters: [nop]}\n",
            vec![
                "x.yaml:7:3: extensions.nosuch: unknown extension type \"nosuch\"; known types: k8s_metadata, file_storage, session, recorder",
                "x.yaml:9:16: service.extensions[0]: extension recorder/b is not defined in the extensions section",
                "x.yaml:9:40: service.extensions[2]: recorder/a is listed twice",
            ],
        ),
        (
            "extensions:\n  recorder/a:\nprocessors:\n  user/1: {extension: recorder/a}\n  user/2: {extension: recorder/b}\nservice:\n  pipelines:\n    traces: {receivers: [otlp], processors: [user/1, user/2], exporters: [nop]}\n",
            vec![
                "x.yaml:8:12: processors.user/1.extension: extensions.recorder/a is defined but not in service.extensions, so it never runs",
                "x.yaml:9:12: processors.user/2.extension: extensions.recorder/b is not defined",
            ],
        ),
        (
            "extensions:\n  recorder/user:\nprocessors:\n  user:\nservice:\n  extensions: [recorder/user]\n  pipelines:\n    traces: {receivers: [otlp], processors: [user], exporters: [nop]}\n",
            vec![
                "x.yaml:8:3: processors.user: names no extension, so it makes its own, extensions.recorder/user, but this file defines an extension of that id: name it with `extension:`, or give it another id",
            ],
        ),
    ];
    for (text, expected) in cases {
        let errors = load_with(&format!("{PIPELINE}{text}"), "x.yaml", &registry(), &no_env)
            .unwrap_err()
            .to_string();
        assert_eq!(errors, expected.join("\n"), "{text}");
    }
}
