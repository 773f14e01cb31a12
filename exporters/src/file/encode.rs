//! OTLP-JSON encoding of a batch as one line (pure; the writer only appends bytes).

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use podscope_core::Batch;

/// The batch as an OTLP-JSON export request followed by `\n`.
pub fn encode_json_line(batch: &Batch) -> Vec<u8> {
    // The request types own their data; building them clones the batch once, which is the price
    // of using the generated serde code rather than a hand-written encoder.
    let mut line = match batch {
        Batch::Metrics(rms) => serde_json::to_vec(&ExportMetricsServiceRequest {
            resource_metrics: rms.to_vec(),
        }),
        Batch::Traces(rss) => serde_json::to_vec(&ExportTraceServiceRequest {
            resource_spans: rss.to_vec(),
        }),
    }
    .expect("OTLP types always serialize to JSON");
    line.push(b'\n');
    line
}
