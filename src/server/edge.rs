//! Tower layers at the edge of both listeners: what a client sends is checked before
//! anything trusts it, and the refusals tonic makes itself get the error shape of ours.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use axum::http::{HeaderMap, HeaderValue, Request, Response};

use super::status::{ApiError, to_status};
use crate::biz::ErrorKind;

/// Longest `x-request-id` kept from a client; a longer or non-printable one is replaced
/// by a new id (it is stored in the append-only audit trail and echoed back).
pub const MAX_REQUEST_ID_LEN: usize = 128;

const REQUEST_ID: &str = "x-request-id";

/// Whether a client's request id may be kept: 1 to 128 visible ASCII characters.
pub fn acceptable_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_REQUEST_ID_LEN
        && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// Drops an unacceptable `x-request-id`, so the request-id layer after it makes a new one.
#[derive(Clone, Copy, Default)]
pub struct SanitizeRequestIdLayer;

impl<S> tower::Layer<S> for SanitizeRequestIdLayer {
    type Service = SanitizeRequestId<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SanitizeRequestId { inner }
    }
}

/// See [`SanitizeRequestIdLayer`].
#[derive(Clone)]
pub struct SanitizeRequestId<S> {
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for SanitizeRequestId<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let headers = req.headers_mut();
        if headers.get_all(REQUEST_ID).iter().count() > 1
            || headers.get(REQUEST_ID).is_some_and(|v| !acceptable_request_id(v))
        {
            headers.remove(REQUEST_ID);
        }
        self.inner.call(req)
    }
}

/// Answers tonic's own refusal of an oversized message (`OUT_OF_RANGE`, from its framing
/// before any codec runs) as every oversized body is answered: `RESOURCE_EXHAUSTED` with
/// `ErrorInfo` reason `PAYLOAD_TOO_LARGE`.
#[derive(Clone, Copy)]
pub struct GrpcRefusalsLayer {
    /// The server's limit, for the message.
    pub max_message_bytes: usize,
}

impl<S> tower::Layer<S> for GrpcRefusalsLayer {
    type Service = GrpcRefusals<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcRefusals { inner, max_message_bytes: self.max_message_bytes }
    }
}

/// See [`GrpcRefusalsLayer`].
#[derive(Clone)]
pub struct GrpcRefusals<S> {
    inner: S,
    max_message_bytes: usize,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<Request<B>> for GrpcRefusals<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let call = self.inner.call(req);
        let limit = self.max_message_bytes;
        Box::pin(async move {
            let mut response = call.await?;
            // An error is sent "trailers-only": its status is in the headers.
            if is_oversize_refusal(response.headers()) {
                let status = to_status(ApiError::new(
                    ErrorKind::PayloadTooLarge,
                    "PAYLOAD_TOO_LARGE",
                    format!("the message exceeds {limit} bytes"),
                ));
                let headers = response.headers_mut();
                for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
                    headers.remove(name);
                }
                // Writing a status into a header map only fails for unencodable details.
                let _ = status.add_header(headers);
            }
            Ok(response)
        })
    }
}

/// Answers a call of a method this server does not serve `UNIMPLEMENTED`, as tonic does,
/// but only once the request has been read to its end (at most `max_message_bytes`,
/// within `within`). Answered before that, the stream is reset, and h2 closes a
/// connection after 1,024 resets of its own making (its defence against "MadeYouReset"):
/// a client calling a method of a newer version would lose its connection.
#[derive(Clone, Copy)]
pub struct UnknownMethodsLayer {
    pub max_message_bytes: usize,
    pub within: Duration,
}

impl<S> tower::Layer<S> for UnknownMethodsLayer {
    type Service = UnknownMethods<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UnknownMethods { inner, layer: *self }
    }
}

/// See [`UnknownMethodsLayer`].
#[derive(Clone)]
pub struct UnknownMethods<S> {
    inner: S,
    layer: UnknownMethodsLayer,
}

impl<S, B> tower::Service<Request<B>> for UnknownMethods<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    B: axum::body::HttpBody + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if super::metrics::is_served(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let UnknownMethodsLayer { max_message_bytes, within } = self.layer;
        Box::pin(async move {
            // The 5-byte frame header; a larger or slower request is reset after all.
            let body = http_body_util::Limited::new(req.into_body(), max_message_bytes + 5);
            let _ = tokio::time::timeout(within, http_body_util::BodyExt::collect(body)).await;
            Ok(tonic::Status::unimplemented("").into_http())
        })
    }
}

fn is_oversize_refusal(headers: &HeaderMap) -> bool {
    let out_of_range = (tonic::Code::OutOfRange as i32).to_string();
    // The message is percent-encoded on the wire (a space is `%20`).
    let message = headers
        .get("grpc-message")
        .map(|m| String::from_utf8_lossy(m.as_bytes()).replace("%20", " "));
    headers.get("grpc-status").is_some_and(|v| v.as_bytes() == out_of_range.as_bytes())
        && message.is_some_and(|m| m.starts_with("Error, decoded message length too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_only_when_short_and_printable() {
        let ok = |s: &str| acceptable_request_id(&HeaderValue::from_str(s).unwrap());
        assert!(ok("3f1c2b7e-0000-4000-8000-000000000001"));
        assert!(ok(&"x".repeat(MAX_REQUEST_ID_LEN)));
        assert!(!ok(&"x".repeat(MAX_REQUEST_ID_LEN + 1)));
        assert!(!ok("has space"));
        assert!(!ok(""));
        assert!(!acceptable_request_id(&HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap()));
    }
}
