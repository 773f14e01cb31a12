//! Selecting pods by namespace and labels, for components that are not the Kubernetes processor
//! but act on pods (the eBPF receiver's kernel-side cgroup filter). The processor's cache answers
//! through [`PodDirectory`]; the two meet in the agent's [`crate::SharedState`].

/// One requirement of an equality-based Kubernetes label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    DoesNotExist(String),
}

impl LabelRequirement {
    pub fn matches<'a>(&self, label: impl Fn(&str) -> Option<&'a str>) -> bool {
        match self {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            // As in Kubernetes: `k!=v` also selects objects without the label.
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::DoesNotExist(k) => label(k).is_none(),
        }
    }
}

/// Parses `app=web,tier!=batch,canary,!legacy` (`==` is read as `=`). Set-based forms
/// (`in (…)`) are refused with a message saying so.
pub fn parse_label_selector(selector: &str) -> Result<Vec<LabelRequirement>, String> {
    let mut requirements = Vec::new();
    for part in selector.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(format!("{selector:?}: empty requirement between commas"));
        }
        if part.contains(" in ") || part.contains(" notin ") || part.contains('(') {
            return Err(format!(
                "{part:?}: set-based requirements (in, notin) are not supported; use k=v, k!=v, k or !k"
            ));
        }
        let requirement = if let Some((k, v)) = part.split_once("!=") {
            LabelRequirement::NotEquals(key(k)?, value(v)?)
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            LabelRequirement::Equals(key(k)?, value(v)?)
        } else if let Some(k) = part.strip_prefix('!') {
            LabelRequirement::DoesNotExist(key(k)?)
        } else {
            LabelRequirement::Exists(key(part)?)
        };
        requirements.push(requirement);
    }
    Ok(requirements)
}

fn key(k: &str) -> Result<String, String> {
    let k = k.trim();
    let valid = !k.is_empty()
        && k.len() <= 316
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if valid {
        Ok(k.to_string())
    } else {
        Err(format!("{k:?} is not a valid label key"))
    }
}

fn value(v: &str) -> Result<String, String> {
    let v = v.trim();
    let valid = v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if valid {
        Ok(v.to_string())
    } else {
        Err(format!("{v:?} is not a valid label value"))
    }
}

/// Pods known to a Kubernetes metadata cache.
pub trait PodDirectory: Send + Sync {
    /// Whether the pod with this UID is live, in one of `namespaces` (any when empty) and
    /// satisfies every label requirement. Unknown pods match nothing.
    fn pod_matches(
        &self,
        pod_uid: &str,
        namespaces: &[String],
        labels: &[LabelRequirement],
    ) -> bool;

    /// Changes whenever pods come, go or change (the value itself means nothing).
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn selectors_parse_and_match_like_kubernetes() {
        let reqs = parse_label_selector("app=web, tier!=batch,canary,!legacy,env==prod").unwrap();
        assert_eq!(
            reqs,
            vec![
                LabelRequirement::Equals("app".into(), "web".into()),
                LabelRequirement::NotEquals("tier".into(), "batch".into()),
                LabelRequirement::Exists("canary".into()),
                LabelRequirement::DoesNotExist("legacy".into()),
                LabelRequirement::Equals("env".into(), "prod".into()),
            ]
        );
        let labels = BTreeMap::from([("app", "web"), ("canary", "yes"), ("env", "prod")]);
        let get = |k: &str| labels.get(k).copied();
        assert!(reqs.iter().all(|r| r.matches(get)));
        let other = BTreeMap::from([("app", "web"), ("tier", "batch")]);
        let get = |k: &str| other.get(k).copied();
        assert!(!LabelRequirement::NotEquals("tier".into(), "batch".into()).matches(get));
        assert!(LabelRequirement::NotEquals("zone".into(), "a".into()).matches(get));
        for bad in ["", "a=b,", "app in (a,b)", "=x", "a b=c", "a=b c"] {
            assert!(parse_label_selector(bad).is_err(), "{bad:?}");
        }
    }
}
