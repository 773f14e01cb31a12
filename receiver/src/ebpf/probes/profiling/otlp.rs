//! An interval's summed samples as OTLP profiles (the development version of the protocol): one
//! `ResourceProfiles` per cgroup (the same resource as its metrics, so `k8sattributes` enriches
//! both alike), an on-CPU profile (`samples`/`count`, period `cpu`/`nanoseconds`) and an off-CPU
//! profile (`off_cpu`/`nanoseconds`), and one dictionary for the whole message.
//!
//! A sample taken while its thread served an HTTP/gRPC request links to that request's span
//! (`link_index` into the dictionary's `link_table`: trace id and span id), the protocol's own
//! way of tying a sample to a trace.
//!
//! Frames of binaries keep their mapping (file name, `process.executable.build_id.gnu`) and their
//! file offset as the location's address, named or not, so a backend can symbolize what the node
//! could not.

use std::collections::HashMap;
use std::hash::Hash;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope};
use opentelemetry_proto::tonic::profiles::v1development::{
    Function, KeyValueAndUnit, Line, Link, Location, Mapping, Profile, ProfilesData,
    ProfilesDictionary, ResourceProfiles, Sample, ScopeProfiles, Stack, ValueType,
};

use super::modules::ModuleCache;
use super::stacks::{Frame, SampleKey, StackCounts, Weight};
use super::symbolize::{FrameMapping, NamedFrame};
use super::trace_link::SpanLink;
use crate::ebpf::builder::{resource, Owner};
use crate::ebpf::cgroups::CgroupIndex;

/// The attribute a mapping's build id goes in (OpenTelemetry semantic conventions).
pub const BUILD_ID_ATTRIBUTE: &str = "process.executable.build_id.gnu";

/// What the profiles are built from besides the samples.
pub struct ProfileContext<'a> {
    pub host_name: &'a str,
    pub index: &'a CgroupIndex,
    pub modules: &'a ModuleCache,
    pub names: &'a HashMap<Frame, NamedFrame>,
    /// Sampling frequency, for the on-CPU profile's period.
    pub frequency_hz: u64,
    pub end_ns: u64,
}

/// `counts` as OTLP profiles.
pub fn profiles(counts: &StackCounts, ctx: &ProfileContext<'_>) -> ProfilesData {
    let mut dictionary = DictionaryBuilder::new();
    let mut by_cgroup: HashMap<u64, (Vec<Sample>, Vec<Sample>)> = HashMap::new();
    for (kind, samples) in [(0, &counts.on_cpu), (1, &counts.off_cpu)] {
        let mut keys: Vec<(&SampleKey, &Weight)> = samples.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        for (key, weight) in keys {
            let sample = dictionary.sample(key, weight, kind == 1, ctx);
            let entry = by_cgroup.entry(key.cgroup).or_default();
            if kind == 0 {
                entry.0.push(sample);
            } else {
                entry.1.push(sample);
            }
        }
    }
    let scope = InstrumentationScope {
        name: "podscope.receiver.ebpf".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    };
    let duration = ctx.end_ns.saturating_sub(counts.start_ns);
    let mut cgroups: Vec<u64> = by_cgroup.keys().copied().collect();
    cgroups.sort_unstable();
    let mut resource_profiles = Vec::new();
    for cgroup in cgroups {
        let (on_cpu, off_cpu) = by_cgroup.remove(&cgroup).unwrap_or_default();
        let mut profiles = Vec::new();
        if !on_cpu.is_empty() {
            profiles.push(Profile {
                sample_type: Some(dictionary.value_type("samples", "count")),
                samples: on_cpu,
                time_unix_nano: counts.start_ns,
                duration_nano: duration,
                period_type: Some(dictionary.value_type("cpu", "nanoseconds")),
                period: (1_000_000_000 / ctx.frequency_hz.max(1)) as i64,
                ..Default::default()
            });
        }
        if !off_cpu.is_empty() {
            profiles.push(Profile {
                sample_type: Some(dictionary.value_type("off_cpu", "nanoseconds")),
                samples: off_cpu,
                time_unix_nano: counts.start_ns,
                duration_nano: duration,
                ..Default::default()
            });
        }
        resource_profiles.push(ResourceProfiles {
            resource: Some(resource(
                ctx.host_name,
                Owner::Cgroup(cgroup),
                ctx.index.path(cgroup),
            )),
            scope_profiles: vec![ScopeProfiles {
                scope: Some(scope.clone()),
                profiles,
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    ProfilesData {
        resource_profiles,
        dictionary: Some(dictionary.finish()),
    }
}

/// Interns strings, mappings, functions, locations, stacks and attributes into one
/// dictionary (index 0 of every table is its zero value, as the protocol asks).
struct DictionaryBuilder {
    tables: ProfilesDictionary,
    strings: HashMap<String, i32>,
    mappings: HashMap<FrameMapping, i32>,
    functions: HashMap<(i32, i32), i32>,
    locations: HashMap<Frame, i32>,
    stacks: HashMap<Vec<i32>, i32>,
    attributes: HashMap<(i32, AttributeValue), i32>,
    links: HashMap<SpanLink, i32>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum AttributeValue {
    Int(i64),
    Text(String),
}

fn intern<K: Eq + Hash, T>(
    index: &mut HashMap<K, i32>,
    table: &mut Vec<T>,
    key: K,
    make: impl FnOnce() -> T,
) -> i32 {
    *index.entry(key).or_insert_with(|| {
        table.push(make());
        (table.len() - 1) as i32
    })
}

impl DictionaryBuilder {
    fn new() -> DictionaryBuilder {
        let tables = podscope_core::profiles::empty_dictionary();
        DictionaryBuilder {
            tables,
            strings: HashMap::from([(String::new(), 0)]),
            mappings: HashMap::new(),
            functions: HashMap::new(),
            locations: HashMap::new(),
            stacks: HashMap::new(),
            attributes: HashMap::new(),
            links: HashMap::new(),
        }
    }

    fn string(&mut self, text: &str) -> i32 {
        if let Some(&i) = self.strings.get(text) {
            return i;
        }
        self.tables.string_table.push(text.to_string());
        let i = (self.tables.string_table.len() - 1) as i32;
        self.strings.insert(text.to_string(), i);
        i
    }

    fn value_type(&mut self, kind: &str, unit: &str) -> ValueType {
        ValueType {
            type_strindex: self.string(kind),
            unit_strindex: self.string(unit),
        }
    }

    fn attribute(&mut self, key: &str, value: AttributeValue) -> i32 {
        let key_strindex = self.string(key);
        let any = match &value {
            AttributeValue::Int(v) => any_value::Value::IntValue(*v),
            AttributeValue::Text(v) => any_value::Value::StringValue(v.clone()),
        };
        intern(
            &mut self.attributes,
            &mut self.tables.attribute_table,
            (key_strindex, value),
            || KeyValueAndUnit {
                key_strindex,
                value: Some(AnyValue { value: Some(any) }),
                unit_strindex: 0,
            },
        )
    }

    fn mapping(&mut self, mapping: &FrameMapping, modules: &ModuleCache) -> i32 {
        if let Some(&i) = self.mappings.get(mapping) {
            return i;
        }
        let (file, build_id) = match mapping {
            FrameMapping::Kernel => ("[kernel.kallsyms]".to_string(), None),
            FrameMapping::Module(id) => match modules.get(*id) {
                Some(m) => (m.name.clone(), m.build_id.clone()),
                None => ("[unknown]".to_string(), None),
            },
            FrameMapping::Jit(path) => (path.clone(), None),
            FrameMapping::Unknown => ("[unknown]".to_string(), None),
        };
        let filename_strindex = self.string(&file);
        let attribute_indices = build_id
            .map(|b| vec![self.attribute(BUILD_ID_ATTRIBUTE, AttributeValue::Text(b))])
            .unwrap_or_default();
        // Addresses are file offsets (binaries) or absolute (kernel, JIT): the mapping spans
        // every address, so address - memory_start + file_offset is the address itself.
        self.tables.mapping_table.push(Mapping {
            memory_start: 0,
            memory_limit: u64::MAX,
            file_offset: 0,
            filename_strindex,
            attribute_indices,
        });
        let i = (self.tables.mapping_table.len() - 1) as i32;
        self.mappings.insert(mapping.clone(), i);
        i
    }

    fn location(&mut self, frame: &Frame, ctx: &ProfileContext<'_>) -> i32 {
        if let Some(&i) = self.locations.get(frame) {
            return i;
        }
        let named = ctx.names.get(frame);
        let mapping_index = match named {
            Some(n) => self.mapping(&n.mapping, ctx.modules),
            None => 0,
        };
        let lines = match named.and_then(|n| n.function.as_deref()) {
            Some(function) => {
                let name_strindex = self.string(function);
                let filename_strindex = self.tables.mapping_table[mapping_index as usize].filename_strindex;
                let function_index = intern(
                    &mut self.functions,
                    &mut self.tables.function_table,
                    (name_strindex, filename_strindex),
                    || Function {
                        name_strindex,
                        system_name_strindex: name_strindex,
                        filename_strindex,
                        start_line: 0,
                    },
                );
                vec![Line {
                    function_index,
                    line: 0,
                    column: 0,
                }]
            }
            None => Vec::new(),
        };
        self.tables.location_table.push(Location {
            mapping_index,
            address: named.map_or(0, |n| n.address),
            lines,
            attribute_indices: Vec::new(),
        });
        let i = (self.tables.location_table.len() - 1) as i32;
        self.locations.insert(*frame, i);
        i
    }

    fn sample(
        &mut self,
        key: &SampleKey,
        weight: &Weight,
        off_cpu: bool,
        ctx: &ProfileContext<'_>,
    ) -> Sample {
        let locations: Vec<i32> = key.frames.iter().map(|f| self.location(f, ctx)).collect();
        let stack_index = intern(
            &mut self.stacks,
            &mut self.tables.stack_table,
            locations.clone(),
            || Stack {
                location_indices: locations,
            },
        );
        let attribute_indices = vec![
            self.attribute("process.pid", AttributeValue::Int(key.pid as i64)),
            self.attribute("thread.name", AttributeValue::Text(key.thread.clone())),
        ];
        let link_index = match &key.link {
            Some(link) => intern(
                &mut self.links,
                &mut self.tables.link_table,
                *link,
                || Link {
                    trace_id: link.trace_id.to_vec(),
                    span_id: link.span_id.to_vec(),
                },
            ),
            None => 0,
        };
        Sample {
            stack_index,
            attribute_indices,
            link_index,
            values: vec![if off_cpu {
                weight.off_cpu_ns as i64
            } else {
                weight.samples as i64
            }],
            timestamps_unix_nano: Vec::new(),
        }
    }

    fn finish(self) -> ProfilesDictionary {
        self.tables
    }
}
