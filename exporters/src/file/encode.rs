//! OTLP-JSON encoding of a batch as one line (pure; the writer only appends bytes).

use podscope_core::otlp::{otlp, Encoding};
use podscope_core::Batch;

/// The batch as an OTLP-JSON export request followed by `\n` (NaN and infinities written as the
/// proto3 JSON strings, so any protobuf JSON parser reads the line back).
pub fn encode_json_line(batch: &Batch) -> Vec<u8> {
    let mut line = Vec::from(otlp(batch.signal()).encode_request(batch, Encoding::Json));
    line.push(b'\n');
    line
}
