//! The kernel probes: one folder each, behind two traits. [`ProbeKind`] is a probe's static side
//! (its `probes.<name>` settings, metrics and maps, and how it loads); [`Probe`] is a loaded
//! probe, owned by the collection task (read its maps into data points, free the entries of
//! removed cgroups). [`probe_table!`] lists every kind once: it makes the `probes:` settings and
//! the loader's list from that line.
//!
//! Each probe loads on its own: one this kernel refuses is logged in one line and skipped, unless
//! it is `required`. Nothing here knows a particular probe beyond its line in the table.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use podscope_core::FieldError;
use serde::{Deserialize, Deserializer};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::builder::MetricsBuilder;
use super::catalog::MetricDoc;
use super::events::ProcessTable;
use super::object::{
    Global, KernelFeatures, MapDef, MapSize, ObjectSettings, ProbeError, ProbeObject, ProbeSpec,
    RING_MIN_BYTES,
};
use super::telemetry::EbpfTelemetry;

/// A kind of kernel probe: its settings, what it emits and how it loads.
pub trait ProbeKind {
    /// `probes.<name>:`
    type Config: for<'de> Deserialize<'de> + Default + Clone + std::fmt::Debug;
    /// Its object, programs and maps; its name is the key under `probes:`.
    const SPEC: ProbeSpec;
    /// Every metric it emits (`docs/metrics.md` is generated from these).
    const METRICS: &'static [MetricDoc];
    /// Whether it makes spans (the receiver's traces signal).
    const MAKES_SPANS: bool = false;
    /// Whether it makes profiles (the receiver's profiles signal).
    const MAKES_PROFILES: bool = false;

    /// Whether the settings turn the probe on.
    fn enabled(config: &Self::Config) -> bool;
    /// Whether the settings name something to run (`uprobes: []` does not), on or off.
    fn listed(_config: &Self::Config) -> bool {
        true
    }
    /// Problems beyond what the types say, with paths under `prefix` (`probes.<name>`).
    fn validate(_config: &Self::Config, _prefix: &str, _errors: &mut Vec<FieldError>) {}
    /// Loads and attaches (only called when enabled). A probe that cannot load is skipped with a
    /// line or fails startup when required: [`LoadContext::attempt`].
    fn load(
        config: &Self::Config,
        ctx: &mut LoadContext<'_>,
    ) -> anyhow::Result<Vec<Box<dyn Probe>>>;
}

/// A loaded probe.
pub trait Probe: Send {
    /// Its loaded objects (one, or one per uprobe entry).
    fn objects_mut(&mut self) -> Vec<&mut ProbeObject>;

    /// Where it is attached when it is not evident from its spec (a hook chosen at load time, with
    /// the reason), for the start-up line; empty otherwise.
    fn hooks(&self) -> String {
        String::new()
    }

    /// Reads its maps into `out`, noting every cgroup it has entries for.
    fn collect(&mut self, out: &mut Collection<'_>);

    /// Frees the entries of cgroups that no longer exist (their series were reported a last time).
    fn forget(&mut self, _gone: &HashSet<u64>) {}

    /// Kernel memory of maps it holds outside `objects_mut` (users' programs).
    fn extra_map_memory(&self) -> Vec<super::object::MapMemory> {
        Vec::new()
    }

    /// Starts the tasks it runs beside the collection (the process probe's event reader).
    fn spawn(
        &mut self,
        _ctx: &StartContext,
        _cancel: &CancellationToken,
    ) -> anyhow::Result<Vec<JoinHandle<()>>> {
        Ok(Vec::new())
    }

    /// Whether it wants to hear about new containers (`container:` uprobes).
    fn watches_containers(&self) -> bool {
        false
    }

    /// Looks for new targets (containers started since the last look): at start, at every
    /// collection, and when a new container appears.
    fn rescan(&mut self) {}
}

/// What probes load with.
pub struct LoadContext<'a> {
    pub receiver: &'a str,
    pub features: &'a KernelFeatures,
    pub telemetry: &'a EbpfTelemetry,
    /// The receiver's settings every object gets (`agent_tgid`, `filter_mode`).
    pub common: Vec<Global>,
    /// The `max_entries` settings of the probe being loaded.
    pub max_entries: MapSizes,
    /// Probes that were skipped, and why.
    pub skipped: Vec<ProbeError>,
}

impl LoadContext<'_> {
    /// Loads `spec`'s object with the receiver's settings, the probe's map sizes and `settings`.
    pub fn object(
        &self,
        spec: &ProbeSpec,
        settings: &ObjectSettings<'_>,
    ) -> Result<ProbeObject, ProbeError> {
        ProbeObject::load(
            spec,
            self.features,
            &self.common,
            &self.max_entries.0,
            settings,
        )
    }

    /// Sizes `map` at `entries` unless the probe's `max_entries` setting does: for maps the
    /// probe's settings leave unused (one entry then, instead of the compiled default).
    pub fn size_unless_set(&mut self, map: &str, entries: u32) {
        self.max_entries.0.entry(map.to_string()).or_insert(entries);
    }

    /// Runs `load`: its probe, or, when it fails, an error if `required` (`what` says what is
    /// required), else `None` after one log line (the probe is listed as skipped).
    pub fn attempt<T>(
        &mut self,
        required: bool,
        what: &str,
        load: impl FnOnce(&mut Self) -> Result<T, ProbeError>,
    ) -> anyhow::Result<Option<T>> {
        match load(self) {
            Ok(probe) => Ok(Some(probe)),
            Err(error) if required => anyhow::bail!("{error} (the {what} is required)"),
            Err(error) => {
                tracing::warn!(receiver = %self.receiver, "{error}; skipped");
                self.telemetry.set_probe_skipped(error.probe, true);
                self.skipped.push(error);
                Ok(None)
            }
        }
    }
}

/// The usual kind of probe: one object, on when `enabled`; one that cannot load is skipped with a
/// line, or fails startup when `required`. Every kind but `uprobes` is one.
pub trait SingleObjectProbe {
    type Config: ProbeSettings + for<'de> Deserialize<'de> + Default + Clone + std::fmt::Debug;
    /// Its object, programs and maps (the spec's name is the probe's).
    const SPEC: ProbeSpec;
    const METRICS: &'static [MetricDoc];
    const MAKES_SPANS: bool = false;
    const MAKES_PROFILES: bool = false;

    fn validate(_config: &Self::Config, _prefix: &str, _errors: &mut Vec<FieldError>) {}
    fn open(config: &Self::Config, ctx: &mut LoadContext<'_>)
        -> Result<Box<dyn Probe>, ProbeError>;
}

impl<K: SingleObjectProbe> ProbeKind for K {
    type Config = K::Config;
    const SPEC: ProbeSpec = K::SPEC;
    const METRICS: &'static [MetricDoc] = K::METRICS;
    const MAKES_SPANS: bool = K::MAKES_SPANS;
    const MAKES_PROFILES: bool = K::MAKES_PROFILES;

    fn enabled(config: &K::Config) -> bool {
        config.enabled()
    }

    fn validate(config: &K::Config, prefix: &str, errors: &mut Vec<FieldError>) {
        config
            .max_entries()
            .validate(K::SPEC.maps, &format!("{prefix}.max_entries"), errors);
        K::validate(config, prefix, errors);
    }

    fn load(config: &K::Config, ctx: &mut LoadContext<'_>) -> anyhow::Result<Vec<Box<dyn Probe>>> {
        ctx.max_entries = config.max_entries().clone();
        let probe = ctx.attempt(config.required(), "probe", |ctx| K::open(config, ctx))?;
        if let Some(probe) = &probe {
            ctx.telemetry.set_probe_skipped(K::SPEC.name, false);
            let hooks = probe.hooks();
            if hooks.is_empty() {
                tracing::info!(receiver = %ctx.receiver, probe = K::SPEC.name, "probe attached");
            } else {
                tracing::info!(receiver = %ctx.receiver, probe = K::SPEC.name, %hooks, "probe attached");
            }
        }
        Ok(probe.into_iter().collect())
    }
}

/// `enabled`, `required` and `max_entries`, which every single-object probe's settings have.
pub trait ProbeSettings {
    fn enabled(&self) -> bool;
    fn required(&self) -> bool;
    fn max_entries(&self) -> &MapSizes;
}

/// `impl ProbeSettings` for settings with `enabled`, `required` and `max_entries` fields.
macro_rules! probe_settings {
    ($config:ty) => {
        impl $crate::ebpf::probes::ProbeSettings for $config {
            fn enabled(&self) -> bool {
                self.enabled
            }
            fn required(&self) -> bool {
                self.required
            }
            fn max_entries(&self) -> &$crate::ebpf::probes::MapSizes {
                &self.max_entries
            }
        }
    };
}
pub(crate) use probe_settings;

probe_settings!(BasicProbeConfig);

/// `max_entries:` of a probe — kernel map sizes by map name, instead of the sizes compiled into
/// the probe (`docs/metrics.md` lists every map with its default): entries for hash maps, bytes
/// for ring buffers.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct MapSizes(pub BTreeMap<String, u32>);

impl MapSizes {
    /// Every name must be a sizable map of `maps`, every size one the kernel takes.
    pub fn validate(&self, maps: &[MapDef], prefix: &str, errors: &mut Vec<FieldError>) {
        for (name, &size) in &self.0 {
            let at = format!("{prefix}.{name}");
            match maps.iter().find(|m| m.name == name).map(|m| m.size) {
                None | Some(MapSize::Fixed) => {
                    let sizable: Vec<&str> = maps
                        .iter()
                        .filter(|m| m.size != MapSize::Fixed)
                        .map(|m| m.name)
                        .collect();
                    errors.push(FieldError::new(
                        at,
                        format!(
                            "not a map of this probe that can be sized; those are: {}",
                            sizable.join(", ")
                        ),
                    ));
                }
                Some(MapSize::Entries) if size == 0 => {
                    errors.push(FieldError::new(at, "must be at least 1"));
                }
                Some(MapSize::RingBytes) if size < RING_MIN_BYTES || !size.is_power_of_two() => {
                    errors.push(FieldError::new(
                        at,
                        format!("a ring buffer's size in bytes is a power of two, at least {RING_MIN_BYTES}"),
                    ));
                }
                Some(_) => {}
            }
        }
    }
}

/// What probes start their tasks with.
pub struct StartContext {
    /// Where spans go: the receiver's traces pipelines, if any.
    pub traces: Option<Arc<dyn podscope_core::Consumer>>,
    /// Where profiles go: the receiver's profiles pipelines, if any.
    pub profiles: Option<Arc<dyn podscope_core::Consumer>>,
    pub collection_interval: std::time::Duration,
    /// `host.name` and the cgroup2 mount, for the resources of what probes send themselves.
    pub host_name: String,
    pub cgroup_root: std::path::PathBuf,
    pub processes: ProcessTable,
    /// Told when a process starts in a cgroup not seen before, if a probe watches containers.
    pub new_containers: Option<Arc<Notify>>,
    /// Which thread served which HTTP/gRPC request when: published by the http probe, read by
    /// the profiling probe's trace link. Only when both run in this receiver and both signals
    /// have pipelines.
    pub trace_links: Option<profiling::trace_link::TraceLinks>,
    /// Where the http probe hands its exchanges to live `trace … http` sessions: the `session`
    /// extension the receiver names, if any.
    pub http_exchanges: Option<Arc<crate::session::ExchangeTap>>,
}

/// One collection: the data points being built and the cgroups with entries in any map.
pub struct Collection<'a> {
    pub metrics: MetricsBuilder<'a>,
    pub host_name: &'a str,
    pub receiver: &'a str,
    cgroups: HashSet<u64>,
}

impl<'a> Collection<'a> {
    pub fn new(metrics: MetricsBuilder<'a>, host_name: &'a str, receiver: &'a str) -> Self {
        Collection {
            metrics,
            host_name,
            receiver,
            cgroups: HashSet::new(),
        }
    }

    /// Notes cgroups that have map entries (to free them once the cgroup is removed).
    pub fn saw(&mut self, cgroups: impl IntoIterator<Item = u64>) {
        self.cgroups.extend(cgroups);
    }

    pub fn finish(self) -> (MetricsBuilder<'a>, HashSet<u64>) {
        (self.metrics, self.cgroups)
    }
}

/// Settings of a probe that has no others (`sched`, `block_io`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BasicProbeConfig {
    /// Default true.
    pub enabled: bool,
    /// Fail startup if the probe cannot attach (default false: log one line and go on).
    pub required: bool,
    /// Kernel map sizes by map name (see [`MapSizes`]).
    pub max_entries: MapSizes,
}

impl Default for BasicProbeConfig {
    fn default() -> Self {
        BasicProbeConfig {
            enabled: true,
            required: false,
            max_entries: MapSizes::default(),
        }
    }
}

fn present_means_on<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Some(
        Option::<T>::deserialize(deserializer)?.unwrap_or_default(),
    ))
}

/// The probe table: one line per probe, `key: Kind` (the folder `probes/<key>/` and the
/// [`ProbeKind`] in it), in load order. It declares the module and makes `ProbesConfig` (a field
/// per probe, on when listed) and the loader's and the catalog's lists.
macro_rules! probe_table {
    ($($(#[doc = $doc:literal])* $name:ident: $kind_name:ident,)+) => {
        $(pub mod $name;)+
        probe_table!(@lists $($(#[doc = $doc])* $name: $name::$kind_name,)+);
    };
    (@lists $($(#[doc = $doc:literal])* $name:ident: $kind:ty,)+) => {
        /// `probes:` — a probe is on when listed, even empty (`sched:`), unless `enabled: false`.
        #[derive(Debug, Clone, Default, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct ProbesConfig {
            $(
                $(#[doc = $doc])*
                #[serde(deserialize_with = "present_means_on")]
                pub $name: Option<<$kind as ProbeKind>::Config>,
            )+
        }

        impl ProbesConfig {
            /// Whether a probe that makes spans is on.
            pub fn makes_spans(&self) -> bool {
                false $(|| (<$kind as ProbeKind>::MAKES_SPANS && self.$name.as_ref().is_some_and(<$kind as ProbeKind>::enabled)))+
            }

            /// Whether a probe that makes profiles is on.
            pub fn makes_profiles(&self) -> bool {
                false $(|| (<$kind as ProbeKind>::MAKES_PROFILES && self.$name.as_ref().is_some_and(<$kind as ProbeKind>::enabled)))+
            }

            /// Whether any probe is listed (on or off).
            pub fn any_listed(&self) -> bool {
                false $(|| self.$name.as_ref().is_some_and(<$kind as ProbeKind>::listed))+
            }

            /// The keys of the probes listed, on or off, in table order.
            pub fn listed_names(&self) -> Vec<&'static str> {
                let mut names = Vec::new();
                $(if self.$name.is_some() {
                    names.push(stringify!($name));
                })+
                names
            }

            /// The keys of the probes that are on, in table order.
            pub fn enabled_names(&self) -> Vec<&'static str> {
                let mut names = Vec::new();
                $(if self.$name.as_ref().is_some_and(<$kind as ProbeKind>::enabled) {
                    names.push(stringify!($name));
                })+
                names
            }

            /// These settings with only the probes named in `kinds` left listed.
            pub fn only(&self, kinds: &[&str]) -> ProbesConfig {
                ProbesConfig {
                    $($name: if kinds.contains(&stringify!($name)) { self.$name.clone() } else { None },)+
                }
            }

            pub fn validate(&self, errors: &mut Vec<FieldError>) {
                $(if let Some(config) = &self.$name {
                    <$kind as ProbeKind>::validate(config, concat!("probes.", stringify!($name)), errors);
                })+
            }

            /// Loads every probe that is on, in table order.
            pub fn load(&self, ctx: &mut LoadContext<'_>) -> anyhow::Result<Vec<Box<dyn Probe>>> {
                let mut probes = Vec::new();
                $(if let Some(config) = self.$name.as_ref().filter(|c| <$kind as ProbeKind>::enabled(c)) {
                    probes.extend(<$kind as ProbeKind>::load(config, ctx)?);
                })+
                Ok(probes)
            }
        }

        /// Every probe's key and metrics, in table order.
        pub const KINDS: &[(&str, &[MetricDoc])] = &[$((stringify!($name), <$kind as ProbeKind>::METRICS)),+];

        /// Every probe's key and spec (object and maps), in table order.
        pub const SPECS: &[(&str, ProbeSpec)] = &[$((stringify!($name), <$kind as ProbeKind>::SPEC)),+];
    };
}

probe_table! {
    process: Process,
    syscalls: Syscalls,
    files: Files,
    sched: Sched,
    block_io: BlockIo,
    tcp: Tcp,
    /// User functions to count, with a captured argument or return value.
    uprobes: Uprobes,
    /// HTTP and gRPC requests served and made, as spans and RED metrics.
    http: Http,
    /// On- and off-CPU stack profiles (a profiles pipeline takes them).
    profiling: Profiling,
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_table_key_is_its_probes_name() {
        for (key, spec) in super::SPECS {
            assert_eq!(key, &spec.name);
        }
    }
}
