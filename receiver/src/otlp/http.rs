//! OTLP/HTTP: `POST /v1/metrics` and `POST /v1/traces` with `application/x-protobuf` or
//! `application/json` bodies, optionally gzip-compressed. Answers in the request's encoding;
//! failures carry a `google.rpc.Status` as the OTLP specification asks. One handler for every
//! signal, with the signal's OTLP wire format (`podscope_core::otlp`).
//!
//! At shutdown, a request whose body is still arriving is answered 503 at once (the client
//! retries elsewhere) instead of holding the receiver open; a request whose body was read is
//! finished normally.

use std::io::Read as _;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use podscope_core::otlp::{otlp, Encoding, OtlpSignal};
use podscope_core::server::Authenticator;
use podscope_core::{ConsumeError, Consumer, ReceiverConsumers, Signal};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

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

#[derive(Clone)]
struct Endpoint {
    signal: &'static dyn OtlpSignal,
    next: Option<Arc<dyn Consumer>>,
    max_body: usize,
    stop: CancellationToken,
    /// Credentials every request must carry, when `auth:` is set.
    auth: Option<Arc<Authenticator>>,
}

/// The routes of every signal; those this receiver has no pipeline for answer 404.
pub fn router(
    consumers: &ReceiverConsumers,
    max_body: usize,
    stop: &CancellationToken,
    auth: Option<Arc<Authenticator>>,
) -> Router {
    let mut router = Router::new();
    for signal in Signal::ALL {
        let endpoint = Endpoint {
            signal: otlp(signal),
            next: consumers.get(signal).cloned(),
            max_body,
            stop: stop.clone(),
            auth: auth.clone(),
        };
        router = router.route(
            endpoint.signal.http_path(),
            post(export).with_state(endpoint),
        );
    }
    router
}

async fn export(State(endpoint): State<Endpoint>, headers: HeaderMap, body: Body) -> Response {
    // Credentials first: an unauthenticated client learns nothing else about the endpoint.
    if let Some(auth) = &endpoint.auth {
        if let Err(refused) = auth.check(&headers) {
            let mut response = error_body(
                content_type(&headers).unwrap_or(Encoding::Protobuf),
                StatusCode::UNAUTHORIZED,
                16,
                refused.message.to_string(),
            );
            for challenge in refused.challenges {
                response.headers_mut().append(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
            }
            return response;
        }
    }
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
    // Compressed bodies are limited here, decompressed ones in `decompress`.
    let read = tokio::select! {
        biased;
        read = axum::body::to_bytes(body, endpoint.max_body) => read,
        _ = endpoint.stop.cancelled() => {
            let shutting_down = ConsumeError::retryable("shutting_down", "the receiver is shutting down");
            return refused(encoding, &shutting_down);
        }
    };
    let body = match read {
        Ok(body) => body,
        Err(e) => {
            return error(
                encoding,
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request body unreadable or larger than max_request_body_size ({} bytes): {e}",
                    endpoint.max_body
                ),
            )
        }
    };
    let body = match decompress(&headers, body, endpoint.max_body) {
        Ok(b) => b,
        Err((status, message)) => return error(encoding, status, message),
    };
    let batch = match endpoint.signal.decode_request(body, encoding) {
        Ok(batch) => batch,
        Err(message) => return error(encoding, StatusCode::BAD_REQUEST, message),
    };
    if !batch.is_empty() {
        if let Err(e) = next.consume(batch).await {
            return refused(encoding, &e);
        }
    }
    let body = endpoint.signal.encode_response(None, encoding);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, encoding.content_type())],
        body,
    )
        .into_response()
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
            // The memory_limiter's refusal is 429 / RESOURCE_EXHAUSTED, as in the Collector;
            // other retryable refusals (a full queue, shutdown) are 503 / UNAVAILABLE.
            let (status, code) = if error.is_memory_limited() {
                (StatusCode::TOO_MANY_REQUESTS, 8)
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, 14)
            };
            let mut response = error_body(encoding, status, code, message.clone());
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

fn respond(encoding: Encoding, status: StatusCode, message: &RpcStatus) -> Response {
    let body = match encoding {
        Encoding::Protobuf => prost::Message::encode_to_vec(message),
        Encoding::Json => serde_json::to_vec(message).unwrap_or_default(),
    };
    (
        status,
        [(header::CONTENT_TYPE, encoding.content_type())],
        body,
    )
        .into_response()
}
