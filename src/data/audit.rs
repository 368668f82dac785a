//! `AuditRepo` on PostgreSQL: an instance's trail, newest first, by keyset.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{Db, map_sqlx};
use crate::biz::{
    Actor, AuditEntry, AuditRecord, AuditRepo, InstanceId, RepoError, Source,
    audit::{Action, Outcome},
};

/// The audit trail in PostgreSQL.
#[derive(Clone)]
pub struct PgAuditRepo {
    db: Db,
}

impl PgAuditRepo {
    /// A repository over `db`.
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    id: i64,
    instance_id: i64,
    actor: String,
    source: String,
    action: String,
    outcome: String,
    reason: String,
    request_id: String,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
    created_at: DateTime<Utc>,
}

impl TryFrom<AuditRow> for AuditRecord {
    type Error = RepoError;

    fn try_from(r: AuditRow) -> Result<Self, RepoError> {
        let corrupt = |what: &str, value: &str| {
            RepoError::Internal(format!("audit row {}: unknown {what} {value:?}", r.id).into())
        };
        let source = Source::ALL
            .into_iter()
            .find(|v| v.as_str() == r.source)
            .ok_or_else(|| corrupt("source", &r.source))?;
        let action = Action::ALL
            .into_iter()
            .find(|v| v.as_str() == r.action)
            .ok_or_else(|| corrupt("action", &r.action))?;
        let outcome = Outcome::ALL
            .into_iter()
            .find(|v| v.as_str() == r.outcome)
            .ok_or_else(|| corrupt("outcome", &r.outcome))?;
        Ok(AuditRecord {
            id: r.id,
            entry: AuditEntry {
                instance_id: r.instance_id,
                actor: Actor { id: r.actor, source },
                action,
                outcome,
                reason: r.reason,
                request_id: r.request_id,
                before: r.before,
                after: r.after,
                at: r.created_at,
            },
        })
    }
}

#[async_trait]
impl AuditRepo for PgAuditRepo {
    async fn list(
        &self,
        instance_id: InstanceId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, RepoError> {
        let rows: Vec<AuditRow> = self
            .db
            .run("list audit rows", async |conn| {
                sqlx::query_as(
                    "SELECT id, instance_id, actor, source, action, outcome, reason, \
                     request_id, before, after, created_at FROM audit_logs \
                     WHERE instance_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
                )
                .bind(instance_id.get())
                .bind(before.unwrap_or(i64::MAX))
                .bind(i64::from(limit))
                .fetch_all(conn)
                .await
                .map_err(map_sqlx)
            })
            .await?;
        rows.into_iter().map(AuditRecord::try_from).collect()
    }
}
