//! The simulated scheduler and kubelet of the fake's single node.
//!
//! Each pod write that needs the kubelet schedules one timer task; the task re-reads the pod
//! under the store lock and acts only if it is still the same pod (same uid).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::store::{Key, Shared, State, finalizers_empty, images, is_deleting, now, uid};
use crate::{Kind, Options};

const NODE_NAME: &str = "fake-node";
const HOST_IP: &str = "10.0.0.10";
const FIRST_POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 0);
const GPU: &str = "nvidia.com/gpu";

#[derive(Debug, Clone, Copy)]
enum Step {
    /// Bring container states in line with the spec and the failing images.
    Sync,
    /// Remove a pod whose graceful termination has ended.
    Terminate,
}

/// The status of a pod just created: scheduled onto the node, or `Unschedulable` when its
/// `nodeSelector` asks for labels the node does not have, or it asks for more GPUs than
/// the node has free.
pub(crate) fn set_initial_status(st: &State, pod: &mut Value) {
    let at = now();
    match unschedulable_because(st, &pod["spec"]) {
        None => {
            pod["spec"]["nodeName"] = json!(NODE_NAME);
            pod["status"] = json!({"phase": "Pending", "qosClass": "BestEffort", "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": at}]});
        }
        Some(message) => {
            pod["status"] = json!({"phase": "Pending", "qosClass": "BestEffort", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": message, "lastTransitionTime": at}]});
        }
    }
}

/// The scheduler's event about a pod just created: `Scheduled`, or `FailedScheduling`.
pub(crate) fn record_scheduling(st: &mut State, pod: &Value) {
    let meta = &pod["metadata"];
    let (ns, name) = (text(&meta["namespace"]), text(&meta["name"]));
    let unscheduled = pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "PodScheduled" && c["status"] == "False");
    match unscheduled {
        Some(c) => {
            let message = text(&c["message"]);
            st.record_event(pod, "Warning", "FailedScheduling", &message);
        }
        None => {
            let message = format!("Successfully assigned {ns}/{name} to {NODE_NAME}");
            st.record_event(pod, "Normal", "Scheduled", &message);
        }
    }
}

/// Why the node cannot take a pod with `spec`, as the scheduler says it; `None`: it can.
fn unschedulable_because(st: &State, spec: &Value) -> Option<String> {
    if !is_schedulable(&st.opts, spec) {
        return Some(
            "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.".into(),
        );
    }
    let (Some(gpus), wanted) = (st.opts.node_gpus, gpus_of(spec)) else { return None };
    let used: u64 = st
        .objects
        .iter()
        .filter(|(k, p)| k.0 == Kind::Pod && p["spec"]["nodeName"].is_string())
        .map(|(_, p)| gpus_of(&p["spec"]))
        .sum();
    (wanted > 0 && used + wanted > gpus)
        .then(|| format!("0/1 nodes are available: 1 Insufficient {GPU}."))
}

/// The GPUs a pod spec asks for (limits, else requests, of every container).
fn gpus_of(spec: &Value) -> u64 {
    let containers = spec["containers"].as_array().cloned().unwrap_or_default();
    containers
        .iter()
        .map(|c| {
            let resources = &c["resources"];
            let amount = resources["limits"][GPU].as_str().or(resources["requests"][GPU].as_str());
            amount.and_then(|a| a.parse::<u64>().ok()).unwrap_or(0)
        })
        .sum()
}

fn is_schedulable(opts: &Options, spec: &Value) -> bool {
    let Some(node) = &opts.node_labels else { return true };
    let wanted = spec["nodeSelector"].as_object().into_iter().flatten();
    wanted.into_iter().all(|(k, v)| node.get(k).map(String::as_str) == v.as_str())
}

/// Reacts to a committed pod write: start a new pod, restart changed images, or finish a
/// termination once no finalizer holds the pod.
pub(crate) fn on_pod_written(shared: &Arc<Shared>, old: Option<&Value>, pod: &Value) {
    let (delay, step) = {
        let opts = &shared.lock().opts;
        if is_deleting(pod) {
            if !finalizers_empty(pod) {
                return;
            }
            (opts.termination_delay, Step::Terminate)
        } else {
            let scheduled = pod["spec"]["nodeName"].is_string();
            let images_changed =
                old.is_some_and(|old| images(&old["spec"]) != images(&pod["spec"]));
            if !scheduled || (old.is_some() && !images_changed) {
                return;
            }
            (opts.kubelet_delay, Step::Sync)
        }
    };
    let meta = &pod["metadata"];
    let name = |field: &str| meta[field].as_str().unwrap_or_default().to_string();
    let key = (crate::Kind::Pod, name("namespace"), name("name"));
    schedule(shared, step, key, uid(pod), delay);
}

fn schedule(shared: &Arc<Shared>, step: Step, key: Key, uid: String, delay: Duration) {
    // Weak, so a stopped fake's pending timers do not keep its state alive.
    let weak = Arc::downgrade(shared);
    shared.runtime.spawn(async move {
        tokio::time::sleep(delay).await;
        if let Some(shared) = weak.upgrade() {
            run(&shared, step, key, &uid);
        }
    });
}

fn run(shared: &Arc<Shared>, step: Step, key: Key, pod_uid: &str) {
    let mut st = shared.lock();
    let Some(mut pod) = st.objects.get(&key).filter(|p| uid(p) == pod_uid).cloned() else {
        return;
    };
    match step {
        Step::Terminate if is_deleting(&pod) && finalizers_empty(&pod) => {
            st.commit(key, pod, "DELETED");
        }
        Step::Terminate => {}
        Step::Sync if is_deleting(&pod) => {}
        Step::Sync => {
            let wanted = wanted_states(&pod, &st.opts.failing_images);
            let current = current_states(&pod);
            if wanted != current {
                let ip = pod["status"]["podIP"].as_str().map(str::to_string).unwrap_or_else(|| {
                    st.next_pod_ip += 1;
                    Ipv4Addr::from(u32::from(FIRST_POD_IP) + st.next_pod_ip).to_string()
                });
                pod["status"] = pod_status(&pod["status"], &wanted, &ip);
                let written = st.commit(key.clone(), pod, "MODIFIED");
                record_container_events(&mut st, &written, &current, &wanted);
            }
            let delay = st.opts.kubelet_delay;
            drop(st);
            // Keep retrying the pull, silently, like the kubelet's back-off.
            if wanted.iter().any(|c| c.waiting.is_some()) {
                schedule(shared, Step::Sync, key, pod_uid.to_string(), delay);
            }
        }
    }
}

/// One container as the kubelet reports it: running (`waiting` is `None`) or waiting.
#[derive(Debug, PartialEq)]
struct ContainerState {
    name: String,
    image: String,
    waiting: Option<&'static str>,
}

/// What each container should show next: running, or the next image-pull failure reason.
fn wanted_states(pod: &Value, failing: &[String]) -> Vec<ContainerState> {
    let current = current_states(pod);
    let containers = pod["spec"]["containers"].as_array().cloned().unwrap_or_default();
    containers
        .iter()
        .map(|c| {
            let (name, image) = (text(&c["name"]), text(&c["image"]));
            let was = current.iter().find(|s| s.name == name && s.image == image);
            let waiting = failing.contains(&image).then(|| match was.and_then(|s| s.waiting) {
                Some("ErrImagePull" | "ImagePullBackOff") => "ImagePullBackOff",
                _ => "ErrImagePull",
            });
            ContainerState { name, image, waiting }
        })
        .collect()
}

/// The kubelet's events for the containers whose state changed.
fn record_container_events(
    st: &mut State,
    pod: &Value,
    before: &[ContainerState],
    after: &[ContainerState],
) {
    for c in after {
        let was = before.iter().find(|b| b.name == c.name && b.image == c.image);
        if was.is_some_and(|w| w.waiting == c.waiting) {
            continue;
        }
        let image = &c.image;
        match c.waiting {
            None => st.record_event(pod, "Normal", "Started", &format!("Started container {}", c.name)),
            Some("ErrImagePull") => st.record_event(
                pod,
                "Warning",
                "Failed",
                &format!("Failed to pull image {image:?}: failed to pull and unpack image {image:?}: not found"),
            ),
            Some(_) => st.record_event(
                pod,
                "Warning",
                "BackOff",
                &format!("Back-off pulling image {image:?}"),
            ),
        };
    }
}

fn current_states(pod: &Value) -> Vec<ContainerState> {
    let statuses = pod["status"]["containerStatuses"].as_array().cloned().unwrap_or_default();
    let reason = |s: &Value| match s["state"]["waiting"]["reason"].as_str() {
        Some("ErrImagePull") => Some("ErrImagePull"),
        Some("ImagePullBackOff") => Some("ImagePullBackOff"),
        Some(_) => Some("Waiting"),
        None => None,
    };
    let state = |s: &Value| ContainerState {
        name: text(&s["name"]),
        image: text(&s["image"]),
        waiting: reason(s),
    };
    statuses.iter().map(state).collect()
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// A full pod status for the given container states, keeping the start time and phase
/// history of `old` (a pod that ran stays `Running` while a new image fails).
fn pod_status(old: &Value, containers: &[ContainerState], ip: &str) -> Value {
    let at = now();
    let ready = containers.iter().all(|c| c.waiting.is_none());
    let phase = if ready || old["phase"] == "Running" { "Running" } else { "Pending" };
    let flag = |b: bool| if b { "True" } else { "False" };
    let mut conditions = vec![
        json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": at}),
        json!({"type": "Initialized", "status": "True", "lastTransitionTime": at}),
    ];
    for kind in ["ContainersReady", "Ready"] {
        let mut condition = json!({"type": kind, "status": flag(ready), "lastTransitionTime": at});
        if !ready {
            condition["reason"] = json!("ContainersNotReady");
        }
        conditions.push(condition);
    }
    let statuses: Vec<Value> = containers.iter().map(|c| container_status(c, &at)).collect();
    json!({
        "phase": phase,
        "conditions": conditions,
        "hostIP": HOST_IP,
        "hostIPs": [{"ip": HOST_IP}],
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": old.get("startTime").cloned().unwrap_or(json!(at)),
        "qosClass": "BestEffort",
        "containerStatuses": statuses,
    })
}

fn container_status(c: &ContainerState, at: &str) -> Value {
    let state = match c.waiting {
        None => json!({"running": {"startedAt": at}}),
        Some(reason @ "ErrImagePull") => json!({"waiting": {"reason": reason, "message":
            format!("failed to pull and unpack image \"{}\": not found", c.image)}}),
        Some(reason) => json!({"waiting": {"reason": reason, "message":
            format!("Back-off pulling image \"{}\"", c.image)}}),
    };
    let running = c.waiting.is_none();
    json!({
        "name": c.name,
        "image": c.image,
        "imageID": if running { format!("{}@sha256:fake", c.image) } else { String::new() },
        "containerID": if running { format!("containerd://{}", c.name) } else { String::new() },
        "ready": running,
        "started": running,
        "restartCount": 0,
        "state": state,
    })
}
