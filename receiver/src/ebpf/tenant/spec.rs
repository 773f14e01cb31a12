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
        serde_path_to_error::deserialize(spec.clone())
            .map_err(|e| format!("invalid spec: spec.{}: {}", e.path(), e.inner()))
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
