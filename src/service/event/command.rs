//! Lifecycle events (`mq.v1.Event`) mapped onto the same commands as the API.

use sha2::{Digest, Sha256};

use super::Inbound;
use crate::{
    biz::{
        Action, Actor, Command, Envelope, Error, EventKey, GpuType, InstanceId, InstanceSpec,
        SpecPatch,
    },
    pb::mq::v1 as pb,
};

/// The de-duplication key of an event: its producer's message id. Two messages with
/// different ids are two commands, even with equal bodies; a message id seen again (a
/// redelivery, a publisher's retry) is the same command.
pub fn message_key(message_id: &str) -> EventKey {
    let digest =
        Sha256::new().chain_update(b"amqp-message-id\0").chain_update(message_id).finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    EventKey(key)
}

/// The command a delivery asks for, with its identity and its audit actor.
pub(super) fn envelope(inbound: &Inbound) -> Envelope {
    let command = match &inbound.event {
        Ok(event) => command(event),
        Err(why) => Command::Refused {
            id: None,
            action: Action::Create,
            error: Error::InvalidEvent { message: why.clone() },
        },
    };
    // Without a message id an event has no identity: it is a level command, applied as
    // it comes (asking again for the state an instance is in is an audited no-op).
    let key = inbound.message_id.as_deref().filter(|id| !id.is_empty()).map(message_key);
    let fingerprint = key.and(inbound.event.as_ref().ok()).map(event_fingerprint);
    Envelope { key, fingerprint, actor: Actor::mq(), request_id: inbound.audit_id.clone(), command }
}

/// A digest of what an event says, equal for the same event in either encoding (the
/// protobuf encoding of a decoded message is canonical): a message id seen again with
/// another fingerprint was reused for another event.
fn event_fingerprint(event: &pb::Event) -> [u8; 16] {
    let digest = Sha256::digest(prost::Message::encode_to_vec(event));
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// Maps an event onto a command, refusing what is malformed.
fn command(e: &pb::Event) -> Command {
    let event_type = pb::EventType::try_from(e.event_type).unwrap_or(pb::EventType::Unspecified);
    let action = match event_type {
        pb::EventType::InstanceCreated => Action::Create,
        pb::EventType::InstanceDeleted => Action::Delete,
        pb::EventType::InstanceSpecChanged => Action::ChangeSpec,
        pb::EventType::InstanceStarted => Action::Start,
        pb::EventType::InstanceStopped => Action::Stop,
        pb::EventType::InstanceK8sSync => Action::K8sSync,
        pb::EventType::Unspecified => {
            let message = format!("unknown event_type {}", e.event_type);
            return Command::Refused {
                id: None,
                action: Action::Create,
                error: Error::InvalidEvent { message },
            };
        }
    };
    if event_type == pb::EventType::InstanceK8sSync && e.instance_id == 0 {
        return Command::Sync { id: None };
    }
    let id = match InstanceId::try_from(e.instance_id) {
        Ok(id) => id,
        Err(error) => return Command::Refused { id: None, action, error },
    };
    let refused = |error| Command::Refused { id: Some(id), action, error };
    match event_type {
        pb::EventType::InstanceCreated => {
            if e.user_id == 0 {
                return refused(Error::invalid("user_id", "required for INSTANCE_CREATED"));
            }
            match spec(e) {
                Ok(spec) => Command::Create {
                    id,
                    user_id: e.user_id.to_string(),
                    name: e.name.clone(),
                    spec,
                    // Events carry no labels (mq.v1.Event has none).
                    labels: Default::default(),
                },
                Err(error) => refused(error),
            }
        }
        // Events carry no config_json: the instance keeps its own.
        pb::EventType::InstanceSpecChanged => match spec(e) {
            Ok(spec) => Command::ChangeSpec {
                id,
                patch: SpecPatch { config: None, ..SpecPatch::all(spec) },
            },
            Err(error) => refused(error),
        },
        pb::EventType::InstanceDeleted => Command::Delete { id },
        pb::EventType::InstanceStarted => Command::Start { id },
        pb::EventType::InstanceStopped => Command::Stop { id },
        pb::EventType::InstanceK8sSync => Command::Sync { id: Some(id) },
        pb::EventType::Unspecified => unreachable!("handled above"),
    }
}

fn spec(e: &pb::Event) -> Result<InstanceSpec, Error> {
    let Some(s) = &e.spec else {
        return Err(Error::InvalidSpec { field: "spec", message: "is required".into() });
    };
    Ok(InstanceSpec {
        cpu: s.cpus,
        memory_mb: s.memory_mb,
        gpu: GpuType::parse(&s.gpu)?,
        image: s.image.clone(),
        config: serde_json::Value::Object(serde_json::Map::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::publish::SAMPLE_JSON as SEED_JSON;

    #[test]
    fn the_seed_example_maps_to_a_create() {
        let event: pb::Event = serde_json::from_str(SEED_JSON).unwrap();

        let Command::Create { id, user_id, name, spec, .. } = command(&event) else {
            panic!("not a create");
        };

        assert_eq!(id.get(), 1_234_567_890);
        assert_eq!(user_id, "123");
        assert_eq!(name, "GPU 计算实例");
        assert_eq!((spec.cpu, spec.memory_mb, spec.gpu), (8, 32768, GpuType::TeslaA100));
        assert_eq!(spec.image, "ubuntu:22.04");
    }

    #[test]
    fn an_event_is_identified_by_its_message_id_not_its_body() {
        let event: pb::Event = serde_json::from_str(SEED_JSON).unwrap();
        let inbound = |message_id: Option<&str>| Inbound {
            event: Ok(event.clone()),
            message_id: message_id.map(str::to_owned),
            audit_id: message_id.unwrap_or("instance.created#1").to_owned(),
            retries: 0,
        };

        let first = envelope(&inbound(Some("m-1")));
        let again = envelope(&inbound(Some("m-1")));
        let other = envelope(&inbound(Some("m-2")));

        assert_eq!(first.key, again.key, "a redelivery is the same command");
        assert_ne!(first.key, other.key, "equal bodies with other ids are other commands");
        assert_eq!(first.request_id, "m-1");
        assert_eq!(envelope(&inbound(None)).key, None, "no id: a level command");
        assert_eq!(envelope(&inbound(Some(""))).key, None, "an empty id is no id");
    }

    #[test]
    fn malformed_events_are_refused_with_a_reason() {
        let base: pb::Event = serde_json::from_str(SEED_JSON).unwrap();
        let cases = [
            (pb::Event { event_type: 0, ..base.clone() }, "INVALID_EVENT"),
            (pb::Event { event_type: 42, ..base.clone() }, "INVALID_EVENT"),
            (pb::Event { instance_id: 0, ..base.clone() }, "INVALID_ARGUMENT"),
            (pb::Event { instance_id: -1, ..base.clone() }, "INVALID_ARGUMENT"),
            (pb::Event { user_id: 0, ..base.clone() }, "INVALID_ARGUMENT"),
            (pb::Event { spec: None, ..base.clone() }, "INVALID_SPEC"),
            (
                pb::Event {
                    spec: Some(pb::InstanceSpec {
                        gpu: "B200".into(),
                        ..base.spec.clone().unwrap()
                    }),
                    ..base.clone()
                },
                "INVALID_GPU_TYPE",
            ),
        ];
        for (event, reason) in cases {
            let Command::Refused { error, .. } = command(&event) else {
                panic!("accepted: {event:?}");
            };
            assert_eq!(error.reason(), reason, "{event:?}");
        }
    }

    #[test]
    fn a_global_sync_is_the_only_event_with_id_zero() {
        let sync =
            pb::Event { event_type: pb::EventType::InstanceK8sSync as i32, ..Default::default() };

        assert!(matches!(command(&sync), Command::Sync { id: None }));
    }
}
