//! Checks an OTLP protobuf export request and counts its items without decoding it, so that a
//! request no processor changes can be forwarded as the bytes it arrived in.
//!
//! The check follows the OTLP schema field by field: wire types of known fields, lengths,
//! varints, UTF-8 of strings, nesting depth. It is at least as strict as decoding with prost:
//! whatever it accepts, prost decodes, to the same number of items (the tests hold it to that).
//! It may refuse more (groups, unknown top-level fields, deep nesting): the caller then decodes
//! with prost, whose answer — the batch, or the error the client sees — is the one that counts.
//!
//! Items are counted as [`crate::Batch::item_count`] counts them, including prost's rule for a
//! `oneof` met twice: the same variant merges (its data points add up), another replaces it.

/// The request is not one this check vouches for; decode it to know more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unchecked;

/// How a field is written on the wire.
#[derive(Clone, Copy)]
enum Kind {
    /// int32, int64, uint32, uint64, sint32, bool, enum.
    Varint,
    /// fixed64, sfixed64, double.
    Fixed64,
    /// fixed32.
    Fixed32,
    Bytes,
    Str,
    Message(&'static MessageSchema),
    /// `repeated` varints: packed, or one by one.
    RepeatedVarint,
    /// `repeated` fixed64 or double: packed, or one by one.
    RepeatedFixed64,
}

/// What a field adds to the item count of its message.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    /// The items of its content, if any.
    Carries,
    /// Each occurrence is one item (a span, a data point).
    Item,
    /// A variant of the message's one counted `oneof` (a metric's data).
    Variant,
}

struct Field {
    tag: u32,
    kind: Kind,
    role: Role,
}

/// The fields of one message type that the check knows; others are skipped as unknown.
pub struct MessageSchema {
    fields: &'static [Field],
}

const fn field(tag: u32, kind: Kind) -> Field {
    Field {
        tag,
        kind,
        role: Role::Carries,
    }
}

const fn item(tag: u32, schema: &'static MessageSchema) -> Field {
    Field {
        tag,
        kind: Kind::Message(schema),
        role: Role::Item,
    }
}

const fn variant(tag: u32, schema: &'static MessageSchema) -> Field {
    Field {
        tag,
        kind: Kind::Message(schema),
        role: Role::Variant,
    }
}

use Kind::{Bytes, Fixed32, Fixed64, Message, RepeatedFixed64, RepeatedVarint, Str, Varint};

// common/v1
static ANY_VALUE: MessageSchema = MessageSchema {
    fields: &[
        field(1, Str),
        field(2, Varint),
        field(3, Varint),
        field(4, Fixed64),
        field(5, Message(&ARRAY_VALUE)),
        field(6, Message(&KEY_VALUE_LIST)),
        field(7, Bytes),
        field(8, Varint),
    ],
};
static ARRAY_VALUE: MessageSchema = MessageSchema {
    fields: &[field(1, Message(&ANY_VALUE))],
};
static KEY_VALUE_LIST: MessageSchema = MessageSchema {
    fields: &[field(1, Message(&KEY_VALUE))],
};
static KEY_VALUE: MessageSchema = MessageSchema {
    fields: &[
        field(1, Str),
        field(2, Message(&ANY_VALUE)),
        field(3, Varint),
    ],
};
static SCOPE: MessageSchema = MessageSchema {
    fields: &[
        field(1, Str),
        field(2, Str),
        field(3, Message(&KEY_VALUE)),
        field(4, Varint),
    ],
};
static ENTITY_REF: MessageSchema = MessageSchema {
    fields: &[field(1, Str), field(2, Str), field(3, Str), field(4, Str)],
};
// resource/v1
static RESOURCE: MessageSchema = MessageSchema {
    fields: &[
        field(1, Message(&KEY_VALUE)),
        field(2, Varint),
        field(3, Message(&ENTITY_REF)),
    ],
};

// trace/v1
/// `ResourceSpans`: one element of a trace export request.
pub static RESOURCE_SPANS: MessageSchema = MessageSchema {
    fields: &[
        field(1, Message(&RESOURCE)),
        field(2, Message(&SCOPE_SPANS)),
        field(3, Str),
    ],
};
static SCOPE_SPANS: MessageSchema = MessageSchema {
    fields: &[field(1, Message(&SCOPE)), item(2, &SPAN), field(3, Str)],
};
static SPAN: MessageSchema = MessageSchema {
    fields: &[
        field(1, Bytes),
        field(2, Bytes),
        field(3, Str),
        field(4, Bytes),
        field(5, Str),
        field(6, Varint),
        field(7, Fixed64),
        field(8, Fixed64),
        field(9, Message(&KEY_VALUE)),
        field(10, Varint),
        field(11, Message(&SPAN_EVENT)),
        field(12, Varint),
        field(13, Message(&SPAN_LINK)),
        field(14, Varint),
        field(15, Message(&SPAN_STATUS)),
        field(16, Fixed32),
    ],
};
static SPAN_EVENT: MessageSchema = MessageSchema {
    fields: &[
        field(1, Fixed64),
        field(2, Str),
        field(3, Message(&KEY_VALUE)),
        field(4, Varint),
    ],
};
static SPAN_LINK: MessageSchema = MessageSchema {
    fields: &[
        field(1, Bytes),
        field(2, Bytes),
        field(3, Str),
        field(4, Message(&KEY_VALUE)),
        field(5, Varint),
        field(6, Fixed32),
    ],
};
static SPAN_STATUS: MessageSchema = MessageSchema {
    fields: &[field(2, Str), field(3, Varint)],
};

// metrics/v1
/// `ResourceMetrics`: one element of a metrics export request.
pub static RESOURCE_METRICS: MessageSchema = MessageSchema {
    fields: &[
        field(1, Message(&RESOURCE)),
        field(2, Message(&SCOPE_METRICS)),
        field(3, Str),
    ],
};
static SCOPE_METRICS: MessageSchema = MessageSchema {
    fields: &[
        field(1, Message(&SCOPE)),
        field(2, Message(&METRIC)),
        field(3, Str),
    ],
};
static METRIC: MessageSchema = MessageSchema {
    fields: &[
        field(1, Str),
        field(2, Str),
        field(3, Str),
        field(12, Message(&KEY_VALUE)),
        variant(5, &GAUGE),
        variant(7, &SUM),
        variant(9, &HISTOGRAM),
        variant(10, &EXPONENTIAL_HISTOGRAM),
        variant(11, &SUMMARY),
    ],
};
static GAUGE: MessageSchema = MessageSchema {
    fields: &[item(1, &NUMBER_POINT)],
};
static SUM: MessageSchema = MessageSchema {
    fields: &[item(1, &NUMBER_POINT), field(2, Varint), field(3, Varint)],
};
static HISTOGRAM: MessageSchema = MessageSchema {
    fields: &[item(1, &HISTOGRAM_POINT), field(2, Varint)],
};
static EXPONENTIAL_HISTOGRAM: MessageSchema = MessageSchema {
    fields: &[item(1, &EXPONENTIAL_POINT), field(2, Varint)],
};
static SUMMARY: MessageSchema = MessageSchema {
    fields: &[item(1, &SUMMARY_POINT)],
};
static NUMBER_POINT: MessageSchema = MessageSchema {
    fields: &[
        field(7, Message(&KEY_VALUE)),
        field(2, Fixed64),
        field(3, Fixed64),
        field(4, Fixed64),
        field(6, Fixed64),
        field(5, Message(&EXEMPLAR)),
        field(8, Varint),
    ],
};
static HISTOGRAM_POINT: MessageSchema = MessageSchema {
    fields: &[
        field(9, Message(&KEY_VALUE)),
        field(2, Fixed64),
        field(3, Fixed64),
        field(4, Fixed64),
        field(5, Fixed64),
        field(6, RepeatedFixed64),
        field(7, RepeatedFixed64),
        field(8, Message(&EXEMPLAR)),
        field(10, Varint),
        field(11, Fixed64),
        field(12, Fixed64),
    ],
};
static EXPONENTIAL_POINT: MessageSchema = MessageSchema {
    fields: &[
        field(1, Message(&KEY_VALUE)),
        field(2, Fixed64),
        field(3, Fixed64),
        field(4, Fixed64),
        field(5, Fixed64),
        field(6, Varint),
        field(7, Fixed64),
        field(8, Message(&EXPONENTIAL_BUCKETS)),
        field(9, Message(&EXPONENTIAL_BUCKETS)),
        field(10, Varint),
        field(11, Message(&EXEMPLAR)),
        field(12, Fixed64),
        field(13, Fixed64),
        field(14, Fixed64),
    ],
};
static EXPONENTIAL_BUCKETS: MessageSchema = MessageSchema {
    fields: &[field(1, Varint), field(2, RepeatedVarint)],
};
static SUMMARY_POINT: MessageSchema = MessageSchema {
    fields: &[
        field(7, Message(&KEY_VALUE)),
        field(2, Fixed64),
        field(3, Fixed64),
        field(4, Fixed64),
        field(5, Fixed64),
        field(6, Message(&QUANTILE)),
        field(8, Varint),
    ],
};
static QUANTILE: MessageSchema = MessageSchema {
    fields: &[field(1, Fixed64), field(2, Fixed64)],
};
static EXEMPLAR: MessageSchema = MessageSchema {
    fields: &[
        field(7, Message(&KEY_VALUE)),
        field(2, Fixed64),
        field(4, Bytes),
        field(5, Bytes),
        field(3, Fixed64),
        field(6, Fixed64),
    ],
};

/// Nesting deeper than this is left to prost (whose own limit is 100).
const MAX_DEPTH: u32 = 64;

/// The items of an export request whose only field is `repeated <item> = 1`, where one element
/// has the schema `item`. A request holding anything else at its top level is [`Unchecked`]:
/// forwarded bytes must be exactly those elements.
pub fn count_request_items(item: &'static MessageSchema, body: &[u8]) -> Result<usize, Unchecked> {
    let mut items = 0;
    let mut pos = 0;
    while pos < body.len() {
        // Field 1, length-delimited: key byte 0x0A.
        if body[pos] != 0x0A {
            return Err(Unchecked);
        }
        pos += 1;
        let element = length_delimited(body, &mut pos)?;
        items += walk(item, element, MAX_DEPTH)?;
    }
    Ok(items)
}

/// The items `buf`, a message of type `schema`, carries.
fn walk(schema: &MessageSchema, buf: &[u8], depth: u32) -> Result<usize, Unchecked> {
    if depth == 0 {
        return Err(Unchecked);
    }
    let mut items = 0;
    // (tag, items) of the counted oneof's variant seen last.
    let mut chosen: Option<(u32, usize)> = None;
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        if key > u64::from(u32::MAX) || key >> 3 == 0 {
            return Err(Unchecked);
        }
        let (tag, wire_type) = ((key >> 3) as u32, (key & 7) as u8);
        let Some(field) = schema.fields.iter().find(|f| f.tag == tag) else {
            skip_unknown(wire_type, buf, &mut pos)?;
            continue;
        };
        match (field.kind, wire_type) {
            (Varint | RepeatedVarint, 0) => {
                varint(buf, &mut pos)?;
            }
            (Fixed64 | RepeatedFixed64, 1) => advance(buf, &mut pos, 8)?,
            (Fixed32, 5) => advance(buf, &mut pos, 4)?,
            (Bytes, 2) => {
                length_delimited(buf, &mut pos)?;
            }
            (Str, 2) => {
                let text = length_delimited(buf, &mut pos)?;
                std::str::from_utf8(text).map_err(|_| Unchecked)?;
            }
            (RepeatedFixed64, 2) => {
                if length_delimited(buf, &mut pos)?.len() % 8 != 0 {
                    return Err(Unchecked);
                }
            }
            (RepeatedVarint, 2) => {
                let packed = length_delimited(buf, &mut pos)?;
                let mut at = 0;
                while at < packed.len() {
                    varint(packed, &mut at)?;
                }
            }
            (Message(inner), 2) => {
                let content = length_delimited(buf, &mut pos)?;
                let carried = walk(inner, content, depth - 1)?;
                match field.role {
                    Role::Carries => items += carried,
                    Role::Item => items += 1,
                    Role::Variant => {
                        chosen = match chosen {
                            Some((same, before)) if same == tag => Some((tag, before + carried)),
                            _ => Some((tag, carried)),
                        }
                    }
                }
            }
            _ => return Err(Unchecked),
        }
    }
    Ok(items + chosen.map_or(0, |(_, n)| n))
}

fn skip_unknown(wire_type: u8, buf: &[u8], pos: &mut usize) -> Result<(), Unchecked> {
    match wire_type {
        0 => varint(buf, pos).map(drop),
        1 => advance(buf, pos, 8),
        2 => length_delimited(buf, pos).map(drop),
        5 => advance(buf, pos, 4),
        // Groups (3, 4) and the undefined wire types.
        _ => Err(Unchecked),
    }
}

fn advance(buf: &[u8], pos: &mut usize, n: usize) -> Result<(), Unchecked> {
    if buf.len() - *pos < n {
        return Err(Unchecked);
    }
    *pos += n;
    Ok(())
}

/// A length prefix and the bytes it announces.
fn length_delimited<'a>(buf: &'a [u8], pos: &mut usize) -> Result<&'a [u8], Unchecked> {
    let len = varint(buf, pos)?;
    if len > (buf.len() - *pos) as u64 {
        return Err(Unchecked);
    }
    let start = *pos;
    *pos += len as usize;
    Ok(&buf[start..*pos])
}

/// A base-128 varint of at most 10 bytes whose value fits 64 bits, as prost reads them.
fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, Unchecked> {
    let mut value = 0u64;
    for i in 0..10 {
        let byte = *buf.get(*pos).ok_or(Unchecked)?;
        *pos += 1;
        if i == 9 && byte > 1 {
            return Err(Unchecked);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Ok(value);
        }
    }
    Err(Unchecked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_otlp::{service_points, service_spans, string_kv};
    use crate::otlp::{otlp, Encoding};
    use crate::{Batch, Signal};
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{
        any_value, AnyValue, ArrayValue, EntityRef, KeyValue, KeyValueList,
    };
    use opentelemetry_proto::tonic::metrics::v1::{
        exemplar, exponential_histogram_data_point::Buckets, metric, summary_data_point, Exemplar,
        ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics, Summary, SummaryDataPoint,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{span, ResourceSpans, ScopeSpans, Span};
    use prost::Message as _;
    use rand::{Rng, SeedableRng};

    fn nested_value(depth: usize) -> AnyValue {
        let value = if depth == 0 {
            any_value::Value::BytesValue(vec![0xff, 0, 7])
        } else if depth.is_multiple_of(2) {
            any_value::Value::ArrayValue(ArrayValue {
                values: vec![
                    nested_value(depth - 1),
                    AnyValue {
                        value: Some(any_value::Value::DoubleValue(-1.5)),
                    },
                    AnyValue {
                        value: Some(any_value::Value::BoolValue(true)),
                    },
                ],
            })
        } else {
            any_value::Value::KvlistValue(KeyValueList {
                values: vec![KeyValue {
                    key: "nested".into(),
                    value: Some(nested_value(depth - 1)),
                    key_strindex: 3,
                }],
            })
        };
        AnyValue { value: Some(value) }
    }

    fn attributes() -> Vec<KeyValue> {
        vec![
            string_kv("k", "välue"),
            KeyValue {
                key: "deep".into(),
                value: Some(nested_value(4)),
                ..Default::default()
            },
            KeyValue {
                key: "i".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::IntValue(-42)),
                }),
                ..Default::default()
            },
        ]
    }

    fn resource() -> Option<Resource> {
        Some(Resource {
            attributes: attributes(),
            dropped_attributes_count: 2,
            entity_refs: vec![EntityRef {
                schema_url: "s".into(),
                r#type: "k8s.pod".into(),
                id_keys: vec!["k8s.pod.uid".into()],
                description_keys: vec!["k8s.pod.name".into()],
            }],
        })
    }

    /// Spans using every field of the trace schema.
    fn every_span_field() -> Batch {
        let spans = (0..3)
            .map(|i| Span {
                trace_id: vec![i; 16],
                span_id: vec![i; 8],
                trace_state: "a=b".into(),
                parent_span_id: vec![9; 8],
                flags: 0x301,
                name: format!("span {i}"),
                kind: span::SpanKind::Client as i32,
                start_time_unix_nano: 1,
                end_time_unix_nano: 2,
                attributes: attributes(),
                dropped_attributes_count: 1,
                events: vec![span::Event {
                    time_unix_nano: 3,
                    name: "event".into(),
                    attributes: attributes(),
                    dropped_attributes_count: 4,
                }],
                dropped_events_count: 5,
                links: vec![span::Link {
                    trace_id: vec![1; 16],
                    span_id: vec![2; 8],
                    trace_state: "c=d".into(),
                    attributes: attributes(),
                    dropped_attributes_count: 6,
                    flags: 7,
                }],
                dropped_links_count: 8,
                status: Some(opentelemetry_proto::tonic::trace::v1::Status {
                    message: "bad".into(),
                    code: 2,
                }),
            })
            .collect();
        Batch::traces(vec![
            ResourceSpans {
                resource: resource(),
                scope_spans: vec![ScopeSpans {
                    scope: Some(
                        opentelemetry_proto::tonic::common::v1::InstrumentationScope {
                            name: "n".into(),
                            version: "v".into(),
                            attributes: attributes(),
                            dropped_attributes_count: 1,
                        },
                    ),
                    spans,
                    schema_url: "u".into(),
                }],
                schema_url: "u".into(),
            },
            ResourceSpans::default(),
        ])
    }

    /// Data points of every type, using every field of the metrics schema.
    fn every_point_field() -> Batch {
        let exemplars = vec![
            Exemplar {
                filtered_attributes: attributes(),
                time_unix_nano: 1,
                span_id: vec![1; 8],
                trace_id: vec![2; 16],
                value: Some(exemplar::Value::AsDouble(0.5)),
            },
            Exemplar {
                value: Some(exemplar::Value::AsInt(-3)),
                ..Default::default()
            },
        ];
        let number = NumberDataPoint {
            attributes: attributes(),
            start_time_unix_nano: 1,
            time_unix_nano: 2,
            exemplars: exemplars.clone(),
            flags: 1,
            value: Some(
                opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(1.5),
            ),
        };
        let metrics = vec![
            Metric {
                name: "g".into(),
                description: "d".into(),
                unit: "1".into(),
                metadata: attributes(),
                data: Some(metric::Data::Gauge(Gauge {
                    data_points: vec![number.clone(); 2],
                })),
            },
            Metric {
                name: "exp".into(),
                data: Some(metric::Data::ExponentialHistogram(ExponentialHistogram {
                    data_points: vec![
                        ExponentialHistogramDataPoint {
                            attributes: attributes(),
                            start_time_unix_nano: 1,
                            time_unix_nano: 2,
                            count: 9,
                            sum: Some(3.0),
                            scale: -2,
                            zero_count: 1,
                            positive: Some(Buckets {
                                offset: -3,
                                bucket_counts: vec![1, 300, 70_000],
                            }),
                            negative: Some(Buckets {
                                offset: 2,
                                bucket_counts: vec![5],
                            }),
                            flags: 0,
                            exemplars: exemplars.clone(),
                            min: Some(-1.0),
                            max: Some(8.0),
                            zero_threshold: 0.001,
                        };
                        3
                    ],
                    aggregation_temporality: 1,
                })),
                ..Default::default()
            },
            Metric {
                name: "summary".into(),
                data: Some(metric::Data::Summary(Summary {
                    data_points: vec![SummaryDataPoint {
                        attributes: attributes(),
                        start_time_unix_nano: 1,
                        time_unix_nano: 2,
                        count: 4,
                        sum: 10.0,
                        quantile_values: vec![summary_data_point::ValueAtQuantile {
                            quantile: 0.5,
                            value: 2.0,
                        }],
                        flags: 1,
                    }],
                })),
                ..Default::default()
            },
            Metric {
                name: "empty".into(),
                ..Default::default()
            },
        ];
        let Batch::Metrics(service) = service_points(9) else {
            unreachable!()
        };
        let mut resource_metrics = service.to_vec();
        resource_metrics.push(ResourceMetrics {
            resource: resource(),
            scope_metrics: vec![ScopeMetrics {
                scope: None,
                metrics,
                schema_url: "u".into(),
            }],
            schema_url: "u".into(),
        });
        Batch::metrics(resource_metrics)
    }

    fn schema(signal: Signal) -> &'static MessageSchema {
        match signal {
            Signal::Traces => &RESOURCE_SPANS,
            Signal::Metrics => &RESOURCE_METRICS,
        }
    }

    /// What prost makes of `body`: the item count, or `None` if it refuses it.
    fn prost_items(signal: Signal, body: &[u8]) -> Option<usize> {
        let batch = match signal {
            Signal::Traces => {
                Batch::traces(ExportTraceServiceRequest::decode(body).ok()?.resource_spans)
            }
            Signal::Metrics => Batch::metrics(
                ExportMetricsServiceRequest::decode(body)
                    .ok()?
                    .resource_metrics,
            ),
        };
        Some(batch.item_count())
    }

    fn batches() -> Vec<Batch> {
        vec![
            service_spans(20),
            service_points(21),
            every_span_field(),
            every_point_field(),
            Batch::empty(Signal::Traces),
        ]
    }

    #[test]
    fn counts_the_items_prost_decodes() {
        for batch in batches() {
            let body = otlp(batch.signal()).encode_request(&batch, Encoding::Protobuf);
            assert_eq!(
                count_request_items(schema(batch.signal()), &body),
                Ok(batch.item_count()),
                "{} of {:?}",
                batch.item_count(),
                batch.signal()
            );
        }
    }

    /// Random damage to valid requests: whatever the check accepts, prost decodes to as many
    /// items. (It may refuse what prost accepts; the caller then decodes.)
    #[test]
    fn accepts_only_what_prost_decodes_to_the_same_count() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(19);
        let (mut accepted, mut refused) = (0, 0);
        for batch in batches().into_iter().filter(|b| !b.is_empty()) {
            let signal = batch.signal();
            let body = otlp(signal)
                .encode_request(&batch, Encoding::Protobuf)
                .to_vec();
            for _ in 0..4000 {
                let mut damaged = body.clone();
                for _ in 0..rng.random_range(1..=3) {
                    let at = rng.random_range(0..damaged.len());
                    match rng.random_range(0..5) {
                        0 => damaged[at] ^= 1 << rng.random_range(0..8),
                        1 => damaged[at] = rng.random(),
                        2 => damaged.truncate(at),
                        3 => damaged.insert(at, rng.random()),
                        _ => {
                            damaged.remove(at);
                        }
                    }
                    if damaged.is_empty() {
                        break;
                    }
                }
                match count_request_items(schema(signal), &damaged) {
                    Ok(items) => {
                        accepted += 1;
                        assert_eq!(
                            prost_items(signal, &damaged),
                            Some(items),
                            "{signal} request {damaged:?}"
                        );
                    }
                    Err(Unchecked) => refused += 1,
                }
            }
        }
        // Both outcomes happen, so the assertion above was exercised.
        assert!(accepted > 1000 && refused > 1000, "{accepted} / {refused}");
    }

    /// Bytes of a length-delimited field.
    fn field_bytes(tag: u32, content: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(content.len() as u64, &mut out);
        out.extend_from_slice(content);
        out
    }

    #[test]
    fn a_metric_data_met_twice_counts_as_prost_merges_it() {
        let gauge = |points| Metric {
            name: "m".into(),
            data: Some(metric::Data::Gauge(Gauge {
                data_points: vec![NumberDataPoint::default(); points],
            })),
            ..Default::default()
        };
        let Batch::Metrics(sum) = service_points(2) else {
            unreachable!()
        };
        let sum = sum[0].scope_metrics[0].metrics[1].clone(); // a sum of 1 point
        for (parts, expected) in [
            (vec![gauge(2), gauge(3)], 5),    // the same variant merges
            (vec![gauge(2), sum.clone()], 1), // another one replaces it
            (vec![sum, gauge(3)], 3),
        ] {
            let metric: Vec<u8> = parts.iter().flat_map(|m| m.encode_to_vec()).collect();
            let body = field_bytes(1, &field_bytes(2, &field_bytes(2, &metric)));
            assert_eq!(prost_items(Signal::Metrics, &body), Some(expected));
            assert_eq!(count_request_items(&RESOURCE_METRICS, &body), Ok(expected));
        }
    }

    #[test]
    fn refuses_what_it_cannot_forward_as_is() {
        let batch = service_spans(2);
        let body = otlp(Signal::Traces).encode_request(&batch, Encoding::Protobuf);
        // An unknown field next to the items: valid, but not only items.
        let mut extra = body.to_vec();
        extra.extend(field_bytes(7, b"x"));
        assert_eq!(prost_items(Signal::Traces, &extra), Some(2));
        assert_eq!(count_request_items(&RESOURCE_SPANS, &extra), Err(Unchecked));
        // A span name that is not UTF-8.
        let bad = body.to_vec();
        let at = bad.windows(3).position(|w| w == b"GET").unwrap();
        let mut bad = bad;
        bad[at] = 0xff;
        assert_eq!(prost_items(Signal::Traces, &bad), None);
        assert_eq!(count_request_items(&RESOURCE_SPANS, &bad), Err(Unchecked));
    }
}
