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

// logs/v1
/// `ResourceLogs`: one element of a logs export request.
pub static RESOURCE_LOGS: MessageSchema = MessageSchema {
    fields: &[
        field(1, Message(&RESOURCE)),
        field(2, Message(&SCOPE_LOGS)),
        field(3, Str),
    ],
};
static SCOPE_LOGS: MessageSchema = MessageSchema {
    fields: &[
        field(1, Message(&SCOPE)),
        item(2, &LOG_RECORD),
        field(3, Str),
    ],
};
static LOG_RECORD: MessageSchema = MessageSchema {
    fields: &[
        field(1, Fixed64),
        field(11, Fixed64),
        field(2, Varint),
        field(3, Str),
        field(5, Message(&ANY_VALUE)),
        field(6, Message(&KEY_VALUE)),
        field(7, Varint),
        field(8, Fixed32),
        field(9, Bytes),
        field(10, Bytes),
        field(12, Str),
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
