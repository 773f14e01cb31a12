//! YAML documents (CRDs, examples, manifests) as JSON values, the way the Kubernetes API server
//! stores them, for tests that check what a user would apply.

use serde_json::{json, Value};
use yaml_rust2::{Yaml, YamlLoader};

/// The first document of `text` as JSON; panics (the test's input is wrong) if it is not YAML.
pub fn document_as_json(text: &str) -> Value {
    let documents = YamlLoader::load_from_str(text).expect("valid YAML");
    to_json(documents.first().expect("one YAML document at least"))
}

/// One YAML node as JSON: mappings with string keys, sequences, scalars; anything else is null.
pub fn to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Hash(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), to_json(v)))
                .collect(),
        ),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::String(s) => json!(s),
        Yaml::Integer(i) => json!(i),
        Yaml::Boolean(b) => json!(b),
        Yaml::Real(r) => json!(r
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("YAML real {r:?}"))),
        _ => Value::Null,
    }
}
