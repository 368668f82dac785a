//! The reconciler: keeps every instance's workload in the cluster in agreement with the
//! instance in the database, level-triggered.
//!
//! The database holds the desired state and the cluster the actual one. What is looked
//! at, and when: instances whose status waits for the cluster (CREATING, STOPPING,
//! DELETING) on every poll; an instance whose workload changed (the watch); an instance,
//! or all of them, named by an `INSTANCE_K8S_SYNC` (read from the audit trail, so every
//! replica sees it); everything at start-up and every `resync_interval`. Each look
//! decides afresh from both sides ([`decide`]), so a missed trigger only delays work.
//!
//! One instance is handled by one replica at a time: a lease row in PostgreSQL
//! ([`ReconcileRepo::claim`]) is taken before and released after. Status changes go
//! through the planner as [`Observation`]s, so they are audited (actor `reconciler`) and
//! published like every other change; the reconciler's own audit rows do not trigger it.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use futures::StreamExt;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    Actor, Backoff, Error, RepoError, Source,
    cluster::{Cluster, ClusterError, Observed, Phase, Workload},
    health::Probe,
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
    /// Most cluster API writes (apply, remove) per second.
    pub api_qps: u32,
    /// How often instances waiting for the cluster and sync requests are looked up.
    pub poll_interval: Duration,
    /// How often everything is compared.
    pub resync_interval: Duration,
    /// How long a replica holds an instance while it reconciles it.
    pub lease_ttl: Duration,
    /// Readiness fails when the watch has not been (re)established for this long.
    pub watch_silence: Duration,
}

/// What the reconciler needs from the database besides the instances themselves.
#[async_trait]
pub trait ReconcileRepo: Send + Sync {
    /// Instances whose status waits for the cluster (CREATING, STOPPING, DELETING).
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn unsettled(&self) -> Result<Vec<InstanceId>, RepoError>;

    /// Every instance that is not deleted.
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn live(&self) -> Result<Vec<InstanceId>, RepoError>;

    /// `INSTANCE_K8S_SYNC` requests audited after audit row `after` (`None`: every
    /// instance), and the newest audit row id. `after = None` only returns the id.
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
    async fn claim(&self, id: InstanceId, owner: &str, ttl: Duration) -> Result<bool, RepoError>;

    /// Gives the lease of `id` back.
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn release(&self, id: InstanceId, owner: &str) -> Result<(), RepoError>;
}

/// One decision about one instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing to change; look again after this long (or when something changes).
    Wait(Option<Duration>),
    /// Create or update the workload.
    Apply(Box<Workload>),
    /// Remove the workload (then report it gone where the status waits for that).
    Remove,
    /// Record an observation.
    Report(Observation),
    /// Record an observation, then remove what is left.
    ReportThenRemove(Observation),
}

/// How long to wait for a workload that is starting before looking again.
const PENDING_RECHECK: Duration = Duration::from_secs(2);
/// How long to wait after applying before looking again if the watch says nothing.
const APPLIED_RECHECK: Duration = Duration::from_secs(5);
/// How long to wait for a workload being removed.
const REMOVING_RECHECK: Duration = Duration::from_millis(500);

/// What the database says about one instance.
#[derive(Debug, Clone, Copy)]
pub struct Desired<'a> {
    /// Its status.
    pub status: InstanceStatus,
    /// The endpoint it records.
    pub endpoint: &'a Endpoint,
    /// What it should run.
    pub workload: &'a Workload,
}

/// Decides what to do with one instance from the database (`None`: no such instance)
/// and its workload in the cluster (`None`: none).
pub fn decide(desired: Option<Desired<'_>>, observed: Option<&Observed>) -> Step {
    use InstanceStatus as S;
    let status = desired.map(|d| d.status);
    let wants_workload = matches!(status, Some(S::Creating | S::Running));
    let instance = desired.map(|d| (d.status, d.workload));
    match (instance, observed) {
        (Some((_, workload)), None) if wants_workload => Step::Apply(Box::new(workload.clone())),
        (Some((status, _)), Some(o)) if wants_workload && o.terminating => {
            match (o.protected, status) {
                // Someone else deleted it: record that, release it, recreate it.
                (true, S::Running) => Step::ReportThenRemove(Observation::Lost(
                    "workload deleted out of band; recreating".into(),
                )),
                (true, _) => Step::Remove,
                // Our own removal is in progress.
                (false, _) => Step::Wait(Some(REMOVING_RECHECK)),
            }
        }
        (Some((_, workload)), Some(o)) if wants_workload && o.spec_hash != workload.spec_hash => {
            Step::Remove
        }
        // The Service went missing (deleted by hand): applying again restores it.
        (Some((_, workload)), Some(o)) if wants_workload && !o.service_ok => {
            Step::Apply(Box::new(workload.clone()))
        }
        (Some((status, _)), Some(o)) if wants_workload => match &o.phase {
            Phase::Running
                if status == S::Creating || desired.is_some_and(|d| *d.endpoint != o.endpoint) =>
            {
                Step::Report(Observation::Running(o.endpoint.clone()))
            }
            Phase::Running => Step::Wait(None),
            Phase::Failed(reason) => Step::Report(Observation::Failed(reason.clone())),
            Phase::Pending => Step::Wait(Some(PENDING_RECHECK)),
        },
        (_, Some(o)) if o.terminating && !o.protected => Step::Wait(Some(REMOVING_RECHECK)),
        (_, Some(_)) => Step::Remove,
        (_, None) if matches!(status, Some(S::Stopping | S::Deleting)) => {
            Step::Report(Observation::Gone)
        }
        (_, None) => Step::Wait(None),
    }
}

/// Spaces cluster writes evenly to at most `qps` per second.
struct RateLimiter {
    interval: Duration,
    next: Mutex<Instant>,
}

impl RateLimiter {
    fn new(qps: u32) -> Self {
        Self { interval: Duration::from_secs(1) / qps.max(1), next: Mutex::new(Instant::now()) }
    }

    async fn acquire(&self) {
        let at = {
            let mut next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let at = (*next).max(Instant::now());
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at).await;
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

/// The reconciler of one replica.
pub struct Reconciler {
    instances: Arc<InstanceUsecase>,
    repo: Arc<dyn ReconcileRepo>,
    cluster: Arc<dyn Cluster>,
    conf: ReconcileConf,
    owner: String,
    limiter: RateLimiter,
    watch: Arc<WatchHealth>,
}

/// When the cluster watch was last (re)established; read by readiness.
pub struct WatchHealth {
    last: Mutex<Option<Instant>>,
    bound: Duration,
}

#[async_trait]
impl Probe for WatchHealth {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    async fn check(&self) -> Result<(), RepoError> {
        let last = *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match last {
            Some(at) if at.elapsed() <= self.bound => Ok(()),
            _ => Err(RepoError::Unavailable("the cluster watch is not established".into())),
        }
    }
}

impl Reconciler {
    /// A reconciler acting as `owner` (unique per replica).
    pub fn new(
        instances: Arc<InstanceUsecase>,
        repo: Arc<dyn ReconcileRepo>,
        cluster: Arc<dyn Cluster>,
        conf: ReconcileConf,
        owner: String,
    ) -> Self {
        let watch = Arc::new(WatchHealth { last: Mutex::new(None), bound: conf.watch_silence });
        let limiter = RateLimiter::new(conf.api_qps);
        Self { instances, repo, cluster, conf, owner, limiter, watch }
    }

    /// The readiness probe of the cluster watch.
    pub fn watch_health(&self) -> Arc<WatchHealth> {
        self.watch.clone()
    }

    /// Runs until `shutdown`: the watch, the polls and the resyncs.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (changed_tx, mut changed) = mpsc::channel(8192);
        let (alive_tx, mut alive) = mpsc::channel(16);
        tokio::spawn(self.clone().supervise_watch(changed_tx, alive_tx, shutdown.clone()));

        let mut due: HashMap<InstanceId, Instant> = HashMap::new();
        // Instances the watch reported: fresh facts, handled before the backlog.
        let mut urgent: HashSet<InstanceId> = HashSet::new();
        let mut failures: HashMap<InstanceId, u32> = HashMap::new();
        let mut audit_mark: Option<i64> = None;
        let mut poll = tokio::time::interval(self.conf.poll_interval);
        let mut resync = tokio::time::interval(self.conf.resync_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut more = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                // Work is left from the last chunk: go on at once (the other branches are
                // still polled, so the watch is read between chunks).
                () = std::future::ready(()), if more => {}
                Some(id) = changed.recv() => {
                    urgent.insert(id);
                    while let Ok(id) = changed.try_recv() {
                        urgent.insert(id);
                    }
                }
                Some(()) = alive.recv() => {
                    *self.watch.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
                }
                _ = resync.tick() => {
                    if let Err(e) = self.resync(&mut due).await {
                        tracing::warn!(error = %e, "reconciler: resync failed; retrying at the next one");
                    }
                    continue;
                }
                _ = poll.tick() => {
                    if let Err(e) = self.poll(&mut due, &mut audit_mark).await {
                        tracing::warn!(error = %e, "reconciler: poll failed");
                    }
                }
            }
            self.work_off(&mut due, &mut urgent, &mut failures, &shutdown).await;
            let now = Instant::now();
            more = !urgent.is_empty() || due.values().any(|at| *at <= now);
        }
    }

    /// Instances waiting for the cluster, and sync requests, become due.
    async fn poll(
        &self,
        due: &mut HashMap<InstanceId, Instant>,
        audit_mark: &mut Option<i64>,
    ) -> Result<(), Failure> {
        let now = Instant::now();
        for id in self.repo.unsettled().await.map_err(Error::from)? {
            due.entry(id).or_insert(now);
        }
        let (requests, newest) = self.repo.sync_requests(*audit_mark).await.map_err(Error::from)?;
        if audit_mark.is_none() {
            // Start-up: the first resync covers whatever was asked before.
            *audit_mark = Some(newest);
            return Ok(());
        }
        *audit_mark = Some(newest);
        for request in requests {
            match request {
                Some(id) => {
                    due.insert(id, now);
                }
                None => self.resync(due).await?,
            }
        }
        Ok(())
    }

    /// Everything the database or the cluster knows becomes due.
    async fn resync(&self, due: &mut HashMap<InstanceId, Instant>) -> Result<(), Failure> {
        let now = Instant::now();
        let live = self.repo.live().await.map_err(Error::from)?;
        let observed = self.cluster.list().await?;
        for id in live.into_iter().chain(observed.into_iter().map(|o| o.id)) {
            due.insert(id, now);
        }
        Ok(())
    }

    /// Reconciles a bounded chunk of due instances, `concurrency` at a time: what the
    /// watch reported first, then the backlog, oldest first. The chunk is bounded so the
    /// loop soon reads the watch again (a flood of creates must not delay the news that
    /// their Pods run).
    async fn work_off(
        &self,
        due: &mut HashMap<InstanceId, Instant>,
        urgent: &mut HashSet<InstanceId>,
        failures: &mut HashMap<InstanceId, u32>,
        shutdown: &CancellationToken,
    ) {
        let now = Instant::now();
        let chunk = self.conf.concurrency.max(1) * 4;
        // Instances backing off after a failure wait for their turn even when reported.
        urgent.retain(|id| due.get(id).is_none_or(|at| *at <= now || !failures.contains_key(id)));
        let mut ready: Vec<InstanceId> = urgent.iter().copied().take(chunk).collect();
        for id in &ready {
            urgent.remove(id);
            due.remove(id);
        }
        if ready.len() < chunk {
            let mut backlog: Vec<(Instant, InstanceId)> =
                due.iter().filter(|(_, at)| **at <= now).map(|(id, at)| (*at, *id)).collect();
            backlog.sort_unstable();
            for (_, id) in backlog.into_iter().take(chunk - ready.len()) {
                due.remove(&id);
                ready.push(id);
            }
        }
        if ready.is_empty() {
            return;
        }
        let mut results = futures::stream::iter(ready)
            .map(|id| async move { (id, self.reconcile(id).await) })
            .buffer_unordered(self.conf.concurrency.max(1));
        let mut seen = HashSet::new();
        while let Some((id, result)) = results.next().await {
            seen.insert(id);
            match result {
                Ok(Some(after)) => {
                    failures.remove(&id);
                    due.insert(id, Instant::now() + after);
                }
                Ok(None) => {
                    failures.remove(&id);
                }
                Err(e) => {
                    metrics::counter!("resource_reconcile_errors_total").increment(1);
                    let attempt = failures.entry(id).or_insert(0);
                    *attempt += 1;
                    let delay = Backoff::new(Duration::from_millis(200), Duration::from_secs(30))
                        .delay(*attempt);
                    tracing::warn!(instance_id = id.get(), attempt = *attempt, error = %e,
                        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        "reconcile failed; backing off");
                    due.insert(id, Instant::now() + delay);
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
        }
    }

    /// Reconciles one instance under its lease; when to look again (`None`: when
    /// something changes).
    async fn reconcile(&self, id: InstanceId) -> Result<Option<Duration>, Failure> {
        let ttl = self.conf.lease_ttl;
        if !self.repo.claim(id, &self.owner, ttl).await.map_err(Error::from)? {
            // Another replica is on it; it will see what we would have.
            return Ok(Some(ttl));
        }
        let result = self.reconcile_held(id).await;
        if let Err(e) = self.repo.release(id, &self.owner).await {
            tracing::warn!(instance_id = id.get(), error = %e, "could not release a reconcile lease; it expires");
        }
        result
    }

    async fn reconcile_held(&self, id: InstanceId) -> Result<Option<Duration>, Failure> {
        let instance = match self.instances.get(id).await {
            Ok(instance) => Some(instance),
            Err(Error::InstanceNotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let workload = match instance.as_ref().map(Workload::of).transpose() {
            Ok(workload) => workload,
            Err(e) => {
                // Only rows written before the container schema existed can get here.
                self.report(id, Observation::Failed(format!("invalid config_json: {e}"))).await?;
                return Ok(None);
            }
        };
        let observed = self.cluster.observe(id).await?;
        let desired = instance.as_ref().zip(workload.as_ref()).map(|(i, workload)| Desired {
            status: i.status,
            endpoint: &i.endpoint,
            workload,
        });
        let step = decide(desired, observed.as_ref());
        let name = match &step {
            Step::Wait(_) => "wait",
            Step::Apply(_) => "apply",
            Step::Remove => "remove",
            Step::Report(_) | Step::ReportThenRemove(_) => "report",
        };
        metrics::counter!("resource_reconcile_operations_total", "step" => name).increment(1);
        match step {
            Step::Wait(after) => Ok(after),
            Step::Apply(workload) => {
                // One write for the Pod, one for the Service.
                self.limiter.acquire().await;
                if !workload.container.ports.is_empty() {
                    self.limiter.acquire().await;
                }
                self.cluster.apply(&workload).await?;
                Ok(Some(APPLIED_RECHECK))
            }
            Step::Remove => self.remove(id, instance.map(|i| i.status)).await,
            Step::Report(observation) => {
                self.report(id, observation).await?;
                Ok(Some(Duration::ZERO))
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
    ) -> Result<Option<Duration>, Failure> {
        // Up to three writes: the Service, the finalizer, the Pod.
        for _ in 0..3 {
            self.limiter.acquire().await;
        }
        let gone = self.cluster.remove(id).await?;
        if gone && matches!(status, Some(InstanceStatus::Stopping | InstanceStatus::Deleting)) {
            self.report(id, Observation::Gone).await?;
            return Ok(None);
        }
        Ok(Some(if gone { Duration::ZERO } else { REMOVING_RECHECK }))
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

    /// Keeps the watch running: restarts it with backoff when it fails or ends.
    async fn supervise_watch(
        self: Arc<Self>,
        changed: mpsc::Sender<InstanceId>,
        alive: mpsc::Sender<()>,
        shutdown: CancellationToken,
    ) {
        let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut attempt = 0;
        loop {
            let watch = self.cluster.watch(changed.clone(), alive.clone());
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                result = watch => result,
            };
            match result {
                Ok(()) => attempt = 0,
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "cluster watch failed; restarting it");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(if attempt == 0 { Duration::ZERO } else { backoff.delay(attempt) }) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::biz::cluster::ContainerConfig;
    use crate::biz::instance::GpuType;

    fn workload(hash: &str) -> Workload {
        Workload {
            id: InstanceId::try_from(1).unwrap(),
            owner: "u".into(),
            image: "nginx".into(),
            cpu: 1,
            memory_mb: 64,
            gpu: GpuType::None,
            container: ContainerConfig::default(),
            spec_hash: hash.into(),
        }
    }

    fn observed(hash: &str, phase: Phase) -> Observed {
        Observed {
            id: InstanceId::try_from(1).unwrap(),
            spec_hash: hash.into(),
            phase,
            endpoint: Endpoint { pod_ip: "10.0.0.1".into(), ..Endpoint::default() },
            terminating: false,
            protected: true,
            service_ok: true,
        }
    }

    #[test]
    fn the_decision_table() {
        use InstanceStatus as S;
        let w = workload("a");
        let running = observed("a", Phase::Running);
        let gone_by_hand = Observed { terminating: true, ..running.clone() };
        let ours_going = Observed { terminating: true, protected: false, ..running.clone() };
        let outdated = observed("old", Phase::Running);
        let pending = observed("a", Phase::Pending);
        let failing = observed("a", Phase::Failed("ErrImagePull".into()));
        let no_service = Observed { service_ok: false, ..running.clone() };
        let none = Endpoint::default();
        let at = |status| Some(Desired { status, endpoint: &none, workload: &w });
        let cases: Vec<(Option<Desired<'_>>, Option<&Observed>, Step)> = vec![
            (at(S::Creating), None, Step::Apply(Box::new(w.clone()))),
            (at(S::Running), None, Step::Apply(Box::new(w.clone()))),
            (
                at(S::Creating),
                Some(&running),
                Step::Report(Observation::Running(running.endpoint.clone())),
            ),
            (at(S::Creating), Some(&outdated), Step::Remove),
            (at(S::Creating), Some(&pending), Step::Wait(Some(PENDING_RECHECK))),
            (
                at(S::Running),
                Some(&failing),
                Step::Report(Observation::Failed("ErrImagePull".into())),
            ),
            (
                at(S::Running),
                Some(&gone_by_hand),
                Step::ReportThenRemove(Observation::Lost(
                    "workload deleted out of band; recreating".into(),
                )),
            ),
            (at(S::Running), Some(&ours_going), Step::Wait(Some(REMOVING_RECHECK))),
            (at(S::Stopping), Some(&running), Step::Remove),
            (at(S::Stopping), None, Step::Report(Observation::Gone)),
            (at(S::Deleting), None, Step::Report(Observation::Gone)),
            (at(S::Stopped), None, Step::Wait(None)),
            (at(S::Failed), Some(&running), Step::Remove),
            (None, Some(&running), Step::Remove),
            (None, None, Step::Wait(None)),
            (at(S::Running), Some(&no_service), Step::Apply(Box::new(w.clone()))),
        ];
        for (desired, obs, expected) in cases {
            assert_eq!(decide(desired, obs), expected, "{desired:?} / {obs:?}");
        }
        let known = running.endpoint.clone();
        let converged = Desired { status: S::Running, endpoint: &known, workload: &w };
        assert_eq!(decide(Some(converged), Some(&running)), Step::Wait(None), "nothing to do");
    }
}
