//! In-memory fakes of the repository traits, for use-case tests.
//!
//! [`FakeInstanceRepo`] is a model of the PostgreSQL store, not a stub: one unit of work
//! at a time (the lock stands in for the row locks), a snapshot of the instances and
//! processed keys it names, and all of a unit's `Changes` applied or none, with the
//! constraints the tables enforce (primary keys of `instances` and `processed_events`,
//! the version check of an update) reported as `RepoError::Conflict`. Timestamps are
//! stored at PostgreSQL's precision (microseconds). Failures and concurrent writers can
//! be injected. Depends on `biz` only.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Mutex, MutexGuard, PoisonError},
};

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, TimeZone, Utc};

use super::{
    AuditRecord, AuditRepo, Changes, EventKey, GpuType, Instance, InstanceId, InstanceRepo,
    InstanceSpec, InstanceStatus, ListQuery, Processed, RepoError, Snapshot, StatusChange,
    instance::{Endpoint, Labels},
    quota::{Amounts, Held, QuotaOverride, QuotaRepo, Scope},
};

/// A failure the next unit of work meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Lost a race at commit: the work was planned, then rolled back.
    Conflict,
    /// The store did not answer: nothing was read or planned.
    Unavailable,
}

/// A concurrent writer that commits between a unit's read and its write.
type Race = Box<dyn FnOnce(&mut State) + Send>;

/// One in-memory store behind `InstanceRepo` and `AuditRepo`, as one database is behind
/// `PgInstanceRepo` and `PgAuditRepo`.
#[derive(Default)]
pub(crate) struct FakeInstanceRepo {
    state: Mutex<State>,
}

/// What the store holds, and what it was asked.
#[derive(Default)]
pub(crate) struct State {
    /// Every instance ever written, deleted or not (rows are never removed).
    pub instances: BTreeMap<InstanceId, Instance>,
    /// `processed_events`.
    pub processed: HashMap<EventKey, Processed>,
    /// `audit_logs`, in id order.
    pub audit: Vec<AuditRecord>,
    /// `status_outbox`, in id order.
    pub outbox: Vec<StatusChange>,
    /// `sync_requests`, in id order.
    pub sync_requests: Vec<Option<InstanceId>>,
    /// `quota_usage`.
    pub usage: HashMap<Scope, Amounts>,
    /// `quota_overrides`.
    pub own: HashMap<String, QuotaOverride>,
    /// Calls made, by method.
    pub calls: Calls,
    /// What the next units of work meet, in order (`None`: nothing).
    faults: VecDeque<Option<Fault>>,
    races: VecDeque<Race>,
    down: bool,
}

/// How often each method was called.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Calls {
    /// `get`.
    pub get: usize,
    /// `list`.
    pub list: usize,
    /// `processed`.
    pub processed: usize,
    /// `transact` (attempts, committed or not).
    pub transact: usize,
    /// Units of work committed with something written.
    pub commits: usize,
}

impl FakeInstanceRepo {
    /// An empty store.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A store holding `instances`, as if committed earlier.
    pub(crate) fn with(instances: impl IntoIterator<Item = Instance>) -> Self {
        let repo = Self::new();
        {
            let mut state = repo.state();
            for instance in instances {
                let instance = stored(instance);
                state.instances.insert(instance.id, instance);
            }
        }
        repo
    }

    /// The store's contents and counters, to arrange or assert on.
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next `n` units of work (after those already scripted) meet `fault`.
    pub(crate) fn fail_next_transacts(&self, n: usize, fault: Fault) {
        self.state().faults.extend(std::iter::repeat_n(Some(fault), n));
    }

    /// The next `n` units of work (after those already scripted) meet no fault.
    pub(crate) fn pass_next_transacts(&self, n: usize) {
        self.state().faults.extend(std::iter::repeat_n(None, n));
    }

    /// While the next unit of work is between its read and its write, `writer` commits
    /// (through [`State::commit`] or by editing rows), as a concurrent transaction would.
    pub(crate) fn race_next_transact(&self, writer: impl FnOnce(&mut State) + Send + 'static) {
        self.state().races.push_back(Box::new(writer));
    }

    /// Whether every call fails with `Unavailable`, as when the database is down.
    pub(crate) fn set_down(&self, down: bool) {
        self.state().down = down;
    }

    /// How often each method was called.
    pub(crate) fn calls(&self) -> Calls {
        self.state().calls
    }

    /// One stored instance.
    pub(crate) fn instance(&self, id: InstanceId) -> Option<Instance> {
        self.state().instances.get(&id).cloned()
    }
}

impl State {
    /// Writes `changes` as `PgInstanceRepo` does: all or nothing, and only if the
    /// constraints hold.
    ///
    /// # Errors
    /// `RepoError::Conflict` when an inserted instance or processed key exists already,
    /// or an updated instance is missing or no longer at the version it was loaded at.
    pub(crate) fn commit(&mut self, changes: &Changes) -> Result<(), RepoError> {
        // `PgInstanceRepo::transact` writes nothing for empty changes (and so drops sync
        // requests that come alone).
        if changes.is_empty() {
            return Ok(());
        }
        let mut inserted = Vec::new();
        for instance in &changes.inserts {
            if self.instances.contains_key(&instance.id) || inserted.contains(&instance.id) {
                return Err(RepoError::Conflict);
            }
            inserted.push(instance.id);
        }
        for update in &changes.updates {
            match self.instances.get(&update.instance.id) {
                Some(row) if row.version == update.loaded_version => {}
                // `UPDATE … WHERE version = expected` matched fewer rows than asked.
                _ => return Err(RepoError::Conflict),
            }
        }
        for change in &changes.usage {
            let before = self.usage.get(&change.scope).copied().unwrap_or_default();
            // `add_usage`: the counter, moved past a limit since it was read, refuses.
            if change.limits.exceeded_by(before, change.delta).is_some() {
                return Err(RepoError::Conflict);
            }
        }
        let mut keys = Vec::new();
        for seen in &changes.seen {
            if self.processed.contains_key(&seen.key) || keys.contains(&seen.key) {
                return Err(RepoError::Conflict);
            }
            keys.push(seen.key);
        }

        for instance in &changes.inserts {
            self.instances.insert(instance.id, stored(instance.clone()));
        }
        for update in &changes.updates {
            let row = self.instances.get_mut(&update.instance.id).expect("checked above");
            let mut next = stored(update.instance.clone());
            // The UPDATE leaves `created_at` alone, and the spec row is written only when
            // the update says it changed.
            next.created_at = row.created_at;
            if !update.spec_changed {
                next.spec = row.spec.clone();
            }
            *row = next;
        }
        for entry in &changes.audit {
            let mut entry = entry.clone();
            entry.at = micros(entry.at);
            let id = self.audit.last().map_or(1, |r| r.id + 1);
            self.audit.push(AuditRecord { id, entry });
        }
        for change in &changes.outbox {
            self.outbox.push(StatusChange { at: micros(change.at), ..change.clone() });
        }
        for seen in &changes.seen {
            let processed =
                Processed { instance_id: seen.instance_id, fingerprint: seen.fingerprint };
            self.processed.insert(seen.key, processed);
        }
        self.sync_requests.extend(&changes.sync_requests);
        for change in &changes.usage {
            let counter = self.usage.entry(change.scope.clone()).or_default();
            *counter = *counter + change.delta;
        }
        self.calls.commits += 1;
        Ok(())
    }

    /// The counters of `scopes` that have a row, with owners' own limits.
    pub(crate) fn held(&self, scopes: &[Scope]) -> HashMap<Scope, Held> {
        scopes
            .iter()
            .filter_map(|scope| {
                let own = match scope {
                    Scope::User(user_id) => self.own.get(user_id).copied(),
                    Scope::Gpu(_) => None,
                };
                let usage = self.usage.get(scope).copied();
                (usage.is_some() || own.is_some())
                    .then(|| (scope.clone(), Held { usage: usage.unwrap_or_default(), own }))
            })
            .collect()
    }

    /// The audit rows of `id`, oldest first.
    pub(crate) fn audit_of(&self, id: InstanceId) -> Vec<AuditRecord> {
        self.audit.iter().filter(|r| r.entry.instance_id == id.get()).cloned().collect()
    }

    fn unavailable(&self) -> Result<(), RepoError> {
        if self.down { Err(RepoError::Unavailable("fake store is down".into())) } else { Ok(()) }
    }
}

#[async_trait]
impl InstanceRepo for FakeInstanceRepo {
    async fn get(&self, id: InstanceId) -> Result<Instance, RepoError> {
        let mut state = self.state();
        state.calls.get += 1;
        state.unavailable()?;
        state.instances.get(&id).cloned().ok_or(RepoError::NotFound)
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<Instance>, RepoError> {
        let mut state = self.state();
        state.calls.list += 1;
        state.unavailable()?;
        let f = &query.filter;
        Ok(state
            .instances
            .values()
            .rev()
            .filter(|i| query.before.is_none_or(|before| i.id < before))
            .filter(|i| f.matches(i))
            .take(query.limit as usize)
            .cloned()
            .collect())
    }

    async fn processed(&self, key: EventKey) -> Result<Option<Processed>, RepoError> {
        let mut state = self.state();
        state.calls.processed += 1;
        state.unavailable()?;
        Ok(state.processed.get(&key).cloned())
    }

    async fn transact(
        &self,
        ids: &[InstanceId],
        keys: &[EventKey],
        owners: &[String],
        work: &mut (dyn FnMut(Snapshot) -> Changes + Send),
    ) -> Result<(), RepoError> {
        // Held for the whole unit of work: units run one at a time, like writers of the
        // same rows under `FOR UPDATE`. (No await below, so the guard never crosses one.)
        let mut state = self.state();
        state.calls.transact += 1;
        state.unavailable()?;
        let fault = state.faults.pop_front().flatten();
        if fault == Some(Fault::Unavailable) {
            return Err(RepoError::Unavailable("injected: the store did not answer".into()));
        }
        let instances: HashMap<InstanceId, Instance> =
            ids.iter().filter_map(|id| state.instances.get(id).map(|i| (*id, i.clone()))).collect();
        let mut scopes: Vec<Scope> = owners.iter().map(|o| Scope::User(o.clone())).collect();
        scopes.extend(instances.values().map(|i| Scope::User(i.user_id.clone())));
        if !scopes.is_empty() {
            scopes.extend(Scope::gpus());
        }
        let quota = state.held(&scopes);
        let snapshot = Snapshot {
            quota,
            seen: keys
                .iter()
                .filter_map(|k| state.processed.get(k).map(|p| (*k, p.fingerprint)))
                .collect(),
            instances,
        };
        let changes = work(snapshot);
        if fault == Some(Fault::Conflict) {
            return Err(RepoError::Conflict);
        }
        if let Some(race) = state.races.pop_front() {
            race(&mut state);
        }
        state.commit(&changes)
    }
}

#[async_trait]
impl QuotaRepo for FakeInstanceRepo {
    async fn held(&self, scopes: &[Scope]) -> Result<HashMap<Scope, Held>, RepoError> {
        let state = self.state();
        state.unavailable()?;
        Ok(state.held(scopes))
    }

    async fn set_own(&self, user_id: &str, own: &QuotaOverride) -> Result<(), RepoError> {
        let mut state = self.state();
        state.unavailable()?;
        if own.is_empty() {
            state.own.remove(user_id);
        } else {
            state.own.insert(user_id.to_owned(), *own);
        }
        Ok(())
    }
}

#[async_trait]
impl AuditRepo for FakeInstanceRepo {
    async fn list(
        &self,
        instance_id: InstanceId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, RepoError> {
        let state = self.state();
        state.unavailable()?;
        Ok(state
            .audit
            .iter()
            .rev()
            .filter(|r| r.entry.instance_id == instance_id.get())
            .filter(|r| r.id < before.unwrap_or(i64::MAX))
            .take(limit as usize)
            .cloned()
            .collect())
    }
}

/// `t` as a `timestamptz` column keeps it.
fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

/// `instance` as its row reads back.
fn stored(mut instance: Instance) -> Instance {
    instance.created_at = micros(instance.created_at);
    instance.updated_at = micros(instance.updated_at);
    instance.deleted_at = instance.deleted_at.map(micros);
    instance
}

// === impl Instance (fixtures) ===

impl Instance {
    /// A running instance 1 of `u1` named `demo`, at version 1.
    pub(crate) fn fixture() -> Self {
        let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        Instance {
            id: InstanceId::try_from(1).unwrap(),
            user_id: "u1".into(),
            name: "demo".into(),
            status: InstanceStatus::Running,
            status_reason: String::new(),
            spec: InstanceSpec {
                cpu: 2,
                memory_mb: 4096,
                gpu: GpuType::None,
                image: "ubuntu:22.04".into(),
                config: serde_json::json!({}),
            },
            endpoint: Endpoint::default(),
            created_at: at,
            updated_at: at,
            deleted_at: None,
            version: 1,
            labels: Labels::new(),
        }
    }

    /// With `labels`.
    pub(crate) fn labelled(self, labels: &[(&str, &str)]) -> Self {
        let labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Self { labels, ..self }
    }

    /// With id `id`.
    pub(crate) fn with_id(self, id: i64) -> Self {
        Self { id: InstanceId::try_from(id).unwrap(), ..self }
    }

    /// In `status`; deleted at its last update when that is `DELETED`.
    pub(crate) fn with_status(self, status: InstanceStatus) -> Self {
        let deleted_at = (status == InstanceStatus::Deleted).then_some(self.updated_at);
        Self { status, deleted_at, ..self }
    }

    /// Owned by `user_id`.
    pub(crate) fn owned_by(self, user_id: &str) -> Self {
        Self { user_id: user_id.into(), ..self }
    }

    /// Named `name`.
    pub(crate) fn named(self, name: &str) -> Self {
        Self { name: name.into(), ..self }
    }
}
