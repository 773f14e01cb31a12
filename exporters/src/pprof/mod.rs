//! Profiles in the formats people open: pprof (`profile.proto`, gzip-compressed, what
//! `go tool pprof`, Pyroscope and speedscope read) and folded stacks (one line per stack, what
//! flame graph tools read), made from OTLP profiles. The `podscope profile` command writes its
//! output with the builders here.
//!
//! The `pprof` exporter writes each OTLP profile of a `profiles` pipeline (one container, one
//! interval, one sample type) as one gzip pprof file into `directory`, named after the container
//! (see [`pprof_files`]), and keeps the directory within `rotation` (a count of files and a byte
//! budget; the oldest files go first). A file that cannot be written (a full disk) is dropped
//! and counted as the exporter's drop; the agent goes on.

mod config;
mod directory;
mod files;
mod proto;
mod resolve;

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use opentelemetry_proto::tonic::profiles::v1development::{
    Profile, ProfilesData, ResourceProfiles,
};
use podscope_core::component::create_exporter;
use podscope_core::{
    Batch, BuildContext, ConsumeError, Exporter, ExporterBuilder, ExporterFactory, Signal,
};
use prost::Message as _;

pub use config::{PprofConfig, PprofRotation};
pub use directory::PprofDirectory;
pub use files::{pprof_files, PprofFile};
pub use proto::Profile as PprofProfile;
pub use resolve::{resolved_profile_samples, resolved_samples, ResolvedFrame, ResolvedSample};

use crate::helper::{HelperSettings, QueuedExporter, Request, Sender, SendingQueueSettings, Sent};

pub const FACTORY: ExporterFactory = ExporterFactory {
    type_name: "pprof",
    description:
        "Writes one gzip pprof file per container, interval and profile type into a directory, with rotation",
    signals: &[Signal::Profiles],
    create: create_exporter::<PprofConfig>,
};

impl ExporterBuilder for PprofConfig {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Exporter>> {
        // As the file exporter: a write works or fails for a reason a quick retry will not fix
        // (a full disk), so no queue and no retries: a failed file is dropped and counted.
        let settings = HelperSettings {
            sending_queue: SendingQueueSettings {
                enabled: false,
                ..Default::default()
            },
            ..Default::default()
        };
        QueuedExporter::new(
            &ctx,
            settings,
            PprofSender {
                config: *self,
                directory: Arc::new(Mutex::new(None)),
            },
        )
        .map(|e| e as _)
    }
}

struct PprofSender {
    config: PprofConfig,
    /// Opened by `start`.
    directory: Arc<Mutex<Option<PprofDirectory>>>,
}

#[async_trait]
impl Sender for PprofSender {
    type Payload = PprofFile;

    async fn start(&self) -> anyhow::Result<()> {
        let directory = PprofDirectory::open(&self.config.directory, self.config.rotation.clone())?;
        *self.directory.lock().unwrap_or_else(|e| e.into_inner()) = Some(directory);
        Ok(())
    }

    fn requests(&self, batch: Batch) -> Result<Vec<Request<PprofFile>>, ConsumeError> {
        let Batch::Profiles(data) = &batch else {
            return Err(ConsumeError::permanent(
                "unsupported_signal",
                format!("the pprof exporter takes profiles, not {}", batch.signal()),
            ));
        };
        Ok(pprof_files(data)
            .into_iter()
            .map(|file| {
                let samples = file.samples;
                Request::unordered(file, samples)
            })
            .collect())
    }

    async fn send(&self, file: &PprofFile) -> Result<Sent, ConsumeError> {
        let file = file.clone();
        let directory = self.directory.clone();
        let path = self.config.directory.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = directory.lock().unwrap_or_else(|e| e.into_inner());
            let Some(directory) = guard.as_mut() else {
                return Err(ConsumeError::retryable(
                    "not_started",
                    "the pprof exporter is not started",
                ));
            };
            directory
                .write(&file)
                .map(|_| Sent::default())
                .map_err(|e| {
                    let reason = if directory::is_disk_full(&e) {
                        "disk_full"
                    } else {
                        "io_error"
                    };
                    ConsumeError::permanent(
                        reason,
                        format!("writing {} into {}: {e}", file.name, path.display()),
                    )
                })
        })
        .await
        .map_err(|e| ConsumeError::permanent("io_error", format!("writer task failed: {e}")))?
    }
}

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
        let mut added = 0;
        for rp in &data.resource_profiles {
            for profile in rp.scope_profiles.iter().flat_map(|sp| &sp.profiles) {
                added += self.add_profile(data, rp, profile);
            }
        }
        added
    }

    /// Adds the samples of one `profile` of `rp`, a resource of `data`, if it has this
    /// builder's sample type; returns how many.
    pub fn add_profile(
        &mut self,
        data: &ProfilesData,
        rp: &ResourceProfiles,
        profile: &Profile,
    ) -> usize {
        let samples = resolved_profile_samples(data, rp, profile);
        if samples.first().map(|s| &s.sample_type.0) != Some(&self.sample_type) {
            return 0;
        }
        let start = profile.time_unix_nano as i64;
        self.start_ns = Some(self.start_ns.map_or(start, |s| s.min(start)));
        self.end_ns = self
            .end_ns
            .max(start.saturating_add(profile.duration_nano as i64));
        self.add_samples(samples)
    }

    fn add_samples(&mut self, samples: Vec<ResolvedSample>) -> usize {
        let mut added = 0;
        for sample in samples {
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
            // The span's ids as Pyroscope's span profiles and `go tool pprof -tagfocus` read them.
            if let Some((trace_id, span_id)) = &sample.span {
                for (key, id) in [("trace_id", trace_id), ("span_id", span_id)] {
                    labels.push(proto::Label {
                        key: self.string(key),
                        str: self.string(id),
                        num: 0,
                    });
                }
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
