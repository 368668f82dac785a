//! The reconciler: keeps every instance's workload in the cluster in agreement with the
//! instance in the database, level-triggered.
//!
//! The database holds the desired state and the cluster the actual one, read from a
//! watch-fed cache (so looking costs no API request). What is looked at, and when:
//! instances whose status waits for the cluster (CREATING, STOPPING, DELETING) when they
//! change; an instance whose objects changed (the watch); an instance, or all of them,
//! named by an `INSTANCE_K8S_SYNC`; everything at start-up and every `resync_interval`.
//! Each look decides afresh from both sides ([`decide`]), so a missed trigger only delays
//! work.
//!
//! Work is a queue, not a batch: `concurrency` workers each take the next instance that
//! is due, user actions and watch news ahead of periodic resyncs, so one slow or failing
//! instance never holds the others. A failure backs that instance off alone (exponential,
//! jittered, never before the server's `Retry-After`).
//!
//! One instance is handled by one replica at a time: a lease row in PostgreSQL
//! ([`ReconcileRepo::claim`]) is taken before acting and released after (a look that
//! finds nothing to do takes none). Status changes go through the planner as
//! [`Observation`]s, so they are audited (actor `reconciler`) and published like every
//! other change; so are corrections of what was changed behind the service's back.

use std::{
    collections::{BTreeSet, HashMap},
    hash::BuildHasher,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{
    Actor, Backoff, Error, RepoError, Source,
    cluster::{
        Cluster, ClusterError, ClusterHealth, Drift, NamespaceState, Observed, Phase, Workload,
    },
    instance::{
        Command, Endpoint, Envelope, InstanceId, InstanceStatus, InstanceUsecase, Observation,
        Outcome,
    },
};

/// How the reconciler paces itself (`data.kubernetes.*` in the configuration).
#[derive(Debug, Clone)]
pub struct ReconcileConf {
    /// Instances reconciled at the same time.
    pub concurrency: usize,
    /// How often instances waiting for the cluster and sync requests are looked up.
    pub poll_interval: Duration,
    /// How often everything is compared.
    pub resync_interval: Duration,
    /// How long a replica holds an instance while it reconciles it.
    pub lease_ttl: Duration,
    /// Longest wait between two tries of an instance whose reconcile fails.
    pub backoff_max: Duration,
    /// How often the namespace is checked (and recreated when it is gone).
    pub namespace_check: Duration,
}

/// What the reconciler needs from the database besides the instances themselves.
#[async_trait]
pub trait ReconcileRepo: Send + Sync {
    /// Instances whose status waits for the cluster (CREATING, STOPPING, DELETING), with
    /// their versions.
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn unsettled(&self) -> Result<Vec<(InstanceId, i64)>, RepoError>;

    /// Every instance that is not deleted.
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn live(&self) -> Result<Vec<InstanceId>, RepoError>;

    /// `INSTANCE_K8S_SYNC` requests recorded after cursor `after` (each `None`: every
    /// instance), and the cursor to pass next time. `after = None` only returns the
    /// cursor (requests made before this replica started are covered by its first
    /// resync).
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn sync_requests(
        &self,
        after: Option<i64>,
    ) -> Result<(Vec<Option<InstanceId>>, i64), RepoError>;

    /// Takes the lease of `id` for `owner` if no other replica holds it.
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn claim(
        &self,
        id: InstanceId,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Claimed>, RepoError>;

    /// Gives the lease of `id` back, remembering `applied`: the instance version whose
    /// workload was applied under it, if one was.
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn release(
        &self,
        id: InstanceId,
        owner: &str,
        applied: Option<i64>,
    ) -> Result<(), RepoError>;
}

/// A lease taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimed {
    /// The instance version last applied under this lease (by any replica) and how long
    /// ago, if it is remembered.
    pub last_applied: Option<(i64, Duration)>,
}

/// `step`, unless it applies what was applied for this `version` a moment ago: the watch
/// cache has not shown that write yet (a replica's cache trails every write, its own and
/// others'), so wait for it rather than write again.
/// A restore is held back alike: a cache that has seen the Pod of that write but not yet
/// its Service sees a Service missing.
fn settling(claimed: Claimed, version: Option<i64>, step: Step) -> Step {
    let writes = matches!(step, Step::Apply(_) | Step::Restore(..));
    match claimed.last_applied {
        Some((done, ago)) if writes && Some(done) == version && ago < CACHE_CATCH_UP => {
            Step::Wait(Some(CACHE_CATCH_UP - ago))
        }
        _ => step,
    }
}

/// One decision about one instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing to change; look again after this long (`None`: when something changes).
    Wait(Option<Duration>),
    /// Create or update the workload.
    Apply(Box<Workload>),
    /// Put right what was changed behind the service's back: in place, or by replacing
    /// the Pod when an immutable part differs.
    Restore(Vec<Drift>, Box<Workload>),
    /// Remove the workload (then report it gone where the status waits for that).
    Remove,
    /// Remove the workload of an instance that does not exist (or is deleted).
    RemoveOrphan,
    /// Record an observation.
    Report(Observation),
    /// Record an observation, then remove what is left.
    ReportThenRemove(Observation),
}

/// How long to wait for a workload that is starting before looking again (the watch
/// normally tells sooner; this look costs no API request).
const PENDING_RECHECK: Duration = Duration::from_secs(10);
/// How long an apply is taken to be on its way into every replica's watch cache: within
/// it, the same workload is not applied again.
const CACHE_CATCH_UP: Duration = Duration::from_secs(5);
/// How long to wait after applying before looking again if the watch says nothing.
const APPLIED_RECHECK: Duration = Duration::from_secs(5);
/// How long to wait for a workload being removed.
const REMOVING_RECHECK: Duration = Duration::from_secs(2);
/// First wait after a failure.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
/// Failures in a row after which a waiting instance's reason names the error.
const FAILURES_SHOWN: u32 = 3;

/// What the database says about one instance.
#[derive(Debug, Clone, Copy)]
pub struct Desired<'a> {
    /// Its status.
    pub status: InstanceStatus,
    /// Its status reason.
    pub reason: &'a str,
    /// The endpoint it records.
    pub endpoint: &'a Endpoint,
    /// What it should run.
    pub workload: &'a Workload,
}

/// Decides what to do with one instance from the database (`None`: no such instance)
/// and its Pod in the cluster (`None`: none); `service_left` says whether a Service
/// exists without a Pod.
pub fn decide(
    desired: Option<Desired<'_>>,
    observed: Option<&Observed>,
    service_left: bool,
) -> Step {
    use InstanceStatus as S;
    let Some(d) = desired.filter(|d| d.status != S::Deleted) else {
        return match observed {
            Some(o) if o.terminating && !o.protected => Step::Wait(Some(REMOVING_RECHECK)),
            Some(_) => Step::RemoveOrphan,
            None if service_left => Step::RemoveOrphan,
            None => Step::Wait(None),
        };
    };
    let wants_workload = matches!(d.status, S::Creating | S::Running);
    let waiting = |reason: String| {
        if reason == d.reason {
            Step::Wait(Some(REMOVING_RECHECK))
        } else {
            Step::Report(Observation::Waiting(reason))
        }
    };
    match observed {
        None if wants_workload => Step::Apply(Box::new(d.workload.clone())),
        Some(o) if wants_workload && o.terminating => match (d.status, o.protected) {
            // Someone else deleted it: record that, release it, recreate it.
            (S::Running, true) => Step::ReportThenRemove(Observation::Lost(
                "workload deleted out of band; recreating".into(),
            )),
            // Our own replacement (a spec change) is in progress.
            (S::Running, false) if o.foreign_finalizers.is_empty() => {
                Step::Wait(Some(REMOVING_RECHECK))
            }
            // Removed by someone else, and held: it no longer runs as it should.
            (S::Running, false) => Step::Report(Observation::Lost(format!(
                "workload is being removed{}; recreating",
                held_by(o)
            ))),
            (_, true) => Step::Remove,
            // Our own removal is in progress.
            (_, false) if o.foreign_finalizers.is_empty() => Step::Wait(Some(REMOVING_RECHECK)),
            (_, false) => waiting(format!("waiting for the old workload to go{}", held_by(o))),
        },
        // Our own update of the spec: the Pod is replaced. (A hash edited by hand, over a
        // Pod that runs as asked, is drift of the annotations, restored below.)
        Some(o)
            if wants_workload
                && !o.spec_hash.is_empty()
                && o.spec_hash != d.workload.spec_hash
                && o.drift.iter().any(|d| matches!(d, Drift::Image { .. } | Drift::Pod(_))) =>
        {
            Step::Remove
        }
        // Our own change of the instance's labels: applied in place (labels of a Pod are
        // mutable), as any apply, and not taken for a change behind our back.
        Some(o) if wants_workload && !o.terminating && o.labels_hash != d.workload.labels_hash => {
            Step::Apply(Box::new(d.workload.clone()))
        }
        Some(o) if wants_workload && !o.drift.is_empty() => {
            Step::Restore(o.drift.clone(), Box::new(d.workload.clone()))
        }
        Some(o) if wants_workload => match &o.phase {
            Phase::Running if d.status == S::Creating || *d.endpoint != o.endpoint => {
                Step::Report(Observation::Running(o.endpoint.clone()))
            }
            Phase::Running => Step::Wait(None),
            Phase::Failed(reason) => Step::Report(Observation::Failed(reason.clone())),
            Phase::Pending(Some(reason)) if d.status == S::Creating => waiting(reason.clone()),
            Phase::Pending(_) => Step::Wait(Some(PENDING_RECHECK)),
        },
        Some(o) if o.terminating && !o.protected => {
            if o.foreign_finalizers.is_empty() || !matches!(d.status, S::Stopping | S::Deleting) {
                Step::Wait(Some(REMOVING_RECHECK))
            } else {
                waiting(format!("waiting for the workload to go{}", held_by(o)))
            }
        }
        Some(_) => Step::Remove,
        None if service_left => Step::Remove,
        None if matches!(d.status, S::Stopping | S::Deleting) => Step::Report(Observation::Gone),
        None => Step::Wait(None),
    }
}

fn held_by(o: &Observed) -> String {
    if o.foreign_finalizers.is_empty() {
        String::new()
    } else {
        format!(" (held by finalizers: {})", o.foreign_finalizers.join(", "))
    }
}

/// Why one reconcile did not finish.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Store(#[from] Error),
}

/// When to look at an instance again.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Next {
    /// After this long.
    After(Duration),
    /// When something changes (the watch, a poll, the next resync).
    Park,
    /// The reconcile failed: back off, not before this.
    Failed(Option<Duration>),
}

/// How a push ranks an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Push {
    /// A user action (the instance changed, or a sync was asked for): ahead of
    /// everything else, now, even if it is backing off.
    Action,
    /// Watch news: ahead of periodic work, now, unless it is backing off.
    Urgent,
    /// A periodic look: now, behind urgent work.
    Normal,
    /// Only if the instance is not queued at all.
    IfAbsent,
}

/// Where an instance waits in the queue.
#[derive(Debug, Clone, Copy)]
struct Entry {
    at: Instant,
    urgent: bool,
}

/// Instances due for a look, by rank and time; each is handed to one worker at a time.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    wake: Notify,
}

#[derive(Default)]
struct QueueState {
    entries: HashMap<InstanceId, Entry>,
    urgent: BTreeSet<(Instant, InstanceId)>,
    normal: BTreeSet<(Instant, InstanceId)>,
    /// Instances being reconciled, with a push that came meanwhile.
    busy: HashMap<InstanceId, Option<Push>>,
    /// Failures in a row, per instance.
    failures: HashMap<InstanceId, u32>,
    /// The version of each instance when it was last looked at.
    seen: HashMap<InstanceId, i64>,
}

/// What a worker gets from the queue.
enum Take {
    Ready(InstanceId, u32),
    Idle(Option<Instant>),
}

// === impl QueueState ===

impl QueueState {
    /// The ordered set an entry of this rank lives in.
    fn rank(&mut self, urgent: bool) -> &mut BTreeSet<(Instant, InstanceId)> {
        if urgent { &mut self.urgent } else { &mut self.normal }
    }

    fn set(&mut self, id: InstanceId, entry: Entry) {
        self.unset(id);
        self.entries.insert(id, entry);
        self.rank(entry.urgent).insert((entry.at, id));
    }

    /// Takes `id` out of the queue (not out of `busy`, `failures` or `seen`).
    fn unset(&mut self, id: InstanceId) {
        if let Some(old) = self.entries.remove(&id) {
            self.rank(old.urgent).remove(&(old.at, id));
        }
    }

    fn push(&mut self, id: InstanceId, push: Push, now: Instant) {
        if let Some(pending) = self.busy.get_mut(&id) {
            if push != Push::IfAbsent && !matches!(*pending, Some(Push::Urgent | Push::Action)) {
                *pending = Some(push);
            }
            return;
        }
        let backing_off = self.failures.contains_key(&id);
        let entry = match (self.entries.get(&id).copied(), push) {
            (None, push) => Entry { at: now, urgent: matches!(push, Push::Urgent | Push::Action) },
            (Some(_), Push::IfAbsent) => return,
            // A failing instance waits for its turn, whatever the watch reports meanwhile;
            // a user action does not wait.
            (Some(e), push) if backing_off && push != Push::Action => e,
            (Some(e), push) => Entry {
                at: e.at.min(now),
                urgent: e.urgent || matches!(push, Push::Urgent | Push::Action),
            },
        };
        self.set(id, entry);
    }

    fn take(&mut self, now: Instant) -> Take {
        let first = |set: &BTreeSet<(Instant, InstanceId)>| set.first().copied();
        let pick = match (first(&self.urgent), first(&self.normal)) {
            (Some((at, id)), _) if at <= now => Some(id),
            (_, Some((at, id))) if at <= now => Some(id),
            (u, n) => return Take::Idle(u.map(|u| u.0).into_iter().chain(n.map(|n| n.0)).min()),
        };
        let id = pick.expect("a due instance");
        self.unset(id);
        self.busy.insert(id, None);
        Take::Ready(id, self.failures.get(&id).copied().unwrap_or(0))
    }

    fn done(
        &mut self,
        id: InstanceId,
        version: Option<i64>,
        next: Next,
        backoff: &Backoff,
        now: Instant,
    ) {
        let pending = self.busy.remove(&id).flatten();
        if let Some(version) = version {
            self.seen.insert(id, version);
        }
        let mut entry = match next {
            Next::After(after) => Entry { at: now + after, urgent: false },
            // Parked far away: a resync, a poll or the watch brings it forward.
            Next::Park => Entry { at: now + Duration::from_secs(86_400), urgent: false },
            Next::Failed(retry_after) => {
                let attempt = self.failures.entry(id).or_insert(0);
                *attempt += 1;
                let delay = jitter(backoff.delay(*attempt), id, *attempt)
                    .max(retry_after.unwrap_or_default());
                self.set(id, Entry { at: now + delay, urgent: false });
                return;
            }
        };
        self.failures.remove(&id);
        if let Some(push) = pending {
            entry = Entry { at: now, urgent: matches!(push, Push::Urgent | Push::Action) };
        }
        self.set(id, entry);
    }

    fn forget(&mut self, id: InstanceId) {
        self.unset(id);
        self.failures.remove(&id);
        self.seen.remove(&id);
    }
}

/// `delay` spread over [delay/2, delay], so instances failing together retry apart.
fn jitter(delay: Duration, id: InstanceId, attempt: u32) -> Duration {
    static SEED: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    let hash =
        SEED.get_or_init(std::hash::RandomState::new).hash_one((id.get(), attempt, Instant::now()));
    #[allow(clippy::cast_precision_loss)] // a fraction only
    let fraction = (hash % 1_000) as f64 / 1_000.0;
    delay.mul_f64(0.5 + fraction / 2.0)
}

// === impl Queue ===

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, id: InstanceId, push: Push) {
        self.lock().push(id, push, Instant::now());
        self.wake.notify_one();
    }
}

/// The reconciler of one replica.
pub struct Reconciler {
    instances: Arc<InstanceUsecase>,
    repo: Arc<dyn ReconcileRepo>,
    cluster: Arc<dyn Cluster>,
    conf: ReconcileConf,
    owner: String,
    health: Arc<ClusterHealth>,
    queue: Queue,
    backoff: Backoff,
    namespace: tokio::sync::Mutex<()>,
}

/// What one look at an instance found and did.
struct Looked {
    version: Option<i64>,
    status: Option<InstanceStatus>,
    result: Result<Next, Failure>,
}

// === impl Reconciler ===

impl Reconciler {
    /// A reconciler acting as `owner` (unique per replica); `health` is the one the
    /// cluster implementation reports to.
    pub fn new(
        instances: Arc<InstanceUsecase>,
        repo: Arc<dyn ReconcileRepo>,
        cluster: Arc<dyn Cluster>,
        health: Arc<ClusterHealth>,
        conf: ReconcileConf,
        owner: String,
    ) -> Self {
        let backoff = Backoff::new(BACKOFF_FIRST, conf.backoff_max.max(BACKOFF_FIRST));
        Self {
            instances,
            repo,
            cluster,
            conf,
            owner,
            health,
            queue: Queue::default(),
            backoff,
            namespace: tokio::sync::Mutex::new(()),
        }
    }

    /// The readiness probe of the cluster.
    pub fn health(&self) -> Arc<ClusterHealth> {
        self.health.clone()
    }

    /// Runs until `shutdown`: the watch, the workers, the polls and the resyncs.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (changed_tx, mut changed) = mpsc::channel(8192);
        tokio::spawn({
            let (cluster, shutdown) = (self.cluster.clone(), shutdown.clone());
            async move { cluster.watch(changed_tx, shutdown).await }
        });
        self.check_namespace().await;
        // Nothing is decided from a cache that has not been filled yet.
        while !self.health.listed() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let workers: Vec<_> = (0..self.conf.concurrency.max(1))
            .map(|_| tokio::spawn(self.clone().work(shutdown.clone())))
            .collect();

        let mut sync_cursor: Option<i64> = None;
        let mut poll = tokio::time::interval(self.conf.poll_interval);
        let mut resync = tokio::time::interval(self.conf.resync_interval);
        let mut namespace = tokio::time::interval(self.conf.namespace_check);
        for tick in [&mut poll, &mut resync, &mut namespace] {
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(id) = changed.recv() => {
                    self.queue.push(id, Push::Urgent);
                    while let Ok(id) = changed.try_recv() {
                        self.queue.push(id, Push::Urgent);
                    }
                }
                _ = resync.tick() => {
                    if let Err(e) = self.resync().await {
                        tracing::warn!(error = %e, "reconciler: resync failed; retrying at the next one");
                    }
                }
                _ = poll.tick() => {
                    if let Err(e) = self.poll(&mut sync_cursor).await {
                        tracing::warn!(error = %e, "reconciler: poll failed");
                    }
                }
                _ = namespace.tick() => self.check_namespace().await,
            }
        }
        for worker in workers {
            let _ = worker.await;
        }
    }

    /// One worker: takes the next due instance, reconciles it, schedules its next look.
    async fn work(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let notified = self.queue.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let take = self.queue.lock().take(Instant::now());
            let (id, attempt) = match take {
                Take::Ready(id, attempt) => (id, attempt),
                Take::Idle(until) => {
                    let until = until.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(until) => {}
                    }
                    continue;
                }
            };
            // Another instance may be due as well: let an idle worker look.
            self.queue.wake.notify_one();
            let looked = tokio::select! {
                () = shutdown.cancelled() => return,
                looked = self.reconcile(id) => looked,
            };
            let next = match looked.result {
                Ok(next) => next,
                Err(e) => self.failed(id, attempt + 1, looked.status, e).await,
            };
            let mut queue = self.queue.lock();
            let gone = matches!(looked.status, None | Some(InstanceStatus::Deleted));
            if gone && next == Next::Park {
                // Neither in the database nor in the cluster: nothing more to look at.
                queue.busy.remove(&id);
                queue.forget(id);
            } else {
                queue.done(id, looked.version, next, &self.backoff, Instant::now());
            }
        }
    }

    /// Logs a failure and, for an instance waiting on the cluster, shows it in the
    /// reason once it persists.
    async fn failed(
        &self,
        id: InstanceId,
        attempt: u32,
        status: Option<InstanceStatus>,
        e: Failure,
    ) -> Next {
        metrics::counter!("resource_reconcile_errors_total").increment(1);
        // The server's hint, up to our own cap: a Retry-After of an hour must not park it.
        let retry_after = match &e {
            Failure::Cluster(c) => c.retry_after().map(|r| r.min(self.conf.backoff_max)),
            Failure::Store(_) => None,
        };
        let delay = self.backoff.delay(attempt).max(retry_after.unwrap_or_default());
        tracing::warn!(instance_id = id.get(), attempt, error = %e,
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "reconcile failed; backing off");
        if let Failure::Cluster(ClusterError::NamespaceMissing(_)) = &e {
            self.check_namespace().await;
        }
        let lasting = attempt >= FAILURES_SHOWN
            || matches!(
                e,
                Failure::Cluster(ClusterError::Refused(_) | ClusterError::NamespaceMissing(_))
            );
        let waiting = status.is_some_and(InstanceStatus::awaits_cluster);
        if lasting
            && waiting
            && let Failure::Cluster(c) = &e
            && let Err(e) = self.report(id, Observation::Waiting(c.to_string())).await
        {
            tracing::debug!(instance_id = id.get(), error = %e, "could not record why an instance waits");
        }
        Next::Failed(retry_after)
    }

    /// Instances waiting for the cluster that changed, and sync requests, become due.
    async fn poll(&self, sync_cursor: &mut Option<i64>) -> Result<(), Failure> {
        let unsettled = self.repo.unsettled().await.map_err(Error::from)?;
        {
            let mut queue = self.queue.lock();
            let now = Instant::now();
            for (id, version) in unsettled {
                let push = if queue.seen.get(&id) == Some(&version) {
                    Push::IfAbsent
                } else {
                    Push::Action
                };
                queue.push(id, push, now);
            }
        }
        self.queue.wake.notify_one();
        let (requests, newest) =
            self.repo.sync_requests(*sync_cursor).await.map_err(Error::from)?;
        if sync_cursor.is_none() {
            // Start-up: the first resync covers whatever was asked before.
            *sync_cursor = Some(newest);
            return Ok(());
        }
        *sync_cursor = Some(newest);
        for request in requests {
            match request {
                Some(id) => self.queue.push(id, Push::Action),
                None => self.resync().await?,
            }
        }
        Ok(())
    }

    /// Everything the database or the cluster knows becomes due, behind urgent work;
    /// objects that belong to no instance are removed.
    async fn resync(&self) -> Result<(), Failure> {
        let live = self.repo.live().await.map_err(Error::from)?;
        {
            let mut queue = self.queue.lock();
            let now = Instant::now();
            for id in live.into_iter().chain(self.cluster.known()) {
                queue.push(id, Push::Normal, now);
            }
        }
        self.queue.wake.notify_waiters();
        for stray in self.cluster.strays() {
            tracing::warn!(
                kind = stray.kind,
                name = %stray.name,
                "removing an object labelled as ours that is no instance's workload"
            );
            self.cluster.remove_stray(&stray).await?;
            if let Some(id) = stray.instance {
                let note = format!(
                    "removed stray {} {:?}, labelled as this instance's",
                    stray.kind, stray.name
                );
                self.report(id, Observation::Corrected(note)).await?;
            }
        }
        Ok(())
    }

    /// Checks the namespace and recreates it when it is gone (and allowed).
    async fn check_namespace(&self) {
        let Ok(_one) = self.namespace.try_lock() else { return };
        let problem = match self.cluster.ensure_namespace().await {
            Ok(NamespaceState::Exists) => None,
            Ok(NamespaceState::Created) => {
                tracing::warn!("the instances' namespace was missing; created it again");
                if let Err(e) = self.resync().await {
                    tracing::warn!(error = %e, "reconciler: resync failed");
                }
                None
            }
            Ok(NamespaceState::Terminating) => Some(
                "the instances' namespace is being deleted; \
                     it is created again once it is gone"
                    .to_owned(),
            ),
            Ok(NamespaceState::Missing) => Some(
                "the instances' namespace does not exist \
                 and data.kubernetes.create_namespace is false"
                    .to_owned(),
            ),
            Err(e) => {
                tracing::debug!(error = %e, "could not check the namespace");
                return;
            }
        };
        self.health.namespace(problem);
    }

    /// Looks at one instance and acts when something is to be done, under its lease.
    async fn reconcile(&self, id: InstanceId) -> Looked {
        let (instance, step) = match self.look(id).await {
            Ok(found) => found,
            Err(e) => return Looked { version: None, status: None, result: Err(e) },
        };
        let (version, status) =
            (instance.as_ref().map(|i| i.version), instance.as_ref().map(|i| i.status));
        if let Step::Wait(after) = step {
            let next = after.map_or(Next::Park, Next::After);
            return Looked { version, status, result: Ok(next) };
        }
        let ttl = self.conf.lease_ttl;
        let claimed = match self.repo.claim(id, &self.owner, ttl).await {
            // Another replica is on it; it will see what we would have.
            Ok(None) => return Looked { version, status, result: Ok(Next::After(ttl)) },
            Ok(Some(claimed)) => claimed,
            Err(e) => return Looked { version, status, result: Err(Error::from(e).into()) },
        };
        // Looked at again under the lease: another replica may have acted meanwhile.
        let mut applied = None;
        let result = match self.look(id).await {
            Ok((instance, step)) => {
                let version = instance.as_ref().map(|i| i.version);
                let step = settling(claimed, version, step);
                // What puts the workload in place (not a Pod replaced: its re-creation
                // must not wait).
                let applies = match &step {
                    Step::Apply(_) => true,
                    Step::Restore(drift, _) => !drift.iter().any(Drift::replaces),
                    _ => false,
                };
                let result = self.act(id, instance.as_ref().map(|i| i.status), step).await;
                applied = version.filter(|_| applies && result.is_ok());
                result
            }
            Err(e) => Err(e),
        };
        if let Err(e) = self.repo.release(id, &self.owner, applied).await {
            tracing::warn!(instance_id = id.get(), error = %e, "could not release a reconcile lease; it expires");
        }
        Looked { version, status, result }
    }

    async fn look(
        &self,
        id: InstanceId,
    ) -> Result<(Option<super::instance::Instance>, Step), Failure> {
        let instance = match self.instances.get(id).await {
            Ok(instance) => Some(instance),
            Err(Error::InstanceNotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let workload = match instance.as_ref().map(Workload::of).transpose() {
            Ok(workload) => workload,
            Err(e) => {
                // Only rows written before the container schema existed can get here.
                let step = Step::Report(Observation::Failed(format!("invalid config_json: {e}")));
                return Ok((instance, step));
            }
        };
        let observed = self.cluster.observe(id, workload.as_ref());
        let service_left = observed.is_none() && self.cluster.has_service(id);
        let desired = instance.as_ref().zip(workload.as_ref()).map(|(i, workload)| Desired {
            status: i.status,
            reason: &i.status_reason,
            endpoint: &i.endpoint,
            workload,
        });
        let step = decide(desired, observed.as_ref(), service_left);
        Ok((instance, step))
    }

    async fn act(
        &self,
        id: InstanceId,
        status: Option<InstanceStatus>,
        step: Step,
    ) -> Result<Next, Failure> {
        let name = match &step {
            Step::Wait(_) => "wait",
            Step::Apply(_) => "apply",
            Step::Restore(..) => "restore",
            Step::Remove | Step::RemoveOrphan => "remove",
            Step::Report(_) | Step::ReportThenRemove(_) => "report",
        };
        metrics::counter!("resource_reconcile_operations_total", "step" => name).increment(1);
        match step {
            Step::Wait(after) => Ok(after.map_or(Next::Park, Next::After)),
            Step::Apply(workload) => {
                self.cluster.apply(&workload).await?;
                Ok(Next::After(APPLIED_RECHECK))
            }
            Step::Restore(drift, workload) => {
                let what: Vec<String> = drift.iter().map(ToString::to_string).collect();
                let replace = drift.iter().any(Drift::replaces);
                let how = if replace { "replacing the Pod" } else { "restoring it" };
                tracing::warn!(
                    instance_id = id.get(),
                    drift = %what.join("; "),
                    "the workload was changed behind our back; {how}"
                );
                // Audited once it is done: a correction that fails is retried, not re-audited.
                let next = if replace {
                    self.cluster.replace_pod(id).await?;
                    Next::After(REMOVING_RECHECK)
                } else {
                    self.cluster.apply(&workload).await?;
                    Next::After(APPLIED_RECHECK)
                };
                self.report(id, Observation::Corrected(format!("{}; {how}", what.join("; "))))
                    .await?;
                Ok(next)
            }
            Step::Remove => self.remove(id, status).await,
            Step::RemoveOrphan => {
                tracing::info!(
                    instance_id = id.get(),
                    "removing the workload of an instance that no longer exists"
                );
                self.report(
                    id,
                    Observation::Corrected("removed the workload of a deleted instance".into()),
                )
                .await?;
                self.remove(id, None).await
            }
            Step::Report(observation) => {
                self.report(id, observation).await?;
                Ok(Next::After(Duration::ZERO))
            }
            Step::ReportThenRemove(observation) => {
                self.report(id, observation).await?;
                self.remove(id, None).await
            }
        }
    }

    async fn remove(
        &self,
        id: InstanceId,
        status: Option<InstanceStatus>,
    ) -> Result<Next, Failure> {
        let gone = self.cluster.remove(id).await?;
        if gone && matches!(status, Some(InstanceStatus::Stopping | InstanceStatus::Deleting)) {
            self.report(id, Observation::Gone).await?;
            return Ok(Next::Park);
        }
        // The watch reports the Pod gone; this is the safety net.
        Ok(Next::After(if gone { Duration::ZERO } else { REMOVING_RECHECK }))
    }

    async fn report(&self, id: InstanceId, observation: Observation) -> Result<(), Failure> {
        let envelope = Envelope {
            key: None,
            fingerprint: None,
            actor: Actor { id: "reconciler".into(), source: Source::Reconciler },
            request_id: String::new(),
            command: Command::Observe { id, observation },
        };
        match self.instances.execute(std::slice::from_ref(&envelope)).await?.pop() {
            Some(Outcome::Rejected(e)) => {
                tracing::debug!(instance_id = id.get(), error = %e, "observation no longer applies");
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
