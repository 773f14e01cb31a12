//! OTLP/gRPC: the `Export` method of each signal's service.
//!
//! Served with tonic, but not through the generated servers: their codec reports an undecodable
//! message as INTERNAL, and OTLP clients must see INVALID_ARGUMENT (do not retry) for bad data.
//! So one small tower service takes the message as bytes and decodes it with the signal's OTLP
//! wire format (`podscope_core::otlp`), the same code for every signal.
//!
//! At shutdown, a call still waiting for its request body is answered UNAVAILABLE at once (the
//! client retries elsewhere) instead of holding the receiver open; a call whose request was read
//! is finished normally, so nothing accepted is left unanswered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use podscope_core::otlp::{otlp, Encoding, OtlpSignal, RawCodec};
use podscope_core::server::{Authenticator, Unauthorized};
use podscope_core::{ConsumeError, Consumer, ReceiverConsumers, Signal};
use tokio_util::sync::CancellationToken;
use tonic::codec::{CompressionEncoding, EnabledCompressionEncodings};
use tonic::server::{Grpc, UnaryService};
use tonic::service::Routes;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

/// The services for the signals this receiver has pipelines for; the others answer
/// UNIMPLEMENTED.
pub fn routes(
    consumers: &ReceiverConsumers,
    max_decoding_message_size: usize,
    stop: &CancellationToken,
    auth: Option<Arc<Authenticator>>,
) -> Routes {
    let mut routes = Routes::default();
    for signal in Signal::ALL {
        let Some(next) = consumers.get(signal) else {
            continue;
        };
        let wire = otlp(signal);
        let service = ExportService {
            signal: wire,
            next: next.clone(),
            max_decoding_message_size,
            stop: stop.clone(),
            auth: auth.clone(),
        };
        let router = routes.axum_router_mut();
        *router = std::mem::take(router)
            .route_service(&format!("/{}/{{*method}}", wire.grpc_service()), service);
    }
    routes
}

/// One signal's OTLP service feeding a consumer.
#[derive(Clone)]
struct ExportService {
    signal: &'static dyn OtlpSignal,
    next: Arc<dyn Consumer>,
    max_decoding_message_size: usize,
    stop: CancellationToken,
    /// Credentials every call must carry, when `auth:` is set.
    auth: Option<Arc<Authenticator>>,
}

/// The consumer's answer as a gRPC status: retryable → UNAVAILABLE, permanent → INVALID_ARGUMENT,
/// and the memory_limiter's refusal → RESOURCE_EXHAUSTED with a `RetryInfo` (OTLP clients retry
/// RESOURCE_EXHAUSTED only when the server says when).
fn status_for(error: &ConsumeError) -> Status {
    match error {
        ConsumeError::Retryable {
            message,
            retry_after,
            ..
        } if error.is_memory_limited() => {
            let details = ErrorDetails::with_retry_info(*retry_after);
            Status::with_error_details(Code::ResourceExhausted, message.clone(), details)
        }
        ConsumeError::Retryable { message, .. } => Status::unavailable(message.clone()),
        ConsumeError::Permanent { message, .. } => Status::invalid_argument(message.clone()),
    }
}

/// UNAUTHENTICATED, with the challenges in `www-authenticate` as gRPC servers behind HTTP
/// authentication send them.
fn unauthenticated(refused: &Unauthorized) -> http::Response<tonic::body::Body> {
    let mut response = Status::unauthenticated(refused.message).into_http();
    for challenge in &refused.challenges {
        response.headers_mut().append(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static(challenge),
        );
    }
    response
}

struct ExportMethod {
    signal: &'static dyn OtlpSignal,
    next: Arc<dyn Consumer>,
    /// Set once the request body has been read and decoding starts.
    read: Arc<AtomicBool>,
}

impl UnaryService<Bytes> for ExportMethod {
    type Response = Bytes;
    type Future = futures::future::BoxFuture<'static, Result<Response<Bytes>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        self.read.store(true, Ordering::SeqCst);
        let (signal, next) = (self.signal, self.next.clone());
        Box::pin(async move {
            let batch = signal
                .decode_request(request.into_inner(), Encoding::Protobuf)
                .map_err(Status::invalid_argument)?;
            if !batch.is_empty() {
                next.consume(batch).await.map_err(|e| status_for(&e))?;
            }
            Ok(Response::new(Bytes::from(
                signal.encode_response(None, Encoding::Protobuf),
            )))
        })
    }
}

impl<B> tower::Service<http::Request<B>> for ExportService
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
            if let Some(auth) = &this.auth {
                if let Err(refused) = auth.check(request.headers()) {
                    return Ok(unauthenticated(&refused));
                }
            }
            if request.uri().path() != this.signal.grpc_export_path() {
                return Ok(Status::unimplemented(format!(
                    "{} has only the Export method",
                    this.signal.grpc_service()
                ))
                .into_http());
            }
            let mut accept = EnabledCompressionEncodings::default();
            accept.enable(CompressionEncoding::Gzip);
            let mut grpc = Grpc::new(RawCodec)
                .apply_compression_config(accept, EnabledCompressionEncodings::default())
                .apply_max_message_size_config(Some(this.max_decoding_message_size), None);
            let read = Arc::new(AtomicBool::new(false));
            let method = ExportMethod {
                signal: this.signal,
                next: this.next,
                read: read.clone(),
            };
            let call = grpc.unary(method, request);
            tokio::pin!(call);
            let response = tokio::select! {
                biased;
                response = &mut call => response,
                _ = this.stop.cancelled() => {
                    if read.load(Ordering::SeqCst) {
                        call.await
                    } else {
                        Status::unavailable("the receiver is shutting down").into_http()
                    }
                }
            };
            Ok(response)
        })
    }
}
