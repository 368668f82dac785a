//! `ReconcileRepo` on PostgreSQL: the instances waiting for the cluster, sync requests
//! (`sync_requests`, written in the unit of work that accepts them), and per-instance
//! leases shared by every replica.

use std::{sync::Mutex, time::Duration};

use async_trait::async_trait;
use sqlx::PgConnection;
use tokio::time::Instant;

use super::{Db, map_sqlx};
use crate::biz::{
    InstanceId, InstanceStatus, RepoError,
    reconcile::{Claimed, ReconcileRepo},
};

/// How long a sync request is kept for replicas that have not read it yet.
const SYNC_REQUESTS_KEPT: Duration = Duration::from_secs(3600);

/// The reconciler's tables in PostgreSQL.
pub struct PgReconcileRepo {
    db: Db,
    /// When sync requests older than [`SYNC_REQUESTS_KEPT`] were last deleted.
    pruned: Mutex<Option<Instant>>,
}

impl PgReconcileRepo {
    /// A repository over `db`.
    pub fn new(db: Db) -> Self {
        Self { db, pruned: Mutex::new(None) }
    }

    /// Deletes sync requests every replica has had an hour to read, and leases given back
    /// an hour ago, at most hourly.
    async fn prune_sync_requests(&self) -> Result<(), RepoError> {
        {
            let mut pruned = self.pruned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if pruned.is_some_and(|at| at.elapsed() < SYNC_REQUESTS_KEPT) {
                return Ok(());
            }
            *pruned = Some(Instant::now());
        }
        let kept_ms = i64::try_from(SYNC_REQUESTS_KEPT.as_millis()).unwrap_or(i64::MAX);
        self.db
            .run("prune sync requests", async |conn| {
                // With the leases given back long ago that remember an apply.
                sqlx::query(
                    "WITH old AS (DELETE FROM reconcile_leases \
                         WHERE expires_at < now() - make_interval(secs => $1::double precision / 1000)) \
                     DELETE FROM sync_requests \
                     WHERE requested_at < now() - make_interval(secs => $1::double precision / 1000)",
                )
                .bind(kept_ms)
                .execute(conn)
                .await
                .map_err(map_sqlx)
            })
            .await?;
        Ok(())
    }
}

/// Records sync requests (`None`: every instance) inside the caller's transaction.
pub(super) async fn request_syncs(
    conn: &mut PgConnection,
    ids: &[Option<InstanceId>],
) -> Result<(), RepoError> {
    sqlx::query("INSERT INTO sync_requests (instance_id) SELECT * FROM UNNEST($1::bigint[])")
        .bind(ids.iter().map(|id| id.map(InstanceId::get)).collect::<Vec<_>>())
        .execute(conn)
        .await
        .map_err(map_sqlx)?;
    Ok(())
}

fn names(statuses: &[InstanceStatus]) -> Vec<&'static str> {
    statuses.iter().map(|s| s.as_str()).collect()
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
                    "SELECT instance_id, version FROM instances WHERE status = ANY($1::text[])",
                )
                .bind(names(&InstanceStatus::AWAITING_CLUSTER))
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
                sqlx::query_scalar("SELECT instance_id FROM instances WHERE status <> $1")
                    .bind(InstanceStatus::Deleted.as_str())
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
        if let Err(e) = self.prune_sync_requests().await {
            tracing::debug!(error = %e, "could not prune old sync requests");
        }
        let newest: i64 = self
            .db
            .run("read the newest sync request id", async |conn| {
                sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM sync_requests")
                    .fetch_one(conn)
                    .await
                    .map_err(map_sqlx)
            })
            .await?;
        let Some(after) = after else { return Ok((Vec::new(), newest)) };
        // Rows by primary key range: only what was written since the last look.
        let rows: Vec<Option<i64>> = self
            .db
            .run("read sync requests", async |conn| {
                sqlx::query_scalar(
                    "SELECT instance_id FROM sync_requests WHERE id > $1 AND id <= $2",
                )
                .bind(after)
                .bind(newest)
                .fetch_all(conn)
                .await
                .map_err(map_sqlx)
            })
            .await?;
        let requests =
            rows.into_iter().map(|id| id.and_then(|id| InstanceId::try_from(id).ok())).collect();
        Ok((requests, newest))
    }

    async fn claim(
        &self,
        id: InstanceId,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Claimed>, RepoError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let taken: Option<(Option<i64>, Option<f64>)> = self
            .db
            .run("claim a reconcile lease", async |conn| {
                sqlx::query_as(
                    "INSERT INTO reconcile_leases (instance_id, owner, expires_at)
             VALUES ($1, $2, now() + make_interval(secs => $3::double precision / 1000))
             ON CONFLICT (instance_id) DO UPDATE
                SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
                WHERE reconcile_leases.expires_at < now() OR reconcile_leases.owner = EXCLUDED.owner
             RETURNING applied_version,
                EXTRACT(EPOCH FROM now() - applied_at)::double precision",
                )
                .bind(id.get())
                .bind(owner)
                .bind(ttl_ms)
                .fetch_optional(conn)
                .await
                .map_err(map_sqlx)
            })
            .await?;
        Ok(taken.map(|(version, secs)| Claimed {
            last_applied: version.zip(secs).map(|(version, secs)| {
                (version, Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or_default())
            }),
        }))
    }

    async fn release(
        &self,
        id: InstanceId,
        owner: &str,
        applied: Option<i64>,
    ) -> Result<(), RepoError> {
        self.db
            .run("release a reconcile lease", async |conn| {
                // Kept, expired, while it remembers a recent apply (pruned hourly after);
                // otherwise there is nothing to keep.
                let query = match applied {
                    Some(_) => {
                        "UPDATE reconcile_leases \
                         SET expires_at = now(), applied_version = $3, applied_at = now() \
                         WHERE instance_id = $1 AND owner = $2"
                    }
                    None => {
                        "WITH kept AS (UPDATE reconcile_leases SET expires_at = now() \
                             WHERE instance_id = $1 AND owner = $2 AND $3::bigint IS NULL \
                             AND applied_at > now() - interval '1 minute' RETURNING 1) \
                         DELETE FROM reconcile_leases WHERE instance_id = $1 AND owner = $2 \
                             AND NOT EXISTS (SELECT 1 FROM kept)"
                    }
                };
                sqlx::query(query)
                    .bind(id.get())
                    .bind(owner)
                    .bind(applied)
                    .execute(conn)
                    .await
                    .map_err(map_sqlx)
            })
            .await?;
        Ok(())
    }
}
