//! `QuotaRepo` on PostgreSQL (`quota_usage`, `quota_overrides`), and the two statements a
//! unit of work runs on the counters.

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::PgConnection;

use super::{Db, map_sqlx};
use crate::biz::{
    RepoError,
    quota::{Amounts, Held, QuotaOverride, QuotaRepo, Scope, UsageChange},
};

/// Counters and owners' limits in PostgreSQL.
#[derive(Clone)]
pub struct PgQuotaRepo {
    db: Db,
}

impl PgQuotaRepo {
    /// A repository over `db`.
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

#[async_trait]
impl QuotaRepo for PgQuotaRepo {
    async fn held(&self, scopes: &[Scope]) -> Result<HashMap<Scope, Held>, RepoError> {
        self.db.run("read usage counters", async |conn| held(conn, scopes).await).await
    }

    async fn set_own(&self, user_id: &str, own: &QuotaOverride) -> Result<(), RepoError> {
        self.db
            .run("set a quota", async |conn| {
                if own.is_empty() {
                    sqlx::query("DELETE FROM quota_overrides WHERE user_id = $1")
                        .bind(user_id)
                        .execute(conn)
                        .await
                        .map_err(map_sqlx)?;
                    return Ok(());
                }
                sqlx::query(
                    "INSERT INTO quota_overrides (user_id, instances, cpu, memory_mb, gpus) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id) DO UPDATE SET \
                     instances = EXCLUDED.instances, cpu = EXCLUDED.cpu, \
                     memory_mb = EXCLUDED.memory_mb, gpus = EXCLUDED.gpus, updated_at = now()",
                )
                .bind(user_id)
                .bind(own.instances)
                .bind(own.cpu)
                .bind(own.memory_mb)
                .bind(own.gpus)
                .execute(conn)
                .await
                .map_err(map_sqlx)?;
                Ok(())
            })
            .await
    }
}

type HeldRow =
    (String, i64, i64, i64, i64, bool, Option<i64>, Option<i64>, Option<i64>, Option<i64>);

/// The counters of `scopes` (duplicates allowed) and owners' own limits, without a lock.
pub(super) async fn held(
    conn: &mut PgConnection,
    scopes: &[Scope],
) -> Result<HashMap<Scope, Held>, RepoError> {
    let mut keys: Vec<String> = scopes.iter().map(Scope::key).collect();
    keys.sort_unstable();
    keys.dedup();
    let rows: Vec<HeldRow> = sqlx::query_as(
        "SELECT k.scope, COALESCE(u.instances, 0), COALESCE(u.cpu, 0), \
         COALESCE(u.memory_mb, 0), COALESCE(u.gpus, 0), o.user_id IS NOT NULL, \
         o.instances, o.cpu, o.memory_mb, o.gpus \
         FROM UNNEST($1::text[]) AS k(scope) \
         LEFT JOIN quota_usage u ON u.scope = k.scope \
         LEFT JOIN quota_overrides o ON k.scope LIKE 'user:%' AND o.user_id = substr(k.scope, 6) \
         WHERE u.scope IS NOT NULL OR o.user_id IS NOT NULL",
    )
    .bind(&keys)
    .fetch_all(&mut *conn)
    .await
    .map_err(map_sqlx)?;
    let mut held = HashMap::with_capacity(rows.len());
    for (key, instances, cpu, memory_mb, gpus, has_own, oi, oc, om, og) in rows {
        let scope = Scope::from_key(&key)
            .ok_or_else(|| RepoError::Internal(format!("usage scope {key:?} is unknown").into()))?;
        let own =
            has_own.then_some(QuotaOverride { instances: oi, cpu: oc, memory_mb: om, gpus: og });
        held.insert(scope, Held { usage: Amounts { instances, cpu, memory_mb, gpus }, own });
    }
    Ok(held)
}

/// Adds a unit of work's usage changes, in key order (every unit of work locks the
/// counters in the same order), and refuses the commit with `Conflict` when a counter a
/// change raises ends above the limit it was admitted under: it moved since it was read.
pub(super) async fn add_usage(
    conn: &mut PgConnection,
    changes: &[UsageChange],
) -> Result<(), RepoError> {
    let mut changes: Vec<(String, &UsageChange)> =
        changes.iter().map(|c| (c.scope.key(), c)).collect();
    changes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let column =
        |f: fn(&Amounts) -> i64| changes.iter().map(|(_, c)| f(&c.delta)).collect::<Vec<_>>();
    let keys: Vec<&str> = changes.iter().map(|(k, _)| k.as_str()).collect();
    let after: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
        "INSERT INTO quota_usage AS u (scope, instances, cpu, memory_mb, gpus) \
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[]) \
         ORDER BY 1 \
         ON CONFLICT (scope) DO UPDATE SET instances = u.instances + EXCLUDED.instances, \
         cpu = u.cpu + EXCLUDED.cpu, memory_mb = u.memory_mb + EXCLUDED.memory_mb, \
         gpus = u.gpus + EXCLUDED.gpus \
         RETURNING scope, instances, cpu, memory_mb, gpus",
    )
    .bind(&keys)
    .bind(column(|a| a.instances))
    .bind(column(|a| a.cpu))
    .bind(column(|a| a.memory_mb))
    .bind(column(|a| a.gpus))
    .fetch_all(&mut *conn)
    .await
    .map_err(map_sqlx)?;
    let after: HashMap<String, Amounts> = after
        .into_iter()
        .map(|(k, instances, cpu, memory_mb, gpus)| {
            (k, Amounts { instances, cpu, memory_mb, gpus })
        })
        .collect();
    for (key, change) in &changes {
        let now = after.get(key).copied().unwrap_or_default();
        // What the counter was just before this change, under its lock.
        if change.limits.exceeded_by(now - change.delta, change.delta).is_some() {
            tracing::debug!(scope = %key, "usage counter moved past its limit; planning again");
            return Err(RepoError::Conflict);
        }
    }
    Ok(())
}
