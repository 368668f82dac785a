//! Data layer: PostgreSQL implementations of the `biz` repository traits.
//!
//! Depends on `biz` and `conf`; every backend error is mapped to `biz::RepoError` here
//! and never crosses into the layers above.

mod audit;
mod db;
mod instance;
pub mod kube;
mod outbox;
mod publisher;
mod quota;
mod reconcile;
pub mod snowflake;
mod watch;

use std::time::Duration;

use async_trait::async_trait;
use secrecy::ExposeSecret;
use sqlx::{
    ConnectOptions,
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
};

use tokio_util::sync::CancellationToken;

use crate::{
    biz::{Backoff, Probe, RepoError},
    conf,
};

pub use audit::PgAuditRepo;
pub use db::Db;
pub use instance::PgInstanceRepo;
pub use outbox::PgOutboxRepo;
pub use publisher::AmqpStatusPublisher;
pub use quota::PgQuotaRepo;
pub use reconcile::PgReconcileRepo;
pub use watch::{PgChangeLog, Ticker};

/// Migrations embedded in the binary, so the image needs no `migrations/` directory.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Shared handles to the backing services: two pools, so that background work
/// (ingest, the reconciler, the outbox relay, pruning) can never hold the connections API
/// requests need.
#[derive(Clone)]
pub struct Data {
    requests: Db,
    background: Db,
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
    /// Builds the pools and waits (with backoff, up to `connect_timeout`) until the
    /// database answers.
    ///
    /// # Errors
    /// `ConnectError::InvalidSource`, `ConnectError::Unreachable`.
    pub async fn connect(conf: &conf::Database) -> Result<Self, ConnectError> {
        let options = connect_options(conf)?;
        let requests = Db::new(
            pool_options(conf.max_connections, conf.acquire_timeout)
                .connect_lazy_with(options.clone()),
            conf.query_timeout,
        );
        // Background work can wait for a connection; it never takes one from requests.
        let background = Db::new(
            pool_options(conf.background_connections, conf.query_timeout)
                .connect_lazy_with(options),
            conf.query_timeout,
        );

        let started = tokio::time::Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match requests.run("reach the database", async |conn| ping(conn).await).await {
                Ok(()) => break,
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
        Ok(Self { requests, background })
    }

    /// Applies pending migrations; concurrent replicas serialise on the migrator's lock.
    ///
    /// # Errors
    /// `ConnectError::Migrate`.
    pub async fn migrate(&self) -> Result<(), ConnectError> {
        MIGRATOR.run(self.requests.pool()).await.map_err(|e| ConnectError::Migrate(e.to_string()))
    }

    /// The pool of API requests.
    pub fn requests(&self) -> &Db {
        &self.requests
    }

    /// The pool of background work.
    pub fn background(&self) -> &Db {
        &self.background
    }

    /// A pool of one connection of its own, for the snowflake node lease or the change
    /// log's listener: neither requests nor background work can take it.
    pub fn own_pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(self.requests.pool().connect_options().as_ref().clone())
    }

    /// Samples both pools and the outbox backlog into gauges every 5 s, until `shutdown`.
    pub async fn keep_gauges(self, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            self.sample_gauges().await;
        }
    }

    async fn sample_gauges(&self) {
        for (name, db) in [("requests", &self.requests), ("background", &self.background)] {
            let pool = db.pool();
            let (size, idle) = (pool.size(), u32::try_from(pool.num_idle()).unwrap_or(u32::MAX));
            metrics::gauge!("resource_db_pool_connections", "pool" => name, "state" => "idle")
                .set(f64::from(idle));
            metrics::gauge!("resource_db_pool_connections", "pool" => name, "state" => "in_use")
                .set(f64::from(size.saturating_sub(idle)));
            metrics::gauge!("resource_db_pool_max_connections", "pool" => name)
                .set(f64::from(pool.options().get_max_connections()));
        }
        match outbox::backlog(&self.background).await {
            #[allow(clippy::cast_precision_loss)] // a count far below 2^52
            Ok(backlog) => metrics::gauge!("resource_outbox_backlog").set(backlog as f64),
            Err(e) => tracing::debug!(error = %e, "could not sample the outbox backlog"),
        }
    }
}

/// How the service connects: the URL, its name, and the server-side bounds of a round
/// trip (a statement running past `query_timeout` is cancelled; a session idle in a
/// transaction for twice as long — its client gone — is ended, freeing its locks).
fn connect_options(conf: &conf::Database) -> Result<PgConnectOptions, ConnectError> {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).to_string();
    Ok(conf
        .source
        .expose_secret()
        .parse::<PgConnectOptions>()
        // The parse error can quote the URL, password included: say only what failed.
        .map_err(|_| ConnectError::InvalidSource("not a valid PostgreSQL URL".into()))?
        .application_name("resource")
        .options([
            ("statement_timeout", ms(conf.query_timeout)),
            ("idle_in_transaction_session_timeout", ms(conf.query_timeout * 2)),
        ])
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500)))
}

fn pool_options(size: u32, acquire_timeout: Duration) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(size)
        .min_connections(1.min(size))
        .acquire_timeout(acquire_timeout)
        // A ping before every checkout doubles the round trips of a read; a dead
        // connection surfaces as an I/O error (503) on first use and is replaced, and a
        // stalled one misses its deadline (`Db`).
        .test_before_acquire(false)
        // Every query of the service is built for an index (keyset pages, key
        // lookups). With statistics that lag a fast-growing table (autovacuum off or
        // not there yet) the planner took a seq scan and a sort for "newest first":
        // 267 ms a page at 18k rows, and a soak ran the pool dry. No seq scans, then.
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::Executor::execute(&mut *conn, "SET enable_seqscan = off").await.map(|_| ())
            })
        })
}

async fn ping(conn: &mut sqlx::PgConnection) -> Result<(), RepoError> {
    sqlx::query("SELECT 1").execute(conn).await.map(|_| ()).map_err(map_sqlx)
}

/// How long a readiness probe waits for the database: less than the probe's own bound,
/// so a stalled connection is dropped here rather than abandoned mid-query.
const PROBE_WITHIN: Duration = Duration::from_millis(800);

/// Readiness of PostgreSQL.
pub struct PgProbe {
    db: Db,
}

impl PgProbe {
    /// A probe over `db`.
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

#[async_trait]
impl Probe for PgProbe {
    fn name(&self) -> &'static str {
        "database"
    }

    async fn check(&self) -> Result<(), RepoError> {
        self.db.run_within(PROBE_WITHIN, "check readiness", async |conn| ping(conn).await).await
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
