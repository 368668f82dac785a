//! `ReconcileRepo` on PostgreSQL: the instances waiting for the cluster, sync requests
//! read from the audit trail, and per-instance leases shared by every replica.

use std::time::Duration;

use async_trait::async_trait;

use super::{Db, map_sqlx};
use crate::biz::{InstanceId, RepoError, reconcile::ReconcileRepo};

/// The reconciler's tables in PostgreSQL.
#[derive(Clone)]
pub struct PgReconcileRepo {
    db: Db,
}

impl PgReconcileRepo {
    /// A repository over `db`.
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

fn ids(rows: Vec<i64>) -> Vec<InstanceId> {
    rows.into_iter().filter_map(|id| InstanceId::try_from(id).ok()).collect()
}

#[async_trait]
impl ReconcileRepo for PgReconcileRepo {
    async fn unsettled(&self) -> Result<Vec<(InstanceId, i64)>, RepoError> {
        let rows: Vec<(i64, i64)> = self
            .db
            .run("list unsettled instances", async |conn| {
                sqlx::query_as(
                    "SELECT instance_id, version FROM instances \
                     WHERE status IN ('CREATING', 'STOPPING', 'DELETING')",
                )
                .fetch_all(conn)
                .await
                .map_err(map_sqlx)
            })
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, version)| Some((InstanceId::try_from(id).ok()?, version)))
            .collect())
    }

    async fn live(&self) -> Result<Vec<InstanceId>, RepoError> {
        let rows: Vec<i64> = self
            .db
            .run("list live instances", async |conn| {
                sqlx::query_scalar("SELECT instance_id FROM instances WHERE status <> 'DELETED'")
                    .fetch_all(conn)
                    .await
                    .map_err(map_sqlx)
            })
            .await?;
        Ok(ids(rows))
    }

    async fn sync_requests(
        &self,
        after: Option<i64>,
    ) -> Result<(Vec<Option<InstanceId>>, i64), RepoError> {
        let newest: i64 = self
            .db
            .run("read the newest audit id", async |conn| {
                sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM audit_logs")
                    .fetch_one(conn)
                    .await
                    .map_err(map_sqlx)
            })
            .await?;
        let Some(after) = after else { return Ok((Vec::new(), newest)) };
        // Rows by primary key range: only what was written since the last look.
        let rows: Vec<i64> = self
            .db
            .run("read sync requests", async |conn| {
                sqlx::query_scalar(
                    "SELECT instance_id FROM audit_logs
             WHERE id > $1 AND id <= $2 AND action = 'K8S_SYNC' AND source <> 'reconciler'",
                )
                .bind(after)
                .bind(newest)
                .fetch_all(conn)
                .await
                .map_err(map_sqlx)
            })
            .await?;
        let requests = rows.into_iter().map(|id| InstanceId::try_from(id).ok()).collect();
        Ok((requests, newest))
    }

    async fn claim(&self, id: InstanceId, owner: &str, ttl: Duration) -> Result<bool, RepoError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let taken: Option<i32> = self
            .db
            .run("claim a reconcile lease", async |conn| {
                sqlx::query_scalar(
                    "INSERT INTO reconcile_leases (instance_id, owner, expires_at)
             VALUES ($1, $2, now() + make_interval(secs => $3::double precision / 1000))
             ON CONFLICT (instance_id) DO UPDATE
                SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
                WHERE reconcile_leases.expires_at < now() OR reconcile_leases.owner = EXCLUDED.owner
             RETURNING 1",
                )
                .bind(id.get())
                .bind(owner)
                .bind(ttl_ms)
                .fetch_optional(conn)
                .await
                .map_err(map_sqlx)
            })
            .await?;
        Ok(taken.is_some())
    }

    async fn release(&self, id: InstanceId, owner: &str) -> Result<(), RepoError> {
        self.db
            .run("release a reconcile lease", async |conn| {
                sqlx::query("DELETE FROM reconcile_leases WHERE instance_id = $1 AND owner = $2")
                    .bind(id.get())
                    .bind(owner)
                    .execute(conn)
                    .await
                    .map_err(map_sqlx)
            })
            .await?;
        Ok(())
    }
}
