//! Event ingestion against the real RabbitMQ and PostgreSQL: every event type, the seed
//! example, duplicates, bad input, outages, crashes and the status outbox.

use std::time::Duration;

use lapin::{
    BasicProperties, Channel, Connection,
    message::BasicGetMessage,
    options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable},
};
use prost::Message;
use resource::pb::mq::v1::{Event, EventType, InstanceSpec, InstanceStatusChanged};

use crate::{
    helpers::{AppOptions, TestApp, admin_url, amqp_url, spawn_app, spawn_app_with},
    proxy::{Proxy, target_of},
};

/// How long one of the test's own broker operations may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// `op`, failing the test saying `what` when the broker does not answer in time.
pub(crate) async fn bounded<T>(what: &str, within: Duration, op: impl Future<Output = T>) -> T {
    tokio::time::timeout(within, op)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer from RabbitMQ within {within:?}"))
}

/// The seed's JSON example (`seeds/001_*`), byte for byte.
const SEED_JSON: &str = r#"{
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

/// The test's own connection to the broker, for publishing and inspecting queues.
pub(crate) struct Broker {
    _conn: Connection,
    pub(crate) channel: Channel,
}

impl Broker {
    pub(crate) async fn connect() -> Self {
        let url = amqp_url();
        let conn =
            bounded("connect", BROKER_TIMEOUT, Connection::connect(&url, Default::default()))
                .await
                .unwrap_or_else(|e| {
                    panic!("cannot reach RabbitMQ at {url} ({e}); start it or set TEST_AMQP_URL")
                });
        let channel =
            bounded("open a channel", BROKER_TIMEOUT, conn.create_channel()).await.unwrap();
        let confirms = channel.confirm_select(ConfirmSelectOptions::default());
        bounded("select confirms", BROKER_TIMEOUT, confirms).await.unwrap();
        Self { _conn: conn, channel }
    }

    pub(crate) async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) {
        let publish = async {
            self.channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await
                .unwrap()
                .await
                .unwrap()
        };
        let confirm = bounded("publish with a confirm", BROKER_TIMEOUT, publish).await;
        assert!(confirm.is_ack());
    }

    /// Publishes every `(routing key, body, properties)` of `messages` to `exchange`, then
    /// waits (at most `within`) until the broker confirmed them all.
    pub(crate) async fn publish_all(
        &self,
        exchange: &str,
        messages: impl IntoIterator<Item = (String, Vec<u8>, BasicProperties)>,
        within: Duration,
    ) {
        let publish = async {
            for (routing_key, body, props) in messages {
                self.channel
                    .basic_publish(
                        exchange.into(),
                        routing_key.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        props,
                    )
                    .await
                    .unwrap();
            }
            self.channel.wait_for_confirms().await.unwrap();
        };
        bounded("publish and confirm a stream", within, publish).await;
    }

    pub(crate) async fn publish(&self, app: &TestApp, event: &Event) {
        let key = routing_key(event);
        self.publish_raw(
            &app.mq.exchange,
            &key,
            &event.encode_to_vec(),
            BasicProperties::default(),
        )
        .await;
    }

    /// Publishes `event` as protobuf with AMQP `message_id` set, as producers should.
    pub(crate) async fn publish_with_id(&self, app: &TestApp, event: &Event, message_id: &str) {
        let props = BasicProperties::default().with_message_id(message_id.into());
        self.publish_raw(&app.mq.exchange, &routing_key(event), &event.encode_to_vec(), props)
            .await;
    }

    async fn publish_json(&self, app: &TestApp, routing_key: &str, body: &str) {
        let props = BasicProperties::default().with_content_type("application/json".into());
        self.publish_raw(&app.mq.exchange, routing_key, body.as_bytes(), props).await;
    }

    /// How many messages `queue` holds, ready to be delivered.
    pub(crate) async fn queue_length(&self, queue: &str) -> u32 {
        let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let declare = self.channel.queue_declare(queue.into(), passive, FieldTable::default());
        bounded("look at a queue", BROKER_TIMEOUT, declare)
            .await
            .expect("the queue exists")
            .message_count()
    }

    /// Takes one message from `queue`, waiting up to `wait`.
    pub(crate) async fn get(&self, queue: &str, wait: Duration) -> Option<BasicGetMessage> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let got = self.channel.basic_get(queue.into(), BasicGetOptions { no_ack: true });
            let got = bounded("get a message", BROKER_TIMEOUT, got).await.unwrap();
            if got.is_some() || tokio::time::Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub(crate) fn routing_key(event: &Event) -> String {
    let kind = match EventType::try_from(event.event_type) {
        Ok(EventType::InstanceCreated) => "created",
        Ok(EventType::InstanceDeleted) => "deleted",
        Ok(EventType::InstanceSpecChanged) => "spec_changed",
        Ok(EventType::InstanceStarted) => "started",
        Ok(EventType::InstanceStopped) => "stopped",
        Ok(EventType::InstanceK8sSync) => "k8s_sync",
        _ => "unknown",
    };
    format!("instance.{kind}")
}

fn spec(cpus: i32, memory_mb: i32, gpu: &str) -> Option<InstanceSpec> {
    Some(InstanceSpec { cpus, memory_mb, gpu: gpu.into(), image: "ubuntu:22.04".into() })
}

pub(crate) fn created(id: i64) -> Event {
    Event {
        event_type: EventType::InstanceCreated as i32,
        instance_id: id,
        user_id: 42,
        name: format!("inst-{id}"),
        spec: spec(2, 4096, ""),
        timestamp: 1_705_478_400,
    }
}

pub(crate) fn event(kind: EventType, id: i64, timestamp: i64) -> Event {
    Event { event_type: kind as i32, instance_id: id, timestamp, ..Default::default() }
}

fn header(msg: &BasicGetMessage, key: &str) -> Option<String> {
    match msg.delivery.properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// An integer header of `msg`, whatever width the broker kept it in.
fn int_header(msg: &BasicGetMessage, key: &str) -> Option<i64> {
    match msg.delivery.properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&app.pool).await.unwrap()
}

async fn status_of(app: &TestApp, id: i64) -> Option<String> {
    sqlx::query_scalar("SELECT status FROM instances WHERE instance_id = $1")
        .bind(id)
        .fetch_optional(&app.pool)
        .await
        .unwrap()
}

async fn wait_status(app: &TestApp, id: i64, want: &str) {
    wait_for(&format!("instance {id} to be {want}"), Duration::from_secs(15), || async {
        status_of(app, id).await.as_deref() == Some(want)
    })
    .await;
}

/// (action, outcome) of every audit row of `id`, oldest first.
async fn audit(app: &TestApp, id: i64) -> Vec<(String, String)> {
    sqlx::query_as("SELECT action, outcome FROM audit_logs WHERE instance_id = $1 ORDER BY id")
        .bind(id)
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

fn pairs(rows: &[(&str, &str)]) -> Vec<(String, String)> {
    rows.iter().map(|(a, o)| ((*a).to_owned(), (*o).to_owned())).collect()
}

#[tokio::test]
async fn the_seed_json_example_creates_its_instance_byte_for_byte() {
    let app = spawn_app().await;
    let broker = Broker::connect().await;

    broker.publish_json(&app, "instance.created", SEED_JSON).await;

    wait_status(&app, 1_234_567_890, "RUNNING").await;
    let (status, body) = app.get_json("/v1/resources/1234567890").await;
    assert_eq!(status, 200);
    assert_eq!(body["user_id"], "123");
    assert_eq!(body["name"], "GPU 计算实例");
    assert_eq!(body["spec"]["cpu"], 8);
    assert_eq!(body["spec"]["memory"], 32768);
    assert_eq!(body["spec"]["gpu"], 2);
    assert_eq!(body["spec"]["gpu_model"], "Tesla A100");
    assert_eq!(body["spec"]["image"], "ubuntu:22.04");
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT actor, source, action, outcome FROM audit_logs WHERE instance_id = 1234567890",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(rows, vec![("mq".into(), "mq".into(), "CREATE".into(), "ok".into())]);
}

#[tokio::test]
async fn every_event_type_drives_the_lifecycle_with_one_audit_row_each() {
    let app = spawn_app().await;
    let broker = Broker::connect().await;
    let id = 7001;

    broker.publish(&app, &created(id)).await;
    wait_status(&app, id, "RUNNING").await;
    broker.publish(&app, &event(EventType::InstanceStopped, id, 2)).await;
    wait_status(&app, id, "STOPPED").await;
    broker.publish(&app, &event(EventType::InstanceStarted, id, 3)).await;
    wait_status(&app, id, "RUNNING").await;
    let mut resize = event(EventType::InstanceSpecChanged, id, 4);
    resize.spec = spec(16, 65536, "H100");
    broker.publish(&app, &resize).await;
    wait_for("the new spec", Duration::from_secs(10), || async {
        count(&app, &format!("SELECT count(*) FROM instance_specs WHERE instance_id = {id} AND cpu = 16 AND gpu = 3")).await == 1
    })
    .await;
    broker.publish(&app, &event(EventType::InstanceK8sSync, id, 5)).await;
    broker.publish(&app, &event(EventType::InstanceK8sSync, 0, 5)).await;
    broker.publish(&app, &event(EventType::InstanceDeleted, id, 6)).await;
    wait_status(&app, id, "DELETED").await;

    assert_eq!(
        audit(&app, id).await,
        pairs(&[
            ("CREATE", "ok"),
            ("STOP", "ok"),
            ("START", "ok"),
            ("CHANGE_SPEC", "ok"),
            ("K8S_SYNC", "ignored"),
            ("DELETE", "ok"),
        ])
    );
    assert_eq!(audit(&app, 0).await, pairs(&[("K8S_SYNC", "ignored")]));
    let (_, body) = app.get_json(&format!("/v1/resources/{id}")).await;
    assert_eq!(body["status"], "DELETED");
    assert_eq!(body["spec"]["gpu_model"], "Tesla H100");
    // Asking for a state the instance is already in is an audited no-op.
    broker.publish(&app, &event(EventType::InstanceDeleted, id, 7)).await;
    wait_for("the no-op audit row", Duration::from_secs(10), || async {
        audit(&app, id).await.len() == 7
    })
    .await;
    assert_eq!(audit(&app, id).await[6], ("DELETE".into(), "ignored".into()));
}

#[tokio::test]
async fn five_copies_of_one_message_have_one_effect_and_one_audit_row() {
    let app = spawn_app().await;
    let broker = Broker::connect().await;
    let create = created(8001);
    let stop = event(EventType::InstanceStopped, 8001, 9);

    for _ in 0..5 {
        broker.publish_with_id(&app, &create, "create-8001").await;
    }
    // The same message in JSON is the same message.
    let json = serde_json::to_string(&create).unwrap();
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("create-8001".into());
    broker.publish_raw(&app.mq.exchange, "instance.created", json.as_bytes(), props).await;
    wait_status(&app, 8001, "RUNNING").await;
    for _ in 0..5 {
        broker.publish_with_id(&app, &stop, "stop-8001").await;
    }
    wait_status(&app, 8001, "STOPPED").await;
    // A marker behind them proves the copies were all consumed.
    broker.publish_with_id(&app, &created(8002), "create-8002").await;
    wait_status(&app, 8002, "RUNNING").await;

    assert_eq!(audit(&app, 8001).await, pairs(&[("CREATE", "ok"), ("STOP", "ok")]));
    assert_eq!(count(&app, "SELECT count(*) FROM instances WHERE instance_id = 8001").await, 1);
    assert!(broker.get(&app.mq.dead_letter_queue, Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn without_message_ids_copies_are_level_commands_and_audited_no_ops() {
    let app = spawn_app().await;
    let broker = Broker::connect().await;

    for _ in 0..3 {
        broker.publish(&app, &created(8101)).await;
    }
    for _ in 0..3 {
        broker.publish(&app, &event(EventType::InstanceStopped, 8101, 0)).await;
    }
    broker.publish(&app, &created(8102)).await;
    wait_status(&app, 8102, "RUNNING").await;

    assert_eq!(
        audit(&app, 8101).await,
        pairs(&[
            ("CREATE", "ok"),
            ("CREATE", "ignored"),
            ("CREATE", "ignored"),
            ("STOP", "ok"),
            ("STOP", "ignored"),
            ("STOP", "ignored"),
        ])
    );
    assert_eq!(status_of(&app, 8101).await.as_deref(), Some("STOPPED"));
}

#[tokio::test]
async fn stop_start_stop_with_equal_bodies_all_apply() {
    let app = spawn_app().await;
    let broker = Broker::connect().await;
    // Producers that leave `timestamp` at 0 send byte-equal STOPs.
    let stop = event(EventType::InstanceStopped, 8201, 0);
    let start = event(EventType::InstanceStarted, 8201, 0);
    let with_ids = [(&stop, "a-1"), (&start, "a-2"), (&stop, "a-3")];

    broker.publish_with_id(&app, &created(8201), "a-0").await;
    for (e, id) in with_ids {
        broker.publish_with_id(&app, e, id).await;
    }
    // And the same without message ids, on a second instance.
    broker.publish(&app, &created(8202)).await;
    for e in [&stop, &start, &stop] {
        broker.publish(&app, &Event { instance_id: 8202, ..e.clone() }).await;
    }
    broker.publish_with_id(&app, &created(8203), "marker").await;
    wait_status(&app, 8203, "RUNNING").await;

    let applied = pairs(&[("CREATE", "ok"), ("STOP", "ok"), ("START", "ok"), ("STOP", "ok")]);
    assert_eq!(audit(&app, 8201).await, applied);
    assert_eq!(audit(&app, 8202).await, applied);
    assert_eq!(status_of(&app, 8201).await.as_deref(), Some("STOPPED"));
    assert_eq!(status_of(&app, 8202).await.as_deref(), Some("STOPPED"));
}

#[tokio::test]
async fn a_message_id_redelivered_after_a_later_command_has_no_effect() {
    let app = spawn_app().await;
    let broker = Broker::connect().await;
    broker.publish_with_id(&app, &created(8301), "b-0").await;
    broker.publish_with_id(&app, &event(EventType::InstanceStopped, 8301, 0), "b-1").await;
    broker.publish_with_id(&app, &event(EventType::InstanceStarted, 8301, 0), "b-2").await;
    wait_for("the start", Duration::from_secs(15), || async { audit(&app, 8301).await.len() == 3 })
        .await;

    // A publisher's retry of the STOP, after the START was applied.
    broker.publish_with_id(&app, &event(EventType::InstanceStopped, 8301, 0), "b-1").await;
    broker.publish_with_id(&app, &created(8302), "b-marker").await;
    wait_status(&app, 8302, "RUNNING").await;

    assert_eq!(status_of(&app, 8301).await.as_deref(), Some("RUNNING"));
    assert_eq!(
        audit(&app, 8301).await,
        pairs(&[("CREATE", "ok"), ("STOP", "ok"), ("START", "ok")]),
        "the retried STOP has no effect and no audit row"
    );
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT request_id FROM audit_logs WHERE instance_id = 8301 ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(ids, ["b-0", "b-1", "b-2"], "audit rows carry the message id");
}

#[tokio::test]
async fn a_message_id_reused_for_another_event_is_dead_lettered_and_audited() {
    let app = spawn_app().await;
    let broker = Broker::connect().await;
    broker.publish_with_id(&app, &created(8401), "c-8401").await;
    broker.publish_with_id(&app, &created(8402), "c-8402").await;
    broker.publish_with_id(&app, &event(EventType::InstanceStopped, 8401, 0), "shared-1").await;
    wait_status(&app, 8401, "STOPPED").await;

    // The same id for a STOP of another instance, and for a DELETE of the first.
    broker.publish_with_id(&app, &event(EventType::InstanceStopped, 8402, 0), "shared-1").await;
    broker.publish_with_id(&app, &event(EventType::InstanceDeleted, 8401, 0), "shared-1").await;
    // And a true redelivery of the first STOP: no effect, no row.
    broker.publish_with_id(&app, &event(EventType::InstanceStopped, 8401, 0), "shared-1").await;

    for _ in 0..2 {
        let dead = broker
            .get(&app.mq.dead_letter_queue, Duration::from_secs(10))
            .await
            .expect("the reused id is dead-lettered");
        assert_eq!(header(&dead, "x-reject-reason").as_deref(), Some("MESSAGE_ID_REUSED"));
    }
    broker.publish_with_id(&app, &created(8403), "marker").await;
    wait_status(&app, 8403, "RUNNING").await;
    assert_eq!(status_of(&app, 8402).await.as_deref(), Some("RUNNING"));
    assert_eq!(status_of(&app, 8401).await.as_deref(), Some("STOPPED"));
    assert_eq!(audit(&app, 8402).await, pairs(&[("CREATE", "ok"), ("STOP", "rejected")]));
    assert_eq!(
        audit(&app, 8401).await,
        pairs(&[("CREATE", "ok"), ("STOP", "ok"), ("DELETE", "rejected")])
    );
    assert!(broker.get(&app.mq.dead_letter_queue, Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn an_event_queue_declared_without_single_active_consumer_is_kept_with_a_warning() {
    use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
    let mut app = spawn_app().await;
    assert!(app.terminate().await.success());
    // The queue as an earlier version declared it.
    let broker = Broker::connect().await;
    let delete =
        broker.channel.queue_delete(app.mq.queue.as_str().into(), QueueDeleteOptions::default());
    bounded("delete the event queue", BROKER_TIMEOUT, delete).await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(app.mq.dead_letter_exchange.as_str().into()),
    );
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let declare = broker.channel.queue_declare(app.mq.queue.as_str().into(), durable, args);
    bounded("declare the old event queue", BROKER_TIMEOUT, declare).await.unwrap();

    app.restart().await;

    let warned =
        app.logs.lock().unwrap().iter().any(|l| l.contains("without single active consumer"));
    assert!(warned, "the operator is told what the queue lacks");
    broker.publish_with_id(&app, &created(8501), "c-8501").await;
    wait_status(&app, 8501, "RUNNING").await;
}

#[tokio::test]
async fn a_retry_queue_declared_with_another_delay_is_kept_with_a_warning() {
    use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
    let mut app = spawn_app().await;
    assert!(app.terminate().await.success());
    // The retry queue as a deployment with another `retry_delay` declared it.
    let broker = Broker::connect().await;
    let retry = app.mq.retry_queue.as_str();
    let delete = broker.channel.queue_delete(retry.into(), QueueDeleteOptions::default());
    bounded("delete the retry queue", BROKER_TIMEOUT, delete).await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(123_456));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(app.mq.queue.as_str().into()),
    );
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let declare = broker.channel.queue_declare(retry.into(), durable, args);
    bounded("declare the old retry queue", BROKER_TIMEOUT, declare).await.unwrap();

    // Before, the service never became ready: PRECONDITION_FAILED on every connect.
    app.restart().await;

    let warned = app.logs.lock().unwrap().iter().any(|l| l.contains("retry queue exists"));
    assert!(warned, "the operator is told the delay is not the configured one");
    broker.publish_with_id(&app, &created(8601), "c-8601").await;
    wait_status(&app, 8601, "RUNNING").await;
}

#[tokio::test]
async fn ten_kinds_of_bad_input_are_dead_lettered_with_their_reason() {
    let app = spawn_app().await;
    let broker = Broker::connect().await;
    broker.publish(&app, &created(9001)).await;
    wait_status(&app, 9001, "RUNNING").await;
    broker.publish(&app, &event(EventType::InstanceDeleted, 9001, 2)).await;
    wait_status(&app, 9001, "DELETED").await;

    let mut bad: Vec<(&str, Vec<u8>, Option<&str>, &str)> = Vec::new();
    let mut push = |name, e: Event, reason| bad.push((name, e.encode_to_vec(), None, reason));
    push("unknown type", Event { event_type: 99, ..created(9100) }, "INVALID_EVENT");
    push("no instance id", created(0), "INVALID_ARGUMENT");
    push("cpus out of range", Event { spec: spec(0, 1024, ""), ..created(9101) }, "INVALID_SPEC");
    push(
        "memory out of range",
        Event { spec: spec(1, 99_999_999, ""), ..created(9102) },
        "INVALID_SPEC",
    );
    push("unknown gpu", Event { spec: spec(1, 1024, "B200"), ..created(9103) }, "INVALID_GPU_TYPE");
    let mut bad_image = created(9104);
    bad_image.spec.as_mut().unwrap().image = "Not A Valid Image!".into();
    push("invalid image", bad_image, "INVALID_SPEC");
    push("name too long", Event { name: "x".repeat(500), ..created(9105) }, "INVALID_ARGUMENT");
    push(
        "start a deleted instance",
        event(EventType::InstanceStarted, 9001, 3),
        "ILLEGAL_TRANSITION",
    );
    push("create with no spec", Event { spec: None, ..created(9106) }, "INVALID_SPEC");
    bad.push(("undecodable body", b"\xff\xff\xff not protobuf".to_vec(), None, "INVALID_EVENT"));
    bad.push((
        "malformed JSON",
        b"{\"event_type\": ".to_vec(),
        Some("application/json"),
        "INVALID_EVENT",
    ));

    for (_, body, content_type, _) in &bad {
        let props = match content_type {
            Some(ct) => BasicProperties::default().with_content_type((*ct).into()),
            None => BasicProperties::default(),
        };
        broker.publish_raw(&app.mq.exchange, "instance.created", body, props).await;
    }
    broker.publish(&app, &created(9200)).await;

    wait_status(&app, 9200, "RUNNING").await;
    let mut reasons = Vec::new();
    for _ in 0..bad.len() {
        let msg = broker
            .get(&app.mq.dead_letter_queue, Duration::from_secs(10))
            .await
            .expect("a dead letter");
        assert!(header(&msg, "x-reject-message").is_some_and(|m| !m.is_empty()));
        reasons.push(header(&msg, "x-reject-reason").expect("x-reject-reason"));
    }
    let want: Vec<String> = bad.iter().map(|(_, _, _, r)| (*r).to_owned()).collect();
    assert_eq!(reasons, want, "{:?}", bad.iter().map(|b| b.0).collect::<Vec<_>>());
    assert!(broker.get(&app.mq.dead_letter_queue, Duration::from_millis(300)).await.is_none());
    for id in 9100..=9106 {
        assert_eq!(status_of(&app, id).await, None, "instance {id} must not exist");
    }
    // Rejected where the instance is known: an audit row says why.
    assert_eq!(audit(&app, 9001).await.last().unwrap(), &("START".into(), "rejected".into()));
}

#[tokio::test]
async fn an_event_for_an_instance_not_yet_created_waits_for_it() {
    let app = spawn_app().await;
    let broker = Broker::connect().await;

    broker.publish(&app, &event(EventType::InstanceStopped, 9300, 2)).await;
    // A marker behind the STOP: once it is applied, the STOP was consumed before its
    // instance existed.
    broker.publish(&app, &created(9301)).await;
    wait_status(&app, 9301, "RUNNING").await;
    assert_eq!(status_of(&app, 9300).await, None, "the STOP created nothing");
    broker.publish(&app, &created(9300)).await;

    wait_status(&app, 9300, "STOPPED").await;
    assert_eq!(audit(&app, 9300).await, pairs(&[("CREATE", "ok"), ("STOP", "ok")]));
}

#[tokio::test]
async fn an_event_for_an_instance_that_never_comes_is_dead_lettered_after_bounded_retries() {
    let max_retries = 2;
    let mut app = spawn_app_with(AppOptions {
        env: vec![("RESOURCE_DATA__RABBITMQ__MAX_RETRIES".into(), max_retries.to_string())],
        ..Default::default()
    })
    .await;
    let broker = Broker::connect().await;

    broker.publish(&app, &event(EventType::InstanceStarted, 9400, 2)).await;

    let msg = broker
        .get(&app.mq.dead_letter_queue, Duration::from_secs(10))
        .await
        .expect("dead-lettered");
    assert_eq!(header(&msg, "x-reject-reason").as_deref(), Some("INSTANCE_NOT_FOUND"));
    assert_eq!(
        int_header(&msg, "x-retry-count"),
        Some(max_retries),
        "dead-lettered after exactly max_retries retries"
    );
    let why = header(&msg, "x-reject-message").unwrap_or_default();
    assert!(why.contains(&format!("after {} attempts", max_retries + 1)), "{why}");
    // The service's own account: each try, in order, then the dead letter; nothing more.
    app.wait_for_line("the dead letter", 0, Duration::from_secs(5), |v| {
        v["message"] == "event not applied" && v["reason"] == "INSTANCE_NOT_FOUND"
    })
    .await;
    let reroutes: Vec<String> = app
        .json_logs()
        .iter()
        .filter(|v| v["message"] == "event not applied")
        .map(|v| v["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        reroutes,
        ["INSTANCE_NOT_FOUND (retry 1)", "INSTANCE_NOT_FOUND (retry 2)", "INSTANCE_NOT_FOUND"]
    );
    assert!(broker.get(&app.mq.dead_letter_queue, Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn status_changes_are_published_to_the_status_queue() {
    let app = spawn_app().await;
    let broker = Broker::connect().await;

    broker.publish(&app, &created(9500)).await;
    broker.publish(&app, &event(EventType::InstanceStopped, 9500, 2)).await;

    let mut seen = Vec::new();
    for _ in 0..2 {
        let msg = broker
            .get(&app.mq.status_queue, Duration::from_secs(10))
            .await
            .expect("a status event");
        assert_eq!(
            msg.delivery.properties.kind().as_ref().map(|k| k.to_string()).as_deref(),
            Some("mq.v1.InstanceStatusChanged")
        );
        let change = InstanceStatusChanged::decode(msg.delivery.data.as_slice()).unwrap();
        assert_eq!(change.instance_id, 9500);
        assert_eq!(change.user_id, "42");
        seen.push((change.status, change.version));
    }
    assert_eq!(seen, vec![("RUNNING".to_owned(), 1), ("STOPPED".to_owned(), 2)]);
    wait_for("the outbox to drain", Duration::from_secs(5), || async {
        count(&app, "SELECT count(*) FROM status_outbox").await == 0
    })
    .await;
    // The service's own status events are never consumed as input, even when bound.
    let own = BasicProperties::default().with_type("mq.v1.InstanceStatusChanged".into());
    broker.publish_raw(&app.mq.exchange, "instance.created", b"not an event", own).await;
    broker.publish(&app, &created(9501)).await;
    wait_status(&app, 9501, "RUNNING").await;
    assert!(broker.get(&app.mq.dead_letter_queue, Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn the_status_queue_keeps_the_newest_events_up_to_its_bound() {
    let app = spawn_app_with(AppOptions {
        env: vec![("RESOURCE_DATA__RABBITMQ__STATUS_QUEUE_MAX_LENGTH".into(), "50".into())],
        ..Default::default()
    })
    .await;
    let broker = Broker::connect().await;
    for id in 9_601..=9_720 {
        broker.publish_with_id(&app, &created(id), &format!("c-{id}")).await;
    }
    wait_for("every status event published", Duration::from_secs(30), || async {
        count(&app, "SELECT count(*) FROM instances").await == 120
            && count(&app, "SELECT count(*) FROM status_outbox").await == 0
    })
    .await;

    assert_eq!(
        broker.queue_length(&app.mq.status_queue).await,
        50,
        "bounded by status_queue_max_length"
    );
    let oldest = broker.get(&app.mq.status_queue, Duration::from_secs(5)).await.unwrap();
    let oldest = InstanceStatusChanged::decode(oldest.delivery.data.as_slice()).unwrap();
    assert_eq!(oldest.instance_id, 9_671, "the oldest were dropped, the newest kept");
}

#[tokio::test]
async fn the_outbox_left_by_a_crash_is_published_on_restart() {
    let mut app = spawn_app().await;
    app.kill().await;
    // What a crash between commit and publish leaves behind.
    sqlx::query(
        "INSERT INTO status_outbox (instance_id, user_id, status, version, changed_at, claimed_until) \
         VALUES (1, 'u', 'RUNNING', 1, now(), NULL), (2, 'u', 'STOPPED', 3, now(), now() - interval '1 minute')",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let broker = Broker::connect().await;

    app.restart().await;

    let mut ids = Vec::new();
    for _ in 0..2 {
        let msg =
            broker.get(&app.mq.status_queue, Duration::from_secs(10)).await.expect("published");
        ids.push(InstanceStatusChanged::decode(msg.delivery.data.as_slice()).unwrap().instance_id);
    }
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2]);
    wait_for("the outbox to drain", Duration::from_secs(5), || async {
        count(&app, "SELECT count(*) FROM status_outbox").await == 0
    })
    .await;
}

#[tokio::test]
async fn a_database_outage_during_ingest_loses_and_dead_letters_nothing() {
    let proxy = Proxy::start(target_of(&admin_url(), 5432)).await;
    let mut app =
        spawn_app_with(AppOptions { database_via: Some(proxy.addr), ..Default::default() }).await;
    let broker = Broker::connect().await;
    broker.publish_with_id(&app, &created(10_000), "m-10000").await;
    wait_status(&app, 10_000, "RUNNING").await;

    let cut_at = app.logs.lock().unwrap().len();
    proxy.cut();
    for id in 10_001..=10_050 {
        broker.publish_with_id(&app, &created(id), &format!("m-{id}")).await;
    }
    // The consumer took the events and could not commit them: a known point to look from.
    app.wait_for_line("a batch kept for retry", cut_at, Duration::from_secs(30), |v| {
        v["message"] == "database unavailable; batch kept for retry"
    })
    .await;
    assert_eq!(
        count(&app, "SELECT count(*) FROM instances").await,
        1,
        "nothing applied while down"
    );
    proxy.restore();

    wait_for("every event after the outage", Duration::from_secs(30), || async {
        count(&app, "SELECT count(*) FROM instances").await == 51
    })
    .await;
    assert_eq!(count(&app, "SELECT count(*) FROM audit_logs WHERE action = 'CREATE'").await, 51);
    assert!(broker.get(&app.mq.dead_letter_queue, Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn a_broken_broker_connection_is_rebuilt_and_nothing_is_lost() {
    let proxy = Proxy::start(target_of(&amqp_url(), 5672)).await;
    let app =
        spawn_app_with(AppOptions { broker_via: Some(proxy.addr), ..Default::default() }).await;
    let broker = Broker::connect().await;

    for id in 11_001..=11_200 {
        broker.publish_with_id(&app, &created(id), &format!("m-{id}")).await;
        if id == 11_050 {
            proxy.cut();
        }
        if id == 11_150 {
            proxy.restore();
        }
    }

    wait_for("every event after the reconnect", Duration::from_secs(60), || async {
        count(&app, "SELECT count(*) FROM instances").await == 200
    })
    .await;
    assert_eq!(count(&app, "SELECT count(*) FROM audit_logs").await, 200);
    assert!(broker.get(&app.mq.dead_letter_queue, Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn kill_9_during_ingest_of_5000_events_loses_and_doubles_nothing() {
    // One event per transaction, so the kill surely lands mid-stream.
    let mut app = spawn_app_with(AppOptions {
        env: vec![("RESOURCE_DATA__RABBITMQ__BATCH_SIZE".into(), "1".into())],
        ..Default::default()
    })
    .await;
    let broker = Broker::connect().await;
    let events = (1..=5000_i64).map(|id| {
        let body = created(100_000 + id).encode_to_vec();
        let props = BasicProperties::default().with_message_id(format!("kill-{id}").into());
        ("instance.created".to_owned(), body, props)
    });
    broker.publish_all(&app.mq.exchange, events, Duration::from_secs(60)).await;

    wait_for("ingest to be under way", Duration::from_secs(30), || async {
        count(&app, "SELECT count(*) FROM instances").await > 500
    })
    .await;
    app.kill().await;
    let at_crash = count(&app, "SELECT count(*) FROM instances").await;
    app.restart().await;

    // A bound on a hang, not a speed target (5,000 one-event transactions).
    wait_for("all 5000 instances", Duration::from_secs(180), || async {
        count(&app, "SELECT count(*) FROM instances").await == 5000
    })
    .await;
    // A marker behind every redelivery: once it is applied, no copy is left to double.
    broker.publish_with_id(&app, &created(200_000), "kill-marker").await;
    wait_status(&app, 200_000, "RUNNING").await;

    assert!(at_crash < 5000, "the crash came mid-stream ({at_crash} applied)");
    let stream = "instance_id BETWEEN 100001 AND 105000";
    assert_eq!(count(&app, &format!("SELECT count(*) FROM instances WHERE {stream}")).await, 5000);
    assert_eq!(
        count(
            &app,
            &format!("SELECT count(*) FROM audit_logs WHERE action = 'CREATE' AND {stream}")
        )
        .await,
        5000
    );
    assert_eq!(
        count(&app, &format!("SELECT count(DISTINCT instance_id) FROM audit_logs WHERE {stream}"))
            .await,
        5000
    );
    // Every status change is eventually published, at least once, across the crash.
    let mut published = std::collections::HashSet::new();
    while published.len() < 5000 {
        let msg =
            broker.get(&app.mq.status_queue, Duration::from_secs(20)).await.expect("status events");
        let id = InstanceStatusChanged::decode(msg.delivery.data.as_slice()).unwrap().instance_id;
        if (100_001..=105_000).contains(&id) {
            published.insert(id);
        }
    }
}

#[tokio::test]
async fn sigterm_finishes_in_flight_work_and_exits_0() {
    // Small batches over a slow database link: each batch takes a while, so a signal sent
    // while events wait lands in the middle of one.
    let proxy = Proxy::start(target_of(&admin_url(), 5432)).await;
    let mut app = spawn_app_with(AppOptions {
        database_via: Some(proxy.addr),
        env: vec![("RESOURCE_DATA__RABBITMQ__BATCH_SIZE".into(), "10".into())],
        ..Default::default()
    })
    .await;
    proxy.delay(Duration::from_millis(10));
    let broker = Broker::connect().await;
    // All at once (confirmed together), so that they wait in the queue: the consumer is
    // busy from the first batch to the last.
    let events = (12_001..=12_300).map(|id| {
        ("instance.created".to_owned(), created(id).encode_to_vec(), BasicProperties::default())
    });
    broker.publish_all(&app.mq.exchange, events, Duration::from_secs(30)).await;
    app.wait_for_line("a first batch", 0, Duration::from_secs(30), |v| {
        v["message"] == "batch done"
    })
    .await;
    let pool = app.pool.clone();
    let queue = app.mq.queue.clone();

    let status = app.terminate().await;

    assert_eq!(status.code(), Some(0));
    // The signal came while a batch was being applied, and that batch was finished: its
    // "batch done" follows the shutdown line. No batch starts after the signal.
    let logs = app.json_logs();
    let signal = logs
        .iter()
        .position(|v| v["message"] == "shutting down: no new requests, finishing in-flight ones")
        .expect("the shutdown is logged");
    let finished: Vec<&serde_json::Value> =
        logs[signal..].iter().filter(|v| v["message"] == "batch done").collect();
    let after: Vec<&serde_json::Value> = logs[signal..].iter().map(|v| &v["message"]).collect();
    assert_eq!(
        finished.len(),
        1,
        "one batch was in flight at the signal; logged after it: {after:?}"
    );
    assert!(finished[0]["size"].as_u64().is_some_and(|n| n >= 1), "{:?}", finished[0]);
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM instances").fetch_one(&pool).await.unwrap();
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_logs").fetch_one(&pool).await.unwrap();
    assert_eq!(applied, audited, "every applied event is audited");
    assert!(applied < 300, "the signal came mid-stream ({applied} applied)");
    // Whatever was not applied is still in the queue, not lost.
    let left = broker.queue_length(&queue).await;
    assert_eq!(applied + i64::from(left), 300);
}
