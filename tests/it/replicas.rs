//! Two replicas of the service on one database and one queue.

use std::time::Duration;

use lapin::{BasicProperties, options::BasicPublishOptions};
use prost::Message;
use serde_json::{Value, json};

use crate::{
    helpers::{AppOptions, spawn_app_with},
    mq::{Broker, created},
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
async fn two_replicas_share_10000_events_and_one_stopping_midway_loses_nothing() {
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
    for id in 1..=10_000_i64 {
        broker
            .channel
            .basic_publish(
                app.mq.exchange.as_str().into(),
                "instance.created".into(),
                BasicPublishOptions::default(),
                &created(500_000 + id).encode_to_vec(),
                BasicProperties::default().with_message_id(format!("replicas-{id}").into()),
            )
            .await
            .unwrap();
    }
    broker.channel.wait_for_confirms().await.unwrap();

    let count = |sql: &'static str| {
        let pool = app.pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count("SELECT count(*) FROM instances WHERE instance_id BETWEEN 500001 AND 510000").await
        < 2_000
    {
        assert!(tokio::time::Instant::now() < deadline, "ingest never got under way");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = second.terminate().await;
    assert!(status.success(), "SIGTERM is a clean stop: {status:?}");
    assert!(batches(&second.logs.lock().unwrap()) > 0, "the second replica took its share");
    assert!(batches(&app.logs.lock().unwrap()) > 0, "the first replica took its share");

    while count("SELECT count(*) FROM instances WHERE instance_id BETWEEN 500001 AND 510000").await
        < 10_000
    {
        assert!(tokio::time::Instant::now() < deadline, "not every event was applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
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
    let _ = app.terminate().await;
}
