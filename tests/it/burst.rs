//! Quotas and GPU capacity under a flash-sale burst (#15): two replicas on one database
//! and one queue, 2,000 INSTANCE_CREATED events published as fast as possible while 200
//! API creates run at once, over 50 users — and the proof that the limits held exactly:
//! what SQL counts, what the API answered, what the quota and capacity endpoints show, the
//! audit trail and the status events.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};

use lapin::{BasicProperties, options::BasicGetOptions};
use prost::Message;
use resource::pb::mq::v1::{Event, EventType, InstanceSpec, InstanceStatusChanged};
use serde_json::{Value, json};

use crate::{
    helpers::{AppOptions, spawn_app_with},
    mq::{Broker, bounded},
};

/// Users taking part, `1000`..`1050`.
const USERS: i64 = 50;
/// INSTANCE_CREATED events, instance ids `EVENT_IDS + 0..EVENTS`.
const EVENTS: i64 = 2_000;
const EVENT_IDS: i64 = 900_000;
/// Concurrent API creates, half to each replica.
const API_CREATES: i64 = 200;

/// `quota.per_user`: each limit is what stops some of the users (see [`shape`]).
const MAX_INSTANCES: i64 = 30;
const MAX_CPU: i64 = 100;
const MAX_MEMORY_MB: i64 = 128 * 1024;
const MAX_GPUS: i64 = 5;
/// `quota.gpu_capacity` of type 2 (Tesla A100).
const A100_CAPACITY: i64 = 100;
const A100: i32 = 2;

/// Time to publish the 2,000 events with confirms.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for every event to be applied, and the status outbox to drain, after publishing.
const INGEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the waits look again.
const POLL: Duration = Duration::from_millis(50);

/// What user `k` (0..50) asks for on each instance: CPU cores and memory. Users with
/// `k % 4 == 3` (4 cores) run into `cpu` at 25 instances, users with `k % 5 == 4` (5 GB)
/// into `memory_mb` at 25; the others into `instances` at 30 (each asks for 42 or more).
fn shape(k: i64) -> (i32, i32) {
    let k = i32::try_from(k).unwrap();
    (1 + k % 4, 1024 * (1 + k % 5))
}

fn user_id(k: i64) -> String {
    (1000 + k).to_string()
}

/// Event `n` (0..2,000): user `n % 50`, round `n / 50`. Users 0..5 ask for an A100 on
/// their first 10 events, so they run into `gpus` while A100s are left; everyone asks
/// for one every 8 rounds from round 4, so the fleet's 100 run out.
fn burst_event(n: i64) -> Event {
    let (k, round) = (n % USERS, n / USERS);
    let (cpus, memory_mb) = shape(k);
    let a100 = (k < 5 && round < 10) || round % 8 == 4;
    Event {
        event_type: EventType::InstanceCreated as i32,
        instance_id: EVENT_IDS + n,
        user_id: 1000 + k,
        name: format!("burst-{n}"),
        spec: Some(InstanceSpec {
            cpus,
            memory_mb,
            gpu: if a100 { "2".into() } else { String::new() },
            image: "ubuntu:22.04".into(),
        }),
        timestamp: 1_705_478_400 + n,
    }
}

/// API create `j` (0..200). The first 100 spread over every user, as their events do
/// (one in ten asks for an A100, never for users 0..5, so that the events alone decide
/// their `gpus`); the other 100 ask 10 times each for 16 cores for users 40..50, more than
/// their `cpu` allows whatever the events took, so some are refused for sure.
fn api_body(j: i64) -> Value {
    let (k, heavy) = if j < 100 { (j % USERS, false) } else { (40 + j % 10, true) };
    let (cpu, memory) = shape(k);
    let cpu = if heavy { 16 } else { cpu };
    let gpu = if j % 10 == 5 && !heavy { A100 } else { 0 };
    json!({
        "name": format!("api-{j}"),
        "user_id": user_id(k),
        "spec": {"cpu": cpu, "memory": memory, "gpu": gpu, "image": "nginx:1.25"},
    })
}

/// An int64 of proto3 JSON: a string or a number; absent (a default omitted) is 0.
fn int64(v: &Value) -> i64 {
    match v {
        Value::Null => 0,
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("not an int64: {v}")),
        Value::Number(n) => n.as_i64().unwrap_or_else(|| panic!("not an int64: {v}")),
        other => panic!("not an int64: {other}"),
    }
}

/// What one user's live instances hold, counted with SQL.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Held {
    instances: i64,
    cpu: i64,
    memory_mb: i64,
    gpus: i64,
}

impl Held {
    fn from_json(v: &Value) -> Self {
        Held {
            instances: int64(&v["instances"]),
            cpu: int64(&v["cpu"]),
            memory_mb: int64(&v["memory_mb"]),
            gpus: int64(&v["gpus"]),
        }
    }
}

/// An event's instance that is not live, with the audit row of its create.
#[derive(Debug, sqlx::FromRow)]
struct Refused {
    instance_id: i64,
    status_reason: String,
    gpu: i32,
    outcome: Option<String>,
    reason: Option<String>,
}

/// The limit an event's refusal names, from its audit reason (`QUOTA_EXCEEDED: quota
/// exceeded: user "1000" holds 30 of 30 instances, and 1 more were asked for`), as a
/// 429 names it in `metadata.limit`.
fn limit_in_reason(reason: &str) -> Option<String> {
    if reason.starts_with("CAPACITY_EXHAUSTED") {
        return Some("gpu_capacity".into());
    }
    let (_, rest) = reason.split_once(" holds ")?;
    let (_, rest) = rest.split_once(" of ")?;
    let (_, rest) = rest.split_once(' ')?;
    Some(rest.split_once(',')?.0.to_owned())
}

#[tokio::test]
async fn a_burst_of_events_and_api_creates_on_two_replicas_never_passes_a_limit() {
    let quota = [
        ("RESOURCE_QUOTA__PER_USER__INSTANCES", MAX_INSTANCES),
        ("RESOURCE_QUOTA__PER_USER__CPU", MAX_CPU),
        ("RESOURCE_QUOTA__PER_USER__MEMORY_MB", MAX_MEMORY_MB),
        ("RESOURCE_QUOTA__PER_USER__GPUS", MAX_GPUS),
        ("RESOURCE_QUOTA__GPU_CAPACITY__2", A100_CAPACITY),
    ];
    // The default pool wait (500 ms) and request timeout (1 s): API creates that arrive
    // together are written together (group commit), so 100 at once per replica beside the
    // ingest are answered within them, each by the quota rules.
    let env: Vec<(String, String)> =
        quota.iter().map(|(k, v)| ((*k).to_owned(), v.to_string())).collect();
    let app = spawn_app_with(AppOptions { env, ..Default::default() }).await;
    let second = app.replica().await;
    let broker = Broker::connect().await;
    let events: Vec<_> = (0..EVENTS)
        .map(|n| {
            let props =
                BasicProperties::default().with_message_id(format!("burst-{n}").as_str().into());
            ("instance.created".to_owned(), burst_event(n).encode_to_vec(), props)
        })
        .collect();
    let started = tokio::time::Instant::now();

    // Everything at once: the stream of events, and 200 creates in flight together.
    let publish = broker.publish_all(&app.mq.exchange, events, PUBLISH_TIMEOUT);
    let creates = futures::future::join_all((0..API_CREATES).map(|j| {
        let url = if j % 2 == 0 { &app.http } else { &second.http };
        let request = app.client.post(format!("{url}/v1/resources")).json(&api_body(j)).send();
        async move {
            let response = request.await.unwrap_or_else(|e| panic!("create {j}: {e}"));
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (j, status, body)
        }
    }));
    let ((), answers) = tokio::join!(publish, creates);
    let pool = app.pool.clone();
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() }
    };
    let deadline = tokio::time::Instant::now() + INGEST_TIMEOUT;
    loop {
        let applied =
            count("SELECT count(*) FROM instances WHERE instance_id BETWEEN 900000 AND 901999")
                .await;
        if applied == EVENTS {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{applied} of {EVENTS} events applied");
        tokio::time::sleep(POLL).await;
    }
    let ingested = started.elapsed();
    while count("SELECT count(*) FROM status_outbox").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the status outbox never drained");
        tokio::time::sleep(POLL).await;
    }
    eprintln!(
        "burst: every event applied after {ingested:?}, outbox drained after {:?}",
        started.elapsed()
    );

    // Every API create was answered 200 or 429 with a quota reason: no 5xx, no 409.
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for (_, status, _) in &answers {
        *by_status.entry(*status).or_default() += 1;
    }
    let unexpected: Vec<_> =
        answers.iter().filter(|(_, status, _)| !matches!(status, 200 | 201 | 429)).collect();
    assert!(
        unexpected.is_empty(),
        "API creates answered {by_status:?}; the first unexpected: {:?}",
        &unexpected[..unexpected.len().min(5)]
    );
    let mut api_ids = BTreeSet::new();
    let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
    for (j, status, body) in &answers {
        match status {
            200 | 201 => {
                let id: i64 =
                    body["instance_id"].as_str().expect("an instance_id").parse().unwrap();
                assert_eq!(body["status"], "RUNNING", "create {j}: {body}");
                api_ids.insert(id);
            }
            429 => {
                let reason = body["reason"].as_str().unwrap_or_default();
                assert!(
                    matches!(reason, "QUOTA_EXCEEDED" | "CAPACITY_EXHAUSTED"),
                    "create {j}: 429 {body}"
                );
                let limit = body["metadata"]["limit"].as_str().unwrap_or("?").to_owned();
                *refusals.entry(limit).or_default() += 1;
            }
            _ => panic!("create {j} was answered {status}: {body}"),
        }
    }
    let api_ok = api_ids.len();
    let api_refused: usize = refusals.values().sum();
    assert!(api_refused > 0, "the API creates over the cpu limit were all admitted");
    assert_eq!(
        api_ok + api_refused,
        usize::try_from(API_CREATES).unwrap(),
        "two creates were answered with one id"
    );

    // What SQL counts: exactly the fleet's A100s live, no user over a limit.
    let live_a100 = count(
        "SELECT count(*) FROM instances i JOIN instance_specs s USING (instance_id) \
         WHERE i.status NOT IN ('DELETED', 'FAILED') AND s.gpu = 2",
    )
    .await;
    assert_eq!(live_a100, A100_CAPACITY, "live A100 instances");
    let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT i.user_id, count(*), sum(s.cpu)::bigint, sum(s.memory)::bigint, \
         count(*) FILTER (WHERE s.gpu <> 0) \
         FROM instances i JOIN instance_specs s USING (instance_id) \
         WHERE i.status NOT IN ('DELETED', 'FAILED') GROUP BY i.user_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let held: HashMap<String, Held> = rows
        .into_iter()
        .map(|(user, instances, cpu, memory_mb, gpus)| {
            (user, Held { instances, cpu, memory_mb, gpus })
        })
        .collect();
    assert_eq!(held.len(), usize::try_from(USERS).unwrap(), "every user holds something");
    for (user, h) in &held {
        assert!(h.instances <= MAX_INSTANCES, "user {user} over instances: {h:?}");
        assert!(h.cpu <= MAX_CPU, "user {user} over cpu: {h:?}");
        assert!(h.memory_mb <= MAX_MEMORY_MB, "user {user} over memory_mb: {h:?}");
        assert!(h.gpus <= MAX_GPUS, "user {user} over gpus: {h:?}");
    }

    // The API's creates: one live row per 200, nothing stored for a 429.
    let stored_api: Vec<(i64, String)> = sqlx::query_as(
        "SELECT instance_id, status FROM instances \
         WHERE instance_id NOT BETWEEN 900000 AND 901999",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let stored_ids: BTreeSet<i64> = stored_api.iter().map(|(id, _)| *id).collect();
    assert_eq!(stored_ids, api_ids, "the stored API instances are those answered 200");
    assert!(stored_api.iter().all(|(_, s)| s == "RUNNING"), "API creates live: {stored_api:?}");

    // The two streams really ran into each other: API creates committed between events.
    let interleaved = count(
        "SELECT count(*) FROM instances a WHERE a.instance_id NOT BETWEEN 900000 AND 901999 \
         AND a.created_at > (SELECT min(created_at) FROM instances \
                             WHERE instance_id BETWEEN 900000 AND 901999) \
         AND a.created_at < (SELECT max(created_at) FROM instances \
                             WHERE instance_id BETWEEN 900000 AND 901999)",
    )
    .await;
    assert!(interleaved > 0, "every API create committed before or after the events");

    // Every event instance is live, or FAILED with the reason, audited rejected.
    let failed: Vec<Refused> = sqlx::query_as(
        "SELECT i.instance_id, i.status_reason, s.gpu, a.outcome, a.reason \
         FROM instances i JOIN instance_specs s USING (instance_id) \
         LEFT JOIN audit_logs a ON a.instance_id = i.instance_id AND a.action = 'CREATE' \
         WHERE i.instance_id BETWEEN 900000 AND 901999 AND i.status <> 'RUNNING'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let not_failed = count(
        "SELECT count(*) FROM instances WHERE instance_id BETWEEN 900000 AND 901999 \
         AND status NOT IN ('RUNNING', 'FAILED')",
    )
    .await;
    assert_eq!(not_failed, 0, "an event instance is RUNNING or FAILED");
    let mut failed_reasons = HashMap::new();
    for Refused { instance_id: id, status_reason, gpu, outcome, reason } in &failed {
        assert!(
            matches!(status_reason.as_str(), "QUOTA_EXCEEDED" | "CAPACITY_EXHAUSTED"),
            "instance {id} FAILED with {status_reason:?}"
        );
        assert!(
            status_reason != "CAPACITY_EXHAUSTED" || *gpu == A100,
            "instance {id} without an A100 refused for capacity"
        );
        assert_eq!(outcome.as_deref(), Some("rejected"), "audit of instance {id}");
        let reason = reason.as_deref().unwrap_or_default();
        assert!(reason.starts_with(status_reason.as_str()), "instance {id} audited {reason:?}");
        let limit = limit_in_reason(reason).unwrap_or_else(|| panic!("no limit in {reason:?}"));
        *refusals.entry(limit).or_default() += 1;
        failed_reasons.insert(*id, status_reason.clone());
    }
    let audited = count(
        "SELECT count(*) FROM audit_logs WHERE action = 'CREATE' \
         AND instance_id BETWEEN 900000 AND 901999",
    )
    .await;
    assert_eq!(audited, EVENTS, "one CREATE audit row per event");
    // Each limit did its part: the burst ran into every one of them.
    for limit in ["instances", "cpu", "memory_mb", "gpus", "gpu_capacity"] {
        assert!(refusals.contains_key(limit), "no refusal for {limit}: {refusals:?}");
    }
    let live_events = EVENTS - i64::try_from(failed.len()).unwrap();
    let live_total: i64 = held.values().map(|h| h.instances).sum();
    assert_eq!(live_total, live_events + i64::try_from(api_ok).unwrap());

    // What the API shows equals what SQL counts.
    let (status, capacity) = app.get_json("/v1/capacity").await;
    assert_eq!(status, 200, "GET /v1/capacity: {capacity}");
    let gpus = capacity["gpus"].as_array().unwrap_or_else(|| panic!("no gpus in {capacity}"));
    let a100 = gpus
        .iter()
        .find(|g| int64(&g["gpu"]) == i64::from(A100) || g["gpu_model"] == "Tesla A100")
        .unwrap_or_else(|| panic!("no A100 in {capacity}"));
    assert_eq!(int64(&a100["capacity"]), A100_CAPACITY, "{a100}");
    assert_eq!(int64(&a100["used"]), live_a100, "{a100}");
    assert_eq!(int64(&a100["free"]), 0, "{a100}");
    for other in gpus.iter().filter(|g| !std::ptr::eq(*g, a100)) {
        assert_eq!(int64(&other["used"]), 0, "no other GPU type is used: {other}");
        assert!(other.get("capacity").is_none_or(Value::is_null), "unlimited: {other}");
    }
    for k in 0..USERS {
        let user = user_id(k);
        let (status, quota) = app.get_json(&format!("/v1/quotas/{user}")).await;
        assert_eq!(status, 200, "GET /v1/quotas/{user}: {quota}");
        assert_eq!(quota["user_id"], user.as_str());
        let limits = Held::from_json(&quota["limits"]);
        let want = Held {
            instances: MAX_INSTANCES,
            cpu: MAX_CPU,
            memory_mb: MAX_MEMORY_MB,
            gpus: MAX_GPUS,
        };
        assert_eq!(limits, want, "limits of {user}: {quota}");
        let usage = Held::from_json(&quota["usage"]);
        assert_eq!(usage, held[&user], "usage of {user}: {quota}");
    }

    // Every refusal of an event reached the producer as a FAILED status event; the
    // consumer dead-lettered nothing.
    let status_events = broker.queue_length(&app.mq.status_queue).await;
    let mut published: HashMap<i64, Vec<(String, String)>> = HashMap::new();
    for _ in 0..status_events {
        let get = broker
            .channel
            .basic_get(app.mq.status_queue.as_str().into(), BasicGetOptions { no_ack: true });
        let msg = bounded("take a status event", Duration::from_secs(10), get)
            .await
            .unwrap()
            .expect("as many status events as the queue counted");
        let change = InstanceStatusChanged::decode(msg.delivery.data.as_slice()).unwrap();
        published.entry(change.instance_id).or_default().push((change.status, change.reason));
    }
    for (id, reason) in &failed_reasons {
        assert_eq!(
            published.get(id).map(Vec::as_slice),
            Some(&[("FAILED".to_owned(), reason.clone())][..]),
            "status events of instance {id}"
        );
    }
    let expected_events = usize::try_from(EVENTS).unwrap() + api_ok;
    assert_eq!(published.len(), expected_events, "a status event per created instance");
    assert_eq!(broker.queue_length(&app.mq.dead_letter_queue).await, 0, "nothing dead-lettered");
    assert_eq!(broker.queue_length(&app.mq.retry_queue).await, 0, "nothing waiting for a retry");
    crate::quota_counters::assert_counters_match_sql(&pool).await;
    eprintln!(
        "burst: {api_ok} API creates ({api_refused} refused, {interleaved} committed amid \
         the events) and {live_events} events live, refusals {refusals:?}, {:?} in all",
        started.elapsed()
    );
}
