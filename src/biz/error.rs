//! Named errors of the business layer and the failures repositories may report.

use std::{collections::BTreeMap, sync::Arc};

use super::instance::InstanceStatus;

/// A boxed cause, kept for the log and never shown to a client.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A shared cause, so `Error` can be cloned (a batch outcome is reported to every
/// message it concerns).
pub type SharedError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Every error a use case can return. Each variant has a kind (how transports answer),
/// a stable reason (a value name of `resource.v1.ErrorReason`) and metadata.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A request field is malformed or out of range.
    #[error("invalid {field}: {message}")]
    InvalidArgument { field: &'static str, message: String },
    /// `page_size` is negative or above the maximum.
    #[error("invalid page_size {page_size}: must be between 0 and {max}")]
    InvalidPageSize { page_size: i64, max: u32 },
    /// An instance spec is out of bounds or malformed.
    #[error("invalid spec: {field} {message}")]
    InvalidSpec { field: &'static str, message: String },
    /// A GPU type is not one of the known codes or models.
    #[error("invalid gpu: unknown GPU type {value:?}")]
    InvalidGpuType { value: String },
    /// An event cannot be decoded or has an unknown type.
    #[error("invalid event: {message}")]
    InvalidEvent { message: String },
    /// An instance label is malformed or reserved, or there are too many (`key`: the
    /// offending one, if one is).
    #[error("invalid labels: {message}")]
    InvalidLabels { key: Option<String>, message: String },
    /// A list's label selector does not parse or is beyond its bounds.
    #[error("invalid label_selector: {message}")]
    InvalidLabelSelector { message: String },
    /// `page_token` is not one this service issued for these filters.
    #[error("invalid page_token: {message}")]
    InvalidPageToken { message: &'static str },
    /// The caller presented no valid credentials. The message never says why
    /// verification failed.
    #[error("missing or invalid credentials")]
    Unauthenticated,
    /// The caller may not do this (e.g. create an instance for another user).
    #[error("permission denied: {message}")]
    PermissionDenied { message: String },
    /// The instance does not exist (or is not visible to the caller).
    #[error("instance {instance_id} not found")]
    InstanceNotFound { instance_id: i64 },
    /// An instance with this id exists already, with another owner, name or spec, or was
    /// deleted (ids are never reused).
    #[error("instance {instance_id} already exists")]
    InstanceAlreadyExists { instance_id: i64 },
    /// An idempotency key was reused with a different request body.
    #[error("request_id {request_id:?} was already used for a different request")]
    RequestIdReused { request_id: String },
    /// An event's message id was already used for a different event.
    #[error("message_id {message_id:?} was already used for a different event")]
    MessageIdReused { message_id: String },
    /// The action makes no sense in the instance's current status.
    #[error("instance {instance_id} cannot {action} while {status}")]
    NotAllowed { instance_id: i64, action: &'static str, status: InstanceStatus },
    /// The lifecycle move is not allowed from the current status.
    #[error("instance {instance_id} cannot go from {from} to {to}")]
    IllegalTransition { instance_id: i64, from: InstanceStatus, to: InstanceStatus },
    /// The owner's instances would hold more than their quota allows.
    #[error(
        "quota exceeded: user {user_id:?} holds {usage} of {value} {limit}, and {requested} more were asked for"
    )]
    QuotaExceeded { user_id: String, limit: &'static str, value: i64, usage: i64, requested: i64 },
    /// Every instance of this GPU type the fleet has room for is taken.
    #[error("capacity exhausted: {used} of {capacity} {} instances are live", gpu.model())]
    CapacityExhausted { gpu: super::GpuType, capacity: i64, used: i64 },
    /// A watch's resume token points before the oldest change still kept.
    #[error(
        "resume_token is older than the {retention_s} s the change log keeps; list again and watch from now"
    )]
    ResumeTokenExpired { retention_s: u64 },
    /// A watch's resume token names a position in another change log (another
    /// deployment's) or past this log's head (the database was restored from before it
    /// was issued). As for an expired token, the client lists again.
    #[error(
        "resume_token was issued by another change log, or this one was restored from before it; list again and watch from now"
    )]
    ResumeTokenForeign,
    /// The instance moved on between read and write.
    #[error("instance {instance_id} was changed concurrently")]
    VersionConflict { instance_id: i64 },
    /// The request ran out of time.
    #[error("the request did not finish within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    /// A dependency is down; retrying later may succeed.
    #[error("service unavailable")]
    Unavailable(#[source] SharedError),
    /// A bug or an unexpected state.
    #[error("internal error")]
    Internal(#[source] SharedError),
}

/// How an error is answered, independent of the transport (see `server::status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400 / INVALID_ARGUMENT.
    InvalidArgument,
    /// 401 / UNAUTHENTICATED.
    Unauthenticated,
    /// 403 / PERMISSION_DENIED.
    PermissionDenied,
    /// 404 / NOT_FOUND.
    NotFound,
    /// 405 / UNIMPLEMENTED.
    MethodNotAllowed,
    /// 409 / ALREADY_EXISTS.
    AlreadyExists,
    /// 409 / ABORTED.
    Conflict,
    /// 409 / FAILED_PRECONDITION.
    FailedPrecondition,
    /// 410 / FAILED_PRECONDITION: what was asked for is no longer kept.
    Gone,
    /// 413 / RESOURCE_EXHAUSTED.
    PayloadTooLarge,
    /// 429 / RESOURCE_EXHAUSTED: a quota or the capacity is used up.
    QuotaExhausted,
    /// 408 / DEADLINE_EXCEEDED: the client was too slow sending its request.
    RequestTimeout,
    /// 504 / DEADLINE_EXCEEDED.
    DeadlineExceeded,
    /// 503 / UNAVAILABLE.
    Unavailable,
    /// 500 / INTERNAL.
    Internal,
}

impl Error {
    /// How transports answer this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidArgument { .. }
            | Error::InvalidSpec { .. }
            | Error::InvalidGpuType { .. }
            | Error::InvalidEvent { .. }
            | Error::InvalidPageSize { .. }
            | Error::InvalidPageToken { .. }
            | Error::InvalidLabels { .. }
            | Error::InvalidLabelSelector { .. } => ErrorKind::InvalidArgument,
            Error::InstanceNotFound { .. } => ErrorKind::NotFound,
            Error::Unauthenticated => ErrorKind::Unauthenticated,
            Error::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            Error::MessageIdReused { .. } => ErrorKind::InvalidArgument,
            Error::InstanceAlreadyExists { .. } | Error::RequestIdReused { .. } => {
                ErrorKind::AlreadyExists
            }
            Error::IllegalTransition { .. } | Error::NotAllowed { .. } => {
                ErrorKind::FailedPrecondition
            }
            Error::VersionConflict { .. } => ErrorKind::Conflict,
            Error::ResumeTokenExpired { .. } | Error::ResumeTokenForeign => ErrorKind::Gone,
            Error::QuotaExceeded { .. } | Error::CapacityExhausted { .. } => {
                ErrorKind::QuotaExhausted
            }
            Error::Timeout { .. } => ErrorKind::DeadlineExceeded,
            Error::Unavailable(_) => ErrorKind::Unavailable,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    /// Stable, machine-readable; equals a value name of `resource.v1.ErrorReason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidArgument { .. } => "INVALID_ARGUMENT",
            Error::InvalidSpec { .. } => "INVALID_SPEC",
            Error::InvalidGpuType { .. } => "INVALID_GPU_TYPE",
            Error::InvalidEvent { .. } => "INVALID_EVENT",
            Error::InstanceAlreadyExists { .. } => "INSTANCE_ALREADY_EXISTS",
            Error::RequestIdReused { .. } => "REQUEST_ID_REUSED",
            Error::MessageIdReused { .. } => "MESSAGE_ID_REUSED",
            Error::NotAllowed { .. } => "ILLEGAL_TRANSITION",
            Error::InvalidPageSize { .. } => "INVALID_PAGE_SIZE",
            Error::InvalidPageToken { .. } => "INVALID_PAGE_TOKEN",
            Error::InvalidLabels { .. } => "INVALID_LABELS",
            Error::InvalidLabelSelector { .. } => "INVALID_LABEL_SELECTOR",
            Error::InstanceNotFound { .. } => "INSTANCE_NOT_FOUND",
            Error::Unauthenticated => "UNAUTHENTICATED",
            Error::PermissionDenied { .. } => "PERMISSION_DENIED",
            Error::IllegalTransition { .. } => "ILLEGAL_TRANSITION",
            Error::VersionConflict { .. } => "VERSION_CONFLICT",
            Error::ResumeTokenExpired { .. } | Error::ResumeTokenForeign => "RESUME_TOKEN_EXPIRED",
            Error::QuotaExceeded { .. } => "QUOTA_EXCEEDED",
            Error::CapacityExhausted { .. } => "CAPACITY_EXHAUSTED",
            Error::Timeout { .. } => "TIMEOUT",
            Error::Unavailable(_) => "SERVICE_UNAVAILABLE",
            Error::Internal(_) => "INTERNAL",
        }
    }

    /// Key facts of the error, for clients (`ErrorInfo.metadata`, JSON `metadata`).
    pub fn metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        match self {
            Error::InvalidArgument { field, .. } | Error::InvalidSpec { field, .. } => {
                m.insert("field".into(), (*field).into());
            }
            Error::InvalidGpuType { value } => {
                m.insert("field".into(), "gpu".into());
                m.insert("value".into(), value.clone());
            }
            Error::InvalidEvent { .. }
            | Error::Unauthenticated
            | Error::PermissionDenied { .. } => {}
            Error::InstanceAlreadyExists { instance_id } => {
                m.insert("instance_id".into(), instance_id.to_string());
            }
            Error::RequestIdReused { request_id } => {
                m.insert("request_id".into(), request_id.clone());
            }
            Error::MessageIdReused { message_id } => {
                m.insert("message_id".into(), message_id.clone());
            }
            Error::NotAllowed { instance_id, action, status } => {
                m.insert("instance_id".into(), instance_id.to_string());
                m.insert("action".into(), (*action).into());
                m.insert("status".into(), status.as_str().into());
            }
            Error::InvalidPageSize { page_size, max } => {
                m.insert("field".into(), "page_size".into());
                m.insert("max".into(), max.to_string());
                m.insert("page_size".into(), page_size.to_string());
            }
            Error::InvalidPageToken { .. } => {
                m.insert("field".into(), "page_token".into());
            }
            Error::InvalidLabels { key, .. } => {
                m.insert("field".into(), "labels".into());
                if let Some(key) = key {
                    m.insert("key".into(), key.clone());
                }
            }
            Error::InvalidLabelSelector { .. } => {
                m.insert("field".into(), "label_selector".into());
            }
            Error::InstanceNotFound { instance_id } | Error::VersionConflict { instance_id } => {
                m.insert("instance_id".into(), instance_id.to_string());
            }
            Error::IllegalTransition { instance_id, from, to } => {
                m.insert("instance_id".into(), instance_id.to_string());
                m.insert("from".into(), from.as_str().into());
                m.insert("to".into(), to.as_str().into());
            }
            Error::Timeout { timeout_ms } => {
                m.insert("timeout_ms".into(), timeout_ms.to_string());
            }
            Error::ResumeTokenForeign => {
                m.insert("field".into(), "resume_token".into());
            }
            Error::ResumeTokenExpired { retention_s } => {
                m.insert("field".into(), "resume_token".into());
                m.insert("retention_s".into(), retention_s.to_string());
            }
            Error::QuotaExceeded { user_id, limit, value, usage, requested } => {
                m.insert("user_id".into(), user_id.clone());
                m.insert("limit".into(), (*limit).into());
                m.insert("value".into(), value.to_string());
                m.insert("usage".into(), usage.to_string());
                m.insert("requested".into(), requested.to_string());
            }
            Error::CapacityExhausted { gpu, capacity, used } => {
                m.insert("gpu".into(), gpu.code().to_string());
                m.insert("gpu_model".into(), gpu.model().into());
                m.insert("limit".into(), "gpu_capacity".into());
                m.insert("value".into(), capacity.to_string());
                m.insert("usage".into(), used.to_string());
                m.insert("requested".into(), "1".into());
            }
            Error::Unavailable(_) | Error::Internal(_) => {}
        }
        m
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument { field, message: message.into() }
    }

    /// Shorthand for [`Error::Internal`]: a bug, described by `message`.
    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal(Arc::new(RepoError::Internal(message.into().into())))
    }
}

/// What a repository can report; use cases give it meaning.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// No such row or object.
    #[error("not found")]
    NotFound,
    /// A uniqueness or version check failed.
    #[error("conflict")]
    Conflict,
    /// The backing service cannot be reached or refuses work for now.
    #[error("backend unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// Anything else.
    #[error("backend error: {0}")]
    Internal(#[source] BoxError),
}

impl From<RepoError> for Error {
    /// The context-free mapping; use cases map `NotFound` and `Conflict` themselves first.
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::Unavailable(source) => Error::Unavailable(source.into()),
            RepoError::Internal(source) => Error::Internal(source.into()),
            other @ (RepoError::NotFound | RepoError::Conflict) => Error::Internal(Arc::new(other)),
        }
    }
}
