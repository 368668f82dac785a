//! Instances: the entity, its lifecycle and the use cases that drive it.
//!
//! Nothing here knows about PostgreSQL, Kubernetes or a transport; those are reached
//! through the traits declared in this module.

use std::{
    collections::HashMap,
    fmt,
    str::FromStr,
    sync::{Arc, Mutex, Weak},
};

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};

use super::{
    Actor, AuditEntry, Error, RepoError, audit::Outcome as AuditOutcome, quota::QuotaConf,
};

mod command;
mod label;
mod spec;
#[cfg(test)]
mod usecase_tests;

pub use command::*;
pub use label::*;
pub use spec::*;

use super::page::{page_limit, split_page};
pub use super::{
    id::InstanceId,
    page::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE},
};

/// Lifecycle status of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceStatus {
    /// Accepted; its workload is being created.
    Creating,
    /// Its workload runs.
    Running,
    /// Its workload is being removed before it counts as stopped.
    Stopping,
    /// Stopped; can be started again.
    Stopped,
    /// Its workload is being removed before it counts as deleted.
    Deleting,
    /// Gone for good; kept for its audit trail.
    Deleted,
    /// Its workload could not run.
    Failed,
}

// === impl InstanceStatus ===

impl InstanceStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [InstanceStatus; 7] = [
        InstanceStatus::Creating,
        InstanceStatus::Running,
        InstanceStatus::Stopping,
        InstanceStatus::Stopped,
        InstanceStatus::Deleting,
        InstanceStatus::Deleted,
        InstanceStatus::Failed,
    ];

    /// The stored and wire name (`"RUNNING"`).
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Creating => "CREATING",
            InstanceStatus::Running => "RUNNING",
            InstanceStatus::Stopping => "STOPPING",
            InstanceStatus::Stopped => "STOPPED",
            InstanceStatus::Deleting => "DELETING",
            InstanceStatus::Deleted => "DELETED",
            InstanceStatus::Failed => "FAILED",
        }
    }

    /// Whether the transition table allows moving from `self` to `to`.
    pub fn can_become(self, to: InstanceStatus) -> bool {
        use InstanceStatus::*;
        matches!(
            (self, to),
            (Creating, Running | Failed | Stopping | Deleting)
                | (Running, Stopping | Deleting | Failed | Creating)
                | (Stopping, Stopped)
                | (Stopped, Creating | Deleting)
                | (Failed, Creating | Deleting)
                | (Deleting, Deleted)
        )
    }

    /// The statuses that wait for the cluster to catch up.
    pub const AWAITING_CLUSTER: [InstanceStatus; 3] =
        [InstanceStatus::Creating, InstanceStatus::Stopping, InstanceStatus::Deleting];

    /// Whether this status waits for the cluster to catch up.
    pub fn awaits_cluster(self) -> bool {
        Self::AWAITING_CLUSTER.contains(&self)
    }

    /// Whether nothing can follow.
    pub fn is_terminal(self) -> bool {
        self == InstanceStatus::Deleted
    }
}

impl fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for InstanceStatus {
    type Err = Error;

    /// Accepts the name in any case.
    fn from_str(s: &str) -> Result<Self, Error> {
        InstanceStatus::ALL
            .into_iter()
            .find(|status| status.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::invalid(
                    "status",
                    format!(
                        "unknown status {s:?}; expected one of CREATING, RUNNING, STOPPING, STOPPED, DELETING, DELETED, FAILED"
                    ),
                )
            })
    }
}

/// Where a running instance can be reached.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Endpoint {
    /// Name of the Pod, once created.
    pub pod_name: String,
    /// IP of the Pod, once scheduled.
    pub pod_ip: String,
    /// In-cluster DNS name of the Service.
    pub service_host: String,
    /// Exposed ports.
    pub ports: Vec<Port>,
}

/// One exposed port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Port name.
    pub name: String,
    /// Port number.
    pub port: i32,
    /// `TCP` or `UDP`.
    pub protocol: String,
}

/// A compute instance: the aggregate root.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// Snowflake id.
    pub id: InstanceId,
    /// Opaque owner id.
    pub user_id: String,
    /// Display name.
    pub name: String,
    /// Lifecycle status.
    pub status: InstanceStatus,
    /// Why it is in its status, or empty.
    pub status_reason: String,
    /// What it runs.
    pub spec: InstanceSpec,
    /// Where it can be reached.
    pub endpoint: Endpoint,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When it was deleted.
    pub deleted_at: Option<DateTime<Utc>>,
    /// Optimistic-concurrency version, bumped by every change.
    pub version: i64,
    /// Its labels (valid by [`validate_labels`]).
    pub labels: Labels,
}

// === impl Instance ===

impl Instance {
    /// Moves the instance to `to`, or says why it cannot.
    ///
    /// # Errors
    /// `IllegalTransition` when the table forbids the move.
    pub fn transition(
        &mut self,
        to: InstanceStatus,
        reason: impl Into<String>,
    ) -> Result<(), Error> {
        if !self.status.can_become(to) {
            return Err(Error::IllegalTransition {
                instance_id: self.id.get(),
                from: self.status,
                to,
            });
        }
        self.status = to;
        self.status_reason = reason.into();
        Ok(())
    }
}

/// Which instances a list returns. Every filter present must hold; the SQL of
/// `InstanceRepo::list` and [`ListFilter::matches`] decide alike.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ListFilter {
    /// Only this owner's.
    pub user_id: Option<String>,
    /// Only in this status; `None` means every status but `DELETED`.
    pub status: Option<InstanceStatus>,
    /// Only with exactly this name.
    pub name: Option<String>,
    /// Only those whose labels match this selector.
    pub labels: Option<LabelSelector>,
    /// Only with this GPU type (`GpuType::None`: without a GPU).
    pub gpu: Option<GpuType>,
    /// Only running exactly this image reference.
    pub image: Option<String>,
    /// Only created strictly after this time.
    pub created_after: Option<DateTime<Utc>>,
    /// Only created strictly before this time.
    pub created_before: Option<DateTime<Utc>>,
}

// === impl ListFilter ===

impl ListFilter {
    /// Whether `instance` is one this filter lists, exactly as the list's SQL decides:
    /// with `status: None`, every status but `DELETED` (a deleted instance has
    /// `deleted_at` set).
    pub fn matches(&self, instance: &Instance) -> bool {
        let status_ok = match self.status {
            Some(status) => instance.status == status,
            None => instance.deleted_at.is_none(),
        };
        status_ok && self.matches_ignoring_deleted_default(instance)
    }

    /// Like [`ListFilter::matches`], but `status: None` means any status, `DELETED`
    /// included — what a watch wants, since a deletion is news. (`Some(status)` still
    /// asks for that status.)
    pub fn matches_ignoring_deleted_default(&self, instance: &Instance) -> bool {
        self.status.is_none_or(|status| instance.status == status)
            && self.user_id.as_ref().is_none_or(|u| *u == instance.user_id)
            && self.name.as_ref().is_none_or(|n| *n == instance.name)
            && self.labels.as_ref().is_none_or(|s| s.matches(&instance.labels))
            && self.gpu.is_none_or(|g| g == instance.spec.gpu)
            && self.image.as_ref().is_none_or(|i| *i == instance.spec.image)
            && self.created_after.is_none_or(|t| instance.created_at > t)
            && self.created_before.is_none_or(|t| instance.created_at < t)
    }

    /// Checks what the types do not: text fields within bounds, and a time window that
    /// is not empty.
    ///
    /// # Errors
    /// `InvalidArgument` naming the field.
    pub fn validate(&self) -> Result<(), Error> {
        for (field, value) in
            [("user_id", &self.user_id), ("name", &self.name), ("image", &self.image)]
        {
            if let Some(value) = value {
                validate_text(field, value)?;
            }
        }
        if let (Some(after), Some(before)) = (self.created_after, self.created_before)
            && after >= before
        {
            return Err(Error::invalid(
                "created_after",
                format!("must be earlier than created_before ({after} is not before {before})"),
            ));
        }
        Ok(())
    }
}

/// One keyset-paginated read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Which instances.
    pub filter: ListFilter,
    /// Only ids strictly below this one (the last id of the previous page).
    pub before: Option<InstanceId>,
    /// Most rows to return.
    pub limit: u32,
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The items, newest first.
    pub items: Vec<T>,
    /// Where the next page starts, if there is one.
    pub next: Option<InstanceId>,
}

/// Persistence of instances.
#[async_trait]
pub trait InstanceRepo: Send + Sync {
    /// Loads one instance, deleted or not.
    ///
    /// # Errors
    /// Implementations MUST return `RepoError::NotFound` when no row has `id`.
    async fn get(&self, id: InstanceId) -> Result<Instance, RepoError>;

    /// Loads at most `query.limit` instances matching the filter with ids below
    /// `query.before`, in descending id order. Implementations MUST NOT skip rows with an
    /// offset: the cost of a page must not depend on its depth.
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn list(&self, query: &ListQuery) -> Result<Vec<Instance>, RepoError>;

    /// What an already processed key recorded, if the key was processed.
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn processed(&self, key: EventKey) -> Result<Option<Processed>, RepoError>;

    /// Runs one unit of work in one transaction: loads, locking them in id order, the
    /// live or deleted instances among `ids`, which of `keys` were already processed, and
    /// the usage counters of `owners`, of the loaded instances' owners and of every GPU
    /// type; hands them to `work`; writes the `Changes` it returns; commits.
    ///
    /// `work` may be called again when the transaction is retried, and must then
    /// decide afresh from the snapshot it is given.
    ///
    /// # Errors
    /// Implementations MUST return `RepoError::Conflict` when a concurrent writer won
    /// (unique key, version moved, a usage counter moved past a limit, serialization
    /// failure or deadlock), so the caller can
    /// retry, and `RepoError::Unavailable` when the store does not answer.
    async fn transact(
        &self,
        ids: &[InstanceId],
        keys: &[EventKey],
        owners: &[String],
        work: &mut (dyn FnMut(Snapshot) -> Changes + Send),
    ) -> Result<(), RepoError>;
}

/// What a processed key recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    /// The instance it concerned.
    pub instance_id: i64,
    /// What the create it made asked for ([`create_fingerprint`]); `None` for other
    /// commands, and for keys recorded before fingerprints were.
    pub fingerprint: Option<[u8; 16]>,
}

/// How often a unit of work is retried after losing a race to a concurrent writer.
const CONFLICT_RETRIES: usize = 5;

/// Queues this process's API mutations of one instance in memory, one at a time, so
/// that concurrent writers of a hot instance wait here rather than on its row lock, each
/// holding a pooled database connection: one contended instance cannot take the pool.
/// (The row lock still serialises writers across processes and entry points.)
#[derive(Default)]
struct Gates {
    open: Mutex<GateMap>,
}

#[derive(Default)]
struct GateMap {
    gates: HashMap<InstanceId, Weak<tokio::sync::Mutex<()>>>,
    /// Dead entries are swept when the map reaches this size.
    sweep_at: usize,
}

// === impl Gates ===

impl Gates {
    /// The gate of `id`, shared with every caller holding it now.
    fn of(&self, id: InstanceId) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(gate) = map.gates.get(&id).and_then(Weak::upgrade) {
            return gate;
        }
        if map.gates.len() >= map.sweep_at {
            map.gates.retain(|_, gate| gate.strong_count() > 0);
            map.sweep_at = (map.gates.len() * 2).max(64);
        }
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        map.gates.insert(id, Arc::downgrade(&gate));
        gate
    }
}

/// Most API creates applied in one unit of work.
const MAX_COMBINED: usize = 256;

/// Most units of work of API creates running at once in one process.
const MAX_DRAINERS: usize = 4;

/// Most API creates waiting for a unit of work; more are answered 503 at once.
const MAX_WAITING: usize = 4096;

/// API creates waiting to be applied together. Every create of a GPU type changes that
/// type's usage counter, and a counter row is locked until its transaction commits: one
/// unit of work per create would queue a burst of them on that lock, each holding a
/// pooled connection. So creates that arrive while units of work are running are applied
/// together in the next one (group commit): no wait when there is no burst. A few units
/// run at once, so one stuck on a counter's lock does not hold every other create back.
#[derive(Default)]
struct Combiner {
    queue: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    creates: Vec<Queued>,
    /// Tasks applying them.
    drainers: usize,
}

/// A create waiting for its unit of work.
struct Queued {
    envelope: Envelope,
    done: tokio::sync::oneshot::Sender<Result<Outcome, Error>>,
    /// Closed when the caller went away (a request answered 504): the create is then
    /// dropped before its unit of work starts, never applied behind the caller's back.
    gone: tokio::sync::oneshot::Receiver<()>,
}

/// Counts a draining task out if it ends by a panic, so creates keep being applied. (It
/// ends normally only under the queue's lock, having found it empty.)
struct Draining<'a>(&'a Combiner);

impl Drop for Draining<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.lock().drainers -= 1;
        }
    }
}

// === impl Combiner ===

impl Combiner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Reads and lifecycle of instances.
#[derive(Clone)]
pub struct InstanceUsecase {
    repo: Arc<dyn InstanceRepo>,
    limits: Limits,
    cluster_enabled: bool,
    quota: QuotaConf,
    ids: Arc<crate::biz::snowflake::Snowflake>,
    gates: Arc<Gates>,
    creates: Arc<Combiner>,
}

/// A new instance asked for through the API.
#[derive(Debug, Clone)]
pub struct NewInstance {
    /// The owner.
    pub user_id: String,
    /// Display name.
    pub name: String,
    /// What it runs.
    pub spec: InstanceSpec,
    /// Optional idempotency key, unique per owner.
    pub request_id: Option<String>,
    /// Its labels.
    pub labels: Labels,
}

// === impl InstanceUsecase ===

impl InstanceUsecase {
    /// Use cases over `repo`, creating ids with `ids`. Without a cluster
    /// (`cluster_enabled` false) the steps that would wait for it complete at once.
    pub fn new(
        repo: Arc<dyn InstanceRepo>,
        limits: Limits,
        cluster_enabled: bool,
        ids: Arc<crate::biz::snowflake::Snowflake>,
    ) -> Self {
        Self {
            repo,
            limits,
            cluster_enabled,
            quota: QuotaConf::default(),
            ids,
            gates: Arc::default(),
            creates: Arc::default(),
        }
    }

    /// These use cases with owners' default limits and the GPU capacity of `quota`
    /// (without: unlimited, though usage is counted all the same).
    #[must_use]
    pub fn with_quota(mut self, quota: QuotaConf) -> Self {
        self.quota = quota;
        self
    }

    /// The ranges specs and names are checked against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Creates an instance with a new id. With a `request_id`, the same request (owner,
    /// name and spec) returns the instance it created the first time, as it is now,
    /// whatever happened to it since; another request with that id is refused.
    ///
    /// # Errors
    /// `InvalidSpec`, `InvalidArgument`, `RequestIdReused`, `Unavailable`.
    pub async fn create(
        &self,
        actor: Actor,
        audit_id: String,
        new: NewInstance,
    ) -> Result<Instance, Error> {
        if let Some(request_id) = &new.request_id {
            validate_text("request_id", request_id)?;
        }
        // The whole create, including the audit of a refused request_id, runs to completion
        // in its own task even if the caller goes away once its unit of work has started
        // (see `run_to_completion`); dropped with this future, `_waiting` says it went.
        let (_waiting, gone) = tokio::sync::oneshot::channel::<()>();
        let this = self.clone();
        tokio::spawn(async move { this.create_to_completion(actor, audit_id, new, gone).await })
            .await
            .map_err(|e| Error::Internal(Arc::new(RepoError::Internal(e.to_string().into()))))?
    }

    async fn create_to_completion(
        &self,
        actor: Actor,
        audit_id: String,
        new: NewInstance,
        gone: tokio::sync::oneshot::Receiver<()>,
    ) -> Result<Instance, Error> {
        let key = new.request_id.as_deref().map(|r| idempotency_key(&new.user_id, r));
        let id = InstanceId::generated(self.ids.next_id());
        // What this request asks for: a retry asks for the same, whatever happened since.
        let fingerprint =
            key.map(|_| create_fingerprint(&new.user_id, &new.name, &new.spec, &new.labels));
        let command = Command::Create {
            id,
            user_id: new.user_id.clone(),
            name: new.name.clone(),
            spec: new.spec.clone(),
            labels: new.labels.clone(),
        };
        let envelope = Envelope { key, fingerprint, actor, request_id: audit_id, command };
        match self.execute_combined(envelope.clone(), gone).await? {
            Outcome::Applied(instance) => Ok(instance),
            Outcome::Duplicate => {
                let prior = self.prior(key).await?;
                let instance = self.get(InstanceId::try_from(prior.instance_id)?).await?;
                // A key recorded before fingerprints were: compared with the instance.
                let same = prior.fingerprint.is_some()
                    || (instance.user_id == new.user_id
                        && instance.name == new.name
                        && instance.spec == new.spec
                        && instance.labels == new.labels);
                if same {
                    return Ok(instance);
                }
                let error =
                    Error::RequestIdReused { request_id: new.request_id.unwrap_or_default() };
                self.audit_refusal(&envelope, instance.id, &error).await?;
                Err(error)
            }
            // The refusal is on the trail of the instance the request id made first.
            Outcome::Rejected(Error::RequestIdReused { .. }) => {
                // The planner names the id it knows, the audit id; the client's is this one.
                let error =
                    Error::RequestIdReused { request_id: new.request_id.unwrap_or_default() };
                let prior = self.prior(key).await?;
                self.audit_refusal(&envelope, InstanceId::try_from(prior.instance_id)?, &error)
                    .await?;
                Err(error)
            }
            Outcome::Ignored { instance: Some(instance), .. } => Ok(instance),
            Outcome::Rejected(e) => Err(e),
            Outcome::Ignored { instance: None, .. } | Outcome::Unknown(_) => Err(Error::Internal(
                Arc::new(RepoError::Internal("unexpected create outcome".into())),
            )),
        }
    }

    /// Applies a create together with the others waiting (see [`Combiner`]).
    ///
    /// # Errors
    /// `Unavailable` when [`MAX_WAITING`] creates wait already (the database is slow or
    /// stalled); those of [`InstanceUsecase::execute`].
    async fn execute_combined(
        &self,
        envelope: Envelope,
        gone: tokio::sync::oneshot::Receiver<()>,
    ) -> Result<Outcome, Error> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        let lead = {
            let mut waiting = self.creates.lock();
            if waiting.creates.len() >= MAX_WAITING {
                waiting.creates.retain_mut(|q| {
                    !matches!(
                        q.gone.try_recv(),
                        Err(tokio::sync::oneshot::error::TryRecvError::Closed)
                    )
                });
            }
            if waiting.creates.len() >= MAX_WAITING {
                return Err(Error::Unavailable(Arc::new(RepoError::Unavailable(
                    format!("{MAX_WAITING} creates are waiting for the database").into(),
                ))));
            }
            waiting.creates.push(Queued { envelope, done, gone });
            let lead = waiting.drainers < MAX_DRAINERS;
            waiting.drainers += usize::from(lead);
            lead
        };
        if lead {
            let this = self.clone();
            tokio::spawn(async move { this.drain_creates().await });
        }
        outcome.await.map_err(|_| Error::internal("a combined create was dropped"))?
    }

    async fn drain_creates(&self) {
        let _draining = Draining(&self.creates);
        loop {
            let batch: Vec<Queued> = {
                let mut waiting = self.creates.lock();
                if waiting.creates.is_empty() {
                    waiting.drainers -= 1;
                    return;
                }
                let n = waiting.creates.len().min(MAX_COMBINED);
                waiting.creates.drain(..n).collect()
            };
            let (mut envelopes, mut done) = (Vec::new(), Vec::new());
            for mut queued in batch {
                if matches!(
                    queued.gone.try_recv(),
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed)
                ) {
                    tracing::debug!(request_id = %queued.envelope.request_id, "caller gone before its turn; create not applied");
                    continue;
                }
                envelopes.push(queued.envelope);
                done.push(queued.done);
            }
            if envelopes.is_empty() {
                continue;
            }
            match self.execute(&envelopes).await {
                Ok(outcomes) => {
                    for (done, outcome) in done.into_iter().zip(outcomes) {
                        let _ = done.send(Ok(outcome));
                    }
                }
                // Lost every race for a counter: each create on its own, so each caller
                // is told about its own instance.
                Err(Error::VersionConflict { .. }) if envelopes.len() > 1 => {
                    for (envelope, done) in envelopes.iter().zip(done) {
                        let outcome = self.execute(std::slice::from_ref(envelope)).await;
                        let _ = done.send(outcome.map(|mut o| o.remove(0)));
                    }
                }
                Err(e) => {
                    for done in done {
                        let _ = done.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// What the processed `key` recorded.
    async fn prior(&self, key: Option<EventKey>) -> Result<Processed, Error> {
        let key = key.expect("only keyed commands are duplicates or reused");
        self.repo.processed(key).await?.ok_or_else(|| {
            Error::Internal(Arc::new(RepoError::Internal(
                "processed key without an instance".into(),
            )))
        })
    }

    /// Records a refused command on the instance it concerned, in a unit of work of its
    /// own: the refusal changes nothing else. Used where the refusal is decided outside
    /// the planner (a create whose request_id made another instance).
    async fn audit_refusal(
        &self,
        envelope: &Envelope,
        id: InstanceId,
        error: &Error,
    ) -> Result<(), Error> {
        let reason = format!("{}: {error}", error.reason());
        let mut work = |snapshot: Snapshot| {
            let snapshot_of = snapshot.instances.get(&id).map(command::snapshot_json);
            Changes {
                audit: vec![AuditEntry {
                    instance_id: id.get(),
                    actor: envelope.actor.clone(),
                    action: envelope.command.action(),
                    outcome: AuditOutcome::Rejected,
                    reason: reason.clone(),
                    request_id: envelope.request_id.clone(),
                    before: snapshot_of.clone(),
                    after: snapshot_of,
                    at: Utc::now().trunc_subsecs(6),
                }],
                ..Changes::default()
            }
        };
        self.repo.transact(&[id], &[], &[], &mut work).await.map_err(Error::from)
    }

    /// Runs one lifecycle command on an existing instance and returns it afterwards.
    ///
    /// # Errors
    /// `InstanceNotFound`, `IllegalTransition`, `NotAllowed`, `InvalidSpec`, `Unavailable`.
    pub async fn act(
        &self,
        actor: Actor,
        audit_id: String,
        command: Command,
    ) -> Result<Instance, Error> {
        let id = command.instance_id();
        let envelope =
            Envelope { key: None, fingerprint: None, actor, request_id: audit_id, command };
        match self.run_to_completion(envelope).await? {
            Outcome::Applied(instance) | Outcome::Ignored { instance: Some(instance), .. } => {
                Ok(instance)
            }
            Outcome::Rejected(e) => Err(e),
            Outcome::Unknown(id) => Err(Error::InstanceNotFound { instance_id: id.get() }),
            Outcome::Duplicate | Outcome::Ignored { instance: None, .. } => {
                Err(Error::InstanceNotFound { instance_id: id.map_or(0, InstanceId::get) })
            }
        }
    }

    /// Executes one command in a task of its own: once started it runs to completion
    /// (row, audit and outbox committed together) even if the caller goes away, since a
    /// database connection must not be abandoned mid-transaction (sqlx#563). Commands on
    /// one instance pass its gate one at a time; one whose caller went away (a request
    /// answered 504) while it waited for its turn is dropped, never applied later.
    async fn run_to_completion(&self, envelope: Envelope) -> Result<Outcome, Error> {
        let this = self.clone();
        let gate = envelope.command.instance_id().map(|id| self.gates.of(id));
        // Dropped with this future: the task then knows its caller is gone.
        let (_waiting, gone) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _turn = match &gate {
                Some(gate) => tokio::select! {
                    biased;
                    _ = gone => {
                        tracing::debug!(request_id = %envelope.request_id, "caller gone before its turn; not applied");
                        return Ok(None);
                    }
                    turn = gate.lock() => Some(turn),
                },
                None => None,
            };
            this.execute(std::slice::from_ref(&envelope)).await.map(Some)
        });
        let outcomes = task
            .await
            .map_err(|e| Error::Internal(Arc::new(RepoError::Internal(e.to_string().into()))))??;
        // `None` only when this future was dropped: nobody reads it.
        let mut outcomes = outcomes.ok_or_else(|| {
            Error::Internal(Arc::new(RepoError::Internal("abandoned command".into())))
        })?;
        Ok(outcomes.remove(0))
    }

    /// Applies `batch` in order, in one transaction, and says how each command ended.
    /// Events already processed (same key) are `Duplicate`s with no effect.
    ///
    /// # Errors
    /// The whole batch failed and nothing was written: `Unavailable` (retry later),
    /// `Internal`, or `VersionConflict` after repeated lost races.
    pub async fn execute(&self, batch: &[Envelope]) -> Result<Vec<Outcome>, Error> {
        let mut ids: Vec<InstanceId> =
            batch.iter().filter_map(|e| e.command.instance_id()).collect();
        ids.sort_unstable();
        ids.dedup();
        let keys: Vec<EventKey> = batch.iter().filter_map(|e| e.key).collect();
        let mut owners: Vec<String> = batch
            .iter()
            .filter_map(|e| match &e.command {
                Command::Create { user_id, .. } => Some(user_id.clone()),
                _ => None,
            })
            .collect();
        owners.sort_unstable();
        owners.dedup();
        let mut outcomes = Vec::new();
        for attempt in 1..=CONFLICT_RETRIES {
            let ctx = Context {
                // As PostgreSQL keeps it: the first answer and every later read agree.
                now: Utc::now().trunc_subsecs(6),
                limits: self.limits,
                cluster_enabled: self.cluster_enabled,
                quota: self.quota,
            };
            let mut work = |snapshot: Snapshot| {
                let (o, changes) = plan(batch, snapshot, &ctx);
                outcomes = o;
                changes
            };
            match self.repo.transact(&ids, &keys, &owners, &mut work).await {
                Ok(()) => {
                    count_refusals(batch, &outcomes);
                    return Ok(outcomes);
                }
                Err(RepoError::Conflict) if attempt < CONFLICT_RETRIES => {
                    tracing::debug!(attempt, "unit of work lost a race; retrying");
                }
                Err(RepoError::Conflict) => {
                    let instance_id = ids.first().map_or(0, |id| id.get());
                    return Err(Error::VersionConflict { instance_id });
                }
                Err(e) => return Err(e.into()),
            }
        }
        unreachable!("the loop returns on its last attempt")
    }

    /// Loads one instance, deleted or not.
    ///
    /// # Errors
    /// `InstanceNotFound`, `Unavailable`.
    pub async fn get(&self, id: InstanceId) -> Result<Instance, Error> {
        self.repo.get(id).await.map_err(|e| match e {
            RepoError::NotFound => Error::InstanceNotFound { instance_id: id.get() },
            other => other.into(),
        })
    }

    /// Loads one page, newest first. `page_size` 0 means [`DEFAULT_PAGE_SIZE`].
    ///
    /// # Errors
    /// `InvalidPageSize` outside `0..=MAX_PAGE_SIZE`; `Unavailable`.
    pub async fn list(
        &self,
        filter: ListFilter,
        page_size: i64,
        before: Option<InstanceId>,
    ) -> Result<Page<Instance>, Error> {
        let size = page_limit(page_size)?;
        filter.validate()?;
        // One extra row tells whether another page follows without a second query.
        let query = ListQuery { filter, before, limit: size + 1 };
        let (items, next) = split_page(self.repo.list(&query).await?, size, |i| i.id);
        Ok(Page { items, next })
    }
}

/// Counts the commands of `batch` refused for quota or capacity
/// (`resource_quota_refusals_total{reason, source}`): API commands refused, and creates
/// from events recorded FAILED.
fn count_refusals(batch: &[Envelope], outcomes: &[Outcome]) {
    for (envelope, outcome) in batch.iter().zip(outcomes) {
        let reason = match outcome {
            Outcome::Rejected(
                e @ (Error::QuotaExceeded { .. } | Error::CapacityExhausted { .. }),
            ) => e.reason(),
            Outcome::Applied(i)
                if matches!(envelope.command, Command::Create { .. })
                    && i.status == InstanceStatus::Failed =>
            {
                match i.status_reason.as_str() {
                    "QUOTA_EXCEEDED" => "QUOTA_EXCEEDED",
                    "CAPACITY_EXHAUSTED" => "CAPACITY_EXHAUSTED",
                    _ => continue,
                }
            }
            _ => continue,
        };
        metrics::counter!(
            "resource_quota_refusals_total",
            "reason" => reason,
            "source" => envelope.actor.source.as_str()
        )
        .increment(1);
    }
}

/// What a create asks for (owner, name, the whole spec, the labels), as a digest: equal
/// for equal requests, whatever order their `config_json` keys came in.
pub fn create_fingerprint(
    user_id: &str,
    name: &str,
    spec: &InstanceSpec,
    labels: &Labels,
) -> [u8; 16] {
    use sha2::Digest;
    // serde_json maps are ordered by key, so this text is canonical.
    let mut canonical = serde_json::json!({
        "user_id": user_id,
        "name": name,
        "spec": {
            "cpu": spec.cpu,
            "memory": spec.memory_mb,
            "gpu": spec.gpu.code(),
            "image": spec.image,
            "config_json": spec.config,
        },
    });
    // Only when there are labels: the digests of requests made before labels existed
    // (recorded for their retries) stay the same.
    if !labels.is_empty() {
        canonical["labels"] = serde_json::json!(labels);
    }
    let digest = sha2::Sha256::digest(canonical.to_string().as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// The de-duplication key of an API create: one per owner and request id.
pub fn idempotency_key(user_id: &str, request_id: &str) -> EventKey {
    // FNV-1a 128 over a length-prefixed encoding: distinct (user, request) pairs never
    // share an input, and the key space is disjoint from event digests in practice.
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    let mut feed = |bytes: &[u8]| {
        for b in (bytes.len() as u64).to_be_bytes().iter().chain(bytes) {
            h ^= u128::from(*b);
            h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
        }
    };
    feed(b"api-create");
    feed(user_id.as_bytes());
    feed(request_id.as_bytes());
    EventKey(h.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceStatus::*;

    #[test]
    fn the_transition_table_allows_exactly_the_documented_moves() {
        let allowed = [
            (Creating, Running),
            (Creating, Failed),
            (Creating, Stopping),
            (Creating, Deleting),
            (Running, Stopping),
            (Running, Deleting),
            (Running, Failed),
            (Running, Creating),
            (Stopping, Stopped),
            (Stopped, Creating),
            (Stopped, Deleting),
            (Failed, Creating),
            (Failed, Deleting),
            (Deleting, Deleted),
        ];
        for from in InstanceStatus::ALL {
            for to in InstanceStatus::ALL {
                let want = allowed.contains(&(from, to));
                assert_eq!(from.can_become(to), want, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn a_deleted_instance_cannot_be_started() {
        let mut instance = fixture();
        instance.status = Deleted;

        let result = instance.transition(Creating, "start");

        assert!(matches!(
            result,
            Err(Error::IllegalTransition { from: Deleted, to: Creating, .. })
        ));
        assert_eq!(instance.status, Deleted);
    }

    #[test]
    fn status_names_round_trip_in_any_case() {
        for status in InstanceStatus::ALL {
            assert_eq!(status.as_str().parse::<InstanceStatus>().unwrap(), status);
            assert_eq!(status.as_str().to_lowercase().parse::<InstanceStatus>().unwrap(), status);
        }
        assert!("PAUSED".parse::<InstanceStatus>().is_err());
    }

    #[test]
    fn one_gate_per_instance_while_held_and_none_kept_after() {
        let gates = Gates::default();
        let id = |n: i64| InstanceId::try_from(n).unwrap();
        let (a, b) = (id(1), id(2));
        let held = gates.of(a);
        assert!(Arc::ptr_eq(&held, &gates.of(a)), "callers of one instance share its gate");
        assert!(!Arc::ptr_eq(&held, &gates.of(b)), "instances do not share gates");
        drop(held);
        for n in 3..200 {
            drop(gates.of(InstanceId::try_from(n).unwrap()));
        }
        let live = gates.open.lock().unwrap().gates.len();
        assert!(live < 64, "dropped gates are swept ({live} entries left)");
    }

    #[test]
    fn instance_ids_must_be_positive() {
        assert!(InstanceId::try_from(1).is_ok());
        assert!(InstanceId::try_from(0).is_err());
        assert!(InstanceId::try_from(-5).is_err());
    }

    #[test]
    fn a_list_filter_matches_every_filter_in_memory() {
        let at = |s: i64| DateTime::from_timestamp(1_767_225_600 + s, 0).unwrap();
        let mut instance = Instance::fixture().labelled(&[("team", "a"), ("env", "prod")]);
        instance.spec.gpu = GpuType::TeslaA100;
        instance.created_at = at(10);
        let selector = |s: &str| LabelSelector::parse(s).unwrap();
        let yes = [
            ListFilter::default(),
            ListFilter {
                user_id: Some("u1".into()),
                name: Some("demo".into()),
                ..Default::default()
            },
            ListFilter { status: Some(Running), ..Default::default() },
            ListFilter {
                labels: selector("team=a,env in (prod,dev),!gone,tier notin (x)"),
                ..Default::default()
            },
            ListFilter { gpu: Some(GpuType::TeslaA100), ..Default::default() },
            ListFilter { image: Some("ubuntu:22.04".into()), ..Default::default() },
            ListFilter {
                created_after: Some(at(9)),
                created_before: Some(at(11)),
                ..Default::default()
            },
        ];
        let no = [
            ListFilter { user_id: Some("u2".into()), ..Default::default() },
            ListFilter { name: Some("other".into()), ..Default::default() },
            ListFilter { status: Some(Stopped), ..Default::default() },
            ListFilter { labels: selector("team!=a"), ..Default::default() },
            ListFilter { labels: selector("team,gone"), ..Default::default() },
            ListFilter { gpu: Some(GpuType::None), ..Default::default() },
            ListFilter { image: Some("nginx".into()), ..Default::default() },
            ListFilter { created_after: Some(at(10)), ..Default::default() },
            ListFilter { created_before: Some(at(10)), ..Default::default() },
        ];

        for f in &yes {
            assert!(f.matches(&instance), "{f:?}");
        }
        for f in &no {
            assert!(!f.matches(&instance), "{f:?}");
        }
    }

    #[test]
    fn without_a_status_a_list_leaves_deleted_instances_out_and_a_watch_does_not() {
        let deleted = Instance::fixture().with_status(Deleted);
        let any = ListFilter::default();
        let asked = ListFilter { status: Some(Deleted), ..ListFilter::default() };

        assert!(!any.matches(&deleted));
        assert!(any.matches_ignoring_deleted_default(&deleted));
        assert!(asked.matches(&deleted) && asked.matches_ignoring_deleted_default(&deleted));
        let running = ListFilter { status: Some(Running), ..ListFilter::default() };
        assert!(!running.matches_ignoring_deleted_default(&deleted));
    }

    #[test]
    fn an_empty_time_window_is_refused() {
        let at = |s: i64| DateTime::from_timestamp(s, 0);
        let empty =
            ListFilter { created_after: at(5), created_before: at(5), ..Default::default() };
        let fine = ListFilter { created_after: at(4), created_before: at(5), ..Default::default() };

        assert!(matches!(
            empty.validate(),
            Err(Error::InvalidArgument { field: "created_after", .. })
        ));
        assert!(fine.validate().is_ok());
    }

    fn fixture() -> Instance {
        Instance::fixture().with_id(42).with_status(Creating)
    }
}
