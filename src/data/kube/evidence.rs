//! `ClusterEvidence` on Kubernetes: the instance's Pod, read live (not from the cache),
//! and the core/v1 Events whose involved object is that Pod (field selector
//! `involvedObject.name=inst-<id>,involvedObject.kind=Pod` in the instances' namespace).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use k8s_openapi::{
    api::core::v1::{ContainerStateTerminated, ContainerStatus, Event, Pod},
    jiff::Timestamp,
};
use kube::{Api, api::ListParams};

use super::{FINALIZER, KubeCluster, cluster_error, object_name, said};
use crate::biz::{
    cluster::ClusterError,
    explain::{
        ClusterEvent, ClusterEvidence, Condition, ContainerEvidence, PodEvidence, PodState,
        Termination, Waiting,
    },
    instance::InstanceId,
};

/// Most events listed for one Pod (the kubelet folds repeats into one event's count, so
/// a Pod has a handful; the explanation keeps the newest 20).
const EVENTS_LISTED: u32 = 200;

#[async_trait]
impl ClusterEvidence for KubeCluster {
    async fn evidence(&self, id: InstanceId) -> Result<PodEvidence, ClusterError> {
        let name = object_name(id);
        let events: Api<Event> =
            Api::namespaced(self.pods.clone().into_client(), &self.settings.namespace);
        let selector = format!("involvedObject.name={name},involvedObject.kind=Pod");
        let params = ListParams::default().fields(&selector).limit(EVENTS_LISTED);
        // The event list stays out of readiness: a Role without `events` must not make
        // the service unready, only explanations poorer.
        let listing = tokio::time::timeout(self.settings.call_timeout, events.list(&params));
        let (pod, listed) = tokio::join!(self.call(false, self.pods.get_opt(&name)), listing);
        let pod = pod?.map_err(cluster_error)?;
        let listed = match listed {
            Ok(Ok(list)) => list.items,
            Ok(Err(e)) if super::status_code(&e) == Some(403) => {
                tracing::warn!(instance_id = id.get(), error = %said(&e), "may not list the Pod's events; explaining without them");
                Vec::new()
            }
            Ok(Err(e)) => return Err(cluster_error(e)),
            Err(_) => {
                return Err(ClusterError::unavailable(format!(
                    "the API server did not list events within {} ms",
                    self.settings.call_timeout.as_millis()
                )));
            }
        };
        // With a Pod, only its own events (an earlier Pod of the same name had another
        // uid); without one, the last Pod's events still say what happened to it.
        let uid = pod.as_ref().and_then(|p| p.metadata.uid.clone());
        let events = listed
            .iter()
            .filter(|e| {
                uid.is_none() || e.involved_object.uid.is_none() || e.involved_object.uid == uid
            })
            .map(cluster_event)
            .collect();
        Ok(PodEvidence { pod: pod.as_ref().map(pod_state), events })
    }
}

fn pod_state(pod: &Pod) -> PodState {
    let status = pod.status.clone().unwrap_or_default();
    let conditions = status
        .conditions
        .iter()
        .flatten()
        .map(|c| Condition {
            kind: c.type_.clone(),
            status: c.status.clone(),
            reason: c.reason.clone().unwrap_or_default(),
            message: c.message.clone().unwrap_or_default(),
            last_transition: c.last_transition_time.as_ref().and_then(|t| time(&t.0)),
        })
        .collect();
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .map(container)
        .collect();
    let finalizers = pod.metadata.finalizers.clone().unwrap_or_default();
    PodState {
        phase: status.phase.unwrap_or_default(),
        reason: status.reason.unwrap_or_default(),
        message: status.message.unwrap_or_default(),
        terminating: pod.metadata.deletion_timestamp.is_some(),
        held_by: finalizers.into_iter().filter(|f| f != FINALIZER).collect(),
        conditions,
        containers,
    }
}

fn container(c: &ContainerStatus) -> ContainerEvidence {
    let state = c.state.clone().unwrap_or_default();
    ContainerEvidence {
        name: c.name.clone(),
        image: c.image.clone(),
        ready: c.ready,
        restart_count: c.restart_count,
        running: state.running.is_some(),
        waiting: state.waiting.map(|w| Waiting {
            reason: w.reason.unwrap_or_default(),
            message: w.message.unwrap_or_default(),
        }),
        terminated: state.terminated.as_ref().map(termination),
        last_terminated: c.last_state.as_ref().and_then(|s| s.terminated.as_ref()).map(termination),
    }
}

fn termination(t: &ContainerStateTerminated) -> Termination {
    Termination {
        reason: t.reason.clone().unwrap_or_default(),
        message: t.message.clone().unwrap_or_default(),
        exit_code: t.exit_code,
    }
}

fn cluster_event(e: &Event) -> ClusterEvent {
    let series = e.series.as_ref();
    let last_seen = series
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
        .or_else(|| e.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0));
    ClusterEvent {
        kind: e.type_.clone().unwrap_or_else(|| "Normal".into()),
        reason: e.reason.clone().unwrap_or_default(),
        message: e.message.clone().unwrap_or_default(),
        count: series.and_then(|s| s.count).or(e.count).unwrap_or(1).max(1),
        last_seen: last_seen.as_ref().and_then(time),
    }
}

fn time(t: &Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.as_second(), u32::try_from(t.subsec_nanosecond()).unwrap_or(0))
}
