//! The audit trail: who did what to which instance, from where, and how it ended.

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{RepoError, id::InstanceId};

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
    /// Every source.
    pub const ALL: [Source; 4] = [Source::Grpc, Source::Http, Source::Mq, Source::Reconciler];

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
    /// Replace its labels.
    SetLabels,
    /// Reconcile it with the cluster.
    K8sSync,
    /// A status change observed asynchronously (reconciler).
    StatusChange,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 8] = [
        Action::Create,
        Action::Delete,
        Action::Start,
        Action::Stop,
        Action::ChangeSpec,
        Action::SetLabels,
        Action::K8sSync,
        Action::StatusChange,
    ];

    /// The stored name (`"CHANGE_SPEC"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "CREATE",
            Action::Delete => "DELETE",
            Action::Start => "START",
            Action::Stop => "STOP",
            Action::ChangeSpec => "CHANGE_SPEC",
            Action::SetLabels => "SET_LABELS",
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
    /// Every outcome.
    pub const ALL: [Outcome; 4] =
        [Outcome::Ok, Outcome::Rejected, Outcome::Failed, Outcome::Ignored];

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

/// A stored audit row.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// Row id, increasing with time.
    pub id: i64,
    /// The row.
    pub entry: AuditEntry,
}

/// Reads of the audit trail (rows are written with the changes they record).
#[async_trait]
pub trait AuditRepo: Send + Sync {
    /// Up to `limit` rows of `instance_id` with ids below `before`, newest first.
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn list(
        &self,
        instance_id: InstanceId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, RepoError>;
}

/// Reads of the audit trail.
pub struct AuditUsecase {
    repo: std::sync::Arc<dyn AuditRepo>,
}

impl AuditUsecase {
    /// Reads over `repo`.
    pub fn new(repo: std::sync::Arc<dyn AuditRepo>) -> Self {
        Self { repo }
    }

    /// One page of `instance_id`'s trail, newest first, and the id the next page starts
    /// below, if any. `page_size` 0 means the default.
    ///
    /// # Errors
    /// `InvalidPageSize`, `Unavailable`.
    pub async fn list(
        &self,
        instance_id: InstanceId,
        page_size: i64,
        before: Option<i64>,
    ) -> Result<(Vec<AuditRecord>, Option<i64>), super::Error> {
        let size = super::page::page_limit(page_size)?;
        let rows = self.repo.list(instance_id, before, size + 1).await?;
        let (rows, next) = super::page::split_page(rows, size, |r| r.id);
        Ok((rows, next))
    }
}
