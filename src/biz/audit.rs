//! The audit trail: who did what to which instance, from where, and how it ended.

use std::fmt;

use chrono::{DateTime, Utc};

/// Where a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The gRPC API.
    Grpc,
    /// The REST API.
    Http,
    /// A RabbitMQ event.
    Mq,
    /// The Kubernetes reconciler.
    Reconciler,
}

impl Source {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Grpc => "grpc",
            Source::Http => "http",
            Source::Mq => "mq",
            Source::Reconciler => "reconciler",
        }
    }
}

/// Who acts, from which entry point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// A user id, or `mq` / `reconciler`.
    pub id: String,
    /// The entry point.
    pub source: Source,
}

impl Actor {
    /// The event consumer.
    pub fn mq() -> Self {
        Self { id: "mq".into(), source: Source::Mq }
    }
}

/// What was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Create an instance.
    Create,
    /// Delete it.
    Delete,
    /// Start it.
    Start,
    /// Stop it.
    Stop,
    /// Replace its spec.
    ChangeSpec,
    /// Reconcile it with the cluster.
    K8sSync,
    /// A status change observed asynchronously (reconciler).
    StatusChange,
}

impl Action {
    /// The stored name (`"CHANGE_SPEC"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "CREATE",
            Action::Delete => "DELETE",
            Action::Start => "START",
            Action::Stop => "STOP",
            Action::ChangeSpec => "CHANGE_SPEC",
            Action::K8sSync => "K8S_SYNC",
            Action::StatusChange => "STATUS_CHANGE",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Applied.
    Ok,
    /// Refused: bad input or not allowed in the current status.
    Rejected,
    /// Accepted but failed while carried out.
    Failed,
    /// Nothing to do: the instance already is, or is heading to, what was asked.
    Ignored,
}

impl Outcome {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
            Outcome::Ignored => "ignored",
        }
    }
}

/// One append-only audit row.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// The instance (0 for an action on every instance).
    pub instance_id: i64,
    /// Who.
    pub actor: Actor,
    /// What.
    pub action: Action,
    /// How it ended.
    pub outcome: Outcome,
    /// Why (error reason and message, or a note), or empty.
    pub reason: String,
    /// Request id (API) or message id (MQ).
    pub request_id: String,
    /// The instance before, when it existed.
    pub before: Option<serde_json::Value>,
    /// The instance after, when it exists.
    pub after: Option<serde_json::Value>,
    /// When.
    pub at: DateTime<Utc>,
}
