//! OTLP profiles read back into plain stacks: each sample with its frames' names, files, build
//! ids and addresses resolved through the message's dictionary. Indices that point outside a
//! table (a sender's bug) resolve to empty values instead of failing.

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue};
use opentelemetry_proto::tonic::profiles::v1development::{
    KeyValueAndUnit, Profile, ProfilesData, ResourceProfiles, ValueType,
};

/// One frame: its function name when the sender had one, else file and address identify it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResolvedFrame {
    pub function: Option<String>,
    pub file: String,
    pub build_id: Option<String>,
    /// As the location states it (a file offset for podscope's binaries' frames).
    pub address: u64,
}

impl ResolvedFrame {
    /// What a flame graph shows: the function, or `file+0xaddress` when it has no name.
    pub fn display_name(&self) -> String {
        match &self.function {
            Some(name) => name.clone(),
            None => {
                let file = self.file.rsplit('/').next().unwrap_or("");
                let file = if file.is_empty() { "[unknown]" } else { file };
                format!("{file}+{:#x}", self.address)
            }
        }
    }
}

/// One sample of one profile, with what identifies where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedSample {
    /// The profile's sample type and unit (`samples`/`count`, `off_cpu`/`nanoseconds`).
    pub sample_type: (String, String),
    /// The profile's period type and period, if it states one.
    pub period: Option<((String, String), i64)>,
    pub container_id: Option<String>,
    pub pid: Option<i64>,
    pub thread: Option<String>,
    /// The span the sample links to (its thread was serving that request): trace id and span
    /// id in lowercase hex, as W3C trace context writes them.
    pub span: Option<(String, String)>,
    /// Leaf first.
    pub frames: Vec<ResolvedFrame>,
    pub value: i64,
}

/// Every sample of `data`, profile by profile.
pub fn resolved_samples(data: &ProfilesData) -> Vec<ResolvedSample> {
    let mut out = Vec::new();
    for rp in &data.resource_profiles {
        for profile in rp.scope_profiles.iter().flat_map(|sp| &sp.profiles) {
            out.extend(resolved_profile_samples(data, rp, profile));
        }
    }
    out
}

/// The samples of one `profile` of `rp`, a resource of `data` (whose dictionary they index).
pub fn resolved_profile_samples(
    data: &ProfilesData,
    rp: &ResourceProfiles,
    profile: &Profile,
) -> Vec<ResolvedSample> {
    let Some(d) = data.dictionary.as_ref() else {
        return Vec::new();
    };
    let string = |i: i32| -> String {
        usize::try_from(i)
            .ok()
            .and_then(|i| d.string_table.get(i))
            .cloned()
            .unwrap_or_default()
    };
    let get = |table_len: usize, i: i32| usize::try_from(i).ok().filter(|&i| i < table_len);
    let attribute = |indices: &[i32], key: &str| -> Option<AnyValue> {
        indices
            .iter()
            .filter_map(|&i| get(d.attribute_table.len(), i).map(|i| &d.attribute_table[i]))
            .find(|a: &&KeyValueAndUnit| string(a.key_strindex) == key)
            .and_then(|a| a.value.clone())
    };
    let container_id = rp.resource.as_ref().and_then(|r| {
        r.attributes
            .iter()
            .find(|kv| kv.key == "container.id")
            .and_then(|kv| text(kv.value.as_ref()?))
    });
    let value_type =
        |v: Option<ValueType>| v.map(|v| (string(v.type_strindex), string(v.unit_strindex)));
    let sample_type = value_type(profile.sample_type).unwrap_or_default();
    let period = value_type(profile.period_type).map(|t| (t, profile.period));
    let mut out = Vec::with_capacity(profile.samples.len());
    for sample in &profile.samples {
        let frames = get(d.stack_table.len(), sample.stack_index)
            .map(|i| &d.stack_table[i].location_indices[..])
            .unwrap_or_default()
            .iter()
            .filter_map(|&li| get(d.location_table.len(), li))
            .map(|li| {
                let location = &d.location_table[li];
                let mapping =
                    get(d.mapping_table.len(), location.mapping_index).map(|i| &d.mapping_table[i]);
                let function = location
                    .lines
                    .first()
                    .and_then(|l| get(d.function_table.len(), l.function_index))
                    .map(|i| string(d.function_table[i].name_strindex))
                    .filter(|name| !name.is_empty());
                ResolvedFrame {
                    function,
                    file: mapping
                        .map(|m| string(m.filename_strindex))
                        .unwrap_or_default(),
                    build_id: mapping.and_then(|m| {
                        text(&attribute(
                            &m.attribute_indices,
                            "process.executable.build_id.gnu",
                        )?)
                    }),
                    address: location.address,
                }
            })
            .collect();
        let pid =
            attribute(&sample.attribute_indices, "process.pid").and_then(|v| match v.value? {
                any_value::Value::IntValue(i) => Some(i),
                _ => None,
            });
        // Index 0 is the table's "no link"; an empty id is no link either.
        let span = usize::try_from(sample.link_index)
            .ok()
            .filter(|&i| i > 0)
            .and_then(|i| d.link_table.get(i))
            .filter(|l| !l.trace_id.is_empty() && !l.span_id.is_empty())
            .map(|l| (hex(&l.trace_id), hex(&l.span_id)));
        out.push(ResolvedSample {
            sample_type: sample_type.clone(),
            period: period.clone(),
            container_id: container_id.clone(),
            pid,
            thread: attribute(&sample.attribute_indices, "thread.name").and_then(|v| text(&v)),
            span,
            frames,
            value: sample.values.first().copied().unwrap_or(0),
        });
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: &AnyValue) -> Option<String> {
    match value.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}
