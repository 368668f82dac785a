//! Following instances as they change: positions in the change log, the hub that shares
//! each new tick of changes with every watcher of a replica, and `WatchUsecase`.
//!
//! The log is ordered by *position* — (tick, seq) — where a tick is handed out when a
//! ticker first sees a change committed (see `migrations/0012`): a change that commits
//! late gets a later tick, never a place behind a watcher. A watcher that has read
//! through a position has seen every change placed before it, on any replica.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Error, Instance, ListFilter, RepoError};

#[cfg(test)]
mod tests;

/// A place in the change log: every change at or before it has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The tick that placed the change.
    pub tick: i64,
    /// Its order within the tick.
    pub seq: i64,
}

impl Position {
    /// After every change of `tick`.
    pub const fn end_of(tick: i64) -> Self {
        Self { tick, seq: i64::MAX }
    }
}

/// One committed change: the instance as it was after it (`DELETED` for a deletion).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Its place in the log.
    pub position: Position,
    /// The instance after the change.
    pub instance: Instance,
}

/// Where the log starts and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Every change at or before it has been pruned.
    pub horizon: Position,
    /// The last tick handed out.
    pub head: i64,
    /// Which log this is: drawn once when the log is created, so a position in another
    /// deployment's log (or a log the database was restored over) is told apart.
    pub epoch: i64,
}

/// Where a watch resumes: a position in the log named by `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// The log the position is in ([`Bounds::epoch`]).
    pub epoch: i64,
    /// Every change at or before it was seen.
    pub position: Position,
}

/// The change log, as watchers read it.
#[async_trait]
pub trait ChangeLog: Send + Sync {
    /// The log's bounds now.
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn bounds(&self) -> Result<Bounds, RepoError>;

    /// Places every change committed so far (so "now" is after them), then the bounds.
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn settle(&self) -> Result<Bounds, RepoError>;

    /// Up to `limit` changes after `from` and at most at tick `through`, in position
    /// order, with the horizon as it was when they were read.
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn after(
        &self,
        from: Position,
        through: i64,
        limit: u32,
    ) -> Result<(Vec<Change>, Position), RepoError>;
}

/// How many changes the hub keeps in memory for watchers near the head; one further
/// behind reads the log itself.
const RECENT_CHANGES: usize = 20_000;
/// How many changes a watcher reads from the log at once.
const READ_AT_ONCE: u32 = 500;

/// Shares each tick of changes with every watcher of this replica: ticks are read from
/// the store once, whatever the number of watchers.
pub struct WatchHub {
    epoch: i64,
    horizon: Mutex<Position>,
    head: watch::Sender<i64>,
    stopping: CancellationToken,
    recent: Mutex<Recent>,
    watchers: AtomicUsize,
}

/// The newest ticks, contiguous: every change placed after `floor` through the head.
struct Recent {
    floor: i64,
    ticks: VecDeque<(i64, Vec<Arc<Change>>)>,
    len: usize,
}

impl WatchHub {
    /// A hub over a log with `bounds`; its watches end when `stopping` is cancelled.
    pub fn new(bounds: Bounds, stopping: CancellationToken) -> Arc<Self> {
        let head = bounds.head;
        Arc::new(Self {
            epoch: bounds.epoch,
            horizon: Mutex::new(bounds.horizon),
            head: watch::Sender::new(head),
            stopping,
            recent: Mutex::new(Recent { floor: head, ticks: VecDeque::new(), len: 0 }),
            watchers: AtomicUsize::new(0),
        })
    }

    /// The last tick this replica knows of.
    pub fn head(&self) -> i64 {
        *self.head.borrow()
    }

    /// The horizon as last read: a watch resuming behind it is refused without a read.
    /// It may lag a prune by another replica; a watch that resumes there then learns it
    /// from the log's answer.
    fn horizon(&self) -> Position {
        *self.horizon.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The log's horizon moved to `horizon` (it never moves back).
    pub fn pruned_to(&self, horizon: Position) {
        let mut h = self.horizon.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *h = (*h).max(horizon);
    }

    /// Tick `tick` was handed out with `changes` (all of them, in order). The next tick
    /// after the head is kept for watchers; any other jump forgets the recent ticks, so
    /// watchers read the gap from the log.
    pub fn publish(&self, tick: i64, changes: Vec<Change>) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let head = *self.head.borrow();
            if tick <= head {
                return;
            }
            if tick == head + 1 {
                recent.len += changes.len();
                recent.ticks.push_back((tick, changes.into_iter().map(Arc::new).collect()));
                while recent.len > RECENT_CHANGES {
                    let Some((oldest, dropped)) = recent.ticks.pop_front() else { break };
                    recent.len -= dropped.len();
                    recent.floor = oldest;
                }
            } else {
                *recent = Recent { floor: tick, ticks: VecDeque::new(), len: 0 };
            }
            self.head.send_replace(tick);
        }
        metrics::gauge!("resource_watch_head_tick").set(tick as f64);
    }

    /// The changes after `from` through the head, if the hub still has them all.
    fn recent_after(&self, from: Position, limit: usize) -> Option<Vec<Arc<Change>>> {
        let recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if from < Position::end_of(recent.floor) {
            return None;
        }
        let mut out = Vec::new();
        for (_, changes) in recent.ticks.iter().filter(|(tick, _)| *tick >= from.tick) {
            out.extend(changes.iter().filter(|c| c.position > from).cloned());
            if out.len() >= limit {
                break;
            }
        }
        Some(out)
    }
}

/// How a watch behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchConf {
    /// How long the log keeps a change: an older resume token is refused.
    pub retention: Duration,
    /// How long a stream stays silent before it carries a heartbeat.
    pub heartbeat: Duration,
    /// Most streams open at once on a replica.
    pub max_watchers: usize,
}

impl Default for WatchConf {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(24 * 3600),
            heartbeat: Duration::from_secs(15),
            max_watchers: 10_000,
        }
    }
}

/// Opens watches over the change log.
pub struct WatchUsecase {
    log: Arc<dyn ChangeLog>,
    hub: Arc<WatchHub>,
    conf: WatchConf,
    settler: Settler,
}

/// Settles the log for watches opening "from now", once for all that arrive together:
/// a burst of opens costs a round or two, not one transaction each on the clock's lock.
#[derive(Default)]
struct Settler {
    /// How many rounds have started.
    started: AtomicU64,
    /// The last round to finish, and what it found.
    done: tokio::sync::Mutex<(u64, Option<Result<i64, Error>>)>,
}

impl Settler {
    /// The head after a settle that started after this call did. The round runs as a
    /// task of its own: a caller that goes away mid-round (its client reset, its deadline)
    /// neither cuts the tick's transaction short nor wastes the round for the others.
    async fn head(&self, log: &Arc<dyn ChangeLog>) -> Result<i64, Error> {
        let arrived = self.started.load(Ordering::Acquire);
        let mut done = self.done.lock().await;
        if done.0 > arrived
            && let Some(result) = &done.1
        {
            return result.clone(); // that round started after this call: it covers it
        }
        let round = self.started.fetch_add(1, Ordering::AcqRel) + 1;
        let log = log.clone();
        let result = match tokio::spawn(async move { log.settle().await }).await {
            Ok(settled) => settled.map(|b| b.head).map_err(Error::from),
            Err(e) => Err(Error::internal(format!("settling the change log failed: {e}"))),
        };
        *done = (round, Some(result.clone()));
        result
    }
}

/// What a watch yields.
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// A change the watcher may see and asked for.
    Change(Arc<Change>),
    /// Nothing happened for a while (or nothing the watcher asked for): where it is.
    Heartbeat(Position),
}

/// Which changes a watch shows.
#[derive(Debug, Clone)]
pub enum Interest {
    /// Those matching this filter; a status filter of `None` means every status.
    Matching(ListFilter),
    /// None at all: a user asked for another user's instances.
    Nothing,
}

impl Interest {
    fn wants(&self, instance: &Instance) -> bool {
        match self {
            Interest::Nothing => false,
            Interest::Matching(filter) => filter.matches_ignoring_deleted_default(instance),
        }
    }
}

impl WatchUsecase {
    /// Watches over `log`, sharing ticks through `hub`.
    pub fn new(log: Arc<dyn ChangeLog>, hub: Arc<WatchHub>, conf: WatchConf) -> Self {
        Self { log, hub, conf, settler: Settler::default() }
    }

    /// How watches behave.
    pub fn conf(&self) -> WatchConf {
        self.conf
    }

    /// A watch of the changes `interest` names, after `from` (`None`: from now).
    ///
    /// Resuming reads nothing from the store unless the position is ahead of this
    /// replica's hub (another replica's newer tick); from now settles the log, once for
    /// every watch that opens meanwhile.
    ///
    /// # Errors
    /// `ResumeTokenExpired` when `from` is behind the retention, `ResumeTokenForeign`
    /// when it is in another log or ahead of this one (restored since), `Unavailable`
    /// when the store does not answer or too many watches are open.
    pub async fn watch(&self, interest: Interest, from: Option<Resume>) -> Result<Watch, Error> {
        let guard = WatcherGuard::take(&self.hub, self.conf.max_watchers)?;
        let position = match from {
            None => Position::end_of(self.settler.head(&self.log).await?.max(self.hub.head())),
            Some(r) if r.epoch != self.hub.epoch => return Err(Error::ResumeTokenForeign),
            Some(r) if r.position < self.hub.horizon() => return Err(self.expired()),
            Some(r) if r.position.tick > self.hub.head() => {
                let bounds = self.log.bounds().await?;
                self.hub.pruned_to(bounds.horizon);
                if r.position < bounds.horizon {
                    return Err(self.expired());
                }
                if r.position.tick > bounds.head.max(self.hub.head()) {
                    // Issued by this log's epoch but past its head: the database was
                    // restored from before it. The client lists again.
                    return Err(Error::ResumeTokenForeign);
                }
                r.position
            }
            Some(r) => r.position,
        };
        Ok(Watch {
            log: self.log.clone(),
            hub: self.hub.clone(),
            head: self.hub.head.subscribe(),
            interest,
            position,
            pending: VecDeque::new(),
            heartbeat: self.conf.heartbeat,
            retention: self.conf.retention,
            _guard: guard,
        })
    }

    fn expired(&self) -> Error {
        Error::ResumeTokenExpired { retention_s: self.conf.retention.as_secs() }
    }
}

/// Counts an open watch while it lives.
struct WatcherGuard(Arc<WatchHub>);

impl WatcherGuard {
    fn take(hub: &Arc<WatchHub>, max: usize) -> Result<Self, Error> {
        let open = hub.watchers.fetch_add(1, Ordering::AcqRel) + 1;
        let guard = Self(hub.clone()); // undoes the count on every path below
        if open > max {
            return Err(Error::Unavailable(Arc::new(RepoError::Unavailable(
                format!("{max} watches are open on this replica (watch.max_watchers)").into(),
            ))));
        }
        metrics::gauge!("resource_watchers").set(open as f64);
        Ok(guard)
    }
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        let open = self.0.watchers.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!("resource_watchers").set(open as f64);
    }
}

/// One open watch: yields, in position order, every change after its start that its
/// interest names, and a heartbeat when it has been silent for the heartbeat interval.
pub struct Watch {
    log: Arc<dyn ChangeLog>,
    hub: Arc<WatchHub>,
    head: watch::Receiver<i64>,
    interest: Interest,
    position: Position,
    pending: VecDeque<Arc<Change>>,
    heartbeat: Duration,
    retention: Duration,
    _guard: WatcherGuard,
}

impl Watch {
    /// Where the watch is: every change at or before it has been yielded or skipped.
    pub fn position(&self) -> Position {
        self.position
    }

    /// The log it reads ([`Bounds::epoch`]).
    pub fn epoch(&self) -> i64 {
        self.hub.epoch
    }

    /// The next item.
    ///
    /// # Errors
    /// `ResumeTokenExpired` when the log was pruned past the watch while it caught up;
    /// `Unavailable` when the store does not answer (the client resumes from its last
    /// token).
    pub async fn next(&mut self) -> Result<WatchItem, Error> {
        let silent_until = tokio::time::Instant::now() + self.heartbeat;
        loop {
            while let Some(change) = self.pending.pop_front() {
                self.position = change.position;
                if self.interest.wants(&change.instance) {
                    return Ok(WatchItem::Change(change));
                }
            }
            let head = *self.head.borrow_and_update();
            if self.position < Position::end_of(head) {
                self.read(head).await?;
                continue;
            }
            tokio::select! {
                changed = self.head.changed() => {
                    if changed.is_err() {
                        return Err(Error::internal("the watch hub went away"));
                    }
                }
                () = tokio::time::sleep_until(silent_until) => {
                    return Ok(WatchItem::Heartbeat(self.position));
                }
                () = self.hub.stopping.cancelled() => {
                    return Err(Error::Unavailable(Arc::new(RepoError::Unavailable(
                        "the service is stopping; watch again from the last resume_token".into(),
                    ))));
                }
            }
        }
    }

    /// Reads what follows the position through tick `head`: from the hub when it still
    /// has it, else from the log.
    async fn read(&mut self, head: i64) -> Result<(), Error> {
        if let Some(recent) = self.hub.recent_after(self.position, READ_AT_ONCE as usize) {
            if recent.is_empty() {
                self.position = Position::end_of(head);
            }
            self.pending.extend(recent);
            return Ok(());
        }
        let (changes, horizon) = self.log.after(self.position, head, READ_AT_ONCE).await?;
        self.hub.pruned_to(horizon);
        if self.position < horizon {
            return Err(Error::ResumeTokenExpired { retention_s: self.retention.as_secs() });
        }
        if changes.is_empty() {
            self.position = Position::end_of(head);
        }
        self.pending.extend(changes.into_iter().map(Arc::new));
        Ok(())
    }
}
