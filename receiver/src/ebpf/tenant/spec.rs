//! A `Probe`'s spec, and what it asks for resolved against the agent's `tenant_probes`: the
//! settings of its instance, or why it cannot have one.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::config::TenantProbesConfig;
use crate::ebpf::probes::ProbesConfig;
use crate::ebpf::programs::spec::LabelSelectorSpec;

/// `spec` of a `Probe` (`podscope.dev/v1alpha1`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProbeObjectSpec {
    /// Pods of the Probe's namespace to observe; unset: all of them. Never pods of another
    /// namespace, whatever it says.
    #[serde(default)]
    pub pod_selector: Option<LabelSelectorSpec>,
    /// The built-in probes to run for them, by name, each with what a tenant may set.
    pub probes: BTreeMap<String, Option<TenantProbeSettings>>,
}

/// What a tenant may set of a probe: less than the agent's settings, never more.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TenantProbeSettings {
    /// http: the share of requests whose spans are kept, at most the agent's
    /// `spans.sampling_ratio` for Probes.
    pub sampling_ratio: Option<f64>,
    /// profiling: samples per second on each CPU, at most the agent's `frequency` for Probes.
    pub frequency: Option<u64>,
}

/// A Probe's instance settings: the probes to load, and their names.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub probes: ProbesConfig,
    pub kinds: Vec<String>,
    pub pod_selector: podscope_k8s::labels::Selector,
}

impl ProbeObjectSpec {
    pub fn parse(spec: &serde_json::Value) -> Result<ProbeObjectSpec, String> {
        serde_path_to_error::deserialize(spec.clone()).map_err(|e| {
            let at = match e.path().to_string().as_str() {
                "." => "spec".to_string(),
                path => format!("spec.{path}"),
            };
            format!("invalid spec: {at}: {}", e.inner())
        })
    }

    /// The instance this spec asks for under `config`, or what in it the agent refuses (the
    /// first problem, with its path). `profiles` says whether the receiver has a profiles
    /// pipeline (profiling makes nothing else).
    pub fn resolve(&self, config: &TenantProbesConfig, profiles: bool) -> Result<Resolved, String> {
        let pod_selector = match &self.pod_selector {
            Some(selector) => selector
                .selector()
                .map_err(|e| format!("spec.podSelector: {e}"))?,
            None => Default::default(),
        };
        let allowed = config.allowed();
        if self.probes.is_empty() {
            return Err(format!(
                "spec.probes: names no probe; this agent lets a Probe enable: {}",
                allowed.join(", ")
            ));
        }
        let mut kinds = Vec::new();
        for kind in self.probes.keys() {
            if !allowed.contains(&kind.as_str()) {
                return Err(format!(
                    "spec.probes.{kind}: {kind} is not a probe this agent lets a Probe enable (allowed: {})",
                    allowed.join(", ")
                ));
            }
            kinds.push(kind.as_str());
        }
        // Every kind is allowed, so listed and on in the agent's settings for Probes.
        let mut probes = config.probes.only(&kinds);
        for (kind, settings) in &self.probes {
            let at = format!("spec.probes.{kind}");
            let settings = settings.clone().unwrap_or_default();
            if let Some(ratio) = settings.sampling_ratio {
                let http = probes
                    .http
                    .as_mut()
                    .filter(|_| kind == "http")
                    .ok_or_else(|| format!("{at}.samplingRatio: only http has a sampling ratio"))?;
                let most = http.spans.sampling_ratio;
                if !(0.0..=most).contains(&ratio) {
                    return Err(format!(
                        "{at}.samplingRatio: {ratio} is not within 0 and the agent's maximum {most}"
                    ));
                }
                http.spans.sampling_ratio = ratio;
            }
            if let Some(frequency) = settings.frequency {
                let profiling = probes
                    .profiling
                    .as_mut()
                    .filter(|_| kind == "profiling")
                    .ok_or_else(|| format!("{at}.frequency: only profiling has a frequency"))?;
                let most = profiling.frequency;
                if !(1..=most).contains(&frequency) {
                    return Err(format!(
                        "{at}.frequency: {frequency} is not within 1 and the agent's maximum {most}"
                    ));
                }
                profiling.frequency = frequency;
            }
            if kind == "profiling" && !profiles {
                return Err(format!(
                    "{at}: this agent sends no profiles (its eBPF receiver is in no profiles pipeline)"
                ));
            }
        }
        let kinds = kinds.into_iter().map(str::to_string).collect();
        Ok(Resolved {
            probes,
            kinds,
            pod_selector,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn agent(yaml: serde_json::Value) -> TenantProbesConfig {
        serde_json::from_value(yaml).unwrap()
    }

    fn resolve(spec: serde_json::Value, config: &TenantProbesConfig) -> Result<Resolved, String> {
        ProbeObjectSpec::parse(&spec)?.resolve(config, false)
    }

    #[test]
    fn a_probe_gets_only_the_kinds_it_names_with_the_agents_settings() {
        let config = agent(json!({
            "extension": "k8s_metadata",
            "probes": {"tcp": {"max_peers": 7}, "http": {"spans": {"sampling_ratio": 0.5}}},
        }));
        let resolved = resolve(json!({"probes": {"tcp": {}}}), &config).unwrap();
        assert_eq!(resolved.kinds, ["tcp"]);
        assert_eq!(resolved.probes.tcp.as_ref().unwrap().max_peers, 7);
        assert!(resolved.probes.http.is_none());
        assert_eq!(resolved.probes.listed_names(), ["tcp"]);

        let resolved = resolve(
            json!({"probes": {"http": {"samplingRatio": 0.25}, "tcp": null}}),
            &config,
        )
        .unwrap();
        assert_eq!(resolved.kinds, ["http", "tcp"]);
        assert_eq!(resolved.probes.http.unwrap().spans.sampling_ratio, 0.25);
    }

    #[test]
    fn a_probe_cannot_ask_for_more_than_the_agent_allows() {
        let config =
            agent(json!({"probes": {"tcp": {}, "http": {"spans": {"sampling_ratio": 0.5}}}}));
        let refused = |spec| resolve(spec, &config).unwrap_err();
        assert_eq!(
            refused(json!({"probes": {"syscalls": {}}})),
            "spec.probes.syscalls: syscalls is not a probe this agent lets a Probe enable (allowed: tcp, http)"
        );
        assert_eq!(
            refused(json!({"probes": {"http": {"samplingRatio": 0.75}}})),
            "spec.probes.http.samplingRatio: 0.75 is not within 0 and the agent's maximum 0.5"
        );
        assert_eq!(
            refused(json!({"probes": {"tcp": {"frequency": 10}}})),
            "spec.probes.tcp.frequency: only profiling has a frequency"
        );
        assert_eq!(
            refused(json!({"probes": {}})),
            "spec.probes: names no probe; this agent lets a Probe enable: tcp, http"
        );
        let unknown = refused(json!({"probes": {"tcp": {"maxPeers": 1000}}}));
        assert!(
            unknown.starts_with("invalid spec: spec.probes.tcp")
                && unknown.contains("unknown field `maxPeers`"),
            "{unknown}"
        );
        let namespaces = refused(json!({"probes": {"tcp": {}}, "namespaceSelector": {}}));
        assert!(
            namespaces.contains("unknown field `namespaceSelector`"),
            "a Probe cannot select namespaces: {namespaces}"
        );
    }

    #[test]
    fn profiling_needs_a_profiles_pipeline_and_stays_under_the_agents_frequency() {
        let config = TenantProbesConfig::default();
        let spec =
            ProbeObjectSpec::parse(&json!({"probes": {"profiling": {"frequency": 19}}})).unwrap();
        assert_eq!(
            spec.resolve(&config, false).unwrap_err(),
            "spec.probes.profiling: this agent sends no profiles (its eBPF receiver is in no profiles pipeline)"
        );
        assert_eq!(
            spec.resolve(&config, true)
                .unwrap()
                .probes
                .profiling
                .unwrap()
                .frequency,
            19
        );
        let too_fast =
            ProbeObjectSpec::parse(&json!({"probes": {"profiling": {"frequency": 5000}}})).unwrap();
        assert!(too_fast.resolve(&config, true).unwrap_err().starts_with(
            "spec.probes.profiling.frequency: 5000 is not within 1 and the agent's maximum"
        ));
    }

    #[test]
    fn the_agent_may_not_offer_probes_that_name_binaries_or_own_the_process_stream() {
        let config =
            agent(json!({"extension": "k8sattributes", "probes": {"process": {}, "tcp": {}}}));
        let mut errors = Vec::new();
        config.validate(&mut errors);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["tenant_probes.extension", "tenant_probes.probes.process"],
            "{errors:?}"
        );
    }
}
