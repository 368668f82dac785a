//! Unit tests of `reconcile`.

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
        labels: Default::default(),
        labels_hash: String::new(),
    }
}

fn observed(hash: &str, phase: Phase) -> Observed {
    Observed {
        id: InstanceId::try_from(1).unwrap(),
        spec_hash: hash.into(),
        labels_hash: String::new(),
        phase,
        endpoint: Endpoint { pod_ip: "10.0.0.1".into(), ..Endpoint::default() },
        terminating: false,
        protected: true,
        foreign_finalizers: Vec::new(),
        drift: Vec::new(),
    }
}

#[test]
fn the_decision_table() {
    use InstanceStatus as S;
    let w = workload("a");
    let running = observed("a", Phase::Running);
    let gone_by_hand = Observed { terminating: true, ..running.clone() };
    let ours_going = Observed { terminating: true, protected: false, ..running.clone() };
    let held = Observed { foreign_finalizers: vec!["x.io/hold".into()], ..ours_going.clone() };
    let outdated = Observed {
        drift: vec![Drift::Image { live: "nginx:old".into() }],
        ..observed("old", Phase::Running)
    };
    let rehashed = Observed { drift: vec![Drift::Metadata], ..observed("edited", Phase::Running) };
    let pending = observed("a", Phase::Pending(None));
    let gated = observed("a", Phase::Pending(Some("not scheduled: SchedulingGated".into())));
    let failing = observed("a", Phase::Failed("ErrImagePull".into()));
    let no_service =
        Observed { drift: vec![Drift::Service("is missing".into())], ..running.clone() };
    let resized = Observed { drift: vec![Drift::Pod("resources")], ..running.clone() };
    let none = Endpoint::default();
    let at = |status| Some(Desired { status, reason: "", endpoint: &none, workload: &w });
    let cases: Vec<(Option<Desired<'_>>, Option<&Observed>, bool, Step)> = vec![
        (at(S::Creating), None, false, Step::Apply(Box::new(w.clone()))),
        (at(S::Running), None, false, Step::Apply(Box::new(w.clone()))),
        (
            at(S::Creating),
            Some(&running),
            false,
            Step::Report(Observation::Running(running.endpoint.clone())),
        ),
        (at(S::Creating), Some(&outdated), false, Step::Remove),
        (
            at(S::Running),
            Some(&rehashed),
            false,
            Step::Restore(vec![Drift::Metadata], Box::new(w.clone())),
        ),
        (at(S::Creating), Some(&pending), false, Step::Wait(Some(PENDING_RECHECK))),
        (
            at(S::Creating),
            Some(&gated),
            false,
            Step::Report(Observation::Waiting("not scheduled: SchedulingGated".into())),
        ),
        (
            at(S::Running),
            Some(&failing),
            false,
            Step::Report(Observation::Failed("ErrImagePull".into())),
        ),
        (
            at(S::Running),
            Some(&gone_by_hand),
            false,
            Step::ReportThenRemove(Observation::Lost(
                "workload deleted out of band; recreating".into(),
            )),
        ),
        (at(S::Running), Some(&ours_going), false, Step::Wait(Some(REMOVING_RECHECK))),
        (
            at(S::Running),
            Some(&held),
            false,
            Step::Report(Observation::Lost(
                "workload is being removed (held by finalizers: x.io/hold); recreating".into(),
            )),
        ),
        (
            at(S::Stopping),
            Some(&held),
            false,
            Step::Report(Observation::Waiting(
                "waiting for the workload to go (held by finalizers: x.io/hold)".into(),
            )),
        ),
        (at(S::Stopping), Some(&running), false, Step::Remove),
        (at(S::Stopping), None, false, Step::Report(Observation::Gone)),
        (at(S::Stopping), None, true, Step::Remove),
        (at(S::Deleting), None, false, Step::Report(Observation::Gone)),
        (at(S::Stopped), None, false, Step::Wait(None)),
        (at(S::Stopped), None, true, Step::Remove),
        (at(S::Failed), Some(&running), false, Step::Remove),
        (at(S::Deleted), Some(&running), false, Step::RemoveOrphan),
        (None, Some(&running), false, Step::RemoveOrphan),
        (None, None, true, Step::RemoveOrphan),
        (None, None, false, Step::Wait(None)),
        (
            at(S::Running),
            Some(&no_service),
            false,
            Step::Restore(no_service.drift.clone(), Box::new(w.clone())),
        ),
        (
            at(S::Running),
            Some(&resized),
            false,
            Step::Restore(resized.drift.clone(), Box::new(w.clone())),
        ),
    ];
    for (desired, obs, service_left, expected) in cases {
        assert_eq!(decide(desired, obs, service_left), expected, "{desired:?} / {obs:?}");
    }
    let known = running.endpoint.clone();
    let converged = Desired { status: S::Running, reason: "", endpoint: &known, workload: &w };
    assert_eq!(decide(Some(converged), Some(&running), false), Step::Wait(None), "nothing to do");
    let shown = "not scheduled: SchedulingGated";
    let told = Desired { status: S::Creating, reason: shown, endpoint: &none, workload: &w };
    assert_eq!(
        decide(Some(told), Some(&gated), false),
        Step::Wait(Some(REMOVING_RECHECK)),
        "a reason already shown is not written again"
    );
}

fn id(n: i64) -> InstanceId {
    InstanceId::try_from(n).unwrap()
}

#[test]
fn the_queue_serves_urgent_work_first_and_one_instance_to_one_worker() {
    let mut q = QueueState::default();
    let now = Instant::now();
    for n in 1..=100 {
        q.push(id(n), Push::Normal, now);
    }
    q.push(id(500), Push::Urgent, now);
    let Take::Ready(first, 0) = q.take(now) else { panic!("nothing due") };
    assert_eq!(first, id(500), "a user action goes ahead of a resync");
    let Take::Ready(second, _) = q.take(now) else { panic!("nothing due") };
    // Pushed while busy: not handed out twice, looked at again once done.
    q.push(second, Push::Urgent, now);
    let mut handed = vec![second];
    while let Take::Ready(next, _) = q.take(now) {
        handed.push(next);
    }
    assert_eq!(handed.iter().filter(|i| **i == second).count(), 1);
    let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    q.done(second, Some(1), Next::Park, &backoff, now);
    let Take::Ready(again, _) = q.take(now) else { panic!("the pending push was lost") };
    assert_eq!(again, second);
}

#[test]
fn a_failing_instance_backs_off_alone_and_not_before_retry_after() {
    let mut q = QueueState::default();
    let now = Instant::now();
    let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    q.push(id(1), Push::Urgent, now);
    q.push(id(2), Push::Normal, now);
    let Take::Ready(failing, 0) = q.take(now) else { panic!() };
    q.done(failing, None, Next::Failed(Some(Duration::from_secs(7))), &backoff, now);
    // News about the failing instance does not bring it forward.
    q.push(failing, Push::Urgent, now);
    let Take::Ready(other, 0) = q.take(now) else { panic!() };
    assert_eq!(other, id(2), "the other instance is not held up");
    match q.take(now) {
        Take::Idle(Some(at)) => {
            assert!(at >= now + Duration::from_secs(7), "Retry-After honoured")
        }
        _ => panic!("the failing instance must wait"),
    }
    let later = now + Duration::from_secs(8);
    let Take::Ready(retried, 1) = q.take(later) else { panic!("attempt count kept") };
    assert_eq!(retried, failing);
    q.done(retried, None, Next::Failed(Some(Duration::from_secs(7))), &backoff, later);
    // A user action (a stop, a delete) does not wait for the backoff.
    q.push(retried, Push::Action, later);
    let Take::Ready(acted, 2) = q.take(later) else { panic!("the user action waited") };
    assert_eq!(acted, retried);
}

#[test]
fn jitter_spreads_delays_within_half_to_whole() {
    let d = Duration::from_secs(8);
    let spread: Vec<Duration> = (1..200).map(|n| jitter(d, id(n), 3)).collect();
    assert!(spread.iter().all(|j| *j >= d / 2 && *j <= d));
    assert!(
        spread.iter().any(|j| *j < d.mul_f64(0.7)) && spread.iter().any(|j| *j > d.mul_f64(0.8))
    );
}

#[test]
fn a_workload_applied_a_moment_ago_is_waited_for_not_applied_again() {
    let apply = || Step::Apply(Box::new(workload("h")));
    let claimed = |last| Claimed { last_applied: last };
    let just = Some((3, Duration::from_millis(40)));

    // The same version, 40 ms ago: the cache has not caught up; look again when it has.
    assert_eq!(
        settling(claimed(just), Some(3), apply()),
        Step::Wait(Some(CACHE_CATCH_UP - Duration::from_millis(40)))
    );
    // A newer version, an old apply, or none remembered: apply.
    assert_eq!(settling(claimed(just), Some(4), apply()), apply());
    assert_eq!(settling(claimed(Some((3, CACHE_CATCH_UP))), Some(3), apply()), apply());
    assert_eq!(settling(claimed(None), Some(3), apply()), apply());
    // A restore too (a cache with the Pod of that write but not its Service yet); a
    // removal never.
    let restore = Step::Restore(vec![Drift::Metadata], Box::new(workload("h")));
    assert!(matches!(settling(claimed(just), Some(3), restore), Step::Wait(Some(_))));
    assert_eq!(settling(claimed(just), Some(3), Step::Remove), Step::Remove);
}

#[test]
fn a_label_change_of_our_own_is_applied_in_place_not_restored_as_drift() {
    let mut w = workload("a");
    w.labels_hash = "new".into();
    let o = Observed {
        labels_hash: "old".into(),
        drift: vec![Drift::Metadata],
        ..observed("a", Phase::Running)
    };
    let desired = Desired {
        status: InstanceStatus::Running,
        reason: "",
        endpoint: &o.endpoint,
        workload: &w,
    };

    let step = decide(Some(desired), Some(&o), false);

    assert_eq!(step, Step::Apply(Box::new(w.clone())));
}
