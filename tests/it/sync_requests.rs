//! `INSTANCE_K8S_SYNC` requests: written to `sync_requests` in the unit of work that
//! accepts the event, and read by each replica's reconciler past its own cursor.

use std::time::Duration;

use fake_kube::{FakeKube, Options};
use resource::{
    biz::{InstanceId, reconcile::ReconcileRepo},
    data::{Db, PgReconcileRepo},
    pb::mq::v1::EventType,
};
use serde_json::json;

use crate::{
    helpers::spawn_app,
    kube::{app_on, create, wait_status},
    mq::{Broker, event},
};

async fn requests(pool: &sqlx::PgPool) -> Vec<Option<i64>> {
    sqlx::query_scalar("SELECT instance_id FROM sync_requests ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Waits until the audit trail holds `n` `K8S_SYNC` rows: the events were applied.
async fn synced(pool: &sqlx::PgPool, n: i64) {
    for _ in 0..200 {
        let applied: i64 =
            sqlx::query_scalar("SELECT count(*) FROM audit_logs WHERE action = 'K8S_SYNC'")
                .fetch_one(pool)
                .await
                .unwrap();
        if applied >= n {
            assert_eq!(applied, n);
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{n} K8S_SYNC events were not applied");
}

#[tokio::test]
async fn a_sync_event_is_recorded_for_the_reconciler_per_instance_or_for_all() {
    let fake = FakeKube::start(Options::default()).await.unwrap();
    let (app, _cluster) =
        app_on(fake, None, &[("RESOURCE_DATA__KUBERNETES__RESYNC_INTERVAL", "10m")]).await;
    let id = create(&app, "svc", 0, "nginx:1.25", json!({})).await;
    wait_status(&app, &id, "RUNNING").await;
    let id: i64 = id.parse().unwrap();

    let broker = Broker::connect().await;
    broker.publish(&app, &event(EventType::InstanceK8sSync, id, 1)).await;
    broker.publish(&app, &event(EventType::InstanceK8sSync, 0, 2)).await;
    synced(&app.pool, 2).await;

    assert_eq!(requests(&app.pool).await, vec![Some(id), None]);
}

#[tokio::test]
async fn without_kubernetes_a_sync_event_is_audited_and_requests_nothing() {
    let app = spawn_app().await;
    let broker = Broker::connect().await;

    broker.publish(&app, &event(EventType::InstanceK8sSync, 0, 1)).await;
    synced(&app.pool, 1).await;

    assert_eq!(requests(&app.pool).await, Vec::<Option<i64>>::new());
}

#[tokio::test]
async fn each_reader_sees_every_request_after_its_cursor_once() {
    let app = spawn_app().await;
    let repo = PgReconcileRepo::new(Db::new(app.pool.clone(), Duration::from_secs(5)));
    let insert = |id: Option<i64>| {
        sqlx::query("INSERT INTO sync_requests (instance_id) VALUES ($1)")
            .bind(id)
            .execute(&app.pool)
    };
    insert(Some(1)).await.unwrap();

    // A replica starting now begins after what is there: its first resync covers that.
    let (before, start) = repo.sync_requests(None).await.unwrap();
    assert!(before.is_empty());
    insert(Some(2)).await.unwrap();
    insert(None).await.unwrap();

    let (seen, next) = repo.sync_requests(Some(start)).await.unwrap();
    assert_eq!(seen, vec![Some(InstanceId::try_from(2).unwrap()), None]);
    let (again, same) = repo.sync_requests(Some(next)).await.unwrap();
    assert!(again.is_empty(), "nothing is read twice: {again:?}");
    assert_eq!(same, next);
    // Another replica's cursor is its own: it still sees both.
    let (other, _) = repo.sync_requests(Some(start)).await.unwrap();
    assert_eq!(other.len(), 2);
}
