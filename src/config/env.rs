//! `${env:VAR}` and `${env:VAR:-default}` in config values, as in the OpenTelemetry Collector.
//!
//! Substitution happens in scalar values after parsing, so positions stay those of the file. A
//! value that is exactly one reference takes the type the text resolves to (`${env:PORT}` can be
//! an integer); a reference inside a longer value is spliced as text. `$$` is a literal `$`.

use super::yaml::{Node, Position, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct EnvError {
    pub position: Position,
    pub message: String,
}

/// Replaces references in every scalar value (not keys) of `node`, using `lookup` for variables.
pub fn substitute(
    node: &mut Node,
    lookup: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<EnvError>,
) {
    match &mut node.value {
        Value::Scalar { text, quoted } => {
            if !text.contains('$') {
                return;
            }
            match expand(text, lookup) {
                Ok(Expanded {
                    text: new_text,
                    whole_reference,
                }) => {
                    *text = new_text;
                    // A quoted value stays a string; a plain one that was a single reference
                    // resolves its type from the value; anything spliced is text.
                    if !whole_reference {
                        *quoted = true;
                    }
                }
                Err(message) => errors.push(EnvError {
                    position: node.position,
                    message,
                }),
            }
        }
        Value::Sequence(items) => {
            for item in items {
                substitute(item, lookup, errors);
            }
        }
        Value::Mapping(entries) => {
            for (_, value) in entries {
                substitute(value, lookup, errors);
            }
        }
    }
}

struct Expanded {
    text: String,
    whole_reference: bool,
}

fn expand(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Expanded, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut references = 0;
    let mut literal_text = false;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        literal_text |= i > 0;
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            literal_text = true;
            rest = tail;
        } else if let Some(body_and_tail) = after.strip_prefix('{') {
            let end = body_and_tail
                .find('}')
                .ok_or_else(|| format!("unterminated reference in {text:?}: missing '}}'"))?;
            let body = &body_and_tail[..end];
            out.push_str(&resolve(body, lookup)?);
            references += 1;
            rest = &body_and_tail[end + 1..];
        } else {
            out.push('$');
            literal_text = true;
            rest = after;
        }
    }
    literal_text |= !rest.is_empty();
    out.push_str(rest);
    Ok(Expanded {
        text: out,
        whole_reference: references == 1 && !literal_text,
    })
}

fn resolve(body: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let Some(spec) = body.strip_prefix("env:") else {
        return Err(format!(
            "unsupported reference ${{{body}}}: only ${{env:NAME}} and ${{env:NAME:-default}} are supported (write $$ for a literal $)"
        ));
    };
    let (name, default) = match spec.split_once(":-") {
        Some((n, d)) => (n, Some(d)),
        None => (spec, None),
    };
    let valid_name = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        return Err(format!(
            "invalid environment variable name {name:?} in ${{{body}}}"
        ));
    }
    match (lookup(name), default) {
        (Some(value), _) => Ok(value),
        (None, Some(default)) => Ok(default.to_string()),
        (None, None) => Err(format!(
            "environment variable {name} is not set (give a default with ${{env:{name}:-default}})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::yaml::parse;
    use super::*;

    fn run(yaml: &str) -> (serde_json::Value, Vec<EnvError>) {
        let mut node = parse(yaml).unwrap();
        let mut errors = Vec::new();
        let lookup = |name: &str| match name {
            "PORT" => Some("4317".to_string()),
            "HOST" => Some("collector.local".to_string()),
            _ => None,
        };
        substitute(&mut node, &lookup, &mut errors);
        (node.to_json(), errors)
    }

    #[test]
    fn whole_references_take_the_type_of_their_value() {
        let (v, e) = run("port: ${env:PORT}\nquoted: \"${env:PORT}\"\n");
        assert!(e.is_empty());
        assert_eq!(v["port"], serde_json::json!(4317));
        assert_eq!(v["quoted"], serde_json::json!("4317"));
    }

    #[test]
    fn spliced_references_defaults_and_escapes() {
        let (v, e) = run(
            "endpoint: ${env:HOST}:${env:PORT}\nlevel: ${env:LEVEL:-info}\nprice: $$5 and $x\nempty: ${env:UNSET:-}\n",
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(v["endpoint"], serde_json::json!("collector.local:4317"));
        assert_eq!(v["level"], serde_json::json!("info"));
        assert_eq!(v["price"], serde_json::json!("$5 and $x"));
        assert_eq!(v["empty"], serde_json::Value::Null);
    }

    #[test]
    fn unset_variables_and_bad_references_are_errors_with_positions() {
        let (_, e) = run("a: 1\nb: ${env:NOPE}\nc: ${file:/etc/x}\nd: ${env:OPEN\n");
        let lines: Vec<_> = e
            .iter()
            .map(|e| (e.position.line, e.position.column))
            .collect();
        assert_eq!(lines, vec![(2, 4), (3, 4), (4, 4)]);
        assert!(e[0].message.contains("NOPE is not set"), "{}", e[0].message);
        assert!(
            e[1].message.contains("unsupported reference"),
            "{}",
            e[1].message
        );
        assert!(e[2].message.contains("unterminated"), "{}", e[2].message);
    }
}
