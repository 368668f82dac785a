//! Snowflake node ids leased through PostgreSQL (`snowflake.node_id: auto`): each running
//! replica holds one of the 1,024 node ids, renews it while it runs and gives it back
//! when it stops; an expired lease (a replica that died) can be taken over.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{Data, map_sqlx};
use crate::{
    biz::{RepoError, snowflake::MAX_NODE},
    conf::{self, NodeId},
};

/// This replica's node id: fixed by configuration, or leased (`snowflake.node_id: auto`).
pub enum NodeIds {
    /// `snowflake.node_id` names it.
    Fixed(u16),
    /// Leased from `snowflake_nodes` over a connection of its own.
    Leased(NodeLease),
}

impl NodeIds {
    /// The node id `conf` names, or one leased for this replica.
    ///
    /// # Errors
    /// As [`NodeLease::acquire`].
    pub async fn take(conf: &conf::Snowflake, data: &Data) -> Result<Self, RepoError> {
        match conf.node_id {
            NodeId::Fixed(node) => Ok(Self::Fixed(node)),
            NodeId::Auto => {
                let owner = uuid::Uuid::new_v4().to_string();
                let lease = NodeLease::acquire(data.own_pool(), owner, conf.lease_ttl).await?;
                tracing::info!(node = lease.node(), "snowflake node id leased");
                Ok(Self::Leased(lease))
            }
        }
    }

    /// The node id.
    pub fn node(&self) -> u16 {
        match self {
            Self::Fixed(node) => *node,
            Self::Leased(lease) => lease.node(),
        }
    }

    /// Keeps a leased id until `shutdown` (see [`NodeLease::keep`]); a fixed one needs no
    /// keeping.
    pub async fn keep(&self, shutdown: &CancellationToken) -> LeaseEnd {
        match self {
            Self::Fixed(_) => {
                shutdown.cancelled().await;
                LeaseEnd::Shutdown
            }
            Self::Leased(lease) => lease.keep(shutdown).await,
        }
    }

    /// Gives a leased id back after keeping it ended with `end`; a lost lease is not ours
    /// to release.
    pub async fn release(&self, end: LeaseEnd) {
        if let (Self::Leased(lease), LeaseEnd::Shutdown) = (self, end)
            && let Err(e) = lease.release().await
        {
            tracing::warn!(error = %e, "could not release the snowflake node id; it expires");
        }
    }
}

/// A node id held by this replica.
pub struct NodeLease {
    pool: PgPool,
    owner: String,
    node: u16,
    ttl: Duration,
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

impl NodeLease {
    /// Takes the lowest node id that is free or expired.
    ///
    /// # Errors
    /// `Unavailable` when the database does not answer, `Conflict` when every node id is
    /// held by a live replica.
    pub async fn acquire(pool: PgPool, owner: String, ttl: Duration) -> Result<Self, RepoError> {
        // Two replicas may pick the same free id at once; the loser's upsert returns no
        // row and it tries the next one.
        for _ in 0..16 {
            let node: Option<i32> = sqlx::query_scalar(
                "INSERT INTO snowflake_nodes (node_id, owner, expires_at)
                 SELECT n, $1, now() + make_interval(secs => $2::double precision / 1000)
                 FROM generate_series(0, $3) AS n
                 WHERE NOT EXISTS (
                     SELECT 1 FROM snowflake_nodes s WHERE s.node_id = n AND s.expires_at > now())
                 ORDER BY n LIMIT 1
                 ON CONFLICT (node_id) DO UPDATE
                    SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
                    WHERE snowflake_nodes.expires_at <= now()
                 RETURNING node_id",
            )
            .bind(&owner)
            .bind(ttl_ms(ttl))
            .bind(i32::from(MAX_NODE))
            .fetch_optional(&pool)
            .await
            .map_err(map_sqlx)?;
            if let Some(node) = node.and_then(|n| u16::try_from(n).ok()) {
                return Ok(Self { pool, owner, node, ttl });
            }
        }
        Err(RepoError::Conflict)
    }

    /// The leased node id.
    pub fn node(&self) -> u16 {
        self.node
    }

    /// Extends the lease by its ttl; false when it was lost (taken over after expiring).
    ///
    /// # Errors
    /// `Unavailable` when the database does not answer.
    pub async fn renew(&self) -> Result<bool, RepoError> {
        let renewed = sqlx::query(
            "UPDATE snowflake_nodes
             SET expires_at = now() + make_interval(secs => $3::double precision / 1000)
             WHERE node_id = $1 AND owner = $2",
        )
        .bind(i32::from(self.node))
        .bind(&self.owner)
        .bind(ttl_ms(self.ttl))
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Gives the node id back.
    ///
    /// # Errors
    /// `Unavailable` when the database does not answer (the lease then expires).
    pub async fn release(&self) -> Result<(), RepoError> {
        sqlx::query("DELETE FROM snowflake_nodes WHERE node_id = $1 AND owner = $2")
            .bind(i32::from(self.node))
            .bind(&self.owner)
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }
}

/// How keeping a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEnd {
    /// Shutdown came first; the lease is still held (release it).
    Shutdown,
    /// It was taken over, or could not be renewed before it expired: this replica must
    /// stop generating ids (another one may have the node id now).
    Lost,
}

impl NodeLease {
    /// Renews the lease every third of its ttl until `shutdown`. When it is lost, or
    /// cannot be renewed in time, cancels `shutdown` (the replica stops rather than risk
    /// ids another replica also makes) and says so.
    pub async fn keep(&self, shutdown: &CancellationToken) -> LeaseEnd {
        let mut every = tokio::time::interval(self.ttl / 3);
        every.tick().await;
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return LeaseEnd::Shutdown,
                _ = every.tick() => {}
            }
            match self.renew().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(
                        node = self.node,
                        "the snowflake node lease was lost; stopping"
                    );
                    shutdown.cancel();
                    return LeaseEnd::Lost;
                }
                Err(e) if last_renewed.elapsed() + self.ttl / 3 >= self.ttl => {
                    tracing::error!(error = %e, "the snowflake node lease could not be renewed in time; stopping");
                    shutdown.cancel();
                    return LeaseEnd::Lost;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "snowflake node lease renewal failed; retrying")
                }
            }
        }
    }
}
