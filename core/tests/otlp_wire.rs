//! OTLP export requests as podscope encodes and decodes them, checked against the messages the
//! `opentelemetry-proto` crate generates from the same data.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use podscope_core::otlp::{otlp, Encoding};
use podscope_core::{Batch, Signal};
use podscope_testkit::fake_otlp;

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
        assert_eq!(&wire.decode_request(&body, encoding).unwrap(), batch);
    }
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
