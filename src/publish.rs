//! `resource publish`: the operator and load tool (the Go service's `tests/test_mq.go`).
//! Publishes the seed's sample event, events from a JSON file, or generated events with
//! snowflake ids to the configured exchange, with publisher confirms, and prints one JSON
//! line per event sent.

use std::{path::PathBuf, time::Duration};

use lapin::{BasicProperties, Channel, Confirmation, options::BasicPublishOptions};
use prost::Message;
use tokio::time::Instant;

use crate::{
    amqp,
    biz::snowflake::Snowflake,
    conf,
    pb::mq::v1::{Event, EventType, InstanceSpec},
};

/// The seed's sample event (`seeds/001_*`), byte for byte.
pub const SAMPLE_JSON: &str = r#"{
  "event_type": "INSTANCE_CREATED",
  "instance_id": 1234567890,
  "user_id": 123,
  "name": "GPU 计算实例",
  "spec": {
    "cpus": 8,
    "memory_mb": 32768,
    "gpu": "A100",
    "image": "ubuntu:22.04"
  },
  "timestamp": 1705478400
}"#;

/// Most publishes awaiting their confirm at once.
const WINDOW: usize = 1000;

/// What to publish.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// A JSON file holding one event or an array of events (proto3 JSON mapping).
    #[arg(long, value_name = "PATH", conflicts_with = "count")]
    pub file: Option<PathBuf>,
    /// Generate this many events with fresh snowflake ids instead of the sample.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Event type of generated events: created, deleted, spec_changed, started, stopped,
    /// k8s_sync.
    #[arg(long = "type", value_name = "TYPE", default_value = "created")]
    pub kind: String,
    /// Most events per second (0: as fast as the broker confirms).
    #[arg(long, value_name = "PER_SECOND", default_value_t = 0.0)]
    pub rate: f64,
    /// Body encoding of generated and file events: protobuf or json (the sample is
    /// always sent as the seed's JSON).
    #[arg(long, default_value = "protobuf")]
    pub encoding: String,
    /// Snowflake node id of generated ids.
    #[arg(long, default_value_t = 1023)]
    pub node_id: u16,
    /// Owner of generated instances.
    #[arg(long, default_value_t = 1)]
    pub user_id: i64,
    /// Print only the summary, not one line per event.
    #[arg(long)]
    pub quiet: bool,
}

/// One message to publish.
pub struct Outgoing {
    /// `instance.<type>`.
    pub routing_key: String,
    /// Encoded body.
    pub body: Vec<u8>,
    /// `application/json` or `application/x-protobuf`.
    pub content_type: &'static str,
    /// What the line printed for it says.
    pub event: Event,
}

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Bad arguments or input file.
    #[error("{0}")]
    Input(String),
    /// The broker refused, did not confirm, or could not be reached.
    #[error("{0}")]
    Broker(String),
}

/// `resource publish`: builds the messages, publishes them, prints a JSON line per
/// confirmed message (unless `--quiet`) and a summary on stderr.
///
/// # Errors
/// As [`messages`] and [`publish`].
pub async fn run(conf: &conf::RabbitMq, args: &PublishArgs) -> Result<(), PublishError> {
    let messages = messages(args)?;
    let started = std::time::Instant::now();
    let n = publish(conf, &messages, args.rate, |m| {
        if !args.quiet {
            let line = serde_json::json!({
                "routing_key": m.routing_key,
                "content_type": m.content_type,
                "event": m.event,
            });
            println!("{line}");
        }
    })
    .await?;
    let secs = started.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)] // a count far below 2^52
    let rate = n as f64 / secs.max(1e-9);
    eprintln!(
        "resource publish: {n} event(s) confirmed by the broker in {secs:.2} s ({rate:.0}/s) \
         to exchange {}",
        conf.exchange
    );
    Ok(())
}

/// Builds the messages `args` asks for.
///
/// # Errors
/// `PublishError::Input`.
pub fn messages(args: &PublishArgs) -> Result<Vec<Outgoing>, PublishError> {
    let json = match args.encoding.as_str() {
        "json" => true,
        "protobuf" => false,
        other => {
            return Err(PublishError::Input(format!(
                "--encoding: expected protobuf or json, got {other:?}"
            )));
        }
    };
    if let Some(path) = &args.file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PublishError::Input(format!("{}: {e}", path.display())))?;
        let events: Vec<Event> = match serde_json::from_str::<Vec<Event>>(&text) {
            Ok(events) => events,
            Err(_) => vec![serde_json::from_str::<Event>(&text).map_err(|e| {
                PublishError::Input(format!(
                    "{}: not an event or a list of events: {e}",
                    path.display()
                ))
            })?],
        };
        return Ok(events.into_iter().map(|e| encode(e, json)).collect());
    }
    let Some(count) = args.count else {
        let event: Event = serde_json::from_str(SAMPLE_JSON).expect("the sample is valid");
        return Ok(vec![Outgoing {
            routing_key: "instance.created".into(),
            body: SAMPLE_JSON.as_bytes().to_vec(),
            content_type: "application/json",
            event,
        }]);
    };
    let kind = parse_kind(&args.kind)?;
    if args.node_id > crate::biz::snowflake::MAX_NODE {
        return Err(PublishError::Input("--node-id: must be 0..=1023".into()));
    }
    let ids = Snowflake::new(args.node_id);
    let now = chrono::Utc::now().timestamp();
    Ok((0..count)
        .map(|n| {
            let id = ids.next_id();
            let spec = matches!(kind, EventType::InstanceCreated | EventType::InstanceSpecChanged)
                .then(|| InstanceSpec {
                    cpus: 1 + (n % 8) as i32,
                    memory_mb: 1024 * (1 + (n % 16) as i32),
                    gpu: ["", "V100", "A100", "T4"][(n % 4) as usize].into(),
                    image: "ubuntu:22.04".into(),
                });
            let event = Event {
                event_type: kind as i32,
                instance_id: id,
                user_id: args.user_id,
                name: format!("load-{id}"),
                spec,
                timestamp: now,
            };
            encode(event, json)
        })
        .collect())
}

fn parse_kind(raw: &str) -> Result<EventType, PublishError> {
    let upper = raw.to_ascii_uppercase();
    let name = if upper.starts_with("INSTANCE_") { upper } else { format!("INSTANCE_{upper}") };
    EventType::from_str_name(&name)
        .filter(|k| *k != EventType::Unspecified)
        .ok_or_else(|| PublishError::Input(format!("--type: unknown event type {raw:?}")))
}

fn encode(event: Event, json: bool) -> Outgoing {
    let kind = EventType::try_from(event.event_type)
        .map(|k| k.as_str_name().trim_start_matches("INSTANCE_").to_ascii_lowercase())
        .unwrap_or_else(|_| "unknown".into());
    let (body, content_type) = if json {
        (serde_json::to_vec(&event).expect("events serialize"), "application/json")
    } else {
        (event.encode_to_vec(), "application/x-protobuf")
    };
    Outgoing { routing_key: format!("instance.{kind}"), body, content_type, event }
}

/// Publishes `messages` to `conf.exchange` with publisher confirms, at most `rate` per
/// second (0: unbounded), calling `sent` for each confirmed message. Returns how many
/// were confirmed.
///
/// # Errors
/// `PublishError::Broker` when the broker cannot be reached or refuses a message.
pub async fn publish(
    conf: &conf::RabbitMq,
    messages: &[Outgoing],
    rate: f64,
    mut sent: impl FnMut(&Outgoing),
) -> Result<usize, PublishError> {
    let broker = |e: amqp::AmqpError| PublishError::Broker(e.to_string());
    let conn = amqp::connect(conf, "resource-publish").await.map_err(broker)?;
    amqp::declare_topology(conf, &conn).await.map_err(broker)?;
    let channel = amqp::confirm_channel(conf, &conn).await.map_err(broker)?;
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::with_capacity(WINDOW);
    for (n, message) in messages.iter().enumerate() {
        if rate > 0.0 {
            tokio::time::sleep_until(started + Duration::from_secs_f64(n as f64 / rate)).await;
        }
        if pending.len() == WINDOW {
            settle(&mut pending, messages, &mut sent).await?;
        }
        pending.push_back((n, publish_one(&channel, conf, message).await?));
    }
    while !pending.is_empty() {
        settle(&mut pending, messages, &mut sent).await?;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(messages.len())
}

async fn publish_one(
    channel: &Channel,
    conf: &conf::RabbitMq,
    message: &Outgoing,
) -> Result<lapin::PublisherConfirm, PublishError> {
    let properties = BasicProperties::default()
        .with_content_type(message.content_type.into())
        .with_delivery_mode(2)
        .with_message_id(uuid::Uuid::new_v4().to_string().into());
    channel
        .basic_publish(
            conf.exchange.as_str().into(),
            message.routing_key.as_str().into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            &message.body,
            properties,
        )
        .await
        .map_err(|e| PublishError::Broker(format!("publish: {e}")))
}

async fn settle(
    pending: &mut std::collections::VecDeque<(usize, lapin::PublisherConfirm)>,
    messages: &[Outgoing],
    sent: &mut impl FnMut(&Outgoing),
) -> Result<(), PublishError> {
    let (n, confirm) = pending.pop_front().expect("not empty");
    match confirm.await {
        Ok(Confirmation::Ack(None)) => {
            sent(&messages[n]);
            Ok(())
        }
        Ok(Confirmation::Ack(Some(_))) => Err(PublishError::Broker(format!(
            "{}: unroutable (no queue bound to the exchange for it)",
            messages[n].routing_key
        ))),
        Ok(other) => Err(PublishError::Broker(format!("not confirmed by the broker: {other:?}"))),
        Err(e) => Err(PublishError::Broker(format!("confirm: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> PublishArgs {
        PublishArgs {
            file: None,
            count: None,
            kind: "created".into(),
            rate: 0.0,
            encoding: "protobuf".into(),
            node_id: 3,
            user_id: 7,
            quiet: true,
        }
    }

    #[test]
    fn without_arguments_the_seed_sample_is_sent_as_is() {
        let out = messages(&args()).unwrap();

        assert_eq!(out.len(), 1);
        assert_eq!(out[0].body, SAMPLE_JSON.as_bytes());
        assert_eq!(out[0].routing_key, "instance.created");
        assert_eq!(out[0].content_type, "application/json");
    }

    #[test]
    fn generated_events_have_distinct_growing_snowflake_ids() {
        let out =
            messages(&PublishArgs { count: Some(1000), kind: "stopped".into(), ..args() }).unwrap();

        let ids: Vec<i64> = out.iter().map(|m| m.event.instance_id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert!(ids.iter().all(|id| crate::biz::snowflake::node_of(*id) == 3));
        assert!(out.iter().all(|m| m.routing_key == "instance.stopped" && m.event.spec.is_none()));
    }

    #[test]
    fn unknown_types_and_encodings_are_refused() {
        assert!(
            messages(&PublishArgs { count: Some(1), kind: "paused".into(), ..args() }).is_err()
        );
        assert!(messages(&PublishArgs { encoding: "xml".into(), ..args() }).is_err());
    }
}
