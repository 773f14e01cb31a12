//! The OTLP wire protocol, per signal: what the `otlp` receiver and the OTLP exporters (gRPC,
//! HTTP, file) need to know about a signal — its gRPC service and HTTP path, and how its export
//! requests and responses are encoded in protobuf and JSON. Written once for every signal:
//! adding one is one [`SignalMessages`] impl and one arm in [`otlp`]. Profiles, whose request
//! carries a dictionary beside its resources, implement [`OtlpSignal`] on their own
//! ([`Profiles`]).
//!
//! Pure encoding and decoding; no I/O here.

pub mod json;
pub mod scan;

use bytes::{Buf, BufMut, Bytes};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::profiles::v1development::{
    ExportProfilesPartialSuccess, ExportProfilesServiceRequest, ExportProfilesServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::logs::v1::ResourceLogs;
use opentelemetry_proto::tonic::metrics::v1::ResourceMetrics;
use opentelemetry_proto::tonic::profiles::v1development::ProfilesData;
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use prost::Message;
use serde::de::DeserializeOwned;
use serde::ser::SerializeMap as _;
use serde::Serialize;

use crate::batch::{Batch, Signal};

/// How an OTLP message is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Protobuf,
    /// OTLP-JSON: the proto3 JSON mapping with OTLP's changes (hex ids, integer enums).
    Json,
}

impl Encoding {
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

/// A backend kept an export request but rejected some of its items.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartialSuccess {
    pub rejected: i64,
    pub message: String,
}

/// One signal of the OTLP protocol.
pub trait OtlpSignal: Send + Sync {
    fn signal(&self) -> Signal;

    /// The gRPC service, e.g. `opentelemetry.proto.collector.trace.v1.TraceService`.
    fn grpc_service(&self) -> &'static str;

    /// The gRPC method path, e.g. `/opentelemetry.proto.collector.trace.v1.TraceService/Export`.
    fn grpc_export_path(&self) -> &'static str;

    /// The OTLP/HTTP path, e.g. `/v1/traces`.
    fn http_path(&self) -> &'static str;

    /// The export request holding `batch` (of this signal; any other gives an empty request).
    /// A batch still as received in protobuf is sent as the bytes it came in.
    fn encode_request(&self, batch: &Batch, encoding: Encoding) -> Bytes;

    /// The batch an export request holds; the error says what is malformed. A protobuf
    /// request that [`scan`] vouches for stays encoded in the batch, with its items counted.
    fn decode_request(&self, body: Bytes, encoding: Encoding) -> Result<Batch, String>;

    /// An export response: full success, or the partial success given.
    fn encode_response(&self, partial: Option<&PartialSuccess>, encoding: Encoding) -> Vec<u8>;

    /// What an export response says was rejected (`None`: everything was accepted).
    fn decode_response(
        &self,
        body: &[u8],
        encoding: Encoding,
    ) -> Result<Option<PartialSuccess>, String>;
}

/// The protocol of `signal`.
pub fn otlp(signal: Signal) -> &'static dyn OtlpSignal {
    match signal {
        Signal::Metrics => &Wire::<Metrics>(std::marker::PhantomData),
        Signal::Traces => &Wire::<Traces>(std::marker::PhantomData),
        Signal::Profiles => &Profiles,
        Signal::Logs => &Wire::<Logs>(std::marker::PhantomData),
    }
}

/// The generated messages of one signal and how a batch maps to them.
pub trait SignalMessages: Send + Sync + 'static {
    const SIGNAL: Signal;
    const SERVICE: &'static str;
    const EXPORT_PATH: &'static str;
    const HTTP_PATH: &'static str;
    /// The JSON name of the request's one field (`resourceSpans`).
    const JSON_FIELD: &'static str;
    /// One element of the request's repeated field 1 (`ResourceSpans`).
    type Item: Message + Default + Serialize;
    /// What [`scan`] knows of `Item`.
    const ITEM_SCHEMA: &'static scan::MessageSchema;
    type Request: Message + Default + DeserializeOwned;
    type Response: Message + Default + Serialize + DeserializeOwned;

    fn items(batch: &Batch) -> &[Self::Item];
    fn into_batch(request: Self::Request) -> Batch;
    fn partial(response: &Self::Response) -> Option<PartialSuccess>;
    fn response(partial: Option<&PartialSuccess>) -> Self::Response;
}

pub struct Metrics;
pub struct Traces;
pub struct Logs;

impl SignalMessages for Metrics {
    const SIGNAL: Signal = Signal::Metrics;
    const SERVICE: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
    const EXPORT_PATH: &'static str =
        "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";
    const HTTP_PATH: &'static str = "/v1/metrics";
    const JSON_FIELD: &'static str = "resourceMetrics";
    type Item = ResourceMetrics;
    const ITEM_SCHEMA: &'static scan::MessageSchema = &scan::RESOURCE_METRICS;
    type Request = ExportMetricsServiceRequest;
    type Response = ExportMetricsServiceResponse;

    fn items(batch: &Batch) -> &[ResourceMetrics] {
        match batch {
            Batch::Metrics(rms) => rms,
            _ => &[],
        }
    }

    fn into_batch(request: Self::Request) -> Batch {
        Batch::metrics(request.resource_metrics)
    }

    fn partial(response: &Self::Response) -> Option<PartialSuccess> {
        response.partial_success.as_ref().map(|p| PartialSuccess {
            rejected: p.rejected_data_points,
            message: p.error_message.clone(),
        })
    }

    fn response(partial: Option<&PartialSuccess>) -> Self::Response {
        ExportMetricsServiceResponse {
            partial_success: partial.map(|p| ExportMetricsPartialSuccess {
                rejected_data_points: p.rejected,
                error_message: p.message.clone(),
            }),
        }
    }
}

impl SignalMessages for Traces {
    const SIGNAL: Signal = Signal::Traces;
    const SERVICE: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
    const EXPORT_PATH: &'static str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
    const HTTP_PATH: &'static str = "/v1/traces";
    const JSON_FIELD: &'static str = "resourceSpans";
    type Item = ResourceSpans;
    const ITEM_SCHEMA: &'static scan::MessageSchema = &scan::RESOURCE_SPANS;
    type Request = ExportTraceServiceRequest;
    type Response = ExportTraceServiceResponse;

    fn items(batch: &Batch) -> &[ResourceSpans] {
        match batch {
            Batch::Traces(rss) => rss,
            _ => &[],
        }
    }

    fn into_batch(request: Self::Request) -> Batch {
        Batch::traces(request.resource_spans)
    }

    fn partial(response: &Self::Response) -> Option<PartialSuccess> {
        response.partial_success.as_ref().map(|p| PartialSuccess {
            rejected: p.rejected_spans,
            message: p.error_message.clone(),
        })
    }

    fn response(partial: Option<&PartialSuccess>) -> Self::Response {
        ExportTraceServiceResponse {
            partial_success: partial.map(|p| ExportTracePartialSuccess {
                rejected_spans: p.rejected,
                error_message: p.message.clone(),
            }),
        }
    }
}

impl SignalMessages for Logs {
    const SIGNAL: Signal = Signal::Logs;
    const SERVICE: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
    const EXPORT_PATH: &'static str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
    const HTTP_PATH: &'static str = "/v1/logs";
    const JSON_FIELD: &'static str = "resourceLogs";
    type Item = ResourceLogs;
    const ITEM_SCHEMA: &'static scan::MessageSchema = &scan::RESOURCE_LOGS;
    type Request = ExportLogsServiceRequest;
    type Response = ExportLogsServiceResponse;

    fn items(batch: &Batch) -> &[ResourceLogs] {
        match batch {
            Batch::Logs(rls) => rls,
            _ => &[],
        }
    }

    fn into_batch(request: Self::Request) -> Batch {
        Batch::logs(request.resource_logs)
    }

    fn partial(response: &Self::Response) -> Option<PartialSuccess> {
        response.partial_success.as_ref().map(|p| PartialSuccess {
            rejected: p.rejected_log_records,
            message: p.error_message.clone(),
        })
    }

    fn response(partial: Option<&PartialSuccess>) -> Self::Response {
        ExportLogsServiceResponse {
            partial_success: partial.map(|p| ExportLogsPartialSuccess {
                rejected_log_records: p.rejected,
                error_message: p.message.clone(),
            }),
        }
    }
}

/// [`OtlpSignal`] for the messages of `M`.
struct Wire<M>(std::marker::PhantomData<M>);

/// An export request written straight from a batch's items, without copying them into the
/// generated request type: both requests are `repeated <Item> = 1` and nothing else.
struct RequestRef<'a, M: SignalMessages>(&'a [M::Item]);

impl<M: SignalMessages> Serialize for RequestRef<'_, M> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1))?;
        map.serialize_entry(M::JSON_FIELD, self.0)?;
        map.end()
    }
}

impl<M: SignalMessages> OtlpSignal for Wire<M> {
    fn signal(&self) -> Signal {
        M::SIGNAL
    }

    fn grpc_service(&self) -> &'static str {
        M::SERVICE
    }

    fn grpc_export_path(&self) -> &'static str {
        M::EXPORT_PATH
    }

    fn http_path(&self) -> &'static str {
        M::HTTP_PATH
    }

    fn encode_request(&self, batch: &Batch, encoding: Encoding) -> Bytes {
        if let (Encoding::Protobuf, Some(bodies)) = (encoding, batch.encoded_bodies()) {
            if batch.signal() == M::SIGNAL {
                return match bodies {
                    [one] => one.clone(),
                    several => Bytes::from(several.concat()),
                };
            }
        }
        let items = M::items(batch);
        let body = match encoding {
            Encoding::Protobuf => {
                // Field 1, length-delimited: the key byte, then each item with its length.
                const KEY: u8 = (1 << 3) | 2;
                let len = items
                    .iter()
                    .map(|item| {
                        let len = item.encoded_len();
                        1 + prost::length_delimiter_len(len) + len
                    })
                    .sum();
                let mut out = Vec::with_capacity(len);
                for item in items {
                    out.push(KEY);
                    item.encode_length_delimited(&mut out)
                        .expect("a Vec grows as needed");
                }
                out
            }
            Encoding::Json => json::to_vec(&RequestRef::<M>(items)),
        };
        Bytes::from(body)
    }

    fn decode_request(&self, body: Bytes, encoding: Encoding) -> Result<Batch, String> {
        let request = match encoding {
            Encoding::Protobuf => {
                if let Ok(items) = scan::count_request_items(M::ITEM_SCHEMA, &body) {
                    if let Some(batch) = Batch::encoded(M::SIGNAL, body.clone(), items) {
                        return Ok(batch);
                    }
                }
                M::Request::decode(body).map_err(|e| format!("malformed OTLP protobuf: {e}"))?
            }
            Encoding::Json => {
                serde_json::from_slice(&body).map_err(|e| format!("malformed OTLP JSON: {e}"))?
            }
        };
        Ok(M::into_batch(request))
    }

    fn encode_response(&self, partial: Option<&PartialSuccess>, encoding: Encoding) -> Vec<u8> {
        let response = M::response(partial);
        match encoding {
            Encoding::Protobuf => response.encode_to_vec(),
            Encoding::Json => json::to_vec(&response),
        }
    }

    fn decode_response(
        &self,
        body: &[u8],
        encoding: Encoding,
    ) -> Result<Option<PartialSuccess>, String> {
        let response: M::Response = match encoding {
            Encoding::Protobuf => {
                M::Response::decode(body).map_err(|e| format!("malformed OTLP response: {e}"))?
            }
            // An empty body is a full success, as the Collector answers it.
            Encoding::Json if body.iter().all(u8::is_ascii_whitespace) => M::Response::default(),
            Encoding::Json => serde_json::from_slice(body)
                .map_err(|e| format!("malformed OTLP JSON response: {e}"))?,
        };
        Ok(M::partial(&response).filter(|p| p.rejected > 0 || !p.message.is_empty()))
    }
}

/// OTLP profiles (development version): the request is the batch's message itself
/// (`ProfilesData` and `ExportProfilesServiceRequest` have the same fields and numbers), its
/// resources and its dictionary.
pub struct Profiles;

impl OtlpSignal for Profiles {
    fn signal(&self) -> Signal {
        Signal::Profiles
    }

    fn grpc_service(&self) -> &'static str {
        "opentelemetry.proto.collector.profiles.v1development.ProfilesService"
    }

    fn grpc_export_path(&self) -> &'static str {
        "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export"
    }

    fn http_path(&self) -> &'static str {
        "/v1development/profiles"
    }

    fn encode_request(&self, batch: &Batch, encoding: Encoding) -> Bytes {
        let empty = ProfilesData::default();
        let data = match batch {
            Batch::Profiles(data) => data,
            _ => &empty,
        };
        Bytes::from(match encoding {
            Encoding::Protobuf => data.encode_to_vec(),
            Encoding::Json => json::to_vec(data),
        })
    }

    fn decode_request(&self, body: Bytes, encoding: Encoding) -> Result<Batch, String> {
        let request: ExportProfilesServiceRequest = match encoding {
            Encoding::Protobuf => ExportProfilesServiceRequest::decode(body)
                .map_err(|e| format!("malformed OTLP protobuf: {e}"))?,
            Encoding::Json => {
                serde_json::from_slice(&body).map_err(|e| format!("malformed OTLP JSON: {e}"))?
            }
        };
        Ok(Batch::profiles(ProfilesData {
            resource_profiles: request.resource_profiles,
            dictionary: request.dictionary,
        }))
    }

    fn encode_response(&self, partial: Option<&PartialSuccess>, encoding: Encoding) -> Vec<u8> {
        let response = ExportProfilesServiceResponse {
            partial_success: partial.map(|p| ExportProfilesPartialSuccess {
                rejected_profiles: p.rejected,
                error_message: p.message.clone(),
            }),
        };
        match encoding {
            Encoding::Protobuf => response.encode_to_vec(),
            Encoding::Json => json::to_vec(&response),
        }
    }

    fn decode_response(
        &self,
        body: &[u8],
        encoding: Encoding,
    ) -> Result<Option<PartialSuccess>, String> {
        let response: ExportProfilesServiceResponse = match encoding {
            Encoding::Protobuf => ExportProfilesServiceResponse::decode(body)
                .map_err(|e| format!("malformed OTLP response: {e}"))?,
            Encoding::Json if body.iter().all(u8::is_ascii_whitespace) => Default::default(),
            Encoding::Json => serde_json::from_slice(body)
                .map_err(|e| format!("malformed OTLP JSON response: {e}"))?,
        };
        Ok(response
            .partial_success
            .map(|p| PartialSuccess {
                rejected: p.rejected_profiles,
                message: p.error_message,
            })
            .filter(|p| p.rejected > 0 || !p.message.is_empty()))
    }
}

/// A gRPC codec that passes messages through as bytes, for OTLP services whose messages are
/// encoded and decoded with [`OtlpSignal`] (so a request is encoded once, whatever the retries,
/// and a malformed one is the receiver's INVALID_ARGUMENT rather than the codec's INTERNAL).
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_carry_partial_success_both_ways() {
        let partial = PartialSuccess {
            rejected: 2,
            message: "too old".into(),
        };
        for signal in Signal::ALL {
            let wire = otlp(signal);
            for encoding in [Encoding::Protobuf, Encoding::Json] {
                let body = wire.encode_response(Some(&partial), encoding);
                assert_eq!(
                    wire.decode_response(&body, encoding).unwrap(),
                    Some(partial.clone())
                );
                let full = wire.encode_response(None, encoding);
                assert_eq!(wire.decode_response(&full, encoding).unwrap(), None);
            }
            assert_eq!(wire.decode_response(b"", Encoding::Json).unwrap(), None);
        }
        assert!(otlp(Signal::Metrics)
            .decode_request(Bytes::from_static(b"\xff"), Encoding::Protobuf)
            .unwrap_err()
            .starts_with("malformed OTLP protobuf"));
    }
}
