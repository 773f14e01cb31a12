//! OTLP profiles → pprof files (pure): one gzip pprof per profile, i.e. per container, interval
//! and sample type, named after the container it comes from so a user finds its files.

use std::time::{Duration, UNIX_EPOCH};

use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::profiles::v1development::{ProfilesData, ResourceProfiles};

use super::{encode_gzip, PprofBuilder};

/// One file to write: its name in the directory, its gzip-compressed pprof bytes and the
/// samples (OTLP sample entries) it carries, as the pipeline counts items.
#[derive(Debug, Clone, PartialEq)]
pub struct PprofFile {
    pub name: String,
    pub bytes: Vec<u8>,
    pub samples: usize,
}

/// Every profile of `data` as a pprof file named
/// `<owner>.<interval start, UTC, 20261202T115227Z>.<cpu|off_cpu>.pb.gz`, where the owner is
/// `<pod>_<namespace>_<container>-<container id, 12 digits>` (the kubelet's
/// `/var/log/containers` order) when `k8sattributes` named the pod, else
/// `container-<container id, 12 digits>`, else `cgroup-<cgroup path>`. Profiles without
/// samples make no file.
pub fn pprof_files(data: &ProfilesData) -> Vec<PprofFile> {
    let mut files = Vec::new();
    let Some(dictionary) = data.dictionary.as_ref() else {
        return files;
    };
    for rp in &data.resource_profiles {
        let owner = owner(rp);
        for profile in rp.scope_profiles.iter().flat_map(|sp| &sp.profiles) {
            if profile.samples.is_empty() {
                continue;
            }
            let sample_type = profile
                .sample_type
                .and_then(|t| usize::try_from(t.type_strindex).ok())
                .and_then(|i| dictionary.string_table.get(i))
                .cloned()
                .unwrap_or_default();
            let mut builder = PprofBuilder::new(&sample_type);
            builder.add_profile(data, rp, profile);
            let kind = match sample_type.as_str() {
                "samples" => "cpu".to_string(),
                "" => "unknown".to_string(),
                other => file_safe(other),
            };
            files.push(PprofFile {
                name: format!(
                    "{owner}.{}.{kind}.pb.gz",
                    compact_utc(profile.time_unix_nano)
                ),
                bytes: encode_gzip(&builder.finish()),
                samples: profile.samples.len(),
            });
        }
    }
    files
}

/// Who the profile belongs to, as the start of its file names.
fn owner(rp: &ResourceProfiles) -> String {
    let attribute = |key: &str| -> Option<String> {
        let kv = rp
            .resource
            .as_ref()?
            .attributes
            .iter()
            .find(|kv| kv.key == key)?;
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) if !s.is_empty() => Some(s.clone()),
            any_value::Value::IntValue(i) => Some(i.to_string()),
            _ => None,
        }
    };
    let short_id = attribute("container.id").map(|id| id.chars().take(12).collect::<String>());
    let owner = match (
        attribute("k8s.pod.name"),
        attribute("k8s.namespace.name"),
        &short_id,
    ) {
        (Some(pod), Some(namespace), _) => {
            let container = attribute("k8s.container.name").unwrap_or_else(|| "unknown".into());
            match &short_id {
                Some(id) => format!("{pod}_{namespace}_{container}-{id}"),
                None => format!("{pod}_{namespace}_{container}"),
            }
        }
        (_, _, Some(id)) => format!("container-{id}"),
        _ => match attribute("podscope.cgroup.path") {
            Some(path) => format!("cgroup-{}", path.trim_matches('/')),
            None => "unknown".to_string(),
        },
    };
    file_safe(&owner)
}

/// `text` with every character but letters, digits, `.`, `_` and `-` replaced by `-`, and no
/// leading dot (a hidden file, or `..`).
fn file_safe(text: &str) -> String {
    let safe: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = safe.trim_start_matches('.');
    if trimmed.is_empty() {
        "unknown".to_string()
    } else {
        trimmed.to_string()
    }
}

/// `unix_nanos` as UTC `YYYYMMDDTHHMMSSZ` (ISO 8601 basic format: sorts by time, no `:`).
fn compact_utc(unix_nanos: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_nanos(unix_nanos))
        .to_string()
        .replace(['-', ':'], "")
}
