//! Explanations: why an instance is, or is not, in the state it should be — one sentence
//! naming the cause, the conditions behind it and the recent cluster events of its Pod —
//! from what the cluster says ([`PodEvidence`], through the [`ClusterEvidence`] trait a
//! Kubernetes implementation in `data` provides) or, without a cluster, from the database.
//!
//! Depends on the instance entity and the cluster error only; the derivation is a pure
//! function of (instance, evidence).

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    cluster::ClusterError,
    instance::{GpuType, Instance, InstanceId, InstanceStatus},
};

/// Most events an explanation carries (the newest).
pub const MAX_EVENTS: usize = 20;

/// Longest cluster message quoted in a summary, in characters.
const QUOTED_MAX: usize = 240;

/// Container waiting reasons that mean its image cannot be pulled.
const IMAGE_PULL_REASONS: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "RegistryUnavailable",
    "ImageInspectError",
];

/// Container waiting reasons that are the normal course of starting.
const STARTING_REASONS: &[&str] = &["ContainerCreating", "PodInitializing"];

/// Event reasons that say a volume is not ready.
const VOLUME_EVENT_REASONS: &[&str] =
    &["FailedMount", "FailedAttachVolume", "FailedMapVolume", "ProvisioningFailed"];

/// One condition: a Pod condition (`PodScheduled`, `Ready`, …), one derived from a
/// container's state, or one the database implies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// `PodScheduled`, `Initialized`, `ContainersReady`, `Ready`, `ContainerRunning`, ….
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable cause (`Unschedulable`), or empty.
    pub reason: String,
    /// What the cluster (or the database) said, or empty.
    pub message: String,
    /// When the status last changed, if known.
    pub last_transition: Option<DateTime<Utc>>,
}

/// One cluster event about the instance's Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEvent {
    /// `Normal` or `Warning`.
    pub kind: String,
    /// `Scheduled`, `Failed`, `BackOff`, `FailedScheduling`, ….
    pub reason: String,
    /// What happened.
    pub message: String,
    /// How many times it happened (at least 1).
    pub count: i32,
    /// When it last happened, if known.
    pub last_seen: Option<DateTime<Utc>>,
}

impl ClusterEvent {
    fn is_warning(&self) -> bool {
        self.kind == "Warning"
    }
}

/// How a container ended, now or the last time it ran.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Termination {
    /// `Error`, `OOMKilled`, `Completed`, …, or empty.
    pub reason: String,
    /// The termination message, or empty.
    pub message: String,
    /// The exit code.
    pub exit_code: i32,
}

/// Why a container is waiting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Waiting {
    /// `ErrImagePull`, `CrashLoopBackOff`, `ContainerCreating`, …, or empty.
    pub reason: String,
    /// What the kubelet said, or empty.
    pub message: String,
}

/// One container of the Pod as the kubelet reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerEvidence {
    /// The container's name.
    pub name: String,
    /// The image it runs (or tries to).
    pub image: String,
    /// Passes its readiness checks.
    pub ready: bool,
    /// Times it was restarted.
    pub restart_count: i32,
    /// Runs now.
    pub running: bool,
    /// Waits to run, and why.
    pub waiting: Option<Waiting>,
    /// Has ended, and how.
    pub terminated: Option<Termination>,
    /// How it ended the previous time it ran.
    pub last_terminated: Option<Termination>,
}

/// The instance's Pod as the cluster reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodState {
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown` (empty: not reported).
    pub phase: String,
    /// The Pod's own reason (`Evicted`), or empty.
    pub reason: String,
    /// The Pod's own message, or empty.
    pub message: String,
    /// Being deleted.
    pub terminating: bool,
    /// Finalizers of other controllers, which hold a terminating Pod.
    pub held_by: Vec<String>,
    /// The Pod's conditions.
    pub conditions: Vec<Condition>,
    /// Its containers (init containers first).
    pub containers: Vec<ContainerEvidence>,
}

impl PodState {
    fn condition(&self, kind: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }
}

/// What the cluster says about an instance's Pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodEvidence {
    /// The Pod, `None` when there is none.
    pub pod: Option<PodState>,
    /// Its recent events (also those of an earlier Pod of the same name when there is
    /// none now), in any order.
    pub events: Vec<ClusterEvent>,
}

/// Which evidence an explanation rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvidenceSource {
    /// The live cluster.
    Cluster,
    /// The database only (no cluster, or it could not be reached).
    Database,
}

impl EvidenceSource {
    /// `cluster` or `database`.
    pub fn as_str(self) -> &'static str {
        match self {
            EvidenceSource::Cluster => "cluster",
            EvidenceSource::Database => "database",
        }
    }
}

/// Why an instance is in its state.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// The instance as stored.
    pub instance: Instance,
    /// One sentence naming the cause.
    pub summary: String,
    /// The conditions behind it.
    pub conditions: Vec<Condition>,
    /// The Pod's recent events, newest first, at most [`MAX_EVENTS`].
    pub events: Vec<ClusterEvent>,
    /// Which evidence was used.
    pub source: EvidenceSource,
}

/// What the cluster says about instances' Pods.
#[async_trait]
pub trait ClusterEvidence: Send + Sync {
    /// The Pod of instance `id` (read live, not from a cache) and its recent events.
    ///
    /// # Errors
    /// Implementations MUST return `ClusterError::Unavailable` when the API server does
    /// not answer or fails, and `Refused` when it refuses (no permission to read events).
    async fn evidence(&self, id: InstanceId) -> Result<PodEvidence, ClusterError>;
}

/// What was gathered for an explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gathered {
    /// No cluster is configured.
    NoCluster,
    /// The cluster is configured but did not answer: why.
    Unreachable(String),
    /// The cluster answered.
    Found(PodEvidence),
}

/// Explains instances from the cluster when there is one.
pub struct ExplainUsecase {
    evidence: Option<Arc<dyn ClusterEvidence>>,
    wait: Duration,
}

// === impl ExplainUsecase ===

impl ExplainUsecase {
    /// Explanations from `evidence` (`None`: Kubernetes is disabled), waiting at most
    /// `wait` for the cluster before answering from the database.
    pub fn new(evidence: Option<Arc<dyn ClusterEvidence>>, wait: Duration) -> Self {
        Self { evidence, wait }
    }

    /// Why `instance` is in its state. Never fails: a cluster that does not answer
    /// within the bound, or fails, is said so in the summary and the database answers.
    pub async fn explain(&self, instance: Instance) -> Explanation {
        let Some(source) = &self.evidence else {
            return explain(instance, Gathered::NoCluster);
        };
        let gathered = match tokio::time::timeout(self.wait, source.evidence(instance.id)).await {
            Ok(Ok(evidence)) => Gathered::Found(evidence),
            Ok(Err(e)) => {
                tracing::warn!(instance_id = instance.id.get(), error = %e, "explaining from the database: the cluster failed");
                Gathered::Unreachable(format!("the cluster could not be read: {e}"))
            }
            Err(_) => {
                let ms = self.wait.as_millis();
                tracing::warn!(
                    instance_id = instance.id.get(),
                    timeout_ms = ms,
                    "explaining from the database: the cluster did not answer in time"
                );
                Gathered::Unreachable(format!("the cluster did not answer within {ms} ms"))
            }
        };
        explain(instance, gathered)
    }
}

/// The explanation of `instance` from what was gathered.
pub fn explain(instance: Instance, gathered: Gathered) -> Explanation {
    let (evidence, unreachable) = match &gathered {
        Gathered::Found(evidence) => (Some(evidence), None),
        Gathered::Unreachable(why) => (None, Some(why.as_str())),
        Gathered::NoCluster => (None, None),
    };
    let mut summary = summarize(&instance, evidence);
    if let Some(why) = unreachable {
        // Still one sentence: the note goes before its full stop.
        summary.pop();
        summary.push_str(&format!(" ({why}; this is what the database says)."));
    }
    let conditions = match evidence.and_then(|e| e.pod.as_ref()) {
        Some(pod) => pod_conditions(pod),
        None => vec![database_condition(&instance, evidence)],
    };
    let events = evidence.map(|e| newest(&e.events)).unwrap_or_default();
    let source =
        if evidence.is_some() { EvidenceSource::Cluster } else { EvidenceSource::Database };
    Explanation { instance, summary, conditions, events, source }
}

/// One sentence saying why `instance` is (or is not) in the state it should be, naming the
/// cause; from the cluster's `evidence` when there is some, else from the database.
pub fn summarize(instance: &Instance, evidence: Option<&PodEvidence>) -> String {
    let head = format!("Instance {} is {}", instance.id.get(), instance.status.as_str());
    let reason = quoted(&instance.status_reason);
    let tail = match (instance.status, evidence) {
        (InstanceStatus::Failed, evidence) => Some(if !reason.is_empty() {
            reason
        } else {
            evidence
                .and_then(|e| cluster_cause(instance, e))
                .unwrap_or_else(|| "no reason was recorded".into())
        }),
        (InstanceStatus::Running | InstanceStatus::Creating, Some(e)) => running_cause(instance, e),
        (InstanceStatus::Stopping | InstanceStatus::Deleting, Some(e)) => {
            removal_cause(instance, e)
        }
        (InstanceStatus::Stopped | InstanceStatus::Deleted, Some(e)) if e.pod.is_some() => {
            return format!("{head} as requested, but its Pod still exists and is being removed.");
        }
        (InstanceStatus::Running | InstanceStatus::Stopped | InstanceStatus::Deleted, _) => None,
        (InstanceStatus::Creating, None) => {
            Some(non_empty(reason, "waiting for its workload to start"))
        }
        (InstanceStatus::Stopping, None) => {
            Some(non_empty(reason, "waiting for its workload to stop"))
        }
        (InstanceStatus::Deleting, None) => {
            Some(non_empty(reason, "waiting for its Pod to go away"))
        }
    };
    match tail {
        Some(tail) => format!("{head}: {tail}."),
        None if instance.status == InstanceStatus::Running => format!("{head} as desired."),
        None => format!("{head} as requested."),
    }
}

fn non_empty(text: String, otherwise: &str) -> String {
    if text.is_empty() { otherwise.to_owned() } else { text }
}

/// Why an instance that should run does not run as it should (`None`: it does).
fn running_cause(instance: &Instance, evidence: &PodEvidence) -> Option<String> {
    let creating = instance.status == InstanceStatus::Creating;
    let Some(pod) = &evidence.pod else {
        let cause = if creating {
            "its Pod has not been created yet"
        } else {
            "its Pod is missing and is being recreated"
        };
        return Some(with_latest_warning(cause, evidence));
    };
    if pod.terminating {
        return Some(format!("its Pod is being deleted{}", held_by(pod)));
    }
    if let Some(cause) = cluster_cause(instance, evidence) {
        return Some(cause);
    }
    let ready = pod.condition("Ready").is_some_and(|c| c.status == "True");
    if pod.phase == "Running" && ready {
        return creating.then(|| "its Pod runs and is ready; it becomes RUNNING shortly".into());
    }
    if pod.phase == "Running" {
        let why = pod
            .condition("ContainersReady")
            .filter(|c| c.status != "True")
            .map(|c| said(&c.reason, &c.message))
            .filter(|s| !s.is_empty());
        let unhealthy = latest_warning(evidence, |e| e.reason == "Unhealthy");
        return Some(match (unhealthy, why) {
            (Some(e), _) => format!("its container runs but is not ready ({})", event_said(e)),
            (None, Some(why)) => format!("its container runs but is not ready ({why})"),
            (None, None) => "its container runs but is not ready yet".into(),
        });
    }
    Some(with_latest_warning("its Pod is starting", evidence))
}

/// What keeps the Pod from running, from its containers, conditions, phase and events;
/// `None` when nothing is wrong.
fn cluster_cause(instance: &Instance, evidence: &PodEvidence) -> Option<String> {
    if let Some(pod) = &evidence.pod {
        if let Some(cause) = container_cause(instance, pod) {
            return Some(cause);
        }
        if let Some(c) = pod.condition("PodScheduled").filter(|c| c.status == "False") {
            return Some(scheduling_cause(instance, &c.reason, &c.message));
        }
        if matches!(pod.phase.as_str(), "Failed" | "Succeeded") {
            return Some(pod_ended(pod));
        }
    }
    // The kubelet's pull failures, when the Pod's status (read a moment apart) does not
    // show them yet or any more.
    if let Some(e) = latest_warning(evidence, is_pull_failure) {
        let image = &instance.spec.image;
        return Some(format!("its Pod cannot pull image {image:?} ({})", event_said(e)));
    }
    if let Some(e) = latest_warning(evidence, |e| VOLUME_EVENT_REASONS.contains(&e.reason.as_str()))
    {
        return Some(format!("its volumes are not ready ({})", event_said(e)));
    }
    if let Some(e) = latest_warning(evidence, |e| e.reason == "FailedScheduling") {
        return Some(scheduling_cause(instance, &e.reason, &e.message));
    }
    if evidence.pod.is_none() {
        // An earlier Pod's crash events still say what went wrong.
        if let Some(e) =
            latest_warning(evidence, |e| matches!(e.reason.as_str(), "Failed" | "BackOff"))
        {
            return Some(format!("its last Pod failed ({})", event_said(e)));
        }
    }
    None
}

/// What a container's state says is wrong, if anything.
fn container_cause(instance: &Instance, pod: &PodState) -> Option<String> {
    for c in &pod.containers {
        let image = if c.image.is_empty() { &instance.spec.image } else { &c.image };
        if let Some(w) = &c.waiting {
            if IMAGE_PULL_REASONS.contains(&w.reason.as_str()) {
                return Some(format!(
                    "its Pod cannot pull image {image:?} ({})",
                    said(&w.reason, &w.message)
                ));
            }
            if w.reason == "CrashLoopBackOff" {
                return Some(crash_loop(instance, c));
            }
            if !w.reason.is_empty() && !STARTING_REASONS.contains(&w.reason.as_str()) {
                return Some(format!(
                    "its container cannot start ({})",
                    said(&w.reason, &w.message)
                ));
            }
        }
        if let Some(t) = &c.terminated
            && pod.phase != "Failed"
            && pod.phase != "Succeeded"
        {
            if c.restart_count > 0 {
                return Some(crash_loop(instance, c));
            }
            return Some(format!("its container exited ({})", termination(instance, t)));
        }
        if c.running
            && let Some(t) = c.last_terminated.as_ref().filter(|t| t.reason == "OOMKilled")
            && !c.ready
        {
            return Some(format!(
                "its container restarted after running out of memory ({}, {} restarts)",
                termination(instance, t),
                c.restart_count
            ));
        }
    }
    None
}

/// An event of the kubelet saying an image cannot be pulled.
fn is_pull_failure(e: &ClusterEvent) -> bool {
    matches!(e.reason.as_str(), "Failed" | "BackOff" | "ErrImagePull" | "ImagePullBackOff")
        && (e.message.contains("pull image") || e.message.contains("pulling image"))
}

fn crash_loop(instance: &Instance, c: &ContainerEvidence) -> String {
    let restarts = match c.restart_count {
        1 => "1 restart".to_owned(),
        n => format!("{n} restarts"),
    };
    let last = c.last_terminated.as_ref().or(c.terminated.as_ref());
    match last {
        Some(t) => format!(
            "its container keeps crashing (CrashLoopBackOff, {restarts}): {}",
            termination(instance, t)
        ),
        None => format!("its container keeps crashing (CrashLoopBackOff, {restarts})"),
    }
}

/// How a container ended, with the memory limit when it ran out of memory.
fn termination(instance: &Instance, t: &Termination) -> String {
    let reason = if t.reason.is_empty() { "exited" } else { t.reason.as_str() };
    let mut text = format!("{reason}, exit code {}", t.exit_code);
    if t.reason == "OOMKilled" {
        text.push_str(&format!(": it ran out of its {} MiB memory limit", instance.spec.memory_mb));
    }
    let message = quoted(&t.message);
    if !message.is_empty() {
        text.push_str(&format!(": {message}"));
    }
    text
}

/// Why the Pod is not scheduled, naming the resource no node has.
fn scheduling_cause(instance: &Instance, reason: &str, message: &str) -> String {
    let said = said(reason, message);
    let lower = message.to_ascii_lowercase();
    if lower.contains("persistentvolumeclaim") {
        return format!("its volumes are not ready ({said})");
    }
    if message.contains("Insufficient nvidia.com/gpu") {
        let model = match instance.spec.gpu {
            GpuType::None => String::new(),
            gpu => format!(" for {}", gpu.model()),
        };
        return format!("no node has a free nvidia.com/gpu{model} ({said})");
    }
    for resource in ["cpu", "memory"] {
        if message.contains(&format!("Insufficient {resource}")) {
            return format!("no node has enough free {resource} for it ({said})");
        }
    }
    if lower.contains("node affinity/selector") || lower.contains("node selector") {
        return format!("no node matches its node selector ({said})");
    }
    format!("its Pod cannot be scheduled ({said})")
}

fn pod_ended(pod: &PodState) -> String {
    let phase = pod.phase.to_ascii_lowercase();
    match (pod.reason.as_str(), said(&pod.reason, &pod.message)) {
        ("Evicted", said) => format!("its Pod was evicted ({said})"),
        (_, said) if said.is_empty() => format!("its Pod {phase}"),
        (_, said) => format!("its Pod {phase} ({said})"),
    }
}

fn removal_cause(instance: &Instance, evidence: &PodEvidence) -> Option<String> {
    let deleting = instance.status == InstanceStatus::Deleting;
    let Some(pod) = &evidence.pod else {
        let next = if deleting { "DELETED" } else { "STOPPED" };
        return Some(format!("its Pod is gone; it becomes {next} shortly"));
    };
    let what =
        if deleting { "waiting for its Pod to go away" } else { "waiting for its Pod to stop" };
    if !pod.held_by.is_empty() {
        return Some(format!("{what}{}", held_by(pod)));
    }
    let reason = quoted(&instance.status_reason);
    Some(if reason.is_empty() { what.to_owned() } else { format!("{what} ({reason})") })
}

fn held_by(pod: &PodState) -> String {
    if pod.held_by.is_empty() {
        String::new()
    } else {
        format!(" (held by finalizers: {})", pod.held_by.join(", "))
    }
}

fn with_latest_warning(cause: &str, evidence: &PodEvidence) -> String {
    match latest_warning(evidence, |_| true) {
        Some(e) => format!("{cause}; latest warning: {}", event_said(e)),
        None => cause.to_owned(),
    }
}

fn latest_warning(
    evidence: &PodEvidence,
    matches: impl Fn(&ClusterEvent) -> bool,
) -> Option<&ClusterEvent> {
    evidence.events.iter().filter(|e| e.is_warning() && matches(e)).max_by_key(|e| e.last_seen)
}

fn event_said(e: &ClusterEvent) -> String {
    said(&e.reason, &e.message)
}

/// `reason: message`, either alone, or empty; quoted for a sentence.
fn said(reason: &str, message: &str) -> String {
    let message = quoted(message);
    match (reason.is_empty(), message.is_empty()) {
        (false, false) => format!("{reason}: {message}"),
        (false, true) => reason.to_owned(),
        (true, _) => message,
    }
}

/// Cluster text fit for the middle of a sentence: on one line, without a final full stop,
/// at most [`QUOTED_MAX`] characters.
fn quoted(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let trimmed = one_line.trim_end_matches('.');
    if trimmed.chars().count() <= QUOTED_MAX {
        return trimmed.to_owned();
    }
    let mut clipped: String = trimmed.chars().take(QUOTED_MAX).collect();
    clipped.push('…');
    clipped
}

/// The Pod's conditions, then one per container derived from its state.
fn pod_conditions(pod: &PodState) -> Vec<Condition> {
    let mut conditions = pod.conditions.clone();
    for c in &pod.containers {
        let (status, reason, message) = if c.running {
            let message = match &c.last_terminated {
                Some(t) if c.restart_count > 0 => {
                    format!(
                        "restarted {} times; last ended: {}",
                        c.restart_count,
                        said(&t.reason, &t.message)
                    )
                }
                _ => String::new(),
            };
            ("True", "Running".to_owned(), message)
        } else if let Some(w) = &c.waiting {
            ("False", w.reason.clone(), quoted(&w.message))
        } else if let Some(t) = &c.terminated {
            let reason =
                if t.reason.is_empty() { "Terminated".to_owned() } else { t.reason.clone() };
            ("False", reason, format!("exit code {}{}", t.exit_code, suffix(&t.message)))
        } else {
            ("Unknown", String::new(), String::new())
        };
        conditions.push(Condition {
            kind: "ContainerRunning".into(),
            status: status.into(),
            reason,
            message: if message.is_empty() {
                format!("container {}", c.name)
            } else {
                format!("container {}: {message}", c.name)
            },
            last_transition: None,
        });
    }
    conditions
}

fn suffix(message: &str) -> String {
    let message = quoted(message);
    if message.is_empty() { message } else { format!(": {message}") }
}

/// The `Ready` condition the database implies: true while the instance runs.
fn database_condition(instance: &Instance, evidence: Option<&PodEvidence>) -> Condition {
    let running = instance.status == InstanceStatus::Running;
    let message = if !instance.status_reason.is_empty() {
        instance.status_reason.clone()
    } else if evidence.is_some() {
        "the instance has no Pod".to_owned()
    } else {
        String::new()
    };
    Condition {
        kind: "Ready".into(),
        status: if running { "True" } else { "False" }.into(),
        reason: instance.status.as_str().into(),
        message,
        last_transition: Some(instance.updated_at),
    }
}

/// The newest [`MAX_EVENTS`] events, newest first (unknown times last).
fn newest(events: &[ClusterEvent]) -> Vec<ClusterEvent> {
    let mut events = events.to_vec();
    events.sort_by_key(|e| std::cmp::Reverse(e.last_seen));
    events.truncate(MAX_EVENTS);
    events
}

#[cfg(test)]
mod tests;
