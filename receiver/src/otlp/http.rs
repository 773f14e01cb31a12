//! OTLP/HTTP: `POST /v1/metrics` and `POST /v1/traces` with `application/x-protobuf` or
//! `application/json` bodies, optionally gzip-compressed. Answers in the request's encoding;
//! failures carry a `google.rpc.Status` as the OTLP specification asks.

use std::io::Read as _;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use podscope_core::{Batch, ConsumeError, Consumer, ReceiverConsumers};
use serde::de::DeserializeOwned;
use serde::Serialize;

const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";

/// The `google.rpc.Status` message OTLP/HTTP puts in error responses.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => PROTOBUF,
            Encoding::Json => JSON,
        }
    }
}

#[derive(Clone)]
struct Endpoint {
    next: Option<Arc<dyn Consumer>>,
    max_body: usize,
}

/// The router for the signals this receiver has pipelines for; the others answer 404.
pub fn router(consumers: &ReceiverConsumers, max_body: usize) -> Router {
    let metrics = Endpoint {
        next: consumers.metrics.clone(),
        max_body,
    };
    let traces = Endpoint {
        next: consumers.traces.clone(),
        max_body,
    };
    Router::new()
        .route(
            "/v1/metrics",
            post(export::<ExportMetricsServiceRequest, ExportMetricsServiceResponse>)
                .with_state(metrics),
        )
        .route(
            "/v1/traces",
            post(export::<ExportTraceServiceRequest, ExportTraceServiceResponse>)
                .with_state(traces),
        )
        // Compressed bodies are limited here, decompressed ones in `decompress`.
        .layer(DefaultBodyLimit::max(max_body))
}

/// Request types that become a batch.
pub trait IntoBatch {
    fn into_batch(self) -> Batch;
}

impl IntoBatch for ExportMetricsServiceRequest {
    fn into_batch(self) -> Batch {
        Batch::metrics(self.resource_metrics)
    }
}

impl IntoBatch for ExportTraceServiceRequest {
    fn into_batch(self) -> Batch {
        Batch::traces(self.resource_spans)
    }
}

async fn export<Req, Resp>(
    State(endpoint): State<Endpoint>,
    headers: HeaderMap,
    body: Bytes,
) -> Response
where
    Req: prost::Message + Default + DeserializeOwned + IntoBatch,
    Resp: prost::Message + Default + Serialize,
{
    let encoding = match content_type(&headers) {
        Ok(e) => e,
        Err(message) => {
            return error(
                Encoding::Protobuf,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                message,
            )
        }
    };
    let Some(next) = endpoint.next else {
        return error(
            encoding,
            StatusCode::NOT_FOUND,
            "this receiver is in no pipeline for this signal".into(),
        );
    };
    let body = match decompress(&headers, body, endpoint.max_body) {
        Ok(b) => b,
        Err((status, message)) => return error(encoding, status, message),
    };
    let request: Req = match encoding {
        Encoding::Protobuf => match Req::decode(body.as_ref()) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    encoding,
                    StatusCode::BAD_REQUEST,
                    format!("malformed OTLP protobuf: {e}"),
                )
            }
        },
        Encoding::Json => match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    encoding,
                    StatusCode::BAD_REQUEST,
                    format!("malformed OTLP JSON: {e}"),
                )
            }
        },
    };
    let batch = request.into_batch();
    if !batch.is_empty() {
        if let Err(e) = next.consume(batch).await {
            return refused(encoding, &e);
        }
    }
    respond(encoding, StatusCode::OK, &Resp::default())
}

fn content_type(headers: &HeaderMap) -> Result<Encoding, String> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let base = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match base.as_str() {
        PROTOBUF => Ok(Encoding::Protobuf),
        JSON => Ok(Encoding::Json),
        _ => Err(format!(
            "unsupported Content-Type {value:?}: use {PROTOBUF} or {JSON}"
        )),
    }
}

fn decompress(headers: &HeaderMap, body: Bytes, max: usize) -> Result<Bytes, (StatusCode, String)> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    match encoding.as_str() {
        "" | "identity" => Ok(body),
        "gzip" => {
            let mut out = Vec::new();
            let read = flate2::read::GzDecoder::new(body.as_ref())
                .take(max as u64 + 1)
                .read_to_end(&mut out);
            match read {
                Ok(n) if n > max => Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("decompressed body is larger than max_request_body_size ({max} bytes)"),
                )),
                Ok(_) => Ok(Bytes::from(out)),
                Err(e) => Err((StatusCode::BAD_REQUEST, format!("invalid gzip body: {e}"))),
            }
        }
        other => Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported Content-Encoding {other:?}: use gzip or none"),
        )),
    }
}

fn refused(encoding: Encoding, error: &ConsumeError) -> Response {
    match error {
        ConsumeError::Retryable {
            message,
            retry_after,
            ..
        } => {
            let mut response = error_body(
                encoding,
                StatusCode::SERVICE_UNAVAILABLE,
                14,
                message.clone(),
            );
            let seconds = retry_after.map(|d| d.as_secs().max(1)).unwrap_or(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            response
        }
        ConsumeError::Permanent { message, .. } => {
            error_body(encoding, StatusCode::BAD_REQUEST, 3, message.clone())
        }
    }
}

fn error(encoding: Encoding, status: StatusCode, message: String) -> Response {
    // gRPC codes: INVALID_ARGUMENT 3, NOT_FOUND 5, UNIMPLEMENTED 12, RESOURCE_EXHAUSTED 8.
    let code = match status {
        StatusCode::NOT_FOUND => 5,
        StatusCode::PAYLOAD_TOO_LARGE => 8,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => 12,
        _ => 3,
    };
    error_body(encoding, status, code, message)
}

fn error_body(encoding: Encoding, status: StatusCode, code: i32, message: String) -> Response {
    respond(encoding, status, &RpcStatus { code, message })
}

fn respond<M: prost::Message + Serialize>(
    encoding: Encoding,
    status: StatusCode,
    message: &M,
) -> Response {
    let body = match encoding {
        Encoding::Protobuf => message.encode_to_vec(),
        Encoding::Json => serde_json::to_vec(message).unwrap_or_default(),
    };
    (
        status,
        [(header::CONTENT_TYPE, encoding.content_type())],
        body,
    )
        .into_response()
}
