//! `--filter` conditions of a trace (`field=value`, `field!=value`, and the numeric
//! `field>=n`, `field<=n`, `field>n`, `field<n`), applied in the agent to each event's fields,
//! `comm`, `pid` and `tid` (and its labels `namespace`, `pod`, `container`): all must hold. A
//! condition on a field the event does not have, or a numeric one on a value that is not a
//! number, does not hold.

use podscope_core::session::Event;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operator {
    Equal,
    NotEqual,
    AtLeast,
    AtMost,
    Above,
    Below,
}

impl Operator {
    /// The operators by spelling, the two-character ones first.
    const SPELLINGS: [(&'static str, Operator); 6] = [
        ("!=", Operator::NotEqual),
        (">=", Operator::AtLeast),
        ("<=", Operator::AtMost),
        ("=", Operator::Equal),
        (">", Operator::Above),
        ("<", Operator::Below),
    ];

    fn is_numeric(self) -> bool {
        !matches!(self, Operator::Equal | Operator::NotEqual)
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Condition {
    field: String,
    operator: Operator,
    value: String,
    /// The value as a number, for the numeric operators.
    number: f64,
}

impl Condition {
    fn holds(&self, value: &str) -> bool {
        let number = || value.trim().parse::<f64>().ok();
        match self.operator {
            Operator::Equal => value == self.value,
            Operator::NotEqual => value != self.value,
            Operator::AtLeast => number().is_some_and(|n| n >= self.number),
            Operator::AtMost => number().is_some_and(|n| n <= self.number),
            Operator::Above => number().is_some_and(|n| n > self.number),
            Operator::Below => number().is_some_and(|n| n < self.number),
        }
    }
}

/// Every condition of a trace request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    conditions: Vec<Condition>,
}

impl EventFilter {
    /// Parses the request's filters; an error names the one that is not `field=value`,
    /// `field!=value` or a numeric comparison with a number.
    pub fn parse(filters: &[String]) -> Result<EventFilter, String> {
        let mut conditions = Vec::new();
        for filter in filters {
            // The first operator character splits: a value may hold more of them.
            let Some(at) = filter.find(['=', '!', '<', '>']) else {
                return Err(format!(
                    "filter {filter:?} is not field=value, field!=value or field>=, <=, >, < number"
                ));
            };
            let Some((spelling, operator)) = Operator::SPELLINGS
                .iter()
                .find(|(spelling, _)| filter[at..].starts_with(spelling))
            else {
                return Err(format!(
                    "filter {filter:?} is not field=value, field!=value or field>=, <=, >, < number"
                ));
            };
            let field = filter[..at].trim();
            if field.is_empty() {
                return Err(format!("filter {filter:?} names no field"));
            }
            let value = filter[at + spelling.len()..].trim();
            let number = if operator.is_numeric() {
                value.parse::<f64>().map_err(|_| {
                    format!(
                        "filter {filter:?} compares with {spelling} but {value:?} is not a number"
                    )
                })?
            } else {
                0.0
            };
            conditions.push(Condition {
                field: field.to_string(),
                operator: *operator,
                value: value.to_string(),
                number,
            });
        }
        Ok(EventFilter { conditions })
    }

    pub fn matches(&self, event: &Event) -> bool {
        self.conditions.iter().all(|condition| {
            let value = match condition.field.as_str() {
                "comm" => Some(event.comm.clone()),
                "pid" => Some(event.pid.to_string()),
                "tid" => Some(event.tid.to_string()),
                "namespace" => Some(event.namespace.clone()),
                "pod" => Some(event.pod.clone()),
                "container" => Some(event.container.clone()),
                field => event.fields.get(field).cloned(),
            };
            value.is_some_and(|value| condition.holds(&value))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podscope_core::session::TraceProbe;

    fn event() -> Event {
        Event {
            time_unix_nano: 1,
            node: "n".into(),
            namespace: "shop".into(),
            pod: "web-0".into(),
            container: "app".into(),
            probe: TraceProbe::Open,
            pid: 42,
            tid: 43,
            comm: "cat".into(),
            fields: [("path".to_string(), "/etc/hosts".to_string())]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn every_condition_must_hold() {
        let filter = EventFilter::parse(&["comm=cat".into(), "path=/etc/hosts".into()]).unwrap();
        assert!(filter.matches(&event()));
        let filter = EventFilter::parse(&["comm=cat".into(), "pid=41".into()]).unwrap();
        assert!(!filter.matches(&event()));
        let filter =
            EventFilter::parse(&["pid=42".into(), "tid=43".into(), "pod=web-0".into()]).unwrap();
        assert!(filter.matches(&event()));
        assert!(EventFilter::parse(&[]).unwrap().matches(&event()));
    }

    #[test]
    fn not_equal_and_missing_fields() {
        let filter = EventFilter::parse(&["comm!=bash".into()]).unwrap();
        assert!(filter.matches(&event()));
        let filter = EventFilter::parse(&["comm!=cat".into()]).unwrap();
        assert!(!filter.matches(&event()));
        // A field the event lacks holds for neither operator.
        assert!(!EventFilter::parse(&["exit_code=0".into()])
            .unwrap()
            .matches(&event()));
        assert!(!EventFilter::parse(&["exit_code!=0".into()])
            .unwrap()
            .matches(&event()));
        // The value may itself hold '=' (only the first one splits).
        let filter = EventFilter::parse(&["path=a=b".into()]).unwrap();
        assert!(!filter.matches(&event()));
    }

    #[test]
    fn numeric_comparisons_hold_for_numbers_only() {
        let holds = |filter: &str| {
            EventFilter::parse(&[filter.to_string()])
                .unwrap()
                .matches(&event())
        };
        // pid is 42.
        assert!(holds("pid>=42") && holds("pid<=42") && holds("pid>41") && holds("pid<43"));
        assert!(!holds("pid>42") && !holds("pid<42") && !holds("pid>=43") && !holds("pid<=41"));
        // A value that is not a number holds for no comparison.
        assert!(!holds("comm>=0") && !holds("comm<0"));
        // `=` after a comparison character is part of the operator, not a second split.
        assert!(holds("path=/etc/hosts"));
    }

    #[test]
    fn a_malformed_filter_is_named() {
        assert_eq!(
            EventFilter::parse(&["comm".into()]).unwrap_err(),
            r#"filter "comm" is not field=value, field!=value or field>=, <=, >, < number"#
        );
        assert_eq!(
            EventFilter::parse(&["status>=5xx".into()]).unwrap_err(),
            r#"filter "status>=5xx" compares with >= but "5xx" is not a number"#
        );
        assert_eq!(
            EventFilter::parse(&["=x".into()]).unwrap_err(),
            r#"filter "=x" names no field"#
        );
    }
}
