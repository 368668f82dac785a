//! Property tests of `command`.

use chrono::TimeZone;
use proptest::prelude::*;

use super::*;
use crate::biz::{GpuType, audit::Source, quota::QuotaLimits};

#[derive(Debug, Clone)]
enum Op {
    Create(u8),
    Delete,
    Start,
    Stop,
    Resize(u8),
    Sync,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u8..4).prop_map(Op::Create),
        Just(Op::Delete),
        Just(Op::Start),
        Just(Op::Stop),
        (1u8..4).prop_map(Op::Resize),
        Just(Op::Sync),
    ]
}

fn status_of(json: &serde_json::Value) -> InstanceStatus {
    json["status"].as_str().unwrap().parse().unwrap()
}

/// Whether `to` is reachable from `from` in at most two allowed steps (a command
/// may pass through an intermediate status, e.g. STOPPING on its way to STOPPED).
fn reachable(from: InstanceStatus, to: InstanceStatus) -> bool {
    from == to
        || from.can_become(to)
        || InstanceStatus::ALL.iter().any(|mid| from.can_become(*mid) && mid.can_become(to))
}

proptest! {
    /// Whatever sequence of events and API calls arrives, in one batch or one by one,
    /// with or without a cluster: no forbidden move, and the audit trail replays to
    /// the final state.
    #[test]
    fn the_state_machine_holds_and_the_trail_replays(
        ops in proptest::collection::vec(op(), 1..40),
        one_batch in any::<bool>(),
        cluster in any::<bool>(),
        cpu_limit in proptest::option::of(1..300i64),
    ) {
        let id = InstanceId::try_from(7).unwrap();
        let ctx = Context {
            now: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            limits: Limits::default(),
            cluster_enabled: cluster,
            quota: QuotaConf {
                per_user: QuotaLimits { cpu: cpu_limit, ..QuotaLimits::default() },
                ..QuotaConf::default()
            },
        };
        let envelopes: Vec<Envelope> = ops.iter().enumerate().map(|(n, op)| {
            let spec = |cpu: u8| InstanceSpec {
                cpu: i32::from(cpu),
                memory_mb: 512,
                gpu: GpuType::None,
                image: "ubuntu:22.04".into(),
                config: serde_json::json!({}),
            };
            let command = match op {
                Op::Create(cpu) => Command::Create { id, user_id: "u".into(), name: "n".into(), spec: spec(*cpu), labels: Default::default() },
                Op::Delete => Command::Delete { id },
                Op::Start => Command::Start { id },
                Op::Stop => Command::Stop { id },
                Op::Resize(cpu) => Command::ChangeSpec { id, patch: SpecPatch::all(spec(*cpu)) },
                Op::Sync => Command::Sync { id: Some(id) },
            };
            Envelope { key: Some(EventKey([n as u8; 16])), fingerprint: None, actor: Actor { id: "t".into(), source: Source::Mq }, request_id: n.to_string(), command }
        }).collect();

        let mut state: Option<Instance> = None;
        let mut audit = Vec::new();
        let mut counters: HashMap<Scope, Amounts> = HashMap::new();
        let batches: Vec<&[Envelope]> = if one_batch {
            vec![&envelopes[..]]
        } else {
            envelopes.chunks(1).collect()
        };
        for batch in batches {
            let snapshot = Snapshot {
                seen: HashMap::new(),
                instances: state.iter().map(|i| (i.id, i.clone())).collect(),
                quota: counters
                    .iter()
                    .map(|(scope, usage)| (scope.clone(), Held { usage: *usage, own: None }))
                    .collect(),
            };
            let (_, changes) = plan(batch, snapshot, &ctx);
            for update in &changes.updates {
                prop_assert!(update.loaded_version < update.instance.version);
                prop_assert_eq!(update.spec_changed, state.as_ref().map(|s| &s.spec) != Some(&update.instance.spec));
                state = Some(update.instance.clone());
            }
            if let Some(instance) = changes.inserts.last() {
                state = Some(instance.clone());
            }
            audit.extend(changes.audit);
            for change in &changes.usage {
                let counter = counters.entry(change.scope.clone()).or_default();
                *counter = *counter + change.delta;
            }
            // The counter is what the instance holds, and never above the limit.
            let held = state.as_ref().map(crate::biz::quota::held_by).unwrap_or_default();
            let counted = counters.get(&Scope::User("u".into())).copied().unwrap_or_default();
            prop_assert_eq!(counted, held);
            if let Some(limit) = cpu_limit {
                prop_assert!(counted.cpu <= limit, "{} cpu held over a limit of {limit}", counted.cpu);
            }
        }

        let mut replayed: Option<InstanceStatus> = None;
        for entry in &audit {
            // A create over quota from an event is refused, yet records the instance FAILED.
            let recorded_failed = entry.action == Action::Create && entry.before.is_none() && entry.after.is_some();
            if entry.outcome != AuditOutcome::Ok && !recorded_failed {
                continue;
            }
            let after = status_of(entry.after.as_ref().unwrap());
            match (replayed, &entry.before) {
                (None, None) => prop_assert_eq!(entry.action, Action::Create),
                (Some(prev), Some(before)) => {
                    prop_assert_eq!(status_of(before), prev);
                    prop_assert!(reachable(prev, after), "{prev} -> {after} by {:?}", entry.action);
                    prop_assert!(!prev.is_terminal(), "nothing follows DELETED");
                }
                other => prop_assert!(false, "audit out of order: {other:?}"),
            }
            replayed = Some(after);
        }
        prop_assert_eq!(replayed, state.as_ref().map(|i| i.status));
    }
}
