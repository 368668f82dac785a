//! The one table mapping error kinds to HTTP statuses and gRPC codes, and the error body
//! both transports send.

use std::collections::{BTreeMap, HashMap};

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use tonic_types::{ErrorDetails, StatusExt};

use crate::biz::{self, ErrorKind, SharedError};

/// Domain of every `google.rpc.ErrorInfo` this service sends.
pub const ERROR_DOMAIN: &str = "resource.v1";

/// An error on its way to a client: what the wire shows, plus the cause for the log.
#[derive(Debug)]
pub struct ApiError {
    /// How it is answered.
    pub kind: ErrorKind,
    /// A value name of `resource.v1.ErrorReason`.
    pub reason: &'static str,
    /// Human-readable; never carries internal detail.
    pub message: String,
    /// Key facts for clients.
    pub metadata: BTreeMap<String, String>,
    source: Option<SharedError>,
}

impl ApiError {
    /// A transport-level error (unknown route, oversized body …).
    pub fn new(kind: ErrorKind, reason: &'static str, message: impl Into<String>) -> Self {
        Self { kind, reason, message: message.into(), metadata: BTreeMap::new(), source: None }
    }

    /// Logs the cause once, at the transport edge: server faults at `error`, client
    /// faults at `debug`. The current span carries the request id.
    fn log(&self) {
        match self.kind {
            ErrorKind::Unavailable | ErrorKind::Internal | ErrorKind::DeadlineExceeded => {
                tracing::error!(reason = self.reason, error = ?self.source, "request failed");
            }
            _ => tracing::debug!(reason = self.reason, message = %self.message, "request refused"),
        }
    }
}

impl From<biz::Error> for ApiError {
    fn from(e: biz::Error) -> Self {
        let (kind, reason, metadata, message) = (e.kind(), e.reason(), e.metadata(), e.to_string());
        let source = match e {
            biz::Error::Unavailable(s) | biz::Error::Internal(s) => Some(s),
            _ => None,
        };
        Self { kind, reason, message, metadata, source }
    }
}

/// HTTP status of each kind.
pub fn http_status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorKind::AlreadyExists | ErrorKind::Conflict | ErrorKind::FailedPrecondition => {
            StatusCode::CONFLICT
        }
        ErrorKind::Gone => StatusCode::GONE,
        ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::QuotaExhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// gRPC code of each kind.
pub fn grpc_code(kind: ErrorKind) -> tonic::Code {
    match kind {
        ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorKind::Unauthenticated => tonic::Code::Unauthenticated,
        ErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::MethodNotAllowed => tonic::Code::Unimplemented,
        ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
        ErrorKind::Conflict => tonic::Code::Aborted,
        ErrorKind::FailedPrecondition | ErrorKind::Gone => tonic::Code::FailedPrecondition,
        ErrorKind::PayloadTooLarge | ErrorKind::QuotaExhausted => tonic::Code::ResourceExhausted,
        ErrorKind::RequestTimeout => tonic::Code::DeadlineExceeded,
        ErrorKind::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        ErrorKind::Unavailable => tonic::Code::Unavailable,
        ErrorKind::Internal => tonic::Code::Internal,
    }
}

/// A gRPC status carrying `google.rpc.ErrorInfo { reason, domain, metadata }`.
pub fn to_status(err: impl Into<ApiError>) -> tonic::Status {
    let err = err.into();
    err.log();
    let metadata: HashMap<String, String> = err.metadata.into_iter().collect();
    tonic::Status::with_error_details(
        grpc_code(err.kind),
        err.message,
        ErrorDetails::with_error_info(err.reason, ERROR_DOMAIN, metadata),
    )
}

/// An error answered over HTTP as
/// `{"code": 404, "reason": "INSTANCE_NOT_FOUND", "message": "…", "metadata": {…}}`.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl<E: Into<ApiError>> From<E> for HttpError {
    fn from(e: E) -> Self {
        HttpError(e.into())
    }
}

#[derive(serde::Serialize)]
struct ErrorBody<'a> {
    code: u16,
    reason: &'a str,
    message: &'a str,
    metadata: &'a BTreeMap<String, String>,
}

impl<'a> ErrorBody<'a> {
    /// The body of `err`, logged once here, at the transport edge.
    fn of(err: &'a ApiError) -> (StatusCode, Self) {
        err.log();
        let status = http_status(err.kind);
        let body = ErrorBody {
            code: status.as_u16(),
            reason: err.reason,
            message: &err.message,
            metadata: &err.metadata,
        };
        (status, body)
    }
}

/// The JSON error body of `e`, for a failure after the response began (an SSE `error`
/// event).
pub fn error_json(e: biz::Error) -> String {
    let err = ApiError::from(e);
    serde_json::to_string(&ErrorBody::of(&err).1).unwrap_or_default()
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let (status, body) = ErrorBody::of(&self.0);
        (status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        biz::{Error, InstanceStatus},
        pb::resource::v1::ErrorReason,
    };

    fn every_error() -> Vec<(Error, StatusCode, tonic::Code)> {
        vec![
            (
                Error::invalid("name", "too long"),
                StatusCode::BAD_REQUEST,
                tonic::Code::InvalidArgument,
            ),
            (
                Error::InvalidPageSize { page_size: 5000, max: 1000 },
                StatusCode::BAD_REQUEST,
                tonic::Code::InvalidArgument,
            ),
            (
                Error::InvalidPageToken { message: "x" },
                StatusCode::BAD_REQUEST,
                tonic::Code::InvalidArgument,
            ),
            (
                Error::InstanceNotFound { instance_id: 42 },
                StatusCode::NOT_FOUND,
                tonic::Code::NotFound,
            ),
            (
                Error::IllegalTransition {
                    instance_id: 42,
                    from: InstanceStatus::Deleted,
                    to: InstanceStatus::Creating,
                },
                StatusCode::CONFLICT,
                tonic::Code::FailedPrecondition,
            ),
            (
                Error::MessageIdReused { message_id: "m-1".into() },
                StatusCode::BAD_REQUEST,
                tonic::Code::InvalidArgument,
            ),
            (
                Error::VersionConflict { instance_id: 42 },
                StatusCode::CONFLICT,
                tonic::Code::Aborted,
            ),
            (
                Error::Timeout { timeout_ms: 1000 },
                StatusCode::GATEWAY_TIMEOUT,
                tonic::Code::DeadlineExceeded,
            ),
            (
                Error::Unavailable(std::sync::Arc::from(
                    Box::<dyn std::error::Error + Send + Sync>::from(
                        "connection refused by 10.0.0.1",
                    ),
                )),
                StatusCode::SERVICE_UNAVAILABLE,
                tonic::Code::Unavailable,
            ),
            (
                Error::Internal(std::sync::Arc::from(
                    Box::<dyn std::error::Error + Send + Sync>::from("SELECT secret FROM x"),
                )),
                StatusCode::INTERNAL_SERVER_ERROR,
                tonic::Code::Internal,
            ),
        ]
    }

    #[test]
    fn every_reason_is_a_value_of_the_proto_enum() {
        let transport = ["NOT_FOUND", "METHOD_NOT_ALLOWED", "PAYLOAD_TOO_LARGE", "REQUEST_TIMEOUT"];
        let reasons = every_error().into_iter().map(|(e, _, _)| e.reason()).chain(transport);
        for reason in reasons {
            assert!(ErrorReason::from_str_name(reason).is_some(), "{reason}");
        }
    }

    #[tokio::test]
    async fn every_error_maps_to_its_http_status_body_and_grpc_code() {
        // Errors with a source are not Clone: build the table twice, once per transport.
        for ((err, http, grpc), (same, _, _)) in every_error().into_iter().zip(every_error()) {
            let (reason, message, metadata) = (err.reason(), err.to_string(), err.metadata());

            let response = HttpError::from(err).into_response();
            let status = to_status(same);

            assert_eq!(response.status(), http, "{reason}");
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(body["code"], http.as_u16(), "{reason}");
            assert_eq!(body["reason"], reason);
            assert_eq!(body["message"], message.as_str());
            assert_eq!(body["metadata"], serde_json::to_value(&metadata).unwrap());
            let text = body.to_string();
            assert!(!text.contains("SELECT") && !text.contains("10.0.0.1"), "{text}");

            assert_eq!(status.code(), grpc, "{reason}");
            assert_eq!(status.get_error_details().error_info().unwrap().reason, reason);
            assert!(!status.message().contains("SELECT") && !status.message().contains("10.0.0.1"));
        }
    }
}
