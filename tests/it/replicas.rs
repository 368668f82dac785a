//! Two replicas of the service on one database and one queue.

use std::time::Duration;

use lapin::BasicProperties;
use prost::Message;
use serde_json::{Value, json};

use resource::pb::mq::v1::EventType;

use crate::{
    helpers::{AppOptions, spawn_app_with},
    mq::{Broker, created, event},
};

/// The node id a process leased, from its start-up log line.
fn leased_node(logs: &[String]) -> i64 {
    logs.iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|v| v["message"] == "snowflake node id leased")
        .and_then(|v| v["node"].as_i64())
        .expect("a 'snowflake node id leased' line")
}

/// Batches a process applied, from its debug log.
fn batches(logs: &[String]) -> usize {
    logs.iter().filter(|line| line.contains("\"batch done\"")).count()
}

#[tokio::test]
async fn two_replicas_on_10000_events_one_stopping_midway_lose_nothing() {
    let mut app = spawn_app_with(AppOptions {
        env: vec![("RESOURCE_DATA__RABBITMQ__BATCH_SIZE".into(), "50".into())],
        ..Default::default()
    })
    .await;
    let mut second = app.replica().await;

    // Distinct node ids, leased through PostgreSQL, and ids that say so.
    let first_node = leased_node(&app.logs.lock().unwrap());
    let second_node = leased_node(&second.logs.lock().unwrap());
    assert_ne!(first_node, second_node);
    let body =
        json!({"name": "n", "user_id": "u", "spec": {"cpu": 1, "memory": 64, "image": "nginx"}});
    let mut nodes = Vec::new();
    for http in [&app.http, &second.http] {
        let created = app.create_at(http, &body).await;
        let id: i64 = created["instance_id"].as_str().unwrap().parse().unwrap();
        nodes.push((id >> 12) & 0x3ff);
    }
    assert_eq!(nodes, [first_node, second_node], "ids carry each replica's node id");

    let broker = Broker::connect().await;
    let events = (1..=10_000_i64).map(|id| {
        let props = BasicProperties::default().with_message_id(format!("replicas-{id}").into());
        ("instance.created".to_owned(), created(500_000 + id).encode_to_vec(), props)
    });
    broker.publish_all(&app.mq.exchange, events, Duration::from_secs(120)).await;

    let pool = app.pool.clone();
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count("SELECT count(*) FROM instances WHERE instance_id BETWEEN 500001 AND 510000").await
        < 2_000
    {
        assert!(tokio::time::Instant::now() < deadline, "ingest never got under way");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The event queue has a single active consumer: the first replica consumes, the
    // second stands by and takes over when the first stops.
    assert_eq!(batches(&second.logs.lock().unwrap()), 0, "one consumer at a time");
    let status = app.terminate().await;
    assert!(status.success(), "SIGTERM is a clean stop: {status:?}");
    assert!(batches(&app.logs.lock().unwrap()) > 0, "the first replica consumed");

    while count("SELECT count(*) FROM instances WHERE instance_id BETWEEN 500001 AND 510000").await
        < 10_000
    {
        assert!(tokio::time::Instant::now() < deadline, "not every event was applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(batches(&second.logs.lock().unwrap()) > 0, "the second replica took over");
    // A marker behind every redelivery: once the second replica applied it, no copy of
    // the 10,000 is left to apply twice.
    broker.publish_with_id(&app, &created(600_000), "replicas-marker").await;
    while count("SELECT count(*) FROM instances WHERE instance_id = 600000").await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the marker was never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        count("SELECT count(*) FROM instances WHERE instance_id BETWEEN 500001 AND 510000").await,
        10_000
    );
    assert_eq!(
        count("SELECT count(*) FROM audit_logs WHERE action = 'CREATE' AND instance_id BETWEEN 500001 AND 510000")
            .await,
        10_000,
        "each event applied exactly once"
    );
    // The stopped replica gave its node id back.
    assert_eq!(count("SELECT count(*) FROM snowflake_nodes").await, 1);
    let _ = second.terminate().await;
}

#[tokio::test]
async fn with_two_replicas_events_for_one_instance_apply_in_publish_order() {
    let app = spawn_app_with(AppOptions {
        env: vec![("RESOURCE_DATA__RABBITMQ__BATCH_SIZE".into(), "20".into())],
        ..Default::default()
    })
    .await;
    let _second = app.replica().await;
    let broker = Broker::connect().await;
    let ids: Vec<i64> = (1..=15).map(|n| 700_000 + n).collect();
    for id in &ids {
        broker.publish_with_id(&app, &created(*id), &format!("c-{id}")).await;
    }
    // STOP, START, STOP, START of every instance, interleaved, back to back.
    let kinds = [
        EventType::InstanceStopped,
        EventType::InstanceStarted,
        EventType::InstanceStopped,
        EventType::InstanceStarted,
    ];
    for (round, kind) in kinds.iter().enumerate() {
        for id in &ids {
            broker.publish_with_id(&app, &event(*kind, *id, 0), &format!("{round}-{id}")).await;
        }
    }
    let pool = app.pool.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let applied: i64 =
            sqlx::query_scalar("SELECT count(*) FROM audit_logs WHERE source = 'mq'")
                .fetch_one(&pool)
                .await
                .unwrap();
        if applied == 75 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{applied} of 75 events applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in &ids {
        let trail: Vec<(String, String)> = sqlx::query_as(
            "SELECT action, outcome FROM audit_logs WHERE instance_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&pool)
        .await
        .unwrap();
        let want: Vec<(String, String)> = ["CREATE", "STOP", "START", "STOP", "START"]
            .iter()
            .map(|a| ((*a).into(), "ok".into()))
            .collect();
        assert_eq!(trail, want, "instance {id}");
    }
}

#[tokio::test]
async fn a_replica_that_loses_its_node_lease_stops_with_status_75() {
    let mut app = spawn_app_with(AppOptions {
        env: vec![("RESOURCE_SNOWFLAKE__LEASE_TTL".into(), "3s".into())],
        ..Default::default()
    })
    .await;
    let node = leased_node(&app.logs.lock().unwrap());
    // Another replica took the node id over (as after this one's lease expired).
    sqlx::query("UPDATE snowflake_nodes SET owner = 'another-replica' WHERE node_id = $1")
        .bind(i32::try_from(node).unwrap())
        .execute(&app.pool)
        .await
        .unwrap();

    let status = app.exited(Duration::from_secs(15)).await.expect("it stops on its own");

    assert_eq!(status.code(), Some(75), "an orchestrator restarts it: {status:?}");
    let owner: String = sqlx::query_scalar("SELECT owner FROM snowflake_nodes WHERE node_id = $1")
        .bind(i32::try_from(node).unwrap())
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(owner, "another-replica", "the lost lease is not released over its new owner");
}
