//! Quotas and GPU capacity: what an instance holds, what an owner and a GPU type may hold,
//! and the use cases that read and change the limits.
//!
//! Usage is not counted by queries: every unit of work that changes what instances hold
//! writes the difference to a counter per owner and per GPU type in the same transaction
//! ([`UsageChange`]), and the repository refuses to commit a counter pushed over its limit.
//! The planner decides from the counters it read; the write re-checks them under the
//! counter's row lock, so the limit holds exactly across replicas and entry points.

use std::{collections::HashMap, fmt, sync::Arc};

use async_trait::async_trait;

use super::{Error, GpuType, Instance, InstanceStatus, RepoError, access::Access};

/// Amounts of what instances hold (usage, or a change of it). For a GPU type only
/// `instances` is used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts {
    /// Live instances.
    pub instances: i64,
    /// CPU cores.
    pub cpu: i64,
    /// Memory, MB.
    pub memory_mb: i64,
    /// GPUs (each instance with a GPU type holds one).
    pub gpus: i64,
}

// === impl Amounts ===

impl Amounts {
    /// The dimensions with their names, in the order they are checked.
    pub fn named(&self) -> [(&'static str, i64); 4] {
        [
            ("instances", self.instances),
            ("cpu", self.cpu),
            ("memory_mb", self.memory_mb),
            ("gpus", self.gpus),
        ]
    }

    /// Whether every dimension is zero.
    pub fn is_zero(&self) -> bool {
        *self == Amounts::default()
    }

    fn zip(self, other: Amounts, f: impl Fn(i64, i64) -> i64) -> Amounts {
        Amounts {
            instances: f(self.instances, other.instances),
            cpu: f(self.cpu, other.cpu),
            memory_mb: f(self.memory_mb, other.memory_mb),
            gpus: f(self.gpus, other.gpus),
        }
    }
}

impl std::ops::Add for Amounts {
    type Output = Amounts;
    fn add(self, other: Amounts) -> Amounts {
        self.zip(other, |a, b| a + b)
    }
}

impl std::ops::Sub for Amounts {
    type Output = Amounts;
    fn sub(self, other: Amounts) -> Amounts {
        self.zip(other, |a, b| a - b)
    }
}

/// Whether an instance in `status` holds its share: every instance that is not DELETED or
/// FAILED. A stopped instance keeps its reservation (as in Nova), and a DELETING one holds
/// it until its workload is gone, since its Pod still holds the GPU.
pub fn holds(status: InstanceStatus) -> bool {
    !matches!(status, InstanceStatus::Deleted | InstanceStatus::Failed)
}

/// What `instance` holds of its owner's quota.
pub fn held_by(instance: &Instance) -> Amounts {
    if !holds(instance.status) {
        return Amounts::default();
    }
    Amounts {
        instances: 1,
        cpu: i64::from(instance.spec.cpu),
        memory_mb: i64::from(instance.spec.memory_mb),
        gpus: i64::from(instance.spec.gpu != GpuType::None),
    }
}

/// A usage counter: one per owner and one per GPU type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// What one owner's instances hold.
    User(String),
    /// How many live instances have this GPU type (never `GpuType::None`).
    Gpu(GpuType),
}

// === impl Scope ===

impl Scope {
    /// The stored key (`user:<id>`, `gpu:<code>`).
    pub fn key(&self) -> String {
        match self {
            Scope::User(user_id) => format!("user:{user_id}"),
            Scope::Gpu(gpu) => format!("gpu:{}", gpu.code()),
        }
    }

    /// The scope stored under `key`.
    pub fn from_key(key: &str) -> Option<Scope> {
        if let Some(user_id) = key.strip_prefix("user:") {
            return Some(Scope::User(user_id.to_owned()));
        }
        let gpu = GpuType::from_code(key.strip_prefix("gpu:")?.parse().ok()?)?;
        (gpu != GpuType::None).then_some(Scope::Gpu(gpu))
    }

    /// The GPU scopes, one per type.
    pub fn gpus() -> impl Iterator<Item = Scope> {
        GpuType::ALL.into_iter().skip(1).map(Scope::Gpu)
    }

    /// The counters an instance adds to, with what it adds.
    pub fn shares_of(instance: &Instance) -> Vec<(Scope, Amounts)> {
        let held = held_by(instance);
        let mut shares = vec![(Scope::User(instance.user_id.clone()), held)];
        if instance.spec.gpu != GpuType::None {
            shares.push((
                Scope::Gpu(instance.spec.gpu),
                Amounts { instances: held.instances, ..Amounts::default() },
            ));
        }
        shares
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// Limits in force, per dimension: `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaLimits {
    /// Most live instances.
    pub instances: Option<i64>,
    /// Most CPU cores.
    pub cpu: Option<i64>,
    /// Most memory, MB.
    pub memory_mb: Option<i64>,
    /// Most GPUs.
    pub gpus: Option<i64>,
}

// === impl QuotaLimits ===

impl QuotaLimits {
    /// From amounts where 0 means unlimited (the configuration's spelling).
    pub fn from_amounts(a: Amounts) -> Self {
        let limit = |v: i64| (v > 0).then_some(v);
        Self {
            instances: limit(a.instances),
            cpu: limit(a.cpu),
            memory_mb: limit(a.memory_mb),
            gpus: limit(a.gpus),
        }
    }

    /// As amounts where 0 means unlimited.
    pub fn to_amounts(self) -> Amounts {
        Amounts {
            instances: self.instances.unwrap_or(0),
            cpu: self.cpu.unwrap_or(0),
            memory_mb: self.memory_mb.unwrap_or(0),
            gpus: self.gpus.unwrap_or(0),
        }
    }

    /// The dimensions with their names, in the order they are checked.
    pub fn named(&self) -> [(&'static str, Option<i64>); 4] {
        [
            ("instances", self.instances),
            ("cpu", self.cpu),
            ("memory_mb", self.memory_mb),
            ("gpus", self.gpus),
        ]
    }

    /// The first dimension `change` raises above its limit, from `usage`, as
    /// `(name, limit, usage, requested)`.
    pub fn exceeded_by(
        &self,
        usage: Amounts,
        change: Amounts,
    ) -> Option<(&'static str, i64, i64, i64)> {
        self.named().into_iter().zip(usage.named()).zip(change.named()).find_map(
            |(((name, limit), (_, used)), (_, asked))| {
                let limit = limit?;
                (asked > 0 && used + asked > limit).then_some((name, limit, used, asked))
            },
        )
    }
}

/// An owner's own limits, set by an admin: `None` keeps the configured default, `Some(0)`
/// is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaOverride {
    /// Most live instances.
    pub instances: Option<i64>,
    /// Most CPU cores.
    pub cpu: Option<i64>,
    /// Most memory, MB.
    pub memory_mb: Option<i64>,
    /// Most GPUs.
    pub gpus: Option<i64>,
}

// === impl QuotaOverride ===

impl QuotaOverride {
    /// The limits in force: these where set, else `defaults`.
    pub fn over(&self, defaults: QuotaLimits) -> QuotaLimits {
        let pick = |own: Option<i64>, default: Option<i64>| match own {
            Some(0) => None,
            Some(v) => Some(v),
            None => default,
        };
        QuotaLimits {
            instances: pick(self.instances, defaults.instances),
            cpu: pick(self.cpu, defaults.cpu),
            memory_mb: pick(self.memory_mb, defaults.memory_mb),
            gpus: pick(self.gpus, defaults.gpus),
        }
    }

    /// Whether nothing is set (the defaults apply).
    pub fn is_empty(&self) -> bool {
        *self == QuotaOverride::default()
    }

    fn validate(&self) -> Result<(), Error> {
        let fields = [
            ("instances", self.instances),
            ("cpu", self.cpu),
            ("memory_mb", self.memory_mb),
            ("gpus", self.gpus),
        ];
        for (name, value) in fields {
            if value.is_some_and(|v| v < 0) {
                return Err(Error::invalid(
                    "limits",
                    format!("{name} must be 0 (unlimited) or more, got {}", value.unwrap_or(0)),
                ));
            }
        }
        Ok(())
    }
}

/// The `quota` section: default limits of every owner and the fleet's GPU capacity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaConf {
    /// Limits of an owner without limits of their own.
    pub per_user: QuotaLimits,
    /// Most live instances per GPU type, by code (`None`: unlimited; index 0, no GPU, is
    /// always `None`).
    pub gpu_capacity: [Option<i64>; GpuType::ALL.len()],
}

// === impl QuotaConf ===

impl QuotaConf {
    /// The capacity of `gpu`, if limited.
    pub fn capacity(&self, gpu: GpuType) -> Option<i64> {
        if gpu == GpuType::None {
            return None;
        }
        self.gpu_capacity[gpu.code() as usize]
    }

    /// The limits in force for `scope`, given the owner's own limits.
    pub fn limits_of(&self, scope: &Scope, own: Option<&QuotaOverride>) -> QuotaLimits {
        match scope {
            Scope::User(_) => own.map_or(self.per_user, |own| own.over(self.per_user)),
            Scope::Gpu(gpu) => {
                QuotaLimits { instances: self.capacity(*gpu), ..QuotaLimits::default() }
            }
        }
    }
}

/// What a unit of work read of one counter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// The counter (zero when it has no row yet).
    pub usage: Amounts,
    /// The owner's own limits (user scopes only).
    pub own: Option<QuotaOverride>,
}

/// A change of one counter, written with the unit of work that causes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageChange {
    /// The counter.
    pub scope: Scope,
    /// What is added (negative: freed).
    pub delta: Amounts,
    /// The limits the planner admitted the change under. Implementations MUST refuse to
    /// commit (`RepoError::Conflict`) when a dimension the change raises ends above its
    /// limit: the counter moved since it was read, and the unit of work is planned again.
    pub limits: QuotaLimits,
}

/// One owner's quota as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserQuota {
    /// The owner.
    pub user_id: String,
    /// The limits in force.
    pub limits: QuotaLimits,
    /// What their instances hold.
    pub usage: Amounts,
    /// Their own limits, where set.
    pub own: QuotaOverride,
}

/// One GPU type's capacity as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuCapacity {
    /// The type.
    pub gpu: GpuType,
    /// Most live instances (`None`: unlimited).
    pub capacity: Option<i64>,
    /// Live instances.
    pub used: i64,
}

impl GpuCapacity {
    /// What is left (`None`: unlimited); never negative.
    pub fn free(&self) -> Option<i64> {
        self.capacity.map(|c| (c - self.used).max(0))
    }
}

/// Counters and owners' limits.
#[async_trait]
pub trait QuotaRepo: Send + Sync {
    /// The counters of `scopes` and, for owners, their own limits. A scope without a row
    /// is absent from the map (it holds nothing).
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn held(&self, scopes: &[Scope]) -> Result<HashMap<Scope, Held>, RepoError>;

    /// Replaces `user_id`'s own limits (an empty override removes them).
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn set_own(&self, user_id: &str, own: &QuotaOverride) -> Result<(), RepoError>;
}

/// Reading and setting quotas, and the fleet's GPU capacity.
#[derive(Clone)]
pub struct QuotaUsecase {
    repo: Arc<dyn QuotaRepo>,
    conf: QuotaConf,
}

// === impl QuotaUsecase ===

impl QuotaUsecase {
    /// Quotas in `repo`, with `conf`'s defaults and capacities.
    pub fn new(repo: Arc<dyn QuotaRepo>, conf: QuotaConf) -> Self {
        Self { repo, conf }
    }

    /// The configured defaults and capacities.
    pub fn conf(&self) -> &QuotaConf {
        &self.conf
    }

    /// `user_id`'s limits and usage; a user may read their own, an admin anyone's.
    ///
    /// # Errors
    /// `InvalidArgument`, `PermissionDenied`, `Unavailable`.
    pub async fn get(&self, caller: &Access, user_id: &str) -> Result<UserQuota, Error> {
        check_user_id(user_id)?;
        if !caller.admin && caller.user_id != user_id {
            return Err(Error::PermissionDenied {
                message: "only an admin reads another user's quota".into(),
            });
        }
        let scope = Scope::User(user_id.to_owned());
        let held = self.repo.held(std::slice::from_ref(&scope)).await?.remove(&scope);
        let held = held.unwrap_or_default();
        Ok(UserQuota {
            user_id: user_id.to_owned(),
            limits: self.conf.limits_of(&scope, held.own.as_ref()),
            usage: held.usage,
            own: held.own.unwrap_or_default(),
        })
    }

    /// Replaces `user_id`'s own limits (admin only) and returns the quota after.
    ///
    /// # Errors
    /// `InvalidArgument`, `PermissionDenied`, `Unavailable`.
    pub async fn set(
        &self,
        caller: &Access,
        user_id: &str,
        own: QuotaOverride,
    ) -> Result<UserQuota, Error> {
        check_user_id(user_id)?;
        if !caller.admin {
            return Err(Error::PermissionDenied { message: "only an admin sets quotas".into() });
        }
        own.validate()?;
        self.repo.set_own(user_id, &own).await?;
        tracing::info!(user_id, by = %caller.user_id, ?own, "quota set");
        self.get(caller, user_id).await
    }

    /// Capacity and use of every GPU type.
    ///
    /// # Errors
    /// `Unavailable`.
    pub async fn capacity(&self) -> Result<Vec<GpuCapacity>, Error> {
        let scopes: Vec<Scope> = Scope::gpus().collect();
        let held = self.repo.held(&scopes).await?;
        Ok(scopes
            .into_iter()
            .filter_map(|scope| {
                let Scope::Gpu(gpu) = scope else { return None };
                let used = held.get(&scope).map_or(0, |h| h.usage.instances);
                Some(GpuCapacity { gpu, capacity: self.conf.capacity(gpu), used })
            })
            .collect())
    }

    /// Publishes capacity and use per GPU type as gauges, every `period`, until `shutdown`.
    pub async fn keep_gauges(
        self,
        period: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut every = tokio::time::interval(period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            match self.capacity().await {
                Ok(gpus) => {
                    for c in gpus {
                        let model = c.gpu.model();
                        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
                        {
                            metrics::gauge!("resource_gpu_used", "gpu" => model).set(c.used as f64);
                            // -1: unlimited.
                            metrics::gauge!("resource_gpu_capacity", "gpu" => model)
                                .set(c.capacity.map_or(-1.0, |v| v as f64));
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading GPU usage for the gauges failed"),
            }
        }
    }
}

fn check_user_id(user_id: &str) -> Result<(), Error> {
    if user_id.is_empty() {
        return Err(Error::invalid("user_id", "required"));
    }
    super::instance::validate_text("user_id", user_id)
}

#[cfg(test)]
mod tests;
