//! A YAML tree that remembers where every key and value stands in the file, so that errors can
//! name line and column. Built from yaml-rust2's marked events; anchors and aliases are resolved
//! by copying the anchored node.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl From<Marker> for Position {
    fn from(m: Marker) -> Self {
        // yaml-rust2 counts lines from 1 and columns from 0.
        Position {
            line: m.line(),
            column: m.col() + 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub position: Position,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A scalar as written; `quoted` scalars are always strings.
    Scalar {
        text: String,
        quoted: bool,
    },
    Sequence(Vec<Node>),
    /// Entries in file order; duplicates are kept here and reported by the loader.
    Mapping(Vec<(Key, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub text: String,
    pub position: Position,
}

impl Node {
    pub fn as_mapping(&self) -> Option<&[(Key, Node)]> {
        match &self.value {
            Value::Mapping(entries) => Some(entries),
            _ => None,
        }
    }

    /// A plain `~`, `null` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, quoted: false } if is_null_text(text))
    }

    /// Whether this node or one inside it stands at `position`.
    pub fn contains(&self, position: Position) -> bool {
        self.position == position
            || match &self.value {
                Value::Scalar { .. } => false,
                Value::Sequence(items) => items.iter().any(|i| i.contains(position)),
                Value::Mapping(entries) => entries.iter().any(|(_, v)| v.contains(position)),
            }
    }

    pub fn kind_name(&self) -> &'static str {
        match &self.value {
            Value::Scalar { .. } if self.is_null() => "nothing",
            Value::Scalar { .. } => "a scalar",
            Value::Sequence(_) => "a list",
            Value::Mapping(_) => "a mapping",
        }
    }

    /// The value as JSON, resolving plain scalars as YAML 1.2 core schema does (null, booleans,
    /// integers, floats, else strings).
    pub fn to_json(&self) -> serde_json::Value {
        match &self.value {
            Value::Scalar { text, quoted } => {
                if *quoted {
                    serde_json::Value::String(text.clone())
                } else {
                    resolve_plain_scalar(text)
                }
            }
            Value::Sequence(items) => items.iter().map(Node::to_json).collect(),
            Value::Mapping(entries) => serde_json::Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.text.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// Where a serde key path (`protocols.grpc.endpoint`, `probes[0].symbol`) points in this
    /// node: the deepest key or item found along the path, or `fallback` if none is.
    pub fn locate(&self, path: &str, fallback: Position) -> Position {
        let mut node = self;
        let mut position = fallback;
        for segment in path_segments(path) {
            let next = match (&node.value, segment) {
                (Value::Mapping(entries), PathSegment::Key(key)) => entries
                    .iter()
                    .find(|(k, _)| k.text == key)
                    .map(|(k, v)| (k.position, v)),
                (Value::Sequence(items), PathSegment::Index(i)) => {
                    items.get(i).map(|item| (item.position, item))
                }
                _ => None,
            };
            match next {
                Some((p, child)) => {
                    position = p;
                    node = child;
                }
                None => break,
            }
        }
        position
    }
}

enum PathSegment<'a> {
    Key(&'a str),
    Index(usize),
}

fn path_segments(path: &str) -> Vec<PathSegment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        // `probes[0][1]` → key `probes`, index 0, index 1
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(PathSegment::Key(key));
        }
        // Only `[N]` after `[N]`: a key may hold brackets of its own (`a]]`, `b[]]`), which end
        // the walk rather than index anything.
        while let Some(inner) = rest.strip_prefix('[') {
            let Some(end) = inner.find(']') else { break };
            if let Ok(i) = inner[..end].parse() {
                out.push(PathSegment::Index(i));
            }
            rest = &inner[end + 1..];
        }
    }
    out
}

fn is_null_text(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

/// YAML 1.2 core schema resolution of a plain scalar.
pub fn resolve_plain_scalar(text: &str) -> serde_json::Value {
    if is_null_text(text) {
        return serde_json::Value::Null;
    }
    match text {
        "true" | "True" | "TRUE" => return serde_json::Value::Bool(true),
        "false" | "False" | "FALSE" => return serde_json::Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = text.parse::<i64>() {
        return i.into();
    }
    if let Ok(u) = text.parse::<u64>() {
        return u.into();
    }
    if let Some(hex) = text.strip_prefix("0x") {
        if let Ok(i) = i64::from_str_radix(hex, 16) {
            return i.into();
        }
    }
    let looks_numeric = text
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
        && text.chars().any(|c| c.is_ascii_digit());
    if looks_numeric {
        if let Ok(f) = text.parse::<f64>() {
            if let Some(n) = serde_json::Number::from_f64(f) {
                return serde_json::Value::Number(n);
            }
        }
    }
    serde_json::Value::String(text.to_string())
}

/// A syntax error with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub position: Position,
    pub message: String,
}

/// Parses one YAML document. An empty document is an empty mapping.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = TreeBuilder::default();
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut builder, false).map_err(|e| SyntaxError {
        position: (*e.marker()).into(),
        message: e.info().to_string(),
    })?;
    if let Some(error) = builder.error {
        return Err(error);
    }
    Ok(builder.root.unwrap_or(Node {
        position: Position { line: 1, column: 1 },
        value: Value::Mapping(Vec::new()),
    }))
}

enum Open {
    Sequence(Node),
    /// The mapping, and a key waiting for its value.
    Mapping(Node, Option<Key>),
}

#[derive(Default)]
struct TreeBuilder {
    stack: Vec<(Open, usize)>,
    root: Option<Node>,
    anchors: HashMap<usize, Node>,
    error: Option<SyntaxError>,
}

impl TreeBuilder {
    /// Places a finished node into its parent (or as the root).
    fn place(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some((Open::Sequence(seq), _)) => {
                if let Value::Sequence(items) = &mut seq.value {
                    items.push(node);
                }
            }
            Some((Open::Mapping(map, pending_key), _)) => match pending_key.take() {
                None => {
                    // This node is a key.
                    let text = match &node.value {
                        Value::Scalar { text, .. } => text.clone(),
                        _ => {
                            self.error.get_or_insert(SyntaxError {
                                position: node.position,
                                message: "only scalar keys are supported".to_string(),
                            });
                            String::new()
                        }
                    };
                    *pending_key = Some(Key {
                        text,
                        position: node.position,
                    });
                }
                Some(key) => {
                    if let Value::Mapping(entries) = &mut map.value {
                        entries.push((key, node));
                    }
                }
            },
        }
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let position: Position = mark.into();
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                self.place(
                    Node {
                        position,
                        value: Value::Scalar { text, quoted },
                    },
                    anchor,
                );
            }
            Event::SequenceStart(anchor, _) => self.stack.push((
                Open::Sequence(Node {
                    position,
                    value: Value::Sequence(Vec::new()),
                }),
                anchor,
            )),
            Event::MappingStart(anchor, _) => self.stack.push((
                Open::Mapping(
                    Node {
                        position,
                        value: Value::Mapping(Vec::new()),
                    },
                    None,
                ),
                anchor,
            )),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((open, anchor)) = self.stack.pop() {
                    let node = match open {
                        Open::Sequence(n) | Open::Mapping(n, _) => n,
                    };
                    self.place(node, anchor);
                }
            }
            Event::Alias(anchor) => match self.anchors.get(&anchor).cloned() {
                Some(mut node) => {
                    node.position = position;
                    self.place(node, 0);
                }
                None => {
                    self.error.get_or_insert(SyntaxError {
                        position,
                        message: "alias to an unknown anchor".to_string(),
                    });
                }
            },
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_values() {
        let root = parse("a:\n  b: 1\n  c: [x, 'true', true]\nd: ~\n").unwrap();
        assert_eq!(
            root.to_json(),
            serde_json::json!({"a": {"b": 1, "c": ["x", "true", true]}, "d": null})
        );
        let at = |line, column| Position { line, column };
        let none = Position::default();
        assert_eq!(root.locate("a.b", none), at(2, 3));
        assert_eq!(root.locate("a.c[1]", none), at(3, 10));
        // A missing key points at the deepest existing one, or the fallback.
        assert_eq!(root.locate("a.nope.deeper", none), at(1, 1));
        assert_eq!(root.locate("nope", none), none);
    }

    /// Keys with stray brackets (the config fuzzer's crash: a `]` right after `[]` sliced
    /// `[1..0]`) locate what they can and never panic.
    #[test]
    fn keys_with_stray_brackets_are_located_without_panicking() {
        let root = parse("a:\n  b: [x]\n").unwrap();
        let none = Position::default();
        let at = |line, column| Position { line, column };
        for path in ["a.b]][]]]]", "a.b[]]]", "a.b[", "a.b]", "a.b[0]]", "a.[]]x"] {
            assert!(root.locate(path, none).line <= 2, "{path}");
        }
        assert_eq!(root.locate("a.b[0]]", none), at(2, 7));
        assert_eq!(root.locate("a.b]][]]]]", none), at(1, 1));
    }

    #[test]
    fn anchors_are_copied() {
        let root = parse("base: &b {x: 1}\nother: *b\n").unwrap();
        assert_eq!(root.to_json()["other"], serde_json::json!({"x": 1}));
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.position.line >= 1, "{e:?}");
        assert!(!e.message.is_empty());
    }

    #[test]
    fn scalar_resolution() {
        assert_eq!(resolve_plain_scalar("10s"), serde_json::json!("10s"));
        assert_eq!(resolve_plain_scalar("4317"), serde_json::json!(4317));
        assert_eq!(resolve_plain_scalar("1.5"), serde_json::json!(1.5));
        assert_eq!(
            resolve_plain_scalar("0.0.0.0:4317"),
            serde_json::json!("0.0.0.0:4317")
        );
        assert_eq!(resolve_plain_scalar("-3"), serde_json::json!(-3));
    }
}
