//! Profiles in the formats people open: pprof (`profile.proto`, gzip-compressed, what
//! `go tool pprof`, Pyroscope and speedscope read) and folded stacks (one line per stack, what
//! flame graph tools read), made from OTLP profiles. It knows no pipeline; the `podscope profile`
//! command writes its output with it.

mod proto;
mod resolve;

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;

use opentelemetry_proto::tonic::profiles::v1development::ProfilesData;
use prost::Message as _;

pub use proto::Profile as PprofProfile;
pub use resolve::{resolved_samples, ResolvedFrame, ResolvedSample};

/// Builds one pprof profile of one sample type from any number of OTLP profiles (intervals,
/// containers): identical stacks with identical labels are summed.
pub struct PprofBuilder {
    profile: proto::Profile,
    sample_type: String,
    strings: HashMap<String, i64>,
    mappings: HashMap<(String, Option<String>), u64>,
    functions: HashMap<(String, String), u64>,
    locations: HashMap<ResolvedFrame, u64>,
    samples: HashMap<(Vec<u64>, Vec<proto::Label>), usize>,
    start_ns: Option<i64>,
    end_ns: i64,
}

impl PprofBuilder {
    /// A builder that keeps the OTLP profiles whose sample type is `sample_type` (`samples` for
    /// on-CPU, `off_cpu` for off-CPU).
    pub fn new(sample_type: &str) -> PprofBuilder {
        let mut builder = PprofBuilder {
            profile: proto::Profile::default(),
            sample_type: sample_type.to_string(),
            strings: HashMap::new(),
            mappings: HashMap::new(),
            functions: HashMap::new(),
            locations: HashMap::new(),
            samples: HashMap::new(),
            start_ns: None,
            end_ns: 0,
        };
        builder.string("");
        builder
    }

    fn string(&mut self, text: &str) -> i64 {
        if let Some(&i) = self.strings.get(text) {
            return i;
        }
        self.profile.string_table.push(text.to_string());
        let i = self.profile.string_table.len() as i64 - 1;
        self.strings.insert(text.to_string(), i);
        i
    }

    fn value_type(&mut self, (kind, unit): &(String, String)) -> proto::ValueType {
        proto::ValueType {
            r#type: self.string(kind),
            unit: self.string(unit),
        }
    }

    /// Adds the samples of `data`'s profiles of this builder's sample type; returns how many.
    pub fn add(&mut self, data: &ProfilesData) -> usize {
        for rp in &data.resource_profiles {
            for p in rp.scope_profiles.iter().flat_map(|sp| &sp.profiles) {
                let start = p.time_unix_nano as i64;
                self.start_ns = Some(self.start_ns.map_or(start, |s| s.min(start)));
                self.end_ns = self
                    .end_ns
                    .max(start.saturating_add(p.duration_nano as i64));
            }
        }
        let mut added = 0;
        for sample in resolved_samples(data) {
            if sample.sample_type.0 != self.sample_type {
                continue;
            }
            if self.profile.sample_type.is_empty() {
                let value_type = self.value_type(&sample.sample_type);
                self.profile.sample_type.push(value_type);
                if let Some((period_type, period)) = &sample.period {
                    self.profile.period_type = Some(self.value_type(period_type));
                    self.profile.period = *period;
                }
            }
            let location_ids: Vec<u64> = sample.frames.iter().map(|f| self.location(f)).collect();
            let mut labels = Vec::new();
            if let Some(pid) = sample.pid {
                labels.push(proto::Label {
                    key: self.string("pid"),
                    str: 0,
                    num: pid,
                });
            }
            if let Some(thread) = &sample.thread {
                labels.push(proto::Label {
                    key: self.string("thread"),
                    str: self.string(thread),
                    num: 0,
                });
            }
            if let Some(container) = &sample.container_id {
                labels.push(proto::Label {
                    key: self.string("container.id"),
                    str: self.string(container),
                    num: 0,
                });
            }
            match self.samples.get(&(location_ids.clone(), labels.clone())) {
                Some(&i) => self.profile.sample[i].value[0] += sample.value,
                None => {
                    self.samples.insert(
                        (location_ids.clone(), labels.clone()),
                        self.profile.sample.len(),
                    );
                    self.profile.sample.push(proto::Sample {
                        location_id: location_ids,
                        value: vec![sample.value],
                        label: labels,
                    });
                }
            }
            added += 1;
        }
        added
    }

    fn location(&mut self, frame: &ResolvedFrame) -> u64 {
        if let Some(&id) = self.locations.get(frame) {
            return id;
        }
        let mapping_id = self.mapping(&frame.file, &frame.build_id);
        let line = match &frame.function {
            Some(name) => {
                let id = self.function(name, &frame.file);
                vec![proto::Line {
                    function_id: id,
                    line: 0,
                }]
            }
            None => Vec::new(),
        };
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(proto::Location {
            id,
            mapping_id,
            address: frame.address,
            line,
        });
        self.locations.insert(frame.clone(), id);
        id
    }

    fn mapping(&mut self, file: &str, build_id: &Option<String>) -> u64 {
        let key = (file.to_string(), build_id.clone());
        if let Some(&id) = self.mappings.get(&key) {
            return id;
        }
        let id = self.profile.mapping.len() as u64 + 1;
        let mapping = proto::Mapping {
            id,
            // Addresses are what the OTLP locations state (file offsets): the mapping spans them.
            memory_start: 0,
            memory_limit: u64::MAX,
            file_offset: 0,
            filename: self.string(file),
            build_id: build_id.as_deref().map_or(0, |b| self.string(b)),
            has_functions: true,
        };
        self.profile.mapping.push(mapping);
        self.mappings.insert(key, id);
        id
    }

    fn function(&mut self, name: &str, file: &str) -> u64 {
        let key = (name.to_string(), file.to_string());
        if let Some(&id) = self.functions.get(&key) {
            return id;
        }
        let id = self.profile.function.len() as u64 + 1;
        let function = proto::Function {
            id,
            name: self.string(name),
            system_name: self.string(name),
            filename: self.string(file),
        };
        self.profile.function.push(function);
        self.functions.insert(key, id);
        id
    }

    /// Whether no sample was added.
    pub fn is_empty(&self) -> bool {
        self.profile.sample.is_empty()
    }

    pub fn finish(mut self) -> proto::Profile {
        if let Some(start) = self.start_ns {
            self.profile.time_nanos = start;
            self.profile.duration_nanos = self.end_ns.saturating_sub(start);
        }
        self.profile
    }
}

/// `profile` as a pprof file: the message, gzip-compressed (as pprof tools expect).
pub fn encode_gzip(profile: &proto::Profile) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(&profile.encode_to_vec());
    encoder.finish().unwrap_or_default()
}

/// Folded stacks of the samples of `data` whose sample type is `sample_type`: one entry per
/// distinct stack, `thread;root;…;leaf` with the summed value, as flame graph tools read them.
pub fn fold(data: &[ProfilesData], sample_type: &str, folded: &mut BTreeMap<String, i64>) {
    for sample in data.iter().flat_map(resolved_samples) {
        if sample.sample_type.0 != sample_type {
            continue;
        }
        let mut line = sample.thread.clone().unwrap_or_else(|| "[unknown]".into());
        for frame in sample.frames.iter().rev() {
            line.push(';');
            // `;` separates frames: it may not appear in a name.
            line.push_str(&frame.display_name().replace(';', "_"));
        }
        *folded.entry(line).or_default() += sample.value;
    }
}

#[cfg(test)]
mod tests;
