//! `--filter` conditions of a trace (`field=value`, `field!=value`), applied in the agent to
//! each event's fields, `comm`, `pid` and `tid` (and its labels `namespace`, `pod`,
//! `container`): all must hold. A condition on a field the event does not have does not hold.

use podscope_core::session::Event;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Condition {
    field: String,
    equal: bool,
    value: String,
}

/// Every condition of a trace request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    conditions: Vec<Condition>,
}

impl EventFilter {
    /// Parses the request's filters; an error names the one that is not `field=value` or
    /// `field!=value`.
    pub fn parse(filters: &[String]) -> Result<EventFilter, String> {
        let mut conditions = Vec::new();
        for filter in filters {
            let (field, equal, value) = match filter.split_once("!=") {
                Some((field, value)) => (field, false, value),
                None => match filter.split_once('=') {
                    Some((field, value)) => (field, true, value),
                    None => {
                        return Err(format!(
                            "filter {filter:?} is not field=value or field!=value"
                        ))
                    }
                },
            };
            let field = field.trim();
            if field.is_empty() {
                return Err(format!("filter {filter:?} names no field"));
            }
            conditions.push(Condition {
                field: field.to_string(),
                equal,
                value: value.trim().to_string(),
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
            match value {
                Some(value) => (value == condition.value) == condition.equal,
                None => false,
            }
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
    fn a_malformed_filter_is_named() {
        assert_eq!(
            EventFilter::parse(&["comm".into()]).unwrap_err(),
            r#"filter "comm" is not field=value or field!=value"#
        );
        assert_eq!(
            EventFilter::parse(&["=x".into()]).unwrap_err(),
            r#"filter "=x" names no field"#
        );
    }
}
