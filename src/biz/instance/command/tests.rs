//! Unit tests of `command`.

use chrono::TimeZone;

use super::*;
use crate::biz::{GpuType, audit::Source};

fn ctx(cluster_enabled: bool) -> Context {
    Context {
        now: Utc.with_ymd_and_hms(2026, 11, 22, 0, 0, 0).unwrap(),
        limits: Limits::default(),
        cluster_enabled,
        quota: QuotaConf::default(),
    }
}

fn spec(cpu: i32) -> InstanceSpec {
    InstanceSpec {
        cpu,
        memory_mb: 1024,
        gpu: GpuType::None,
        image: "ubuntu:22.04".into(),
        config: serde_json::json!({}),
    }
}

fn id(n: i64) -> InstanceId {
    InstanceId::try_from(n).unwrap()
}

fn env(key: u8, command: Command) -> Envelope {
    Envelope {
        key: Some(EventKey([key; 16])),
        fingerprint: Some([key; 16]),
        actor: Actor { id: "mq".into(), source: Source::Mq },
        request_id: format!("m{key}"),
        command,
    }
}

fn create(n: i64) -> Command {
    Command::Create {
        id: id(n),
        user_id: "u1".into(),
        name: "demo".into(),
        spec: spec(2),
        labels: Labels::new(),
    }
}

fn run(batch: &[Envelope], snapshot: Snapshot, cluster: bool) -> (Vec<Outcome>, Changes) {
    plan(batch, snapshot, &ctx(cluster))
}

fn existing(status: InstanceStatus) -> Snapshot {
    let (_, changes) = run(&[env(0, create(1))], Snapshot::default(), false);
    let mut instance = changes.inserts[0].clone();
    instance.status = status;
    if status == InstanceStatus::Deleted {
        instance.deleted_at = Some(instance.created_at);
    }
    Snapshot {
        seen: HashMap::new(),
        instances: HashMap::from([(id(1), instance)]),
        quota: HashMap::new(),
    }
}

#[test]
fn without_a_cluster_a_create_runs_at_once_with_one_audit_row_and_one_status_event() {
    let (outcomes, changes) = run(&[env(1, create(1))], Snapshot::default(), false);

    assert!(matches!(&outcomes[0], Outcome::Applied(i) if i.status == InstanceStatus::Running));
    assert_eq!(changes.inserts.len(), 1);
    assert_eq!(changes.audit.len(), 1);
    assert_eq!(changes.outbox.len(), 1);
    assert_eq!(changes.outbox[0].status, InstanceStatus::Running);
    let fingerprint = Some([1; 16]);
    assert_eq!(changes.seen, vec![Seen { key: EventKey([1; 16]), instance_id: 1, fingerprint }]);
}

#[test]
fn with_a_cluster_steps_wait_for_it() {
    let (outcomes, _) = run(&[env(1, create(1))], Snapshot::default(), true);
    assert!(matches!(&outcomes[0], Outcome::Applied(i) if i.status == InstanceStatus::Creating));

    let (outcomes, _) =
        run(&[env(2, Command::Stop { id: id(1) })], existing(InstanceStatus::Running), true);
    assert!(matches!(&outcomes[0], Outcome::Applied(i) if i.status == InstanceStatus::Stopping));
}

#[test]
fn a_repeated_key_has_no_effect_and_no_audit_row() {
    let batch = [
        env(1, create(1)),
        env(1, create(1)),
        env(2, Command::Stop { id: id(1) }),
        env(2, Command::Stop { id: id(1) }),
    ];

    let (outcomes, changes) = run(&batch, Snapshot::default(), false);

    assert!(matches!(outcomes[1], Outcome::Duplicate));
    assert!(matches!(outcomes[3], Outcome::Duplicate));
    assert_eq!(changes.audit.len(), 2);
    assert_eq!(changes.inserts.len(), 1);
    assert_eq!(
        changes.inserts[0].status,
        InstanceStatus::Stopped,
        "created and stopped in one batch"
    );
    assert!(changes.updates.is_empty(), "a new instance is inserted in its final state");

    let seen = Snapshot { seen: HashMap::from([(EventKey([1; 16]), None)]), ..Snapshot::default() };
    let (outcomes, changes) = run(&[env(1, create(1))], seen, false);
    assert!(matches!(outcomes[0], Outcome::Duplicate));
    assert!(changes.is_empty());
}

#[test]
fn a_key_seen_with_another_fingerprint_is_refused_and_audited_not_dropped() {
    let stop = Command::Stop { id: id(1) };
    let mut snapshot = existing(InstanceStatus::Running);
    snapshot.seen.insert(EventKey([5; 16]), Some([9; 16]));
    let reused = Envelope { fingerprint: Some([6; 16]), ..env(5, stop.clone()) };
    let redelivered = Envelope { fingerprint: Some([9; 16]), ..env(5, stop.clone()) };

    let (outcomes, changes) = run(&[reused, redelivered], snapshot.clone(), false);

    assert!(matches!(&outcomes[0], Outcome::Rejected(Error::MessageIdReused { .. })));
    assert!(matches!(outcomes[1], Outcome::Duplicate), "the same content is a redelivery");
    assert_eq!(changes.audit.len(), 1);
    assert_eq!(changes.audit[0].outcome, AuditOutcome::Rejected);
    assert!(changes.audit[0].reason.starts_with("MESSAGE_ID_REUSED"));
    assert!(changes.updates.is_empty() && changes.seen.is_empty());

    // A key recorded before fingerprints were is taken for a redelivery.
    snapshot.seen.insert(EventKey([5; 16]), None);
    let (outcomes, _) = run(&[env(5, stop)], snapshot, false);
    assert!(matches!(outcomes[0], Outcome::Duplicate));
}

#[test]
fn asking_for_the_current_state_is_an_audited_no_op() {
    let (outcomes, changes) =
        run(&[env(1, Command::Stop { id: id(1) })], existing(InstanceStatus::Stopped), false);

    assert!(matches!(outcomes[0], Outcome::Ignored { .. }));
    assert_eq!(changes.audit[0].outcome, AuditOutcome::Ignored);
    assert!(changes.updates.is_empty() && changes.outbox.is_empty());
}

#[test]
fn an_illegal_move_is_rejected_and_audited() {
    let (outcomes, changes) =
        run(&[env(1, Command::Start { id: id(1) })], existing(InstanceStatus::Deleted), false);

    assert!(matches!(&outcomes[0], Outcome::Rejected(Error::IllegalTransition { .. })));
    assert_eq!(changes.audit[0].outcome, AuditOutcome::Rejected);
    assert!(changes.audit[0].reason.starts_with("ILLEGAL_TRANSITION"));
    assert!(changes.seen.is_empty(), "rejected events can be replayed");
}

#[test]
fn a_command_for_an_unknown_instance_is_unknown_and_not_audited() {
    let (outcomes, changes) =
        run(&[env(1, Command::Delete { id: id(9) })], Snapshot::default(), false);

    assert!(matches!(outcomes[0], Outcome::Unknown(i) if i == id(9)));
    assert!(changes.is_empty());
}

#[test]
fn a_second_create_is_ignored_when_equal_and_rejected_when_not() {
    let same = run(&[env(1, create(1))], existing(InstanceStatus::Running), false).0;
    let other = Command::Create {
        id: id(1),
        user_id: "u2".into(),
        name: "demo".into(),
        spec: spec(2),
        labels: Labels::new(),
    };
    let different = run(&[env(2, other)], existing(InstanceStatus::Running), false).0;
    let reused = run(&[env(3, create(1))], existing(InstanceStatus::Deleted), false).0;

    assert!(matches!(same[0], Outcome::Ignored { .. }));
    assert!(matches!(different[0], Outcome::Rejected(Error::InstanceAlreadyExists { .. })));
    assert!(matches!(reused[0], Outcome::Rejected(Error::InstanceAlreadyExists { .. })));
}

#[test]
fn a_spec_change_bumps_the_version_and_keeps_the_config_when_asked() {
    let mut snapshot = existing(InstanceStatus::Running);
    snapshot.instances.get_mut(&id(1)).unwrap().spec.config =
        serde_json::json!({"env": {"A": "1"}});
    let patch = SpecPatch { cpu: Some(8), ..SpecPatch::default() };
    let change = Command::ChangeSpec { id: id(1), patch };

    let (outcomes, changes) = run(&[env(1, change)], snapshot, false);

    let Outcome::Applied(instance) = &outcomes[0] else { panic!("not applied") };
    assert_eq!(instance.spec.cpu, 8);
    assert_eq!(instance.spec.config, serde_json::json!({"env": {"A": "1"}}));
    assert_eq!(instance.version, 2);
    assert_eq!(instance.status, InstanceStatus::Running);
    assert_eq!(changes.updates[0].loaded_version, 1, "written only if still at this version");
    assert!(changes.updates[0].spec_changed);
}

#[test]
fn invalid_specs_and_names_are_rejected_before_anything_is_written() {
    let bad_cpu = Command::Create {
        id: id(2),
        user_id: "u".into(),
        name: "n".into(),
        spec: spec(0),
        labels: Labels::new(),
    };
    let bad_name = Command::Create {
        id: id(3),
        user_id: "u".into(),
        name: String::new(),
        spec: spec(1),
        labels: Labels::new(),
    };

    let (outcomes, changes) = run(&[env(1, bad_cpu), env(2, bad_name)], Snapshot::default(), false);

    assert!(matches!(&outcomes[0], Outcome::Rejected(Error::InvalidSpec { field: "cpu", .. })));
    assert!(matches!(
        &outcomes[1],
        Outcome::Rejected(Error::InvalidArgument { field: "name", .. })
    ));
    assert!(changes.is_empty(), "unknown instances get no audit row");
}

#[test]
fn sync_requests_are_written_for_the_reconciler_only_when_there_is_one() {
    let batch = [
        env(1, Command::Sync { id: Some(id(1)) }),
        env(2, Command::Sync { id: None }),
        env(3, Command::Sync { id: Some(id(7)) }), // unknown: retried later, not requested
    ];
    let (outcomes, changes) = run(&batch, existing(InstanceStatus::Running), true);
    assert!(matches!(outcomes[2], Outcome::Unknown(_)), "{outcomes:?}");
    assert_eq!(changes.sync_requests, vec![Some(id(1)), None]);

    let (_, changes) = run(&batch, existing(InstanceStatus::Running), false);
    assert!(changes.sync_requests.is_empty(), "no cluster, no reconciler to ask");

    let mut from_reconciler = env(4, Command::Sync { id: Some(id(1)) });
    from_reconciler.actor = Actor { id: "reconciler".into(), source: Source::Reconciler };
    let (_, changes) = run(&[from_reconciler], existing(InstanceStatus::Running), true);
    assert!(changes.sync_requests.is_empty(), "the reconciler does not ask itself");

    let only_requests = Changes { sync_requests: vec![None], ..Changes::default() };
    assert!(!only_requests.is_empty(), "a unit of work with only a sync request writes it");
}

fn set_labels(pairs: &[(&str, &str)]) -> Command {
    let labels = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    Command::SetLabels { id: id(1), labels }
}

#[test]
fn setting_labels_replaces_them_bumps_the_version_and_audits_before_and_after() {
    let snapshot = existing(InstanceStatus::Running);

    let (outcomes, changes) = run(&[env(1, set_labels(&[("team", "a")]))], snapshot, true);

    let Outcome::Applied(after) = &outcomes[0] else { panic!("{outcomes:?}") };
    assert_eq!(after.labels, Labels::from([("team".into(), "a".into())]));
    assert_eq!(after.version, 2);
    assert_eq!(after.status, InstanceStatus::Running, "labels change no status");
    assert_eq!(changes.updates.len(), 1);
    assert!(!changes.updates[0].spec_changed);
    assert!(changes.outbox.is_empty(), "no status event");
    let audit = &changes.audit[0];
    assert_eq!((audit.action, audit.outcome), (Action::SetLabels, AuditOutcome::Ok));
    assert_eq!(audit.before.as_ref().unwrap()["labels"], serde_json::json!({}));
    assert_eq!(audit.after.as_ref().unwrap()["labels"], serde_json::json!({"team": "a"}));
    assert_eq!(changes.sync_requests, vec![Some(id(1))], "the reconciler copies them");
}

#[test]
fn setting_the_same_labels_is_an_audited_no_op() {
    let (_, first) =
        run(&[env(1, set_labels(&[("team", "a")]))], existing(InstanceStatus::Running), false);
    let mut snapshot = existing(InstanceStatus::Running);
    snapshot.instances.insert(id(1), first.updates[0].instance.clone());

    let (outcomes, changes) = run(&[env(2, set_labels(&[("team", "a")]))], snapshot, false);

    assert!(matches!(outcomes[0], Outcome::Ignored { .. }));
    assert!(changes.updates.is_empty());
    assert_eq!(changes.audit[0].outcome, AuditOutcome::Ignored);
}

#[test]
fn a_deleted_instance_refuses_label_changes_and_bad_labels_are_refused() {
    for status in [InstanceStatus::Deleted, InstanceStatus::Deleting] {
        let (outcomes, changes) =
            run(&[env(1, set_labels(&[("team", "a")]))], existing(status), false);
        assert!(matches!(outcomes[0], Outcome::Rejected(Error::NotAllowed { .. })), "{status}");
        assert_eq!(changes.audit[0].outcome, AuditOutcome::Rejected);
        assert!(changes.updates.is_empty());
    }

    let (outcomes, changes) = run(
        &[env(1, set_labels(&[("resource.io/x", "a")]))],
        existing(InstanceStatus::Running),
        false,
    );
    assert!(matches!(outcomes[0], Outcome::Rejected(Error::InvalidLabels { .. })));
    assert!(changes.updates.is_empty());
}

#[test]
fn a_create_keeps_its_labels_and_refuses_bad_ones() {
    let labelled = |pairs: &[(&str, &str)]| Command::Create {
        id: id(1),
        user_id: "u1".into(),
        name: "demo".into(),
        spec: spec(2),
        labels: pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
    };

    let (outcomes, changes) =
        run(&[env(1, labelled(&[("team", "a")]))], Snapshot::default(), false);
    assert!(matches!(&outcomes[0], Outcome::Applied(i) if i.labels["team"] == "a"));
    assert_eq!(
        changes.audit[0].after.as_ref().unwrap()["labels"],
        serde_json::json!({"team": "a"})
    );

    let (outcomes, changes) =
        run(&[env(1, labelled(&[("bad key", "a")]))], Snapshot::default(), false);
    assert!(matches!(outcomes[0], Outcome::Rejected(Error::InvalidLabels { .. })));
    assert!(changes.inserts.is_empty());
}
