//! The one parser of Kubernetes label selectors (`app=web,tier!=batch,canary,!legacy,
//! env in (prod,staging),zone notin (a)`), into kube's own model, [`kube::core::Selector`], which
//! also matches labels and prints the selector back for the API. Used by the eBPF receiver's pod
//! filter and by the fake API server the tests run, so both read selectors the same way.

use std::collections::BTreeSet;

pub use kube::core::Selector;
use kube::core::{Expression, SelectorExt as _};

/// Whether `labels` match `selector` (kube's own matching).
pub fn matches(selector: &Selector, labels: &std::collections::BTreeMap<String, String>) -> bool {
    selector.matches(labels)
}

/// Parses a label selector as `kubectl -l` and the API server's `labelSelector` take it:
/// `k=v` (or `k==v`), `k!=v`, `k`, `!k`, `k in (v1,v2)`, `k notin (v1,v2)`, joined by commas.
/// The empty selector selects everything. Keys and values are checked as Kubernetes checks
/// label keys and values; an error names the requirement that is wrong.
pub fn parse_selector(selector: &str) -> Result<Selector, String> {
    let mut expressions = Vec::new();
    if selector.trim().is_empty() {
        return Ok(Selector::default());
    }
    for term in split_outside_parentheses(selector) {
        let term = term.trim();
        if term.is_empty() {
            return Err(format!("{selector:?}: empty requirement between commas"));
        }
        expressions.push(expression(term)?);
    }
    Ok(Selector::from_iter(expressions))
}

fn expression(term: &str) -> Result<Expression, String> {
    if let Some((head, rest)) = term.split_once('(') {
        let values = rest
            .strip_suffix(')')
            .ok_or_else(|| format!("{term:?}: a value set is closed by ')'"))?
            .split(',')
            .map(value)
            .collect::<Result<BTreeSet<String>, String>>()?;
        return match head.split_whitespace().collect::<Vec<_>>().as_slice() {
            [k, "in"] => Ok(Expression::In(key(k)?, values)),
            [k, "notin"] => Ok(Expression::NotIn(key(k)?, values)),
            _ => Err(format!(
                "{term:?}: a value set follows `<key> in` or `<key> notin`"
            )),
        };
    }
    if let Some((k, v)) = term.split_once("!=") {
        Ok(Expression::NotEqual(key(k)?, value(v)?))
    } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        Ok(Expression::Equal(key(k)?, value(v)?))
    } else if let Some(k) = term.strip_prefix('!') {
        Ok(Expression::DoesNotExist(key(k)?))
    } else {
        Ok(Expression::Exists(key(term)?))
    }
}

/// `[prefix/]name`: a DNS subdomain prefix of at most 253 characters, and a name of at most 63
/// alphanumerics, `-`, `_` or `.`, starting and ending alphanumeric.
fn key(k: &str) -> Result<String, String> {
    let k = k.trim();
    let (prefix, name) = match k.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, k),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    });
    if prefix_ok && !name.is_empty() && is_name(name) {
        Ok(k.to_string())
    } else {
        Err(format!("{k:?} is not a valid label key"))
    }
}

/// Empty, or a name as in [`key`].
fn value(v: &str) -> Result<String, String> {
    let v = v.trim();
    if v.is_empty() || is_name(v) {
        Ok(v.to_string())
    } else {
        Err(format!("{v:?} is not a valid label value"))
    }
}

fn is_name(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    s.len() <= 63
        && s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.chars().all(|c| alnum(c) || "-_.".contains(c))
}

/// Splits `a=b,c in (d,e)` at the commas between requirements, not those inside a value set.
fn split_outside_parentheses(selector: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&selector[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube::core::SelectorExt as _;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_parse_match_and_print_like_kubernetes() {
        let selector = parse_selector(
            "app=web, tier!=batch,canary,!legacy,env==prod,zone in (a, b),team notin (x)",
        )
        .unwrap();
        assert_eq!(
            selector.to_string(),
            "app=web,tier!=batch,canary,!legacy,env=prod,zone in (a,b),team notin (x)"
        );
        let web = labels(&[
            ("app", "web"),
            ("canary", "yes"),
            ("env", "prod"),
            ("zone", "b"),
        ]);
        assert!(selector.matches(&web));
        // `!=` and `notin` also select objects without the label; `in` does not.
        for (key, value) in [
            ("tier", "batch"),
            ("team", "x"),
            ("legacy", ""),
            ("zone", "c"),
        ] {
            let mut other = web.clone();
            other.insert(key.to_string(), value.to_string());
            assert!(!selector.matches(&other), "{key}={value}");
        }
        let mut no_zone = web.clone();
        no_zone.remove("zone");
        assert!(!selector.matches(&no_zone));
        assert!(parse_selector("").unwrap().selects_all());
        assert!(parse_selector("example.com/tier=web").is_ok());
    }

    #[test]
    fn bad_selectors_name_the_requirement() {
        for (bad, message) in [
            ("a=b,", "empty requirement between commas"),
            ("=x", "\"\" is not a valid label key"),
            ("a b=c", "\"a b\" is not a valid label key"),
            ("a=b c", "\"b c\" is not a valid label value"),
            ("a=-b", "\"-b\" is not a valid label value"),
            (
                "Example.com/a=b",
                "\"Example.com/a\" is not a valid label key",
            ),
            ("a in (b", "a value set is closed by ')'"),
            (
                "a within (b)",
                "a value set follows `<key> in` or `<key> notin`",
            ),
        ] {
            let error = parse_selector(bad).unwrap_err();
            assert!(error.contains(message), "{bad:?}: {error}");
        }
    }
}
