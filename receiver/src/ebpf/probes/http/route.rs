//! `http.route` from a request path: the first configured pattern that matches, else the path
//! with id-like segments (numbers, UUIDs, long hex strings) collapsed into `{id}`; then capped
//! per container, so a crawler cannot multiply series. Query strings never get here (the caller
//! cuts them off) and `redact` regexes apply to what is reported.

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// The route reported for routes beyond a container's cap.
pub const OVERFLOW_ROUTE: &str = "{other}";

/// One `routes.rules` entry: `/users/{id}/cart`, `/static/**`.
#[derive(Debug, Clone)]
pub struct RoutePattern {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    /// `{name}` or `*`: any one segment.
    Any,
    /// `**` as the last segment: anything after.
    Rest,
}

impl RoutePattern {
    pub fn new(text: &str) -> Result<RoutePattern, String> {
        if !text.starts_with('/') {
            return Err(format!("{text:?}: a route pattern starts with '/'"));
        }
        let parts: Vec<&str> = text[1..].split('/').collect();
        let mut segments = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            segments.push(match *part {
                "**" if i + 1 == parts.len() => Segment::Rest,
                "**" => return Err(format!("{text:?}: `**` may only be the last segment")),
                "*" => Segment::Any,
                p if p.starts_with('{') && p.ends_with('}') && p.len() > 2 => Segment::Any,
                p if p.contains(['{', '}', '*']) => {
                    return Err(format!(
                        "{text:?}: segment {p:?} mixes text with a wildcard; a segment is text, `*`, `{{name}}` or a last `**`"
                    ))
                }
                p => Segment::Literal(p.to_string()),
            });
        }
        Ok(RoutePattern {
            text: text.to_string(),
            segments,
        })
    }

    fn matches(&self, path: &str) -> bool {
        let mut parts = path.strip_prefix('/').unwrap_or(path).split('/');
        for segment in &self.segments {
            match segment {
                Segment::Rest => return true,
                Segment::Any => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(text) => {
                    if parts.next() != Some(text.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

/// Whether a path segment looks like an identifier rather than a name.
fn is_id(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    if bytes.is_empty() {
        return false;
    }
    if bytes.iter().all(u8::is_ascii_digit) {
        return true;
    }
    // A UUID: 8-4-4-4-12 hex digits.
    if bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
    {
        return true;
    }
    // Long hex (hashes, object ids): at least 16 hex digits, at least one a decimal digit so
    // that words made of a–f letters stay.
    bytes.len() >= 16 && bytes.iter().all(u8::is_ascii_hexdigit) && bytes.iter().any(u8::is_ascii_digit)
}

/// The heuristic route of a path: id-like segments as `{id}`.
pub fn collapse_ids(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(if is_id(segment) { "{id}" } else { segment });
    }
    out
}

/// Routes for the requests of every container: rules, heuristic, redaction and the cap.
pub struct Router {
    rules: Vec<RoutePattern>,
    redact: Vec<regex::Regex>,
    max_per_container: usize,
    /// Routes kept per container (cgroup id): the first `max_per_container` seen.
    kept: HashMap<u64, HashSet<String>>,
    /// Requests reported under [`OVERFLOW_ROUTE`] since the last call to `take_overflowed`.
    overflowed: u64,
}

impl Router {
    pub fn new(rules: Vec<RoutePattern>, redact: Vec<regex::Regex>, max_per_container: usize) -> Router {
        Router {
            rules,
            redact,
            max_per_container,
            kept: HashMap::default(),
            overflowed: 0,
        }
    }

    /// `path` with the `redact` regexes applied.
    pub fn redact(&self, path: &str) -> String {
        let mut text = path.to_string();
        for re in &self.redact {
            if re.is_match(&text) {
                text = re.replace_all(&text, "<redacted>").into_owned();
            }
        }
        text
    }

    /// The route of a request to `path` (no query string) served in container `cgroup`.
    pub fn route(&mut self, cgroup: u64, path: &str) -> String {
        let route = match self.rules.iter().find(|r| r.matches(path)) {
            Some(rule) => rule.text.clone(),
            None => self.redact(&collapse_ids(path)),
        };
        let kept = self.kept.entry(cgroup).or_default();
        if kept.contains(&route) {
            return route;
        }
        if kept.len() < self.max_per_container {
            kept.insert(route.clone());
            return route;
        }
        self.overflowed += 1;
        OVERFLOW_ROUTE.to_string()
    }

    /// Requests put under the overflow route since the last call.
    pub fn take_overflowed(&mut self) -> u64 {
        std::mem::take(&mut self.overflowed)
    }

    /// Forgets the routes of removed containers.
    pub fn forget(&mut self, cgroup: u64) {
        self.kept.remove(&cgroup);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_collapse_and_names_stay() {
        assert_eq!(collapse_ids("/users/42/orders/7"), "/users/{id}/orders/{id}");
        assert_eq!(
            collapse_ids("/o/123e4567-e89b-12d3-a456-426614174000/x"),
            "/o/{id}/x"
        );
        assert_eq!(collapse_ids("/blob/0123456789abcdef0123"), "/blob/{id}");
        assert_eq!(collapse_ids("/feed/deadbeefcafebabe"), "/feed/deadbeefcafebabe");
        assert_eq!(collapse_ids("/api/v2/items"), "/api/v2/items");
        assert_eq!(collapse_ids("/"), "/");
    }

    #[test]
    fn rules_match_in_order_and_the_rest_gets_the_heuristic() {
        let rules = ["/users/{user}/cart", "/static/**", "/a/*/b"]
            .iter()
            .map(|r| RoutePattern::new(r).unwrap())
            .collect();
        let mut router = Router::new(rules, Vec::new(), 10);
        assert_eq!(router.route(1, "/users/bob/cart"), "/users/{user}/cart");
        assert_eq!(router.route(1, "/users/bob/cart/x"), "/users/bob/cart/x");
        assert_eq!(router.route(1, "/static/css/site.css"), "/static/**");
        assert_eq!(router.route(1, "/a/x/b"), "/a/*/b");
        assert_eq!(router.route(1, "/a/x/c"), "/a/x/c");
        assert_eq!(router.route(1, "/users/7"), "/users/{id}");
    }

    #[test]
    fn the_cap_is_per_container_and_counts_the_overflow() {
        let mut router = Router::new(Vec::new(), Vec::new(), 2);
        assert_eq!(router.route(1, "/a"), "/a");
        assert_eq!(router.route(1, "/b"), "/b");
        assert_eq!(router.route(1, "/c"), OVERFLOW_ROUTE);
        assert_eq!(router.route(1, "/a"), "/a");
        assert_eq!(router.route(2, "/c"), "/c");
        assert_eq!(router.route(1, "/d"), OVERFLOW_ROUTE);
        assert_eq!(router.take_overflowed(), 2);
        assert_eq!(router.take_overflowed(), 0);
    }

    #[test]
    fn redaction_applies_to_paths_and_heuristic_routes() {
        let redact = vec![regex::Regex::new("token=[^/]+|/reset/[a-z]+").unwrap()];
        let mut router = Router::new(Vec::new(), redact, 10);
        assert_eq!(router.redact("/login/token=abc"), "/login/<redacted>");
        assert_eq!(router.route(1, "/reset/secret"), "<redacted>");
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        assert!(RoutePattern::new("users").unwrap_err().contains("starts with '/'"));
        assert!(RoutePattern::new("/**/x").unwrap_err().contains("last segment"));
        assert!(RoutePattern::new("/a*b").unwrap_err().contains("mixes text"));
    }
}
