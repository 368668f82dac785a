//! Commands on instances and the pure function that applies a batch of them to the state
//! a repository loaded: every entry point (API, events, reconciler) goes through here, so
//! there is one behaviour and one audit trail.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::{
    Endpoint, Instance, InstanceId, InstanceSpec, InstanceStatus, Labels, Limits, SpecPatch,
    validate_labels, validate_name, validate_text,
};
use crate::biz::{
    Error,
    audit::{Action, Actor, AuditEntry, Outcome as AuditOutcome, Source},
    quota::{Amounts, Held, QuotaConf, Scope, UsageChange},
};

/// Identity of an event for de-duplication: equal for redeliveries and duplicates of
/// the same event, whatever their encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventKey(pub [u8; 16]);

/// What a caller asks of an instance.
#[derive(Debug, Clone)]
pub enum Command {
    /// Create the instance (id chosen by the caller).
    Create { id: InstanceId, user_id: String, name: String, spec: InstanceSpec, labels: Labels },
    /// Delete it.
    Delete { id: InstanceId },
    /// Start it.
    Start { id: InstanceId },
    /// Stop it.
    Stop { id: InstanceId },
    /// Change some or all fields of its spec; the others keep their current values
    /// (read under the row lock, so a concurrent change of another field is kept).
    ChangeSpec { id: InstanceId, patch: SpecPatch },
    /// Replace its labels as a whole.
    SetLabels { id: InstanceId, labels: Labels },
    /// Reconcile it (or every instance) with the cluster.
    Sync { id: Option<InstanceId> },
    /// Refused before it reached an instance (malformed input); audited when the
    /// instance exists.
    Refused { id: Option<InstanceId>, action: Action, error: Error },
    /// What the reconciler found in the cluster. Applied only where it moves the
    /// instance on; otherwise ignored without an audit row (the reconciler observes
    /// converged instances all the time).
    Observe { id: InstanceId, observation: Observation },
}

/// A fact about an instance's workload, reported by the reconciler.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// The workload runs and is reachable here.
    Running(Endpoint),
    /// The workload cannot run, for this reason.
    Failed(String),
    /// Nothing of the workload remains.
    Gone,
    /// The workload went away without being asked to (deleted out of band); it is
    /// recreated.
    Lost(String),
    /// The workload is not there yet, for this reason (kept in `status_reason` while the
    /// instance waits for the cluster).
    Waiting(String),
    /// What runs differed from what was applied and is being put right (audited as
    /// `K8S_SYNC`; the instance does not change).
    Corrected(String),
}

impl Command {
    /// The instance concerned, if one.
    pub fn instance_id(&self) -> Option<InstanceId> {
        match self {
            Command::Create { id, .. }
            | Command::Delete { id }
            | Command::Start { id }
            | Command::Stop { id }
            | Command::ChangeSpec { id, .. }
            | Command::SetLabels { id, .. }
            | Command::Observe { id, .. } => Some(*id),
            Command::Sync { id } | Command::Refused { id, .. } => *id,
        }
    }

    /// The audited action.
    pub fn action(&self) -> Action {
        match self {
            Command::Create { .. } => Action::Create,
            Command::Delete { .. } => Action::Delete,
            Command::Start { .. } => Action::Start,
            Command::Stop { .. } => Action::Stop,
            Command::ChangeSpec { .. } => Action::ChangeSpec,
            Command::SetLabels { .. } => Action::SetLabels,
            Command::Sync { .. } => Action::K8sSync,
            Command::Refused { action, .. } => *action,
            Command::Observe { observation: Observation::Corrected(_), .. } => Action::K8sSync,
            Command::Observe { .. } => Action::StatusChange,
        }
    }
}

/// A command with who sent it and how to recognise it again.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Set for events: a second command with the same key has no effect.
    pub key: Option<EventKey>,
    /// With a key, what the command asks for (a digest of its content): the key seen
    /// again with another fingerprint is a reused id, refused, not a duplicate.
    pub fingerprint: Option<[u8; 16]>,
    /// Who asks.
    pub actor: Actor,
    /// Request or message id, for the audit trail.
    pub request_id: String,
    /// What is asked.
    pub command: Command,
}

/// How one command of a batch ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Applied and audited.
    Applied(Instance),
    /// Nothing to do (already there or heading there); audited as ignored.
    Ignored { instance: Option<Instance>, note: String },
    /// Seen before: no effect and no audit row.
    Duplicate,
    /// Refused; audited when the instance exists.
    Rejected(Error),
    /// The instance does not exist (yet): the caller may retry later.
    Unknown(InstanceId),
}

/// A status change to publish through the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusChange {
    /// The instance.
    pub instance_id: InstanceId,
    /// Its owner.
    pub user_id: String,
    /// The status entered.
    pub status: InstanceStatus,
    /// Why.
    pub reason: String,
    /// The Service host and ports, once known (`host:port,port`).
    pub endpoint: String,
    /// The instance version after the change.
    pub version: i64,
    /// When it was committed.
    pub at: DateTime<Utc>,
}

/// What a repository loaded, under lock, for a batch.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Event keys already processed, with the fingerprint each was processed with
    /// (`None` for keys recorded before fingerprints were).
    pub seen: HashMap<EventKey, Option<[u8; 16]>>,
    /// The instances the batch names that exist.
    pub instances: HashMap<InstanceId, Instance>,
    /// The usage counters of the owners the batch creates for, of the owners of
    /// `instances` and of every GPU type; a counter without a row is absent (zero).
    pub quota: HashMap<Scope, Held>,
}

/// What a batch writes, in one transaction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    /// New instances, in their final state.
    pub inserts: Vec<Instance>,
    /// Changed instances in their final state.
    pub updates: Vec<Update>,
    /// Audit rows.
    pub audit: Vec<AuditEntry>,
    /// Status changes to publish.
    pub outbox: Vec<StatusChange>,
    /// Event keys now processed.
    pub seen: Vec<Seen>,
    /// Instances the reconciler is asked to compare with the cluster (`None`: every
    /// instance).
    pub sync_requests: Vec<Option<InstanceId>>,
    /// Usage counters changed, one entry per counter.
    pub usage: Vec<UsageChange>,
    /// Every version of an instance the batch made, in the order made: the change log
    /// holds each one, not only the final state (a watcher sees every status an instance
    /// passed through, as the audit trail does).
    pub versions: Vec<Instance>,
}

/// An instance changed by a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// Its final state.
    pub instance: Instance,
    /// The version it was loaded at: written only if the row is still at it.
    pub loaded_version: i64,
    /// Whether its spec changed (otherwise only the instance row is written).
    pub spec_changed: bool,
}

/// An event or request key, now processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The key.
    pub key: EventKey,
    /// The instance it concerned (0 for none).
    pub instance_id: i64,
    /// For a create, what it asked for ([`create_fingerprint`]): a retry of the same
    /// request is told from another request reusing its key.
    pub fingerprint: Option<[u8; 16]>,
}

impl Changes {
    /// Whether nothing is to be written.
    pub fn is_empty(&self) -> bool {
        self.inserts.is_empty()
            && self.updates.is_empty()
            && self.audit.is_empty()
            && self.outbox.is_empty()
            && self.seen.is_empty()
            && self.sync_requests.is_empty()
            && self.usage.is_empty()
            && self.versions.is_empty()
    }
}

/// What applying commands needs besides the state.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// The batch's clock.
    pub now: DateTime<Utc>,
    /// Bounds of specs and names.
    pub limits: Limits,
    /// `false`: no cluster to wait for, so CREATING, STOPPING and DELETING complete at once.
    pub cluster_enabled: bool,
    /// Default limits of owners and the GPU capacity.
    pub quota: QuotaConf,
}

/// Applies `batch` in order to `snapshot`: the outcome of each command and everything
/// to write. Pure: the same input always gives the same output.
pub fn plan(batch: &[Envelope], snapshot: Snapshot, ctx: &Context) -> (Vec<Outcome>, Changes) {
    let mut planner = Planner {
        loaded: snapshot.instances.iter().map(|(id, i)| (*id, i.version)).collect(),
        state: snapshot.instances,
        seen: snapshot.seen,
        created: Vec::new(),
        dirty: Vec::new(),
        respecced: HashSet::new(),
        changes: Changes::default(),
        held: snapshot.quota,
        deltas: BTreeMap::new(),
        ctx,
    };
    let outcomes = batch.iter().map(|envelope| planner.apply(envelope)).collect();
    let mut changes = planner.changes;
    for (scope, delta) in planner.deltas {
        if delta.is_zero() {
            continue;
        }
        let limits =
            ctx.quota.limits_of(&scope, planner.held.get(&scope).and_then(|h| h.own.as_ref()));
        changes.usage.push(UsageChange { scope, delta, limits });
    }
    for id in planner.created {
        changes.inserts.push(planner.state[&id].clone());
    }
    for id in planner.dirty {
        changes.updates.push(Update {
            instance: planner.state[&id].clone(),
            loaded_version: planner.loaded[&id],
            spec_changed: planner.respecced.contains(&id),
        });
    }
    (outcomes, changes)
}

struct Planner<'a> {
    state: HashMap<InstanceId, Instance>,
    loaded: HashMap<InstanceId, i64>,
    seen: HashMap<EventKey, Option<[u8; 16]>>,
    /// Created in this batch, in order.
    created: Vec<InstanceId>,
    /// Loaded and changed in this batch, in order.
    dirty: Vec<InstanceId>,
    /// Loaded instances whose spec this batch changed.
    respecced: HashSet<InstanceId>,
    changes: Changes,
    /// The counters as read.
    held: HashMap<Scope, Held>,
    /// What this batch adds to each counter so far.
    deltas: BTreeMap<Scope, Amounts>,
    ctx: &'a Context,
}

impl Planner<'_> {
    fn apply(&mut self, envelope: &Envelope) -> Outcome {
        if let Some(key) = envelope.key
            && let Some(first) = self.seen.get(&key)
        {
            return match (first, envelope.fingerprint) {
                // The same id for another command: a producer's bug, never a redelivery.
                (Some(first), Some(now)) if *first != now => {
                    let error = match envelope.actor.source {
                        Source::Mq => {
                            Error::MessageIdReused { message_id: envelope.request_id.clone() }
                        }
                        _ => Error::RequestIdReused { request_id: envelope.request_id.clone() },
                    };
                    self.reject(envelope, envelope.command.instance_id(), error)
                }
                _ => Outcome::Duplicate,
            };
        }
        let outcome = self.run(envelope);
        if let (Some(key), Outcome::Applied(_) | Outcome::Ignored { .. }) = (envelope.key, &outcome)
        {
            // Rejected events are not remembered: once the cause is fixed, an operator
            // can replay them from the dead-letter queue.
            self.seen.insert(key, envelope.fingerprint);
            let instance_id = envelope.command.instance_id().map_or(0, InstanceId::get);
            self.changes.seen.push(Seen { key, instance_id, fingerprint: envelope.fingerprint });
        }
        outcome
    }

    fn run(&mut self, envelope: &Envelope) -> Outcome {
        match &envelope.command {
            Command::Create { id, user_id, name, spec, labels } => {
                self.create(envelope, *id, user_id, name, spec, labels)
            }
            Command::Refused { id, error, .. } => self.reject(envelope, *id, error.clone()),
            Command::Observe { id, observation } => self.observe(envelope, *id, observation),
            Command::Sync { id: None } => {
                self.audit(envelope, 0, AuditOutcome::Ignored, self.sync_note(), None, None);
                self.request_sync(envelope, None);
                Outcome::Ignored { instance: None, note: self.sync_note() }
            }
            Command::Sync { id: Some(id) } => {
                let Some(instance) = self.state.get(id).cloned() else {
                    return Outcome::Unknown(*id);
                };
                let json = Some(snapshot_json(&instance));
                self.audit(
                    envelope,
                    id.get(),
                    AuditOutcome::Ignored,
                    self.sync_note(),
                    json.clone(),
                    json,
                );
                self.request_sync(envelope, Some(*id));
                Outcome::Ignored { instance: Some(instance), note: self.sync_note() }
            }
            Command::Delete { id } => self.lifecycle(envelope, *id, |i, ctx| match i.status {
                InstanceStatus::Deleted | InstanceStatus::Deleting => Ok(None),
                _ => {
                    i.transition(InstanceStatus::Deleting, "deletion requested")?;
                    if !ctx.cluster_enabled {
                        i.transition(InstanceStatus::Deleted, "")?;
                        i.deleted_at = Some(ctx.now);
                        i.endpoint = Endpoint::default();
                    }
                    Ok(Some(()))
                }
            }),
            Command::Stop { id } => self.lifecycle(envelope, *id, |i, ctx| match i.status {
                InstanceStatus::Stopped | InstanceStatus::Stopping => Ok(None),
                _ => {
                    i.transition(InstanceStatus::Stopping, "stop requested")?;
                    if !ctx.cluster_enabled {
                        i.transition(InstanceStatus::Stopped, "")?;
                        i.endpoint = Endpoint::default();
                    }
                    Ok(Some(()))
                }
            }),
            Command::Start { id } => self.lifecycle(envelope, *id, |i, ctx| match i.status {
                InstanceStatus::Running | InstanceStatus::Creating => Ok(None),
                _ => {
                    i.transition(InstanceStatus::Creating, "start requested")?;
                    if !ctx.cluster_enabled {
                        i.transition(InstanceStatus::Running, "")?;
                    }
                    Ok(Some(()))
                }
            }),
            Command::SetLabels { id, labels } => self.set_labels(envelope, *id, labels),
            Command::ChangeSpec { id, patch } => {
                self.lifecycle(envelope, *id, |i, ctx| {
                    if matches!(i.status, InstanceStatus::Deleting | InstanceStatus::Deleted) {
                        return Err(Error::NotAllowed {
                            instance_id: i.id.get(),
                            action: "change its spec",
                            status: i.status,
                        });
                    }
                    let spec = patch.apply_to(&i.spec);
                    spec.validate(&ctx.limits)?;
                    if i.spec == spec {
                        return Ok(None);
                    }
                    i.spec = spec;
                    // A running workload is replaced: its Pod goes, then comes back.
                    if i.status == InstanceStatus::Running {
                        i.transition(
                            InstanceStatus::Creating,
                            "spec changed: replacing the workload",
                        )?;
                        if !ctx.cluster_enabled {
                            i.transition(InstanceStatus::Running, "")?;
                        }
                    }
                    Ok(Some(()))
                })
            }
        }
    }

    /// Asks the reconciler to look at `id` (`None`: everything), when there is one.
    fn request_sync(&mut self, envelope: &Envelope, id: Option<InstanceId>) {
        if self.ctx.cluster_enabled && envelope.actor.source != Source::Reconciler {
            self.changes.sync_requests.push(id);
        }
    }

    fn sync_note(&self) -> String {
        if self.ctx.cluster_enabled {
            "handed to the reconciler".into()
        } else {
            "kubernetes disabled: nothing to reconcile".into()
        }
    }

    /// Replaces the labels of an instance that is not (being) deleted; the cluster
    /// copies them onto its workload on the next look (asked for here).
    fn set_labels(&mut self, envelope: &Envelope, id: InstanceId, labels: &Labels) -> Outcome {
        if let Err(e) = validate_labels(labels) {
            return self.reject(envelope, Some(id), e);
        }
        let outcome = self.lifecycle(envelope, id, |i, _| {
            if matches!(i.status, InstanceStatus::Deleting | InstanceStatus::Deleted) {
                return Err(Error::NotAllowed {
                    instance_id: i.id.get(),
                    action: "change its labels",
                    status: i.status,
                });
            }
            if i.labels == *labels {
                return Ok(None);
            }
            i.labels.clone_from(labels);
            Ok(Some(()))
        });
        if matches!(outcome, Outcome::Applied(_)) {
            self.request_sync(envelope, Some(id));
        }
        outcome
    }

    fn create(
        &mut self,
        envelope: &Envelope,
        id: InstanceId,
        user_id: &str,
        name: &str,
        spec: &InstanceSpec,
        labels: &Labels,
    ) -> Outcome {
        if let Err(e) = validate_name(name, &self.ctx.limits)
            .and_then(|()| spec.validate(&self.ctx.limits))
            .and_then(|()| validate_labels(labels))
        {
            return self.reject(envelope, Some(id), e);
        }
        if user_id.is_empty() {
            return self.reject(envelope, Some(id), Error::invalid("user_id", "required"));
        }
        if let Err(e) = validate_text("user_id", user_id) {
            return self.reject(envelope, Some(id), e);
        }
        if let Some(existing) = self.state.get(&id).cloned() {
            let same = existing.user_id == user_id
                && existing.name == name
                && existing.spec == *spec
                && existing.labels == *labels;
            if same && existing.deleted_at.is_none() {
                let note = "instance already exists with the same owner, name and spec".to_owned();
                let json = Some(snapshot_json(&existing));
                self.audit(
                    envelope,
                    id.get(),
                    AuditOutcome::Ignored,
                    note.clone(),
                    json.clone(),
                    json,
                );
                return Outcome::Ignored { instance: Some(existing), note };
            }
            return self.reject(
                envelope,
                Some(id),
                Error::InstanceAlreadyExists { instance_id: id.get() },
            );
        }
        let mut instance = Instance {
            id,
            user_id: user_id.to_owned(),
            name: name.to_owned(),
            status: InstanceStatus::Creating,
            status_reason: String::new(),
            spec: spec.clone(),
            endpoint: Endpoint::default(),
            created_at: self.ctx.now,
            updated_at: self.ctx.now,
            deleted_at: None,
            version: 1,
            labels: labels.clone(),
        };
        let (outcome, reason) = match self.admit(None, &instance) {
            Ok(()) => {
                if !self.ctx.cluster_enabled {
                    instance
                        .transition(InstanceStatus::Running, "")
                        .expect("CREATING -> RUNNING is in the table");
                }
                (AuditOutcome::Ok, String::new())
            }
            // An API caller is told and nothing is kept.
            Err(e) if envelope.actor.source != Source::Mq => {
                return self.reject(envelope, None, e);
            }
            // An event is a fact from the producer (a sale was made): it is recorded as
            // FAILED, and its status event tells the producer, which can refund.
            Err(e) => {
                instance
                    .transition(InstanceStatus::Failed, e.reason())
                    .expect("CREATING -> FAILED is in the table");
                (AuditOutcome::Rejected, format!("{}: {e}", e.reason()))
            }
        };
        self.audit(envelope, id.get(), outcome, reason, None, Some(snapshot_json(&instance)));
        self.publish(&instance);
        self.changes.versions.push(instance.clone());
        self.state.insert(id, instance.clone());
        self.created.push(id);
        Outcome::Applied(instance)
    }

    /// Applies what the reconciler observed when it moves the instance on.
    fn observe(
        &mut self,
        envelope: &Envelope,
        id: InstanceId,
        observation: &Observation,
    ) -> Outcome {
        use InstanceStatus as S;
        let Some(current) = self.state.get(&id).cloned() else {
            return Outcome::Unknown(id);
        };
        if let Observation::Corrected(note) = observation {
            let json = Some(snapshot_json(&current));
            self.audit(envelope, id.get(), AuditOutcome::Ok, note.clone(), json.clone(), json);
            return Outcome::Ignored { instance: Some(current), note: note.clone() };
        }
        let now = self.ctx.now;
        let mut next = current.clone();
        let moved = match (observation, current.status) {
            (Observation::Waiting(reason), S::Creating | S::Stopping | S::Deleting)
                if *reason != current.status_reason =>
            {
                next.status_reason.clone_from(reason);
                Ok(())
            }
            (Observation::Running(endpoint), S::Creating) => {
                next.endpoint = endpoint.clone();
                next.transition(S::Running, "")
            }
            (Observation::Running(endpoint), S::Running) if *endpoint != current.endpoint => {
                next.endpoint = endpoint.clone();
                Ok(())
            }
            (Observation::Failed(reason), S::Creating | S::Running) => {
                next.transition(S::Failed, reason.clone())
            }
            (Observation::Gone, S::Stopping) => {
                next.endpoint = Endpoint::default();
                next.transition(S::Stopped, "")
            }
            (Observation::Gone, S::Deleting) => {
                next.endpoint = Endpoint::default();
                next.deleted_at = Some(now);
                next.transition(S::Deleted, "")
            }
            (Observation::Gone, S::Running) => {
                next.endpoint = Endpoint::default();
                next.transition(S::Creating, "workload disappeared; recreating")
            }
            (Observation::Lost(reason), S::Running) => {
                next.endpoint = Endpoint::default();
                next.transition(S::Creating, reason.clone())
            }
            _ => return Outcome::Ignored { instance: Some(current), note: "nothing to do".into() },
        };
        if let Err(e) = moved {
            return self.reject(envelope, Some(id), e);
        }
        self.lifecycle(envelope, id, move |i, _| {
            *i = next;
            Ok(Some(()))
        })
    }

    /// Runs a lifecycle change on an existing instance. `change` returns `Ok(None)` for
    /// an audited no-op, `Ok(Some(()))` when it changed the instance.
    fn lifecycle(
        &mut self,
        envelope: &Envelope,
        id: InstanceId,
        change: impl FnOnce(&mut Instance, &Context) -> Result<Option<()>, Error>,
    ) -> Outcome {
        let Some(current) = self.state.get(&id).cloned() else {
            return Outcome::Unknown(id);
        };
        let mut next = current.clone();
        match change(&mut next, self.ctx) {
            Err(e) => self.reject(envelope, Some(id), e),
            Ok(None) => {
                let note = match envelope.command {
                    Command::ChangeSpec { .. } => "the spec is already as asked".to_owned(),
                    Command::SetLabels { .. } => "the labels are already as asked".to_owned(),
                    _ => format!("already {}", current.status),
                };
                let json = Some(snapshot_json(&current));
                self.audit(
                    envelope,
                    id.get(),
                    AuditOutcome::Ignored,
                    note.clone(),
                    json.clone(),
                    json,
                );
                Outcome::Ignored { instance: Some(current), note }
            }
            Ok(Some(())) => {
                if let Err(e) = self.admit(Some(&current), &next) {
                    return self.reject(envelope, Some(id), e);
                }
                next.version = current.version + 1;
                next.updated_at = self.ctx.now;
                let (before, after) = (snapshot_json(&current), snapshot_json(&next));
                self.audit(
                    envelope,
                    id.get(),
                    AuditOutcome::Ok,
                    String::new(),
                    Some(before),
                    Some(after),
                );
                if next.status != current.status {
                    self.publish(&next);
                }
                if !self.created.contains(&id) && !self.dirty.contains(&id) {
                    self.dirty.push(id);
                }
                if next.spec != current.spec {
                    self.respecced.insert(id);
                }
                self.changes.versions.push(next.clone());
                self.state.insert(id, next.clone());
                Outcome::Applied(next)
            }
        }
    }

    /// Counts the move of an instance from `before` (`None`: new) to `after` against the
    /// quota of its owner and the capacity of its GPU type, or says which limit it would
    /// break. Only what a move adds is checked: freeing is always allowed, even above a
    /// limit lowered since.
    fn admit(&mut self, before: Option<&Instance>, after: &Instance) -> Result<(), Error> {
        let mut change: BTreeMap<Scope, Amounts> = BTreeMap::new();
        for (scope, amounts) in Scope::shares_of(after) {
            let total = change.entry(scope).or_default();
            *total = *total + amounts;
        }
        for (scope, amounts) in before.map(Scope::shares_of).unwrap_or_default() {
            let total = change.entry(scope).or_default();
            *total = *total - amounts;
        }
        for (scope, delta) in &change {
            let held = self.held.get(scope);
            let usage = held.map(|h| h.usage).unwrap_or_default()
                + self.deltas.get(scope).copied().unwrap_or_default();
            let limits = self.ctx.quota.limits_of(scope, held.and_then(|h| h.own.as_ref()));
            if let Some((limit, value, usage, requested)) = limits.exceeded_by(usage, *delta) {
                return Err(match scope {
                    Scope::User(user_id) => Error::QuotaExceeded {
                        user_id: user_id.clone(),
                        limit,
                        value,
                        usage,
                        requested,
                    },
                    Scope::Gpu(gpu) => {
                        Error::CapacityExhausted { gpu: *gpu, capacity: value, used: usage }
                    }
                });
            }
        }
        for (scope, delta) in change {
            let total = self.deltas.entry(scope).or_default();
            *total = *total + delta;
        }
        Ok(())
    }

    fn reject(&mut self, envelope: &Envelope, id: Option<InstanceId>, error: Error) -> Outcome {
        // Audited only where the instance is known.
        if let Some(instance) = id.and_then(|id| self.state.get(&id)).cloned() {
            let json = Some(snapshot_json(&instance));
            let reason = format!("{}: {error}", error.reason());
            self.audit(
                envelope,
                instance.id.get(),
                AuditOutcome::Rejected,
                reason,
                json.clone(),
                json,
            );
        }
        Outcome::Rejected(error)
    }

    fn audit(
        &mut self,
        envelope: &Envelope,
        instance_id: i64,
        outcome: AuditOutcome,
        reason: String,
        before: Option<serde_json::Value>,
        after: Option<serde_json::Value>,
    ) {
        self.changes.audit.push(AuditEntry {
            instance_id,
            actor: envelope.actor.clone(),
            action: envelope.command.action(),
            outcome,
            reason,
            request_id: envelope.request_id.clone(),
            before,
            after,
            at: self.ctx.now,
        });
    }

    fn publish(&mut self, instance: &Instance) {
        self.changes.outbox.push(StatusChange {
            instance_id: instance.id,
            user_id: instance.user_id.clone(),
            status: instance.status,
            reason: instance.status_reason.clone(),
            endpoint: endpoint_string(&instance.endpoint),
            version: instance.version,
            at: self.ctx.now,
        });
    }
}

/// `host:port,port`, or empty before the instance has a Service.
fn endpoint_string(e: &Endpoint) -> String {
    if e.service_host.is_empty() {
        return String::new();
    }
    let ports: Vec<String> = e.ports.iter().map(|p| p.port.to_string()).collect();
    if ports.is_empty() {
        e.service_host.clone()
    } else {
        format!("{}:{}", e.service_host, ports.join(","))
    }
}

/// The audited view of an instance: what a reader of the trail needs to see change.
///
/// `config_json` sits beside `spec`, not in it: an audit row's `after` is already five
/// protobuf messages deep in `ListAuditLogsReply`, and one JSON level less is what lets a
/// config at `limits.max_config_depth` (32) stay within the 100 levels stock protobuf
/// decoders accept, as it does in `ListResourcesReply`.
pub fn snapshot_json(i: &Instance) -> serde_json::Value {
    serde_json::json!({
        "user_id": i.user_id,
        "name": i.name,
        "status": i.status.as_str(),
        "status_reason": i.status_reason,
        "spec": {
            "cpu": i.spec.cpu,
            "memory": i.spec.memory_mb,
            "gpu": i.spec.gpu.code(),
            "image": i.spec.image,
        },
        "config_json": i.spec.config,
        "labels": i.labels,
        "version": i.version,
    })
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod properties;
