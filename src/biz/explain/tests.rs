//! Unit tests of `explain`: the summary, conditions and events derived from (instance,
//! evidence), as tables.

use chrono::TimeZone;

use super::*;
use crate::biz::cluster::ClusterError;

fn instance(status: InstanceStatus) -> Instance {
    Instance::fixture().with_id(123).with_status(status)
}

fn at(second: u32) -> Option<DateTime<Utc>> {
    Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, second).unwrap())
}

fn condition(kind: &str, status: &str, reason: &str, message: &str) -> Condition {
    Condition {
        kind: kind.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition: at(1),
    }
}

fn event(kind: &str, reason: &str, message: &str, second: u32) -> ClusterEvent {
    ClusterEvent {
        kind: kind.into(),
        reason: reason.into(),
        message: message.into(),
        count: 1,
        last_seen: at(second),
    }
}

fn container() -> ContainerEvidence {
    ContainerEvidence { name: "main".into(), image: "ubuntu:22.04".into(), ..Default::default() }
}

fn waiting(image: &str, reason: &str, message: &str) -> ContainerEvidence {
    ContainerEvidence {
        image: image.into(),
        waiting: Some(Waiting { reason: reason.into(), message: message.into() }),
        ..container()
    }
}

fn pending(containers: Vec<ContainerEvidence>) -> PodState {
    PodState {
        phase: "Pending".into(),
        conditions: vec![
            condition("PodScheduled", "True", "", ""),
            condition(
                "Ready",
                "False",
                "ContainersNotReady",
                "containers with unready status: [main]",
            ),
        ],
        containers,
        ..Default::default()
    }
}

fn running_pod() -> PodState {
    PodState {
        phase: "Running".into(),
        conditions: ["PodScheduled", "Initialized", "ContainersReady", "Ready"]
            .into_iter()
            .map(|kind| condition(kind, "True", "", ""))
            .collect(),
        containers: vec![ContainerEvidence { ready: true, running: true, ..container() }],
        ..Default::default()
    }
}

fn unschedulable(message: &str) -> PodState {
    PodState {
        phase: "Pending".into(),
        conditions: vec![condition("PodScheduled", "False", "Unschedulable", message)],
        ..Default::default()
    }
}

fn with_pod(pod: PodState, events: Vec<ClusterEvent>) -> PodEvidence {
    PodEvidence { pod: Some(pod), events }
}

fn crash_looping(last: Termination, restarts: i32) -> ContainerEvidence {
    ContainerEvidence {
        restart_count: restarts,
        last_terminated: Some(last),
        ..waiting(
            "ubuntu:22.04",
            "CrashLoopBackOff",
            "back-off 5m0s restarting failed container=main",
        )
    }
}

#[test]
fn the_summary_names_the_cause_from_the_cluster() {
    let gpu = |mut i: Instance| {
        i.spec.gpu = GpuType::TeslaA100;
        i
    };
    let creating = instance(InstanceStatus::Creating);
    let running = instance(InstanceStatus::Running);
    let cases: Vec<(&str, Instance, PodEvidence, &str)> = vec![
        (
            "ErrImagePull",
            creating.clone(),
            with_pod(
                pending(vec![waiting(
                    "nope:1",
                    "ErrImagePull",
                    "failed to pull and unpack image \"docker.io/library/nope:1\": not found",
                )]),
                vec![],
            ),
            "Instance 123 is CREATING: its Pod cannot pull image \"nope:1\" (ErrImagePull: failed to pull and unpack image \"docker.io/library/nope:1\": not found).",
        ),
        (
            "image pull back-off",
            creating.clone(),
            with_pod(
                pending(vec![waiting(
                    "nope:1",
                    "ImagePullBackOff",
                    "Back-off pulling image \"nope:1\"",
                )]),
                vec![event("Warning", "Failed", "Failed to pull image \"nope:1\"", 2)],
            ),
            "Instance 123 is CREATING: its Pod cannot pull image \"nope:1\" (ImagePullBackOff: Back-off pulling image \"nope:1\").",
        ),
        (
            "InvalidImageName",
            creating.clone(),
            with_pod(
                pending(vec![waiting(
                    "Bad::Name",
                    "InvalidImageName",
                    "Failed to apply default image tag \"Bad::Name\": couldn't parse image name",
                )]),
                vec![],
            ),
            "Instance 123 is CREATING: its Pod cannot pull image \"Bad::Name\" (InvalidImageName: Failed to apply default image tag \"Bad::Name\": couldn't parse image name).",
        ),
        (
            "Unschedulable for want of a GPU",
            gpu(creating.clone()),
            with_pod(
                unschedulable("0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
                vec![],
            ),
            "Instance 123 is CREATING: no node has a free nvidia.com/gpu for Tesla A100 (Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu).",
        ),
        (
            "Unschedulable for want of memory",
            creating.clone(),
            with_pod(unschedulable("0/3 nodes are available: 3 Insufficient memory."), vec![]),
            "Instance 123 is CREATING: no node has enough free memory for it (Unschedulable: 0/3 nodes are available: 3 Insufficient memory).",
        ),
        (
            "no node matches the selector",
            creating.clone(),
            with_pod(
                unschedulable(
                    "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.",
                ),
                vec![],
            ),
            "Instance 123 is CREATING: no node matches its node selector (Unschedulable: 0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector).",
        ),
        (
            "an unbound PersistentVolumeClaim",
            creating.clone(),
            with_pod(
                unschedulable(
                    "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims.",
                ),
                vec![],
            ),
            "Instance 123 is CREATING: its volumes are not ready (Unschedulable: 0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims).",
        ),
        (
            "FailedMount",
            creating.clone(),
            with_pod(
                pending(vec![waiting("ubuntu:22.04", "ContainerCreating", "")]),
                vec![
                    event(
                        "Normal",
                        "Scheduled",
                        "Successfully assigned instances/inst-123 to node-1",
                        1,
                    ),
                    event(
                        "Warning",
                        "FailedMount",
                        "MountVolume.SetUp failed for volume \"data\" : secret \"data\" not found",
                        3,
                    ),
                ],
            ),
            "Instance 123 is CREATING: its volumes are not ready (FailedMount: MountVolume.SetUp failed for volume \"data\" : secret \"data\" not found).",
        ),
        (
            "FailedAttachVolume",
            creating.clone(),
            with_pod(
                pending(vec![waiting("ubuntu:22.04", "ContainerCreating", "")]),
                vec![event(
                    "Warning",
                    "FailedAttachVolume",
                    "AttachVolume.Attach failed for volume \"pvc-1\" : timed out",
                    3,
                )],
            ),
            "Instance 123 is CREATING: its volumes are not ready (FailedAttachVolume: AttachVolume.Attach failed for volume \"pvc-1\" : timed out).",
        ),
        (
            "CrashLoopBackOff",
            running.clone(),
            with_pod(
                PodState {
                    phase: "Running".into(),
                    containers: vec![crash_looping(
                        Termination {
                            reason: "Error".into(),
                            message: "panic: no config\n".into(),
                            exit_code: 2,
                        },
                        5,
                    )],
                    ..running_pod()
                },
                vec![],
            ),
            "Instance 123 is RUNNING: its container keeps crashing (CrashLoopBackOff, 5 restarts): Error, exit code 2: panic: no config.",
        ),
        (
            "CrashLoopBackOff after OOMKilled",
            running.clone(),
            with_pod(
                PodState {
                    containers: vec![crash_looping(
                        Termination {
                            reason: "OOMKilled".into(),
                            message: String::new(),
                            exit_code: 137,
                        },
                        1,
                    )],
                    ..running_pod()
                },
                vec![],
            ),
            "Instance 123 is RUNNING: its container keeps crashing (CrashLoopBackOff, 1 restart): OOMKilled, exit code 137: it ran out of its 4096 MiB memory limit.",
        ),
        (
            "OOMKilled and restarted, not ready yet",
            running.clone(),
            with_pod(
                PodState {
                    containers: vec![ContainerEvidence {
                        running: true,
                        restart_count: 2,
                        last_terminated: Some(Termination {
                            reason: "OOMKilled".into(),
                            message: String::new(),
                            exit_code: 137,
                        }),
                        ..container()
                    }],
                    ..running_pod()
                },
                vec![],
            ),
            "Instance 123 is RUNNING: its container restarted after running out of memory (OOMKilled, exit code 137: it ran out of its 4096 MiB memory limit, 2 restarts).",
        ),
        (
            "a config error",
            creating.clone(),
            with_pod(
                pending(vec![waiting(
                    "ubuntu:22.04",
                    "CreateContainerConfigError",
                    "secret \"x\" not found",
                )]),
                vec![],
            ),
            "Instance 123 is CREATING: its container cannot start (CreateContainerConfigError: secret \"x\" not found).",
        ),
        (
            "evicted",
            running.clone(),
            with_pod(
                PodState {
                    phase: "Failed".into(),
                    reason: "Evicted".into(),
                    message: "The node was low on resource: memory.".into(),
                    containers: vec![],
                    ..running_pod()
                },
                vec![],
            ),
            "Instance 123 is RUNNING: its Pod was evicted (Evicted: The node was low on resource: memory).",
        ),
        (
            "healthy and running",
            running.clone(),
            with_pod(running_pod(), vec![event("Normal", "Started", "Started container main", 2)]),
            "Instance 123 is RUNNING as desired.",
        ),
        (
            "running and ready while still CREATING in the database",
            creating.clone(),
            with_pod(running_pod(), vec![]),
            "Instance 123 is CREATING: its Pod runs and is ready; it becomes RUNNING shortly.",
        ),
        (
            "running but failing its readiness probe",
            running.clone(),
            with_pod(
                PodState {
                    conditions: vec![
                        condition(
                            "ContainersReady",
                            "False",
                            "ContainersNotReady",
                            "containers with unready status: [main]",
                        ),
                        condition("Ready", "False", "ContainersNotReady", ""),
                    ],
                    ..running_pod()
                },
                vec![event(
                    "Warning",
                    "Unhealthy",
                    "Readiness probe failed: connection refused",
                    4,
                )],
            ),
            "Instance 123 is RUNNING: its container runs but is not ready (Unhealthy: Readiness probe failed: connection refused).",
        ),
        (
            "no Pod yet",
            creating.clone(),
            PodEvidence::default(),
            "Instance 123 is CREATING: its Pod has not been created yet.",
        ),
        (
            "a Pod missing while RUNNING",
            running.clone(),
            PodEvidence::default(),
            "Instance 123 is RUNNING: its Pod is missing and is being recreated.",
        ),
        (
            "a Pod still being scheduled",
            creating.clone(),
            with_pod(pending(vec![waiting("ubuntu:22.04", "ContainerCreating", "")]), vec![]),
            "Instance 123 is CREATING: its Pod is starting.",
        ),
        (
            "FailedScheduling events without a condition",
            gpu(creating.clone()),
            with_pod(
                PodState { phase: "Pending".into(), ..Default::default() },
                vec![event(
                    "Warning",
                    "FailedScheduling",
                    "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                    5,
                )],
            ),
            "Instance 123 is CREATING: no node has a free nvidia.com/gpu for Tesla A100 (FailedScheduling: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu).",
        ),
        (
            "DELETING with the Pod terminating",
            instance(InstanceStatus::Deleting),
            with_pod(PodState { terminating: true, ..running_pod() }, vec![]),
            "Instance 123 is DELETING: waiting for its Pod to go away.",
        ),
        (
            "DELETING with the Pod held",
            instance(InstanceStatus::Deleting),
            with_pod(
                PodState {
                    terminating: true,
                    held_by: vec!["example.com/backup".into()],
                    ..running_pod()
                },
                vec![],
            ),
            "Instance 123 is DELETING: waiting for its Pod to go away (held by finalizers: example.com/backup).",
        ),
        (
            "STOPPING with the Pod gone",
            instance(InstanceStatus::Stopping),
            PodEvidence::default(),
            "Instance 123 is STOPPING: its Pod is gone; it becomes STOPPED shortly.",
        ),
        (
            "STOPPED without a Pod",
            instance(InstanceStatus::Stopped),
            PodEvidence {
                pod: None,
                events: vec![event("Normal", "Killing", "Stopping container main", 9)],
            },
            "Instance 123 is STOPPED as requested.",
        ),
        (
            "FAILED without a reason, the last Pod's events",
            instance(InstanceStatus::Failed),
            PodEvidence {
                pod: None,
                events: vec![event(
                    "Warning",
                    "Failed",
                    "Failed to pull image \"nope:1\": not found",
                    3,
                )],
            },
            "Instance 123 is FAILED: its Pod cannot pull image \"ubuntu:22.04\" (Failed: Failed to pull image \"nope:1\": not found).",
        ),
        (
            "FAILED without a reason, the last Pod crashed",
            instance(InstanceStatus::Failed),
            PodEvidence {
                pod: None,
                events: vec![event(
                    "Warning",
                    "BackOff",
                    "Back-off restarting failed container main",
                    3,
                )],
            },
            "Instance 123 is FAILED: its last Pod failed (BackOff: Back-off restarting failed container main).",
        ),
        (
            "pull events before the Pod's status shows them",
            creating.clone(),
            with_pod(
                pending(vec![waiting("ubuntu:22.04", "ContainerCreating", "")]),
                vec![event(
                    "Warning",
                    "Failed",
                    "Failed to pull image \"ubuntu:22.04\": not found",
                    3,
                )],
            ),
            "Instance 123 is CREATING: its Pod cannot pull image \"ubuntu:22.04\" (Failed: Failed to pull image \"ubuntu:22.04\": not found).",
        ),
    ];

    for (name, instance, evidence, expected) in cases {
        let summary = summarize(&instance, Some(&evidence));

        assert_eq!(summary, expected, "{name}");
    }
}

#[test]
fn the_summary_comes_from_the_database_without_a_cluster() {
    let with_reason = |status, reason: &str| {
        let mut i = instance(status);
        i.status_reason = reason.into();
        i
    };
    let cases = [
        (instance(InstanceStatus::Running), "Instance 123 is RUNNING as desired."),
        (instance(InstanceStatus::Stopped), "Instance 123 is STOPPED as requested."),
        (instance(InstanceStatus::Deleted), "Instance 123 is DELETED as requested."),
        (
            instance(InstanceStatus::Deleting),
            "Instance 123 is DELETING: waiting for its Pod to go away.",
        ),
        (
            instance(InstanceStatus::Stopping),
            "Instance 123 is STOPPING: waiting for its workload to stop.",
        ),
        (
            instance(InstanceStatus::Creating),
            "Instance 123 is CREATING: waiting for its workload to start.",
        ),
        (
            with_reason(InstanceStatus::Creating, "not scheduled: 0/1 nodes are available."),
            "Instance 123 is CREATING: not scheduled: 0/1 nodes are available.",
        ),
        (
            with_reason(InstanceStatus::Failed, "QUOTA_EXCEEDED"),
            "Instance 123 is FAILED: QUOTA_EXCEEDED.",
        ),
        (
            with_reason(InstanceStatus::Failed, "ErrImagePull: failed to pull image \"nope:1\""),
            "Instance 123 is FAILED: ErrImagePull: failed to pull image \"nope:1\".",
        ),
        (instance(InstanceStatus::Failed), "Instance 123 is FAILED: no reason was recorded."),
    ];

    for (instance, expected) in cases {
        let explanation = explain(instance, Gathered::NoCluster);

        assert_eq!(explanation.summary, expected);
        assert_eq!(explanation.source, EvidenceSource::Database);
        assert!(explanation.events.is_empty());
        assert_eq!(explanation.conditions.len(), 1, "the synthetic Ready condition");
        assert_eq!(explanation.conditions[0].kind, "Ready");
    }
}

#[test]
fn a_failed_instance_is_explained_by_its_status_reason() {
    let mut failed = instance(InstanceStatus::Failed);
    failed.status_reason =
        "Unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu.".into();
    let evidence = PodEvidence {
        pod: None,
        events: vec![event(
            "Warning",
            "FailedScheduling",
            "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
            2,
        )],
    };

    let explanation = explain(failed, Gathered::Found(evidence));

    assert_eq!(
        explanation.summary,
        "Instance 123 is FAILED: Unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    );
    assert_eq!(explanation.source, EvidenceSource::Cluster);
    assert_eq!(explanation.events.len(), 1);
    let ready = &explanation.conditions[0];
    assert_eq!(
        (ready.kind.as_str(), ready.status.as_str(), ready.reason.as_str()),
        ("Ready", "False", "FAILED")
    );
    assert!(ready.message.contains("Insufficient nvidia.com/gpu"));
}

#[test]
fn an_unreachable_cluster_is_said_in_the_one_sentence() {
    let explanation = explain(
        instance(InstanceStatus::Creating),
        Gathered::Unreachable("the cluster did not answer within 500 ms".into()),
    );

    assert_eq!(
        explanation.summary,
        "Instance 123 is CREATING: waiting for its workload to start (the cluster did not answer within 500 ms; this is what the database says)."
    );
    assert_eq!(explanation.source, EvidenceSource::Database);
    assert_eq!(explanation.summary.matches(". ").count(), 0, "one sentence");
}

#[test]
fn conditions_are_the_pods_and_one_per_container() {
    let pod = with_pod(
        pending(vec![waiting("nope:1", "ErrImagePull", "failed to pull \"nope:1\".")]),
        vec![],
    );

    let explanation = explain(instance(InstanceStatus::Creating), Gathered::Found(pod));

    let kinds: Vec<(&str, &str, &str)> = explanation
        .conditions
        .iter()
        .map(|c| (c.kind.as_str(), c.status.as_str(), c.reason.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("PodScheduled", "True", ""),
            ("Ready", "False", "ContainersNotReady"),
            ("ContainerRunning", "False", "ErrImagePull"),
        ]
    );
    assert_eq!(explanation.conditions[2].message, "container main: failed to pull \"nope:1\"");
}

#[test]
fn events_are_the_newest_first_and_bounded() {
    let events: Vec<ClusterEvent> =
        (0..30).map(|s| event("Normal", "Pulled", &format!("e{s}"), s)).collect();

    let explanation = explain(
        instance(InstanceStatus::Running),
        Gathered::Found(PodEvidence { pod: Some(running_pod()), events }),
    );

    assert_eq!(explanation.events.len(), MAX_EVENTS);
    assert_eq!(explanation.events[0].message, "e29");
    assert_eq!(explanation.events[MAX_EVENTS - 1].message, "e10");
}

#[test]
fn long_cluster_messages_are_clipped_to_one_line() {
    let message = format!("line one\nline two {}", "x".repeat(1000));
    let pod = with_pod(pending(vec![waiting("nope:1", "ErrImagePull", &message)]), vec![]);

    let summary = summarize(&instance(InstanceStatus::Creating), Some(&pod));

    assert!(!summary.contains('\n'));
    assert!(summary.contains("line one line two"));
    assert!(summary.chars().count() < 400, "{summary}");
}

struct Stalled;

#[async_trait]
impl ClusterEvidence for Stalled {
    async fn evidence(&self, _id: InstanceId) -> Result<PodEvidence, ClusterError> {
        std::future::pending().await
    }
}

struct Failing;

#[async_trait]
impl ClusterEvidence for Failing {
    async fn evidence(&self, _id: InstanceId) -> Result<PodEvidence, ClusterError> {
        Err(ClusterError::unavailable("connection refused"))
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_cluster_is_waited_for_only_within_the_bound() {
    let uc = ExplainUsecase::new(Some(Arc::new(Stalled)), Duration::from_millis(500));
    let started = tokio::time::Instant::now();

    let explanation = uc.explain(instance(InstanceStatus::Running)).await;

    assert_eq!(started.elapsed(), Duration::from_millis(500));
    assert_eq!(explanation.source, EvidenceSource::Database);
    assert!(
        explanation.summary.contains("did not answer within 500 ms"),
        "{}",
        explanation.summary
    );
}

#[tokio::test]
async fn a_failing_cluster_falls_back_to_the_database() {
    let uc = ExplainUsecase::new(Some(Arc::new(Failing)), Duration::from_millis(500));

    let explanation = uc.explain(instance(InstanceStatus::Stopped)).await;

    assert_eq!(explanation.source, EvidenceSource::Database);
    assert!(
        explanation
            .summary
            .starts_with("Instance 123 is STOPPED as requested (the cluster could not be read"),
        "{}",
        explanation.summary
    );
}
