//! A pool of PostgreSQL connections whose every round trip is bounded.
//!
//! A database link that hangs instead of resetting (a failover behind a proxy, a
//! black-holed network) leaves a connection waiting for an answer that never comes: no
//! error, no timeout, and the work it carries — an ingest batch, the outbox — frozen for
//! good. So each unit of work runs within a deadline; a connection that misses it is
//! dropped, never returned to the pool, and the pool's idle connections are pinged so the
//! ones stalled with it go too. The server bounds its side as well (`statement_timeout`,
//! `idle_in_transaction_session_timeout`), so a transaction whose client vanished does not
//! hold its row locks.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sqlx::{PgConnection, PgPool};

use super::map_sqlx;
use crate::biz::RepoError;

/// How long an idle connection has to answer a ping while the pool is swept.
const PING_WITHIN: Duration = Duration::from_secs(1);

/// A pool whose round trips are bounded by a deadline.
#[derive(Clone)]
pub struct Db {
    pool: PgPool,
    deadline: Duration,
    sweeping: Arc<AtomicBool>,
}

impl Db {
    /// Bounds each unit of work on `pool` by `deadline`.
    pub fn new(pool: PgPool, deadline: Duration) -> Self {
        Self { pool, deadline, sweeping: Arc::default() }
    }

    /// The pool (for what needs no bound: tests, the migrator at start-up).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs `work` on one connection within the deadline.
    ///
    /// # Errors
    /// `RepoError::Unavailable` when no connection is free in time or the deadline
    /// passes (the connection is then dropped); `work`'s own errors, mapped.
    pub async fn run<T, F>(&self, what: &'static str, work: F) -> Result<T, RepoError>
    where
        F: AsyncFnOnce(&mut PgConnection) -> Result<T, RepoError>,
    {
        self.run_within(self.deadline, what, work).await
    }

    /// [`Db::run`] with another deadline (a readiness probe answers sooner).
    ///
    /// # Errors
    /// As [`Db::run`].
    pub async fn run_within<T, F>(
        &self,
        deadline: Duration,
        what: &'static str,
        work: F,
    ) -> Result<T, RepoError>
    where
        F: AsyncFnOnce(&mut PgConnection) -> Result<T, RepoError>,
    {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx)?;
        match tokio::time::timeout(deadline, work(&mut conn)).await {
            Ok(result) => result,
            Err(_) => {
                // Its state is unknown (a statement or a COMMIT may still be on the way):
                // it never serves again. Dropping it closes the socket.
                drop(conn.detach());
                tracing::warn!(
                    what,
                    ?deadline,
                    "a database round trip missed its deadline; connection dropped"
                );
                metrics::counter!("resource_db_stalled_total").increment(1);
                self.sweep();
                Err(RepoError::Unavailable(
                    format!("the database did not answer ({what}) within {deadline:?}").into(),
                ))
            }
        }
    }

    /// Pings the idle connections, once at a time, and drops those that do not answer:
    /// a link that stalled one connection has usually stalled the others.
    fn sweep(&self) {
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let (pool, sweeping) = (self.pool.clone(), self.sweeping.clone());
        tokio::spawn(async move {
            let mut alive = Vec::new();
            let mut dropped = 0_usize;
            while let Some(mut conn) = pool.try_acquire() {
                if matches!(
                    tokio::time::timeout(PING_WITHIN, sqlx::Connection::ping(&mut *conn)).await,
                    Ok(Ok(()))
                ) {
                    alive.push(conn); // held until the sweep ends, so it is not pinged twice
                } else {
                    drop(conn.detach());
                    dropped += 1;
                }
            }
            drop(alive);
            if dropped > 0 {
                tracing::warn!(dropped, "dropped idle database connections that did not answer");
            }
            sweeping.store(false, Ordering::Release);
        });
    }
}
