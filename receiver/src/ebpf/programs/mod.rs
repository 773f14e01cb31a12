//! Users' own eBPF programs: an object compiled by the user (local file, or an `EbpfProgram`
//! object of the cluster through a `k8s_metadata` extension), loaded and attached by its
//! section names, its maps read at each collection into the metrics its spec names, with key
//! and value layouts from the object's BTF. See `docs/programs.md`.
//!
//! Modules: `spec` (the spec, shared by local programs and `EbpfProgram` objects), `check`
//! (`podscope program check`), `btf` (the
//! object's type information), `load` (checks, limits, loading and attaching), `maps` (maps read
//! as bytes), `decode` (label decoders), `metrics` (maps into OTLP data points), `set` (the
//! running programs and their status, read by the collection task as one probe).
//!
//! A user's program is untrusted input: anything wrong with it fails that program alone, with a
//! message naming what is wrong; the agent, the built-in probes and other programs go on.

mod btf;
mod check;
mod decode;
mod load;
mod maps;
mod metrics;
mod set;
pub mod spec;
mod sync;

use std::collections::BTreeMap;

use podscope_core::FieldError;
use serde::Deserialize;

pub use check::check;
pub use load::{
    inspect, load, sha256_hex, Limits, LoadSettings, LoadedProgram, ObjectInfo, POD_FILTER_MAP,
    PROGRAM_TYPES,
};
pub use set::{Phase, ProgramSet, ProgramStatus, ProgramsProbe, SeriesLabels};
pub use spec::ProgramSpec;
pub use sync::ProgramSync;

/// `user_programs:` — where programs come from besides `programs:`, and the agent's limits.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserProgramsConfig {
    /// The `k8s_metadata` extension (in `service.extensions`) whose `EbpfProgram` watch gives
    /// this node's cluster programs and whose pod cache serves `podSelector`s.
    pub extension: Option<String>,
    pub limits: Limits,
}

impl UserProgramsConfig {
    pub fn validate(&self, errors: &mut Vec<FieldError>) {
        for (i, t) in self.limits.allowed_types.iter().enumerate() {
            if !PROGRAM_TYPES.contains(&t.as_str()) {
                errors.push(FieldError::new(
                    format!("user_programs.limits.allowed_types[{i}]"),
                    format!("{t:?} is not one of {}", PROGRAM_TYPES.join(", ")),
                ));
            }
        }
        if let Some(extension) = &self.extension {
            match podscope_core::ComponentId::parse(extension) {
                Ok(id) if id.type_name() == "k8s_metadata" => {}
                Ok(_) => errors.push(FieldError::new(
                    "user_programs.extension",
                    format!("{extension:?} is not a k8s_metadata extension id"),
                )),
                Err(e) => errors.push(FieldError::new("user_programs.extension", e)),
            }
        }
    }
}

/// `programs:` entries checked without their objects; `pods` says whether an extension gives
/// pod selectors their pods.
pub fn validate_local(
    programs: &BTreeMap<String, ProgramSpec>,
    pods: bool,
    errors: &mut Vec<FieldError>,
) {
    for (name, spec) in programs {
        spec.validate(&format!("programs.{name}"), errors);
        if !pods && (spec.pod_selector.is_some() || spec.namespace_selector.is_some()) {
            errors.push(FieldError::new(
                format!("programs.{name}.podSelector"),
                "pod selection needs user_programs.extension (the k8s_metadata extension whose pod cache it reads)",
            ));
        }
        if spec.object.config_map.is_some() {
            errors.push(FieldError::new(
                format!("programs.{name}.object.configMap"),
                "a local program's object is a file or base64; ConfigMaps are for EbpfProgram objects",
            ));
        }
        if spec.node_selector.is_some() {
            errors.push(FieldError::new(
                format!("programs.{name}.nodeSelector"),
                "a local program runs where it is configured; nodeSelector is for EbpfProgram objects",
            ));
        }
    }
}

/// The object bytes of a program given as a file (on this node) or inline base64.
pub fn object_bytes(spec: &ProgramSpec, limits: &Limits) -> Result<Vec<u8>, String> {
    if let Some(path) = &spec.object.file {
        return load::read_file(path, limits);
    }
    if let Some(text) = &spec.object.base64 {
        use base64::Engine as _;
        let cleaned: String = text.split_whitespace().collect();
        return base64::engine::general_purpose::STANDARD
            .decode(cleaned)
            .map_err(|e| format!("object.base64: {e}"));
    }
    Err("object: neither a file nor base64".to_string())
}

/// Loads every local program into `set` (each fails alone, with a log line).
pub fn load_local(
    receiver: &str,
    programs: &BTreeMap<String, ProgramSpec>,
    set: &ProgramSet,
    limits: &Limits,
    kernel_btf: Result<&aya::Btf, &String>,
) {
    for (name, spec) in programs {
        let result = kernel_btf.map_err(Clone::clone).and_then(|btf| {
            let bytes = object_bytes(spec, limits)?;
            load(
                name,
                spec,
                &bytes,
                &LoadSettings {
                    kernel_btf: btf,
                    limits,
                    map_memory_in_use: set.map_memory_except(name),
                },
            )
        });
        let status = set.install(name, result);
        match status.phase {
            Phase::Loaded => {
                tracing::info!(receiver, program = %name, attached = ?status.attached, "user program loaded")
            }
            Phase::Failed => {
                tracing::warn!(receiver, program = %name, error = %status.message, "user program failed; the others go on")
            }
        }
    }
}
