//! The change log on PostgreSQL (`migrations/0012`): watchers read it, a ticker places
//! each committed change in it, and a follower brings the ticks other replicas hand out
//! to this replica's hub.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use sqlx::{Connection, PgConnection, postgres::PgListener, types::Json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Db, instance::InstanceRow, map_sqlx};
use crate::biz::{
    Instance, RepoError,
    watch::{Bounds, Change, ChangeLog, Position, WatchHub},
};

/// The channel each tick is announced on; the payload is the tick.
const CHANNEL: &str = "resource_watch";
/// Most changes one tick places: a backlog (after an outage) is placed over several.
const TICK_AT_MOST: i64 = 5_000;
/// Most ticks the follower reads to fill a gap in the hub; a longer gap makes watchers
/// read it from the log themselves.
const GAP_AT_MOST: i64 = 64;
/// How often the ticker looks for changes no one signalled (a replica that crashed
/// between commit and tick), and the follower for ticks it was not told of (a listener
/// connection that stalled).
const BACKSTOP: Duration = Duration::from_secs(1);
/// How often changes older than the retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The change log, read by watchers.
#[derive(Clone)]
pub struct PgChangeLog {
    db: Db,
}

impl PgChangeLog {
    /// A log over `db`.
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

#[async_trait]
impl ChangeLog for PgChangeLog {
    async fn bounds(&self) -> Result<Bounds, RepoError> {
        self.db.run("read the change log's bounds", async |conn| bounds(conn).await).await
    }

    async fn settle(&self) -> Result<Bounds, RepoError> {
        self.db
            .run("settle the change log", async |conn| {
                if unplaced(&mut *conn).await? {
                    place(&mut *conn).await?; // its announcement brings the hub there
                }
                bounds(conn).await
            })
            .await
    }

    async fn after(
        &self,
        from: Position,
        through: i64,
        limit: u32,
    ) -> Result<(Vec<Change>, Position), RepoError> {
        self.db
            .run("read the change log", async |conn| {
                let rows: Vec<(i64, i64, Json<InstanceRow>)> = sqlx::query_as(
                    "SELECT tick, seq, state FROM instance_changes \
                     WHERE tick IS NOT NULL AND (tick, seq) > ($1, $2) AND tick <= $3 \
                     ORDER BY tick, seq LIMIT $4",
                )
                .bind(from.tick)
                .bind(from.seq)
                .bind(through)
                .bind(i64::from(limit))
                .fetch_all(&mut *conn)
                .await
                .map_err(map_sqlx)?;
                // Read after the rows: a prune that removed some of them shows here.
                let horizon = bounds(conn).await?.horizon;
                Ok((decode(rows)?, horizon))
            })
            .await
    }
}

async fn bounds(conn: &mut PgConnection) -> Result<Bounds, RepoError> {
    let (head, tick, seq, epoch): (i64, i64, i64, i64) =
        sqlx::query_as("SELECT tick, horizon_tick, horizon_seq, epoch FROM watch_clock")
            .fetch_one(conn)
            .await
            .map_err(map_sqlx)?;
    Ok(Bounds { horizon: Position { tick, seq }, head, epoch })
}

fn decode(rows: Vec<(i64, i64, Json<InstanceRow>)>) -> Result<Vec<Change>, RepoError> {
    rows.into_iter()
        .map(|(tick, seq, Json(state))| {
            Ok(Change { position: Position { tick, seq }, instance: Instance::try_from(state)? })
        })
        .collect()
}

/// Places committed changes in the log and keeps this replica's hub at its head.
pub struct Ticker {
    db: Db,
    listen: sqlx::PgPool,
    hub: Arc<WatchHub>,
    wake: Arc<Notify>,
    retention: Duration,
}

impl Ticker {
    /// A ticker over `db` (its listener on a pool of its own, `listen`), woken by `wake`
    /// when this replica commits a change, feeding `hub`, pruning what is older than
    /// `retention`.
    pub fn new(
        db: Db,
        listen: sqlx::PgPool,
        hub: Arc<WatchHub>,
        wake: Arc<Notify>,
        retention: Duration,
    ) -> Self {
        Self { db, listen, hub, wake, retention }
    }

    /// Ticks when woken, follows the other replicas' ticks, and prunes, until
    /// `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut listener = None;
        let mut listen_at = tokio::time::Instant::now();
        let mut backstop = tokio::time::interval(BACKSTOP);
        backstop.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if listener.is_none() && tokio::time::Instant::now() >= listen_at {
                listen_at = tokio::time::Instant::now() + Duration::from_secs(5);
                listener = self.listen().await;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => self.tick().await,
                heard = recv(&mut listener) => match heard {
                    Some(tick) => self.follow(tick).await,
                    None => listener = None,
                },
                _ = backstop.tick() => {
                    if self.unplaced().await {
                        self.tick().await;
                    }
                    let read = self.db.run("read the watch clock", async |c| bounds(c).await).await;
                    if let Ok(bounds) = &read {
                        self.hub.pruned_to(bounds.horizon); // perhaps by another replica
                    }
                    match read {
                        Ok(bounds) if bounds.head > self.hub.head() => {
                            // Not told: the listener may hang on a stalled link.
                            if listener.is_some() {
                                tracing::debug!(head = bounds.head, "a tick was not announced; listening again");
                            }
                            listener = None;
                            self.follow(bounds.head).await;
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!(error = %e, "could not read the watch clock"),
                    }
                }
                _ = prune.tick() => self.prune().await,
            }
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let connect = async {
            let mut listener = PgListener::connect_with(&self.listen).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(listener)) => Some(listener),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot listen for ticks; following the clock");
                None
            }
            Err(_) => {
                tracing::warn!("listening for ticks timed out; following the clock");
                None
            }
        }
    }

    /// Whether some committed change waits for a tick.
    async fn unplaced(&self) -> bool {
        self.db.run("look for unplaced changes", async |c| unplaced(c).await).await.unwrap_or(false)
    }

    /// Places every committed, unplaced change (at most [`TICK_AT_MOST`]) under the next
    /// tick, announces it, and hands it to the hub.
    async fn tick(&self) {
        loop {
            match self.db.run("tick the change log", async |conn| place(conn).await).await {
                Ok(None) => return,
                Ok(Some((tick, changes))) => {
                    let full = changes.len() as i64 >= TICK_AT_MOST;
                    metrics::counter!("resource_watch_changes_placed_total")
                        .increment(changes.len() as u64);
                    if self.hub.head() + 1 == tick {
                        self.hub.publish(tick, changes);
                    } else {
                        self.follow(tick).await;
                    }
                    if !full {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not tick the change log; retrying on the next change");
                    return;
                }
            }
        }
    }

    /// Brings the hub to tick `through`, reading the ticks it lacks.
    async fn follow(&self, through: i64) {
        let head = self.hub.head();
        if through <= head {
            return;
        }
        if through - head > GAP_AT_MOST {
            self.hub.publish(through, Vec::new()); // a jump: watchers read the log
            return;
        }
        let read = self
            .db
            .run("read announced ticks", async |conn| {
                let rows: Vec<(i64, i64, Json<InstanceRow>)> = sqlx::query_as(
                    "SELECT tick, seq, state FROM instance_changes \
                     WHERE tick IS NOT NULL AND tick > $1 AND tick <= $2 \
                     ORDER BY tick, seq LIMIT $3",
                )
                .bind(head)
                .bind(through)
                .bind(TICK_AT_MOST * 4 + 1)
                .fetch_all(conn)
                .await
                .map_err(map_sqlx)?;
                decode(rows)
            })
            .await;
        match read {
            Ok(changes) if changes.len() as i64 <= TICK_AT_MOST * 4 => {
                let mut by_tick: Vec<(i64, Vec<Change>)> = Vec::new();
                for change in changes {
                    match by_tick.last_mut() {
                        Some((tick, batch)) if *tick == change.position.tick => batch.push(change),
                        _ => by_tick.push((change.position.tick, vec![change])),
                    }
                }
                // Ticks are dense but a pruned one has no rows left: publish them all.
                let mut by_tick = by_tick.into_iter().peekable();
                for tick in head + 1..=through {
                    let batch =
                        by_tick.next_if(|(t, _)| *t == tick).map(|(_, b)| b).unwrap_or_default();
                    self.hub.publish(tick, batch);
                }
            }
            Ok(_) => self.hub.publish(through, Vec::new()),
            Err(e) => tracing::warn!(error = %e, "could not read announced ticks"),
        }
    }

    /// Removes the changes of ticks older than the retention, a thousand ticks at a
    /// time, and moves the horizon past them.
    async fn prune(&self) {
        let before =
            chrono::Utc::now() - chrono::Duration::from_std(self.retention).unwrap_or_default();
        loop {
            let pruned = self
                .db
                .run("prune the change log", async |conn| {
                    let mut tx = conn.begin().await.map_err(map_sqlx)?;
                    let last: Option<i64> = sqlx::query_scalar(
                        "SELECT max(tick) FROM (SELECT tick FROM watch_ticks \
                         WHERE ticked_at < $1 ORDER BY tick LIMIT 1000) t",
                    )
                    .bind(before)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(map_sqlx)?;
                    let Some(last) = last else { return Ok(None) };
                    // The horizon moves in the same transaction as the rows go (a reader
                    // reads rows, then the horizon, so it never misses rows unawares), and
                    // last: the clock's row lock, which ticks wait for, is held only for
                    // the commit.
                    let removed = sqlx::query(
                        "DELETE FROM instance_changes WHERE tick IS NOT NULL AND tick <= $1",
                    )
                    .bind(last)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_sqlx)?
                    .rows_affected();
                    sqlx::query("DELETE FROM watch_ticks WHERE tick <= $1")
                        .bind(last)
                        .execute(&mut *tx)
                        .await
                        .map_err(map_sqlx)?;
                    sqlx::query(
                        "UPDATE watch_clock SET horizon_tick = $1, horizon_seq = $2 \
                         WHERE (horizon_tick, horizon_seq) < ($1, $2)",
                    )
                    .bind(last)
                    .bind(i64::MAX)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_sqlx)?;
                    tx.commit().await.map_err(map_sqlx)?;
                    Ok(Some((removed, last)))
                })
                .await;
            match pruned {
                Ok(None) => return,
                Ok(Some((n, last))) => {
                    // Tokens behind it are refused from now on, without a read.
                    self.hub.pruned_to(Position::end_of(last));
                    tracing::info!(removed = n, "pruned the change log past its retention");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not prune the change log");
                    return;
                }
            }
        }
    }
}

/// Whether some committed change waits for a tick.
async fn unplaced(conn: &mut PgConnection) -> Result<bool, RepoError> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM instance_changes WHERE tick IS NULL)")
        .fetch_one(conn)
        .await
        .map_err(map_sqlx)
}

/// One tick: under the clock's row lock (ticks are serial across replicas), the next
/// tick places every committed change no tick has placed yet. `None` when there was
/// none (the tick is not spent).
async fn place(conn: &mut PgConnection) -> Result<Option<(i64, Vec<Change>)>, RepoError> {
    let mut tx = conn.begin().await.map_err(map_sqlx)?;
    let tick: i64 = sqlx::query_scalar("UPDATE watch_clock SET tick = tick + 1 RETURNING tick")
        .fetch_one(&mut *tx)
        .await
        .map_err(map_sqlx)?;
    // This statement's snapshot is taken after the lock: it sees the previous tick's
    // stamps, and every change committed before it.
    let mut rows: Vec<(i64, i64, Json<InstanceRow>)> = sqlx::query_as(
        "UPDATE instance_changes SET tick = $1 WHERE seq IN \
         (SELECT seq FROM instance_changes WHERE tick IS NULL ORDER BY seq LIMIT $2) \
         RETURNING tick, seq, state",
    )
    .bind(tick)
    .bind(TICK_AT_MOST)
    .fetch_all(&mut *tx)
    .await
    .map_err(map_sqlx)?;
    if rows.is_empty() {
        tx.rollback().await.map_err(map_sqlx)?;
        return Ok(None);
    }
    rows.sort_unstable_by_key(|(_, seq, _)| *seq);
    sqlx::query("INSERT INTO watch_ticks (tick) VALUES ($1)")
        .bind(tick)
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx)?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(tick.to_string())
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx)?;
    tx.commit().await.map_err(map_sqlx)?;
    Ok(Some((tick, decode(rows)?)))
}

/// The next announced tick; `None` when there is no listener or it failed.
async fn recv(listener: &mut Option<PgListener>) -> Option<i64> {
    let Some(l) = listener.as_mut() else { return std::future::pending().await };
    loop {
        match l.try_recv().await {
            Ok(Some(n)) => match n.payload().parse() {
                Ok(tick) => return Some(tick),
                Err(_) => continue,
            },
            Ok(None) => return None, // connection lost; notifications in between missed
            Err(e) => {
                tracing::warn!(error = %e, "listening for ticks failed");
                return None;
            }
        }
    }
}
