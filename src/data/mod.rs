//! Data layer: PostgreSQL implementations of the `biz` repository traits.
//!
//! Depends on `biz` and `conf`; every backend error is mapped to `biz::RepoError` here
//! and never crosses into the layers above.

mod audit;
mod instance;
pub mod kube;
mod outbox;
mod publisher;
mod reconcile;
pub mod snowflake;

use std::time::Duration;

use async_trait::async_trait;
use secrecy::ExposeSecret;
use sqlx::{
    ConnectOptions,
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
};

use crate::{
    biz::{Backoff, Probe, RepoError},
    conf,
};

pub use audit::PgAuditRepo;
pub use instance::PgInstanceRepo;
pub use outbox::PgOutboxRepo;
pub use publisher::AmqpStatusPublisher;
pub use reconcile::PgReconcileRepo;

/// Migrations embedded in the binary, so the image needs no `migrations/` directory.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Shared handles to the backing services.
#[derive(Clone)]
pub struct Data {
    pool: PgPool,
}

/// Why start-up could not reach or prepare the database.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// `data.database.source` cannot be parsed.
    #[error("data.database.source: {0}")]
    InvalidSource(String),
    /// The database did not answer within `data.database.connect_timeout`.
    #[error("database unreachable after {waited:?}: {last}")]
    Unreachable { waited: Duration, last: String },
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(String),
}

impl Data {
    /// Builds the pool and waits (with backoff, up to `connect_timeout`) until the
    /// database answers.
    ///
    /// # Errors
    /// `ConnectError::InvalidSource`, `ConnectError::Unreachable`.
    pub async fn connect(conf: &conf::Database) -> Result<Self, ConnectError> {
        let options: PgConnectOptions = conf
            .source
            .expose_secret()
            .parse::<PgConnectOptions>()
            // The parse error can quote the URL, password included: say only what failed.
            .map_err(|_| ConnectError::InvalidSource("not a valid PostgreSQL URL".into()))?
            .application_name("resource")
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
        let pool = PgPoolOptions::new()
            .max_connections(conf.max_connections)
            .min_connections(1.min(conf.max_connections))
            .acquire_timeout(conf.acquire_timeout)
            // A ping before every checkout doubles the round trips of a read; a dead
            // connection surfaces as an I/O error (503) on first use and is replaced.
            .test_before_acquire(false)
            // Every query of the service is built for an index (keyset pages, key
            // lookups). With statistics that lag a fast-growing table (autovacuum off or
            // not there yet) the planner took a seq scan and a sort for "newest first":
            // 267 ms a page at 18k rows, and a soak ran the pool dry. No seq scans, then.
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::Executor::execute(&mut *conn, "SET enable_seqscan = off")
                        .await
                        .map(|_| ())
                })
            })
            .connect_lazy_with(options);

        let started = tokio::time::Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match sqlx::query("SELECT 1").execute(&pool).await {
                Ok(_) => break,
                Err(e) if started.elapsed() + backoff.peek() < conf.connect_timeout => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "database not reachable yet");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    return Err(ConnectError::Unreachable {
                        waited: started.elapsed(),
                        last: e.to_string(),
                    });
                }
            }
        }
        Ok(Self { pool })
    }

    /// Wraps an existing pool (tests, tools).
    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Applies pending migrations; concurrent replicas serialise on the migrator's lock.
    ///
    /// # Errors
    /// `ConnectError::Migrate`.
    pub async fn migrate(&self) -> Result<(), ConnectError> {
        MIGRATOR.run(&self.pool).await.map_err(|e| ConnectError::Migrate(e.to_string()))
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Readiness of PostgreSQL.
pub struct PgProbe {
    pool: PgPool,
}

impl PgProbe {
    /// A probe over `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl Probe for PgProbe {
    fn name(&self) -> &'static str {
        "database"
    }

    async fn check(&self) -> Result<(), RepoError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(map_sqlx)
    }
}

/// Maps a sqlx error onto the repository error space.
pub(crate) fn map_sqlx(err: sqlx::Error) -> RepoError {
    if let sqlx::Error::Database(db) = &err {
        // Unique violations, serialization failures and deadlocks (class 40): a
        // concurrent writer won; the unit of work may be retried.
        if db.is_unique_violation() || db.code().is_some_and(|c| c.starts_with("40")) {
            return RepoError::Conflict;
        }
        // Connection exceptions (08), insufficient resources (53) and operator
        // intervention such as a shutdown (57) are outages, not bugs.
        if db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("53") || c.starts_with("57"))
        {
            return RepoError::Unavailable(err.into());
        }
    }
    match err {
        sqlx::Error::RowNotFound => RepoError::NotFound,
        e @ (sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed) => RepoError::Unavailable(e.into()),
        e => RepoError::Internal(e.into()),
    }
}
