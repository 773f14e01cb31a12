//! OTLP export requests as podscope encodes and decodes them, checked against the messages the
//! `opentelemetry-proto` crate generates from the same data.

use bytes::Bytes;
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
    assert_request_is_the_generated_message(Signal::Traces, &batch, &generated);
}

/// `batch`'s request bytes are `generated`'s, in protobuf and JSON, and decode back to `batch`.
fn assert_request_is_the_generated_message(
    signal: Signal,
    batch: &Batch,
    generated: &(impl prost::Message + serde::Serialize),
) {
    let wire = otlp(signal);
    assert_eq!(
        wire.encode_request(batch, Encoding::Protobuf),
        generated.encode_to_vec()
    );
    assert_eq!(
        wire.encode_request(batch, Encoding::Json),
        serde_json::to_vec(generated).unwrap()
    );
    for encoding in [Encoding::Protobuf, Encoding::Json] {
        let body = wire.encode_request(batch, encoding);
        assert_eq!(&wire.decode_request(body, encoding).unwrap(), batch);
    }
}

/// What `scan` does not vouch for is decoded: accepted if prost decodes it, refused with
/// prost's own error otherwise.
#[test]
fn requests_the_scan_does_not_vouch_for_are_decoded() {
    let wire = otlp(Signal::Traces);
    let body = wire.encode_request(&spans(), Encoding::Protobuf).to_vec();
    // An unknown field beside the items: accepted, decoded.
    let mut extra = body.clone();
    extra.extend_from_slice(&[(9 << 3) | 2, 1, b'x']);
    let batch = wire
        .decode_request(Bytes::from(extra), Encoding::Protobuf)
        .unwrap();
    assert_eq!(batch, spans());
    assert!(batch.encoded_bodies().is_none());
    // A span name that is not UTF-8: prost's error, as before the scan existed.
    let mut bad = body;
    let at = bad.windows(13).position(|w| w == b"GET /api/cart").unwrap();
    bad[at] = 0xc0;
    let expected = ExportTraceServiceRequest::decode(&bad[..]).unwrap_err();
    assert_eq!(
        wire.decode_request(Bytes::from(bad), Encoding::Protobuf)
            .unwrap_err(),
        format!("malformed OTLP protobuf: {expected}")
    );
}

#[test]
fn profiles_requests_are_the_generated_message_with_its_dictionary() {
    use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
    let batch = fake_otlp::cpu_profile(3, &[("container.id", "abc")]);
    let Batch::Profiles(data) = &batch else {
        unreachable!("cpu_profile makes profiles")
    };
    let generated = ExportProfilesServiceRequest {
        resource_profiles: data.resource_profiles.clone(),
        dictionary: data.dictionary.clone(),
    };
    assert_eq!(
        otlp(Signal::Profiles).http_path(),
        "/v1development/profiles"
    );
    assert_request_is_the_generated_message(Signal::Profiles, &batch, &generated);
}
