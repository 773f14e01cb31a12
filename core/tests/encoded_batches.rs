//! Batches that arrived as OTLP protobuf and stay encoded (`batch::Items`): how they join, read,
//! change and travel on, as the receiver, the batch processor and the exporters use them.

use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use podscope_core::{Batch, Signal};
use podscope_testkit::fake_otlp;

/// A batch received as protobuf, as the `otlp` receiver makes it.
fn received(batch: &Batch) -> Batch {
    let wire = podscope_core::otlp::otlp(batch.signal());
    let body = wire.encode_request(batch, podscope_core::otlp::Encoding::Protobuf);
    let received = wire
        .decode_request(body, podscope_core::otlp::Encoding::Protobuf)
        .unwrap();
    assert!(received.encoded_bodies().is_some(), "kept as received");
    received
}

#[test]
fn encoded_batches_join_without_decoding_and_read_as_the_items_they_hold() {
    let (a, b) = (fake_otlp::service_spans(3), fake_otlp::service_spans(4));
    let mut joined = received(&a);
    joined.append(received(&b)).unwrap();
    assert_eq!(joined.item_count(), 7);
    assert_eq!(joined.encoded_bodies().map(<[_]>::len), Some(2));
    // Read, they are the items of both, in order.
    let (Batch::Traces(x), Batch::Traces(y)) = (&a, &b) else {
        unreachable!()
    };
    let expected: Vec<ResourceSpans> = x.iter().chain(y.iter()).cloned().collect();
    assert_eq!(joined, Batch::traces(expected.clone()));
    // Sent as protobuf, the bodies are the request the items make.
    let wire = podscope_core::otlp::otlp(Signal::Traces);
    assert_eq!(
        wire.encode_request(&joined, podscope_core::otlp::Encoding::Protobuf),
        wire.encode_request(
            &Batch::traces(expected),
            podscope_core::otlp::Encoding::Protobuf
        )
    );
    // A batch that is decoded joins by decoding the other.
    let mut mixed = fake_otlp::service_spans(1);
    mixed.append(received(&b)).unwrap();
    assert_eq!(mixed.item_count(), 5);
    assert!(mixed.encoded_bodies().is_none());
}

#[test]
fn writing_to_an_encoded_batch_drops_its_bytes_and_copies_only_if_shared() {
    let mut points = received(&fake_otlp::service_points(8));
    let other = points.clone();
    points.metrics_mut().unwrap()[0].schema_url = "changed".into();
    assert!(
        points.encoded_bodies().is_none(),
        "the bytes no longer match"
    );
    assert!(
        other.encoded_bodies().is_some(),
        "the other holder keeps them"
    );
    assert_eq!(points.item_count(), 8);
    let wire = podscope_core::otlp::otlp(Signal::Metrics);
    let body = wire.encode_request(&points, podscope_core::otlp::Encoding::Protobuf);
    let Batch::Metrics(rms) = wire
        .decode_request(body, podscope_core::otlp::Encoding::Protobuf)
        .unwrap()
    else {
        unreachable!()
    };
    assert_eq!(rms[0].schema_url, "changed");
    // Split beyond its size, an encoded batch is decoded and split like any other.
    let sizes: Vec<usize> = other.split(3).iter().map(Batch::item_count).collect();
    assert_eq!(sizes, vec![3, 3, 2]);
}
