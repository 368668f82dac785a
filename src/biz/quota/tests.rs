//! The counting rules and their enforcement, through `InstanceUsecase` and `QuotaUsecase`
//! over the in-memory store of `biz::fake`.

use std::sync::Arc;

use super::*;
use crate::biz::{
    Actor, Command, Envelope, EventKey, InstanceId, InstanceSpec, InstanceUsecase, Limits,
    NewInstance, Outcome, SpecPatch,
    audit::{Action, Outcome as AuditOutcome, Source},
    fake::FakeInstanceRepo,
    instance::Observation,
    snowflake::Snowflake,
};

fn conf(per_user: QuotaLimits, a100_capacity: Option<i64>) -> QuotaConf {
    let mut gpu_capacity = [None; GpuType::ALL.len()];
    gpu_capacity[GpuType::TeslaA100.code() as usize] = a100_capacity;
    QuotaConf { per_user, gpu_capacity }
}

fn usecase(repo: &Arc<FakeInstanceRepo>, quota: QuotaConf, cluster: bool) -> InstanceUsecase {
    InstanceUsecase::new(repo.clone(), Limits::default(), cluster, Arc::new(Snowflake::new(3)))
        .with_quota(quota)
}

fn spec(cpu: i32, gpu: GpuType) -> InstanceSpec {
    InstanceSpec {
        cpu,
        memory_mb: 1024,
        gpu,
        image: "ubuntu:22.04".into(),
        config: serde_json::json!({}),
    }
}

fn api(user: &str) -> Actor {
    Actor { id: user.into(), source: Source::Http }
}

fn new(user: &str, cpu: i32, gpu: GpuType) -> NewInstance {
    NewInstance {
        user_id: user.into(),
        name: "n".into(),
        spec: spec(cpu, gpu),
        request_id: None,
        labels: Default::default(),
    }
}

fn id(n: i64) -> InstanceId {
    InstanceId::try_from(n).unwrap()
}

/// An `INSTANCE_CREATED` event of instance `n`.
fn created(n: u8, user: &str, cpu: i32, gpu: GpuType) -> Envelope {
    Envelope {
        key: Some(EventKey([n; 16])),
        fingerprint: Some([n; 16]),
        actor: Actor::mq(),
        request_id: format!("m{n}"),
        command: Command::Create {
            id: id(i64::from(n)),
            user_id: user.into(),
            name: "n".into(),
            spec: spec(cpu, gpu),
            labels: Default::default(),
        },
    }
}

fn usage(repo: &FakeInstanceRepo, scope: Scope) -> Amounts {
    repo.state().usage.get(&scope).copied().unwrap_or_default()
}

fn user(name: &str) -> Scope {
    Scope::User(name.into())
}

/// Every counter equals what the stored instances hold: the counters never drift.
fn assert_counters_match(repo: &FakeInstanceRepo) {
    let state = repo.state();
    let mut expected: HashMap<Scope, Amounts> = HashMap::new();
    for instance in state.instances.values() {
        for (scope, amounts) in Scope::shares_of(instance) {
            let total = expected.entry(scope).or_default();
            *total = *total + amounts;
        }
    }
    for (scope, counted) in &state.usage {
        let want = expected.get(scope).copied().unwrap_or_default();
        assert_eq!(*counted, want, "counter {scope}");
    }
    for (scope, want) in expected {
        if !want.is_zero() {
            assert_eq!(state.usage.get(&scope).copied(), Some(want), "counter {scope}");
        }
    }
}

const UNLIMITED: QuotaLimits =
    QuotaLimits { instances: None, cpu: None, memory_mb: None, gpus: None };

// === what counts ===

#[test]
fn only_deleted_and_failed_instances_hold_nothing() {
    use InstanceStatus::*;
    for status in InstanceStatus::ALL {
        assert_eq!(holds(status), !matches!(status, Deleted | Failed), "{status}");
    }
    let mut instance = Instance::fixture().with_status(Stopped);
    instance.spec = spec(3, GpuType::TeslaA100);
    let held = held_by(&instance);
    assert_eq!(held, Amounts { instances: 1, cpu: 3, memory_mb: 1024, gpus: 1 });
    assert_eq!(
        Scope::shares_of(&instance)[1],
        (Scope::Gpu(GpuType::TeslaA100), Amounts { instances: 1, ..Amounts::default() })
    );
    instance.status = Failed;
    assert!(held_by(&instance).is_zero());
}

#[test]
fn scope_keys_round_trip_and_no_gpu_has_no_scope() {
    for scope in [user("u:1"), Scope::Gpu(GpuType::Rtx4060Mobile)] {
        assert_eq!(Scope::from_key(&scope.key()), Some(scope));
    }
    assert_eq!(Scope::from_key("gpu:0"), None);
    assert_eq!(Scope::from_key("gpu:9"), None);
    assert_eq!(Scope::gpus().count(), 6);
}

#[test]
fn an_own_limit_replaces_the_default_and_zero_is_unlimited() {
    let defaults = QuotaLimits { instances: Some(5), cpu: Some(10), ..UNLIMITED };
    let own = QuotaOverride { instances: Some(0), gpus: Some(2), ..QuotaOverride::default() };
    assert_eq!(
        own.over(defaults),
        QuotaLimits { instances: None, cpu: Some(10), memory_mb: None, gpus: Some(2) }
    );
}

#[test]
fn only_what_a_change_raises_is_checked() {
    let limits = QuotaLimits { cpu: Some(10), ..UNLIMITED };
    let used = Amounts { cpu: 12, ..Amounts::default() };
    // Above a limit lowered since: freeing, or raising another dimension, passes.
    assert_eq!(
        limits.exceeded_by(used, Amounts { cpu: -2, memory_mb: 5, ..Amounts::default() }),
        None
    );
    let at = Amounts { cpu: 8, ..Amounts::default() };
    assert_eq!(limits.exceeded_by(at, Amounts { cpu: 2, ..Amounts::default() }), None);
    assert_eq!(
        limits.exceeded_by(at, Amounts { cpu: 3, ..Amounts::default() }),
        Some(("cpu", 10, 8, 3))
    );
}

// === counting through the use cases ===

#[tokio::test]
async fn a_resize_counts_the_difference_and_a_stop_keeps_the_share() {
    let repo = Arc::new(FakeInstanceRepo::new());
    let uc = usecase(&repo, conf(QuotaLimits { cpu: Some(8), ..UNLIMITED }, None), false);
    let instance = uc.create(api("u1"), "r1".into(), new("u1", 2, GpuType::None)).await.unwrap();
    let resize = |cpu| Command::ChangeSpec {
        id: instance.id,
        patch: SpecPatch { cpu: Some(cpu), ..SpecPatch::default() },
    };

    uc.act(api("u1"), "r2".into(), resize(6)).await.unwrap();
    assert_eq!(usage(&repo, user("u1")).cpu, 6, "+4 for a resize from 2 to 6");
    uc.act(api("u1"), "r3".into(), Command::Stop { id: instance.id }).await.unwrap();
    assert_eq!(usage(&repo, user("u1")).cpu, 6, "a stopped instance keeps its reservation");
    uc.act(api("u1"), "r4".into(), resize(1)).await.unwrap();
    assert_eq!(usage(&repo, user("u1")).cpu, 1, "-5 for a resize down, while stopped too");
    let err = uc.act(api("u1"), "r5".into(), resize(9)).await.unwrap_err();
    assert!(
        matches!(&err, Error::QuotaExceeded { limit: "cpu", value: 8, usage: 1, requested: 8, .. }),
        "{err:?}"
    );
    assert_eq!(
        repo.instance(instance.id).unwrap().spec.cpu,
        1,
        "the refused resize changed nothing"
    );
    let trail = repo.state().audit_of(instance.id);
    let last = trail.last().unwrap();
    assert_eq!(
        (last.entry.action, last.entry.outcome),
        (Action::ChangeSpec, AuditOutcome::Rejected)
    );
    assert!(last.entry.reason.starts_with("QUOTA_EXCEEDED: "), "{}", last.entry.reason);
    uc.act(api("u1"), "r6".into(), Command::Start { id: instance.id }).await.unwrap();
    assert_eq!(usage(&repo, user("u1")).cpu, 1, "starting a stopped instance takes nothing more");
    assert_counters_match(&repo);
}

#[tokio::test]
async fn deleting_frees_at_once_and_the_freed_share_can_be_taken_again() {
    let repo = Arc::new(FakeInstanceRepo::new());
    let limits = QuotaLimits { instances: Some(1), ..UNLIMITED };
    let uc = usecase(&repo, conf(limits, Some(1)), false);
    let first = uc.create(api("u1"), "r1".into(), new("u1", 1, GpuType::TeslaA100)).await.unwrap();
    let err = uc.create(api("u1"), "r2".into(), new("u1", 1, GpuType::None)).await.unwrap_err();
    assert!(matches!(
        err,
        Error::QuotaExceeded { limit: "instances", value: 1, usage: 1, requested: 1, .. }
    ));
    let err =
        uc.create(api("u2"), "r3".into(), new("u2", 1, GpuType::TeslaA100)).await.unwrap_err();
    assert!(matches!(
        err,
        Error::CapacityExhausted { gpu: GpuType::TeslaA100, capacity: 1, used: 1 }
    ));
    assert_eq!(repo.state().instances.len(), 1, "a refused API create stores nothing");

    uc.act(api("u1"), "r4".into(), Command::Delete { id: first.id }).await.unwrap();
    assert!(usage(&repo, user("u1")).is_zero());
    assert_eq!(usage(&repo, Scope::Gpu(GpuType::TeslaA100)).instances, 0);
    uc.create(api("u2"), "r5".into(), new("u2", 1, GpuType::TeslaA100)).await.unwrap();
    uc.create(api("u1"), "r6".into(), new("u1", 1, GpuType::None)).await.unwrap();
    assert_counters_match(&repo);
}

#[tokio::test]
async fn with_a_cluster_deleting_holds_until_the_workload_is_gone_and_failing_frees() {
    let repo = Arc::new(FakeInstanceRepo::new());
    let uc = usecase(&repo, conf(UNLIMITED, Some(2)), true);
    let a = uc.create(api("u1"), "r1".into(), new("u1", 1, GpuType::TeslaA100)).await.unwrap();
    let b = uc.create(api("u1"), "r2".into(), new("u1", 1, GpuType::TeslaA100)).await.unwrap();
    let gpu = Scope::Gpu(GpuType::TeslaA100);
    uc.act(api("u1"), "r3".into(), Command::Delete { id: a.id }).await.unwrap();
    assert_eq!(usage(&repo, gpu.clone()).instances, 2, "its Pod still holds the GPU");
    let observe = |id, observation| Envelope {
        key: None,
        fingerprint: None,
        actor: Actor { id: "reconciler".into(), source: Source::Reconciler },
        request_id: "rec".into(),
        command: Command::Observe { id, observation },
    };
    uc.execute(&[observe(a.id, Observation::Gone)]).await.unwrap();
    assert_eq!(usage(&repo, gpu.clone()).instances, 1, "DELETED frees");
    uc.execute(&[observe(b.id, Observation::Failed("image pull".into()))]).await.unwrap();
    assert_eq!(usage(&repo, gpu.clone()).instances, 0, "FAILED frees");
    assert!(usage(&repo, user("u1")).is_zero());

    // Starting a FAILED instance takes its share again, so it is checked.
    let c = uc.create(api("u2"), "r4".into(), new("u2", 1, GpuType::TeslaA100)).await.unwrap();
    let d = uc.create(api("u2"), "r5".into(), new("u2", 1, GpuType::TeslaA100)).await.unwrap();
    let err = uc.act(api("u1"), "r6".into(), Command::Start { id: b.id }).await.unwrap_err();
    assert!(matches!(err, Error::CapacityExhausted { capacity: 2, used: 2, .. }), "{err:?}");
    assert_eq!(repo.instance(b.id).unwrap().status, InstanceStatus::Failed);
    uc.act(api("u2"), "r7".into(), Command::Delete { id: c.id }).await.unwrap();
    uc.execute(&[observe(c.id, Observation::Gone)]).await.unwrap();
    uc.act(api("u1"), "r8".into(), Command::Start { id: b.id }).await.unwrap();
    assert_eq!(usage(&repo, gpu).instances, 2);
    let _ = d;
    assert_counters_match(&repo);
}

#[tokio::test]
async fn a_resize_to_another_gpu_type_moves_its_share_and_checks_the_new_type() {
    let repo = Arc::new(FakeInstanceRepo::new());
    let uc = usecase(&repo, conf(UNLIMITED, Some(1)), false);
    let t4 = uc.create(api("u1"), "r1".into(), new("u1", 1, GpuType::TeslaT4)).await.unwrap();
    let a100 = uc.create(api("u2"), "r2".into(), new("u2", 1, GpuType::TeslaA100)).await.unwrap();
    let to = |id, gpu| Command::ChangeSpec {
        id,
        patch: SpecPatch { gpu: Some(gpu), ..SpecPatch::default() },
    };

    let err = uc.act(api("u1"), "r3".into(), to(t4.id, GpuType::TeslaA100)).await.unwrap_err();
    assert!(matches!(err, Error::CapacityExhausted { .. }), "{err:?}");
    uc.act(api("u2"), "r4".into(), to(a100.id, GpuType::None)).await.unwrap();
    uc.act(api("u1"), "r5".into(), to(t4.id, GpuType::TeslaA100)).await.unwrap();
    assert_eq!(usage(&repo, Scope::Gpu(GpuType::TeslaA100)).instances, 1);
    assert_eq!(usage(&repo, Scope::Gpu(GpuType::TeslaT4)).instances, 0);
    assert_eq!(usage(&repo, user("u2")).gpus, 0);
    assert_counters_match(&repo);
}

// === events ===

#[tokio::test]
async fn a_created_event_over_quota_is_recorded_failed_audited_and_published() {
    let repo = Arc::new(FakeInstanceRepo::new());
    let uc = usecase(&repo, conf(QuotaLimits { instances: Some(2), ..UNLIMITED }, Some(3)), false);
    // One batch: the limit holds within a batch as across batches.
    let batch: Vec<Envelope> = (1..=6)
        .map(|n| created(n, if n <= 4 { "u1" } else { "u2" }, 1, GpuType::TeslaA100))
        .collect();

    let outcomes = uc.execute(&batch).await.unwrap();

    let statuses: Vec<(InstanceStatus, String)> = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Applied(i) => (i.status, i.status_reason.clone()),
            other => panic!("every create is applied, got {other:?}"),
        })
        .collect();
    use InstanceStatus::{Failed, Running};
    let q = || (Failed, "QUOTA_EXCEEDED".to_owned());
    let c = || (Failed, "CAPACITY_EXHAUSTED".to_owned());
    let ok = || (Running, String::new());
    assert_eq!(statuses, vec![ok(), ok(), q(), q(), ok(), c()]);
    {
        let state = repo.state();
        let failed = state.audit_of(id(3));
        let [row] = &failed[..] else { panic!("{failed:?}") };
        assert_eq!((row.entry.action, row.entry.outcome), (Action::Create, AuditOutcome::Rejected));
        assert!(
            row.entry
                .reason
                .starts_with("QUOTA_EXCEEDED: quota exceeded: user \"u1\" holds 2 of 2 instances"),
            "{}",
            row.entry.reason
        );
        let published: Vec<_> = state.outbox.iter().filter(|c| c.instance_id == id(6)).collect();
        assert_eq!(published.len(), 1);
        assert_eq!(
            (published[0].status, published[0].reason.as_str()),
            (Failed, "CAPACITY_EXHAUSTED")
        );
        assert_eq!(
            state.processed.len(),
            6,
            "refused creates are processed: a redelivery is a duplicate"
        );
        assert_eq!(state.usage[&Scope::Gpu(GpuType::TeslaA100)].instances, 3);
    }
    let again = uc.execute(&batch[2..3]).await.unwrap();
    assert!(matches!(again[..], [Outcome::Duplicate]));
    assert_counters_match(&repo);
}

#[tokio::test]
async fn a_spec_change_event_over_quota_is_refused_for_the_dead_letter_queue() {
    let repo = Arc::new(FakeInstanceRepo::new());
    let uc = usecase(&repo, conf(QuotaLimits { memory_mb: Some(2048), ..UNLIMITED }, None), false);
    uc.execute(&[created(1, "u1", 1, GpuType::None)]).await.unwrap();
    let grow = Envelope {
        command: Command::ChangeSpec {
            id: id(1),
            patch: SpecPatch { memory_mb: Some(4096), ..SpecPatch::default() },
        },
        ..created(2, "u1", 1, GpuType::None)
    };
    let outcomes = uc.execute(&[grow]).await.unwrap();
    assert!(
        matches!(
            &outcomes[..],
            [Outcome::Rejected(Error::QuotaExceeded {
                limit: "memory_mb",
                value: 2048,
                usage: 1024,
                requested: 3072,
                ..
            })]
        ),
        "{outcomes:?}"
    );
    let trail = repo.state().audit_of(id(1));
    assert_eq!(trail.last().unwrap().entry.outcome, AuditOutcome::Rejected);
    assert_eq!(repo.instance(id(1)).unwrap().spec.memory_mb, 1024);
}

// === exact under races ===

#[tokio::test]
async fn a_counter_moved_by_another_writer_after_the_read_makes_the_unit_plan_again() {
    let repo = Arc::new(FakeInstanceRepo::new());
    let uc = usecase(&repo, conf(UNLIMITED, Some(1)), false);
    // Another replica takes the last A100 between this unit's read and its write.
    repo.race_next_transact(|state| {
        state
            .usage
            .insert(Scope::Gpu(GpuType::TeslaA100), Amounts { instances: 1, ..Amounts::default() });
    });

    let err =
        uc.create(api("u1"), "r1".into(), new("u1", 1, GpuType::TeslaA100)).await.unwrap_err();

    assert!(matches!(err, Error::CapacityExhausted { used: 1, .. }), "{err:?}");
    assert_eq!(repo.calls().transact, 2, "the first plan lost at the write and was planned again");
    assert!(repo.state().instances.is_empty());
}

#[tokio::test]
async fn many_concurrent_creators_of_one_user_never_pass_the_limit() {
    let repo = Arc::new(FakeInstanceRepo::new());
    let uc = usecase(&repo, conf(QuotaLimits { instances: Some(7), ..UNLIMITED }, None), false);
    let tasks: Vec<_> = (0..40)
        .map(|n| {
            let uc = uc.clone();
            tokio::spawn(async move {
                uc.create(api("u1"), format!("r{n}"), new("u1", 1, GpuType::None)).await
            })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => created += 1,
            Err(Error::QuotaExceeded { .. }) => {}
            Err(e) => panic!("only quota refusals, got {e:?}"),
        }
    }
    assert_eq!(created, 7);
    assert_eq!(usage(&repo, user("u1")).instances, 7);
    let units = repo.calls().transact;
    assert!(units < 40, "creates that waited together were applied together ({units} units)");
    assert_counters_match(&repo);
}

// === QuotaUsecase ===

fn caller(user_id: &str, admin: bool) -> Access {
    Access { user_id: user_id.into(), admin }
}

#[tokio::test]
async fn a_user_reads_their_own_quota_and_only_an_admin_sets_one() {
    let repo = Arc::new(FakeInstanceRepo::new());
    let quota = conf(QuotaLimits { instances: Some(5), ..UNLIMITED }, Some(10));
    let uc = usecase(&repo, quota, false);
    uc.create(api("u1"), "r1".into(), new("u1", 2, GpuType::TeslaA100)).await.unwrap();
    let quotas = QuotaUsecase::new(repo.clone(), quota);

    let own = quotas.get(&caller("u1", false), "u1").await.unwrap();
    assert_eq!(own.limits, QuotaLimits { instances: Some(5), ..UNLIMITED });
    assert_eq!(own.usage, Amounts { instances: 1, cpu: 2, memory_mb: 1024, gpus: 1 });
    assert!(matches!(
        quotas.get(&caller("u2", false), "u1").await,
        Err(Error::PermissionDenied { .. })
    ));
    let raise = QuotaOverride { instances: Some(0), gpus: Some(1), ..QuotaOverride::default() };
    assert!(matches!(
        quotas.set(&caller("u1", false), "u1", raise).await,
        Err(Error::PermissionDenied { .. })
    ));
    let negative = QuotaOverride { cpu: Some(-1), ..QuotaOverride::default() };
    assert!(matches!(
        quotas.set(&caller("root", true), "u1", negative).await,
        Err(Error::InvalidArgument { .. })
    ));

    let set = quotas.set(&caller("root", true), "u1", raise).await.unwrap();
    assert_eq!(set.limits, QuotaLimits { instances: None, gpus: Some(1), ..UNLIMITED });
    assert_eq!(set.own, raise);
    // The new limits bind the next create.
    let err =
        uc.create(api("u1"), "r2".into(), new("u1", 1, GpuType::TeslaA100)).await.unwrap_err();
    assert!(matches!(err, Error::QuotaExceeded { limit: "gpus", value: 1, .. }), "{err:?}");
    let cleared = quotas.set(&caller("root", true), "u1", QuotaOverride::default()).await.unwrap();
    assert_eq!(cleared.limits, quota.per_user);

    let capacity = quotas.capacity().await.unwrap();
    assert_eq!(capacity.len(), 6);
    let a100 = capacity.iter().find(|c| c.gpu == GpuType::TeslaA100).unwrap();
    assert_eq!((a100.capacity, a100.used, a100.free()), (Some(10), 1, Some(9)));
    let t4 = capacity.iter().find(|c| c.gpu == GpuType::TeslaT4).unwrap();
    assert_eq!((t4.capacity, t4.used, t4.free()), (None, 0, None));
}
