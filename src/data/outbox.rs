//! `OutboxRepo` on PostgreSQL: claims with a lease (`FOR UPDATE SKIP LOCKED`), so several
//! replicas share the outbox and no transaction is held while publishing.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{Db, map_sqlx};
use crate::biz::{InstanceId, InstanceStatus, OutboxRepo, Pending, RepoError, StatusChange};

/// The outbox in PostgreSQL.
#[derive(Clone)]
pub struct PgOutboxRepo {
    db: Db,
    /// Names this process's claims.
    claimer: String,
}

impl PgOutboxRepo {
    /// A repository over `db`, claiming rows as `claimer` (unique per process).
    pub fn new(db: Db, claimer: String) -> Self {
        Self { db, claimer }
    }
}

/// How many status changes wait to be published.
pub(super) async fn backlog(db: &Db) -> Result<i64, RepoError> {
    db.run("count the outbox", async |conn| {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM status_outbox")
            .fetch_one(conn)
            .await
            .map_err(map_sqlx)
    })
    .await
}

#[derive(sqlx::FromRow)]
struct OutboxRow {
    id: i64,
    instance_id: i64,
    user_id: String,
    status: String,
    reason: String,
    endpoint: String,
    version: i64,
    changed_at: DateTime<Utc>,
}

impl TryFrom<OutboxRow> for Pending {
    type Error = RepoError;

    fn try_from(r: OutboxRow) -> Result<Self, RepoError> {
        let corrupt = |what: String| RepoError::Internal(what.into());
        Ok(Pending {
            id: r.id,
            change: StatusChange {
                instance_id: InstanceId::try_from(r.instance_id).map_err(|_| {
                    corrupt(format!("outbox row {} has instance_id {}", r.id, r.instance_id))
                })?,
                status: r.status.parse::<InstanceStatus>().map_err(|_| {
                    corrupt(format!("outbox row {} has status {:?}", r.id, r.status))
                })?,
                user_id: r.user_id,
                reason: r.reason,
                endpoint: r.endpoint,
                version: r.version,
                at: r.changed_at,
            },
        })
    }
}

#[async_trait]
impl OutboxRepo for PgOutboxRepo {
    async fn claim(&self, limit: u32, lease: Duration) -> Result<Vec<Pending>, RepoError> {
        // The outbox churns: it is mostly dead tuples, and a sequential scan would read
        // them all; the pool's connections never seq scan (`Data::connect`), so this walks
        // the primary key.
        // Rows this relay claimed itself are taken back at once: a claim whose answer was
        // lost (a stalled link) must not wait for its expiry while nobody publishes.
        let rows: Vec<OutboxRow> = self
            .db
            .run("claim outbox rows", async |conn| {
                sqlx::query_as(
                    "UPDATE status_outbox SET claimed_until = now() + make_interval(secs => $1), \
                     claimed_by = $3, attempts = attempts + 1 \
                     WHERE id IN (SELECT id FROM status_outbox \
                                  WHERE claimed_until IS NULL OR claimed_until < now() \
                                     OR claimed_by = $3 \
                                  ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) \
                     RETURNING id, instance_id, user_id, status, reason, endpoint, version, \
                     changed_at",
                )
                .bind(lease.as_secs_f64())
                .bind(i64::from(limit))
                .bind(&self.claimer)
                .fetch_all(conn)
                .await
                .map_err(map_sqlx)
            })
            .await?;
        let mut pending: Vec<Pending> =
            rows.into_iter().map(Pending::try_from).collect::<Result<_, _>>()?;
        // RETURNING does not keep the subquery's order; publish oldest first.
        pending.sort_by_key(|p| p.id);
        Ok(pending)
    }

    async fn remove(&self, ids: &[i64]) -> Result<(), RepoError> {
        self.db
            .run("remove published outbox rows", async |conn| {
                sqlx::query(
                    "DELETE FROM status_outbox o USING UNNEST($1::bigint[]) AS d(id) \
                     WHERE o.id = d.id",
                )
                .bind(ids)
                .execute(conn)
                .await
                .map_err(map_sqlx)
            })
            .await?;
        Ok(())
    }
}
