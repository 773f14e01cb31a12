//! OTLP export requests as podscope encodes and decodes them, checked against the messages the
//! `opentelemetry-proto` crate generates from the same data.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use podscope_core::otlp::{otlp, Encoding};
use podscope_core::{Batch, Signal};
use podscope_testkit::fake_otlp;
use prost::Message as _;

fn spans() -> Batch {
    fake_otlp::spans(3, &[("service.name", "cart")])
}

#[test]
fn requests_are_the_generated_messages_byte_for_byte() {
    let batch = spans();
    let Batch::Traces(rss) = &batch else {
        unreachable!()
    };
    let generated = ExportTraceServiceRequest {
        resource_spans: rss.to_vec(),
    };
    let wire = otlp(Signal::Traces);
    assert_eq!(
        wire.encode_request(&batch, Encoding::Protobuf),
        generated.encode_to_vec()
    );
    assert_eq!(
        wire.encode_request(&batch, Encoding::Json),
        serde_json::to_vec(&generated).unwrap()
    );
    for encoding in [Encoding::Protobuf, Encoding::Json] {
        let body = wire.encode_request(&batch, encoding);
        assert_eq!(wire.decode_request(&body, encoding).unwrap(), batch);
    }
}
