//! OTLP/gRPC: the `Export` methods of the metrics and trace services.
//!
//! Served with tonic, but not through the generated servers: their codec reports an undecodable
//! message as INTERNAL, and OTLP clients must see INVALID_ARGUMENT (do not retry) for bad data.
//! So each service here is a small tower service with its own codec.

use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use podscope_core::{Batch, ConsumeError, Consumer};
use tonic::codec::{
    BufferSettings, Codec, CompressionEncoding, DecodeBuf, Decoder, EnabledCompressionEncodings,
};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

/// What differs between the two OTLP services.
pub trait OtlpGrpcSignal: Send + Sync + 'static {
    const SERVICE: &'static str;
    const EXPORT_PATH: &'static str;
    type Request: prost::Message + Default + Send + 'static;
    type Response: prost::Message + Default + Send + 'static;
    fn into_batch(request: Self::Request) -> Batch;
}

pub struct Metrics;
pub struct Traces;

impl OtlpGrpcSignal for Metrics {
    const SERVICE: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
    const EXPORT_PATH: &'static str =
        "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";
    type Request = ExportMetricsServiceRequest;
    type Response = ExportMetricsServiceResponse;
    fn into_batch(request: Self::Request) -> Batch {
        Batch::metrics(request.resource_metrics)
    }
}

impl OtlpGrpcSignal for Traces {
    const SERVICE: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
    const EXPORT_PATH: &'static str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
    type Request = ExportTraceServiceRequest;
    type Response = ExportTraceServiceResponse;
    fn into_batch(request: Self::Request) -> Batch {
        Batch::traces(request.resource_spans)
    }
}

/// One OTLP gRPC service feeding a consumer.
pub struct ExportService<S> {
    next: Arc<dyn Consumer>,
    max_decoding_message_size: usize,
    _signal: PhantomData<S>,
}

impl<S> Clone for ExportService<S> {
    fn clone(&self) -> Self {
        ExportService {
            next: self.next.clone(),
            max_decoding_message_size: self.max_decoding_message_size,
            _signal: PhantomData,
        }
    }
}

impl<S: OtlpGrpcSignal> ExportService<S> {
    pub fn new(next: Arc<dyn Consumer>, max_decoding_message_size: usize) -> Self {
        ExportService {
            next,
            max_decoding_message_size,
            _signal: PhantomData,
        }
    }
}

impl<S: OtlpGrpcSignal> NamedService for ExportService<S> {
    const NAME: &'static str = S::SERVICE;
}

/// The consumer's answer as a gRPC status: retryable → UNAVAILABLE, permanent → INVALID_ARGUMENT.
pub fn status_for(error: &ConsumeError) -> Status {
    match error {
        ConsumeError::Retryable { message, .. } => Status::unavailable(message.clone()),
        ConsumeError::Permanent { message, .. } => Status::invalid_argument(message.clone()),
    }
}

struct ExportMethod<S> {
    next: Arc<dyn Consumer>,
    _signal: PhantomData<S>,
}

impl<S: OtlpGrpcSignal> UnaryService<S::Request> for ExportMethod<S> {
    type Response = S::Response;
    type Future = futures::future::BoxFuture<'static, Result<Response<S::Response>, Status>>;

    fn call(&mut self, request: Request<S::Request>) -> Self::Future {
        let next = self.next.clone();
        Box::pin(async move {
            let batch = S::into_batch(request.into_inner());
            if !batch.is_empty() {
                next.consume(batch).await.map_err(|e| status_for(&e))?;
            }
            Ok(Response::new(S::Response::default()))
        })
    }
}

impl<S: OtlpGrpcSignal, B> tower::Service<http::Request<B>> for ExportService<S>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            if request.uri().path() != S::EXPORT_PATH {
                return Ok(Status::unimplemented(format!(
                    "{} has only the Export method",
                    S::SERVICE
                ))
                .into_http());
            }
            let mut accept = EnabledCompressionEncodings::default();
            accept.enable(CompressionEncoding::Gzip);
            let mut grpc = Grpc::new(OtlpCodec::<S::Response, S::Request>::default())
                .apply_compression_config(accept, EnabledCompressionEncodings::default())
                .apply_max_message_size_config(Some(this.max_decoding_message_size), None);
            let method = ExportMethod::<S> {
                next: this.next,
                _signal: PhantomData,
            };
            Ok(grpc.unary(method, request).await)
        })
    }
}

/// Prost encoding, with undecodable input reported as INVALID_ARGUMENT.
struct OtlpCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for OtlpCodec<T, U> {
    fn default() -> Self {
        OtlpCodec(PhantomData)
    }
}

impl<T, U> Codec for OtlpCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = InvalidArgumentDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        InvalidArgumentDecoder(PhantomData)
    }
}

struct InvalidArgumentDecoder<U>(PhantomData<U>);

impl<U: prost::Message + Default> Decoder for InvalidArgumentDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed OTLP protobuf: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
