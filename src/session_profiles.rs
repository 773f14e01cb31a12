//! The `session` extension as the agent runs it: the receiver crate's extension, given the
//! pprof and folded formats of `podscope_exporters::pprof` for `kubectl podscope profile` (the
//! receiver crate does not depend on the exporters; this crate knows both).

use opentelemetry_proto::tonic::profiles::v1development::ProfilesData;
use podscope_core::config::parse_component_config;
use podscope_core::session::ProfileFormat;
use podscope_core::{ExtensionBuilder, ExtensionFactory, FieldError};
use podscope_exporters::pprof::{encode_gzip, fold, PprofBuilder};
use podscope_receiver::session::{ProfileEncoder, SessionConfig};

pub const FACTORY: ExtensionFactory = ExtensionFactory {
    create,
    ..podscope_receiver::session::FACTORY
};

fn create(raw: serde_json::Value) -> Result<Box<dyn ExtensionBuilder>, Vec<FieldError>> {
    let mut config = parse_component_config::<SessionConfig>(raw)?;
    config.profile_encoder = ProfileEncoder(Some(encode));
    Ok(Box::new(config))
}

/// On-CPU profiles as one file: gzip-compressed pprof, or folded stacks.
pub fn encode(data: &[ProfilesData], format: ProfileFormat) -> Vec<u8> {
    const SAMPLE_TYPE: &str = "samples";
    match format {
        ProfileFormat::Folded => {
            let mut folded = std::collections::BTreeMap::new();
            fold(data, SAMPLE_TYPE, &mut folded);
            crate::profile::folded_text(&folded).into_bytes()
        }
        ProfileFormat::Pprof => {
            let mut builder = PprofBuilder::new(SAMPLE_TYPE);
            for profiles in data {
                builder.add(profiles);
            }
            encode_gzip(&builder.finish())
        }
    }
}
