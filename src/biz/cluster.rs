//! The cluster that runs instances, as the reconciler sees it: what an instance should
//! run (a [`Workload`]), what runs (an [`Observed`] workload), and the [`Cluster`] trait
//! a Kubernetes implementation in `data` provides.

use std::{collections::BTreeMap, sync::Mutex};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    BoxError, Error, RepoError,
    health::Probe,
    instance::{Endpoint, GpuType, Instance, InstanceId, Labels, Port},
};

/// The container settings `config_json` may carry (every key optional, others ignored):
///
/// ```json
/// {"env": {"NAME": "value"}, "command": ["/bin/app"], "args": ["--flag"],
///  "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerConfig {
    /// Environment variables (values given as strings, numbers or booleans).
    pub env: BTreeMap<String, String>,
    /// Replaces the image's entrypoint.
    pub command: Vec<String>,
    /// Replaces the image's arguments.
    pub args: Vec<String>,
    /// Ports exposed by the instance's Service.
    pub ports: Vec<Port>,
}

impl ContainerConfig {
    /// Reads the documented keys of `config_json`.
    ///
    /// # Errors
    /// `InvalidSpec` for `config_json`, naming the key that does not fit the schema.
    pub fn from_config(config: &serde_json::Value) -> Result<Self, Error> {
        let bad = |message: String| Error::InvalidSpec { field: "config_json", message };
        let mut out = ContainerConfig::default();
        if let Some(env) = config.get("env") {
            let env = env.as_object().ok_or_else(|| bad("env must be an object".into()))?;
            for (name, value) in env {
                if !is_env_name(name) {
                    return Err(bad(format!("env name {name:?} is not a valid variable name")));
                }
                let value = match value {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => number_text(n),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => return Err(bad(format!("env {name:?} must be a string"))),
                };
                out.env.insert(name.clone(), value);
            }
        }
        out.command = string_list(config, "command").map_err(bad)?;
        out.args = string_list(config, "args").map_err(bad)?;
        if let Some(ports) = config.get("ports") {
            let ports = ports.as_array().ok_or_else(|| bad("ports must be a list".into()))?;
            for (i, port) in ports.iter().enumerate() {
                out.ports.push(parse_port(i, port).map_err(bad)?);
            }
            let mut names: Vec<&str> = out.ports.iter().map(|p| p.name.as_str()).collect();
            names.sort_unstable();
            if names.windows(2).any(|w| w[0] == w[1]) {
                return Err(bad("ports must have distinct names".into()));
            }
        }
        Ok(out)
    }
}

/// A JSON number as an environment value: integral numbers without a fraction (the API
/// stores config numbers as doubles, so `4` may arrive as `4.0`).
fn number_text(n: &serde_json::Number) -> String {
    match n.as_f64() {
        #[allow(clippy::cast_possible_truncation)] // integral and below 2^53: exact
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 => {
            (f as i64).to_string()
        }
        _ => n.to_string(),
    }
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
}

fn string_list(config: &serde_json::Value, key: &str) -> Result<Vec<String>, String> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_owned).ok_or(format!("{key} must be a list of strings"))
            })
            .collect(),
        Some(_) => Err(format!("{key} must be a list of strings")),
    }
}

fn parse_port(i: usize, port: &serde_json::Value) -> Result<Port, String> {
    // Config numbers may arrive as doubles (`8080.0`).
    let number = port
        .get("port")
        .and_then(serde_json::Value::as_f64)
        .filter(|p| p.fract() == 0.0 && (1.0..=65535.0).contains(p))
        .ok_or(format!("ports[{i}].port must be an integer between 1 and 65535"))?;
    let protocol = match port.get("protocol").and_then(serde_json::Value::as_str) {
        None => "TCP".to_owned(),
        Some(p) if p.eq_ignore_ascii_case("tcp") => "TCP".to_owned(),
        Some(p) if p.eq_ignore_ascii_case("udp") => "UDP".to_owned(),
        Some(p) => return Err(format!("ports[{i}].protocol {p:?} must be TCP or UDP")),
    };
    let name = match port.get("name").and_then(serde_json::Value::as_str) {
        None => format!("p{}", number as i64),
        Some(n) => n.to_owned(),
    };
    // A Kubernetes port name: at most 15 lower-case letters, digits and '-'.
    let name_ok = !name.is_empty()
        && name.len() <= 15
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !name_ok {
        return Err(format!(
            "ports[{i}].name {name:?} must be 1-15 lower-case letters, digits or '-'"
        ));
    }
    #[allow(clippy::cast_possible_truncation)] // integral and within 1..=65535
    Ok(Port { name, port: number as i32, protocol })
}

/// What one instance should run.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// The instance.
    pub id: InstanceId,
    /// Its owner.
    pub owner: String,
    /// Image reference.
    pub image: String,
    /// CPU cores (requests = limits).
    pub cpu: i32,
    /// Memory in MiB (requests = limits).
    pub memory_mb: i32,
    /// GPU type; one device when not `None`.
    pub gpu: GpuType,
    /// Container settings from `config_json`.
    pub container: ContainerConfig,
    /// Digest of everything above: a running workload whose hash differs is replaced.
    pub spec_hash: String,
    /// The instance's labels, copied onto the Pod and Service (under
    /// `labels.resource.io/`, see `instance::pod_label_key`).
    pub labels: Labels,
    /// Digest of `labels` (empty when there are none): a workload applied with other
    /// labels is applied again in place, not replaced.
    pub labels_hash: String,
}

impl Workload {
    /// The workload of `instance`.
    ///
    /// # Errors
    /// `InvalidSpec` when `config_json` does not fit the container schema (the API and
    /// the planner refuse such specs, so only rows written by older versions can).
    pub fn of(instance: &Instance) -> Result<Self, Error> {
        let spec = &instance.spec;
        let container = ContainerConfig::from_config(&spec.config)?;
        let mut hasher = Sha256::new();
        hasher.update(spec.image.as_bytes());
        hasher.update(spec.cpu.to_be_bytes());
        hasher.update(spec.memory_mb.to_be_bytes());
        hasher.update(spec.gpu.code().to_be_bytes());
        hasher.update(serde_json::to_vec(&spec.config).unwrap_or_default());
        let digest = hasher.finalize();
        let spec_hash = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Ok(Workload {
            id: instance.id,
            owner: instance.user_id.clone(),
            image: spec.image.clone(),
            cpu: spec.cpu,
            memory_mb: spec.memory_mb,
            gpu: spec.gpu,
            container,
            spec_hash,
            labels_hash: labels_hash(&instance.labels),
            labels: instance.labels.clone(),
        })
    }
}

/// A digest of `labels`, empty for none (so workloads applied before labels existed are
/// not applied again).
fn labels_hash(labels: &Labels) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let digest = Sha256::digest(serde_json::to_vec(labels).unwrap_or_default());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// How a workload is doing, as the cluster reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, not running yet. `Some`: why it does not start on its own soon (not
    /// schedulable, held by another controller), worth showing the user.
    Pending(Option<String>),
    /// Running and ready.
    Running,
    /// Cannot run: the reason (image pull error, crash loop, exited).
    Failed(String),
}

/// A difference between what the service applied and what runs, made behind its back
/// (`kubectl edit`, another controller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// The container runs another image (mutable: restored in place).
    Image {
        /// What runs.
        live: String,
    },
    /// The service's labels or annotations are missing or changed (restored in place).
    Metadata,
    /// The service's finalizer was removed (restored in place).
    Finalizer,
    /// The Service is missing or differs (selector, ports, headless or not).
    Service(String),
    /// An immutable part of the Pod differs (resources, node selector, ports,
    /// command, environment): the Pod is replaced.
    Pod(&'static str),
}

impl Drift {
    /// Whether correcting it needs a new Pod.
    pub fn replaces(&self) -> bool {
        matches!(self, Drift::Pod(_))
    }
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::Image { live } => write!(f, "the image was changed to {live:?}"),
            Drift::Metadata => f.write_str("the labels or annotations were changed"),
            Drift::Finalizer => f.write_str("the finalizer was removed"),
            Drift::Service(what) => write!(f, "the Service {what}"),
            Drift::Pod(what) => write!(f, "the Pod's {what} differ"),
        }
    }
}

/// One workload found in the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The instance it belongs to.
    pub id: InstanceId,
    /// The spec hash it was applied with (empty: none recorded).
    pub spec_hash: String,
    /// The labels hash it was applied with (empty: none recorded, or no labels).
    pub labels_hash: String,
    /// How it is doing.
    pub phase: Phase,
    /// Where it can be reached (pod name and IP, service host and ports).
    pub endpoint: Endpoint,
    /// Being deleted (it has a deletion timestamp).
    pub terminating: bool,
    /// Still carries the service's finalizer: if it is terminating, someone else
    /// deleted it (the service removes its finalizer before it deletes).
    pub protected: bool,
    /// Finalizers of other controllers, which hold a terminating Pod.
    pub foreign_finalizers: Vec<String>,
    /// How it differs from the workload it was compared with.
    pub drift: Vec<Drift>,
}

/// An object carrying the service's managed-by label that is no instance's workload
/// (not named `inst-<id>`, or not labelled with the id of its name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stray {
    /// `Pod` or `Service`.
    pub kind: &'static str,
    /// Its name.
    pub name: String,
    /// The instance its labels name, if any.
    pub instance: Option<InstanceId>,
}

/// Why a cluster call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The API server did not answer in time, or answered 5xx/429; retry with backoff,
    /// not before `retry_after` when it said so.
    #[error("cluster unavailable: {source}")]
    Unavailable {
        /// What failed.
        #[source]
        source: BoxError,
        /// The server's `Retry-After`.
        retry_after: Option<std::time::Duration>,
    },
    /// The API server refused the request (4xx); retrying the same request will not help
    /// until someone changes something (permissions, quotas).
    #[error("cluster refused the request: {0}")]
    Refused(String),
    /// The instances' namespace does not exist, or is being deleted.
    #[error("{0}")]
    NamespaceMissing(String),
}

impl ClusterError {
    /// An `Unavailable` without a server hint.
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        ClusterError::Unavailable { source: source.into(), retry_after: None }
    }

    /// The server's hint of when to try again.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            ClusterError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// What [`Cluster::ensure_namespace`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamespaceState {
    /// It exists.
    Exists,
    /// It was missing and has been created.
    Created,
    /// It is being deleted; it can be created again once it is gone.
    Terminating,
    /// It is missing and the service may not create it.
    Missing,
}

/// The cluster. Implementations own the mapping to Pods and Services and keep a cache
/// of them fed by watches, so reading costs no request.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// Creates or updates the workload of an instance (idempotent).
    ///
    /// # Errors
    /// `ClusterError` when the API server fails or refuses.
    async fn apply(&self, workload: &Workload) -> Result<(), ClusterError>;

    /// Removes what exists of an instance's workload (releasing the service's
    /// finalizer first); whether nothing of it remains.
    ///
    /// # Errors
    /// `ClusterError` when the API server fails or refuses.
    async fn remove(&self, id: InstanceId) -> Result<bool, ClusterError>;

    /// Removes the instance's Pod only (its Service stays), to have it created anew.
    ///
    /// # Errors
    /// `ClusterError` when the API server fails or refuses.
    async fn replace_pod(&self, id: InstanceId) -> Result<(), ClusterError>;

    /// The workload of one instance, if its Pod exists, compared with `want` (from the
    /// cache).
    fn observe(&self, id: InstanceId, want: Option<&Workload>) -> Option<Observed>;

    /// Whether the instance's Service exists (from the cache).
    fn has_service(&self, id: InstanceId) -> bool;

    /// The instances that have a Pod or a Service (from the cache).
    fn known(&self) -> Vec<InstanceId>;

    /// Objects labelled as the service's that belong to no instance (from the cache).
    fn strays(&self) -> Vec<Stray>;

    /// Deletes a stray object.
    ///
    /// # Errors
    /// `ClusterError` when the API server fails or refuses.
    async fn remove_stray(&self, stray: &Stray) -> Result<(), ClusterError>;

    /// Makes sure the instances' namespace exists, creating it when allowed.
    ///
    /// # Errors
    /// `ClusterError` when the API server fails or refuses.
    async fn ensure_namespace(&self) -> Result<NamespaceState, ClusterError>;

    /// Keeps the cache in step with the cluster until `shutdown`, sending the id of each
    /// instance whose objects change (the implementation reports its watches' state to
    /// the [`ClusterHealth`] it was made with).
    async fn watch(&self, changed: mpsc::Sender<InstanceId>, shutdown: CancellationToken);
}

/// What readiness knows of the cluster: the watches, the calls, the namespace.
#[derive(Debug)]
pub struct ClusterHealth {
    state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    /// Watches by kind: since when listed and watching (`None`: failed, or not yet).
    watches: BTreeMap<&'static str, Option<Instant>>,
    /// Every watch has listed once: the cache can be read.
    listed: bool,
    /// When recent watch failures happened, and the last one.
    watch_failures: Vec<Instant>,
    last_watch_error: String,
    /// Cluster reads and writes failed in a row, when a write last failed, and the last
    /// failure: a cluster that answers reads but refuses every write is not usable.
    failing_reads: u32,
    failing_writes: u32,
    last_write_failure: Option<Instant>,
    last_call_error: String,
    /// How long without a failure, after repeated ones the last of which was a hang, the
    /// watches need to count as healthy again (a hang shows only once per cycle).
    settle: std::time::Duration,
    last_failure_hung: bool,
    /// Why the namespace cannot be used, if it cannot.
    namespace: Option<String>,
}

/// Watch failures within this window that make the watch count as failing (a 410 Gone
/// loop: each watch is listed, then fails at once) ...
const WATCH_FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// ... how many ...
const WATCH_FAILURES: usize = 3;
/// ... until a watch has stayed up this long (at least; see [`ClusterHealth::new`]).
const WATCH_STABLE: std::time::Duration = std::time::Duration::from_secs(5);
/// A streak of failed writes counts this long after the last one (nothing may need
/// writing for a while).
const WRITE_FAILURES_KEPT: std::time::Duration = std::time::Duration::from_secs(60);
/// A watch that stayed up this long before failing starts a fresh count.
const WATCH_LASTED: std::time::Duration = std::time::Duration::from_secs(30);
/// Calls failed in a row that make the cluster count as failing.
const CALL_FAILURES: u32 = 3;

impl ClusterHealth {
    /// Health of watches of `kinds`, none established yet. After repeated failures the
    /// watches count as healthy again once none has failed for 5 s, or for `settle` when
    /// the last one hung (longer than one watch cycle: a watch that hangs is only noticed
    /// when its cycle ends).
    pub fn new(kinds: &[&'static str], settle: std::time::Duration) -> Self {
        let watches = kinds.iter().map(|k| (*k, None)).collect();
        let settle = settle.max(WATCH_STABLE);
        Self { state: Mutex::new(HealthState { watches, settle, ..HealthState::default() }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The watch of `kind` has listed everything and watches.
    pub fn watch_established(&self, kind: &'static str) {
        let mut state = self.lock();
        state.watches.insert(kind, Some(Instant::now()));
        if state.watches.values().all(Option::is_some) {
            state.listed = true;
        }
    }

    /// Whether every watch has listed at least once, so the cache can be read.
    pub fn listed(&self) -> bool {
        self.lock().listed
    }

    /// The watch of `kind` failed (`hung`: it did not answer in time); it is
    /// re-established.
    pub fn watch_failed(&self, kind: &'static str, hung: bool, error: &str) {
        let mut state = self.lock();
        state.last_failure_hung = hung;
        let now = Instant::now();
        if let Some(Some(up)) = state.watches.insert(kind, None)
            && now.duration_since(up) >= WATCH_LASTED
        {
            state.watch_failures.clear();
        }
        state.watch_failures.retain(|at| now.duration_since(*at) < WATCH_FAILURE_WINDOW);
        state.watch_failures.push(now);
        state.last_watch_error = format!("{kind} watch: {error}");
    }

    /// A cluster call answered (`write`: it was a write).
    pub fn call_succeeded(&self, write: bool) {
        let mut state = self.lock();
        if write {
            state.failing_writes = 0;
        } else {
            state.failing_reads = 0;
        }
    }

    /// A cluster call failed (not answered, 5xx, 429, 401 or 403).
    pub fn call_failed(&self, write: bool, error: &str) {
        let mut state = self.lock();
        if write {
            state.failing_writes = state.failing_writes.saturating_add(1);
            state.last_write_failure = Some(Instant::now());
        } else {
            state.failing_reads = state.failing_reads.saturating_add(1);
        }
        state.last_call_error = error.to_owned();
    }

    /// Why the namespace cannot be used (`None`: it can).
    pub fn namespace(&self, problem: Option<String>) {
        self.lock().namespace = problem;
    }

    /// What is wrong, if anything.
    pub fn problem(&self) -> Option<String> {
        let state = self.lock();
        if let Some(problem) = &state.namespace {
            return Some(problem.clone());
        }
        if let Some((kind, _)) = state.watches.iter().find(|(_, up)| up.is_none()) {
            let cause = if state.last_watch_error.is_empty() {
                "not listed yet".to_owned()
            } else {
                state.last_watch_error.clone()
            };
            return Some(format!("the {kind} watch is not established ({cause})"));
        }
        let now = Instant::now();
        let recent = state
            .watch_failures
            .iter()
            .filter(|at| now.duration_since(**at) < WATCH_FAILURE_WINDOW)
            .count();
        let last_failure = state.watch_failures.iter().max().copied();
        let settle = if state.last_failure_hung { state.settle } else { WATCH_STABLE };
        let settled = last_failure.is_none_or(|at| now.duration_since(at) >= settle);
        if recent >= WATCH_FAILURES && !settled {
            return Some(format!(
                "the cluster watch failed {recent} times in {} s (last: {})",
                WATCH_FAILURE_WINDOW.as_secs(),
                state.last_watch_error
            ));
        }
        let writes_failing = state.failing_writes >= CALL_FAILURES
            && state
                .last_write_failure
                .is_some_and(|at| now.duration_since(at) < WRITE_FAILURES_KEPT);
        if state.failing_reads >= CALL_FAILURES || writes_failing {
            let (n, what) = if writes_failing {
                (state.failing_writes, "writes")
            } else {
                (state.failing_reads, "calls")
            };
            return Some(format!(
                "{n} cluster {what} failed in a row (last: {})",
                state.last_call_error
            ));
        }
        None
    }
}

#[async_trait]
impl Probe for ClusterHealth {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    async fn check(&self) -> Result<(), RepoError> {
        match self.problem() {
            None => Ok(()),
            Some(problem) => Err(RepoError::Unavailable(problem.into())),
        }
    }
}

#[cfg(test)]
mod tests;
