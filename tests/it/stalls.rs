//! Links that hang instead of resetting: a database or broker connection black-holed
//! (held open, every byte dropped, as behind a failed-over proxy) or stalled (nothing
//! moves for a while), then healed. Ingest and the status outbox resume on their own,
//! readiness says what is wrong meanwhile, and nothing is lost or doubled.

use std::time::Duration;

use crate::{
    helpers::{AppOptions, TestApp, admin_url, amqp_url, spawn_app_with},
    mq::{Broker, created},
    proxy::{Proxy, target_of},
};

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pool).await.unwrap()
}

/// Waits until `/readyz` names `check` as `state`, for at most `within`.
async fn wait_readiness(app: &TestApp, check: &str, state: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (_, body) = app.get_json("/readyz").await;
        if body["checks"][check] == state {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness never said {check} {state}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `n` instances exist, each created once, and every status change was
/// published (the outbox is empty).
async fn wait_settled(app: &TestApp, n: i64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let instances = count(app, "SELECT count(*) FROM instances").await;
        let outbox = count(app, "SELECT count(*) FROM status_outbox").await;
        if instances == n && outbox == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not settled: {instances} of {n} instances, {outbox} status events unpublished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn publish_creates(app: &TestApp, broker: &Broker, ids: std::ops::RangeInclusive<i64>) {
    for id in ids {
        broker.publish_with_id(app, &created(id), &format!("c-{id}")).await;
    }
}

/// Every instance has exactly one CREATE, and a status event for each was published.
async fn assert_nothing_lost_or_doubled(app: &TestApp, broker: &Broker, n: i64) {
    assert_eq!(count(app, "SELECT count(*) FROM audit_logs WHERE action = 'CREATE'").await, n);
    assert_eq!(count(app, "SELECT count(DISTINCT instance_id) FROM audit_logs").await, n);
    let published = broker.queue_length(&app.mq.status_queue).await;
    assert!(i64::from(published) >= n, "status events: {published}");
    assert!(broker.get(&app.mq.dead_letter_queue, Duration::from_millis(300)).await.is_none());
}

/// The database link breaks as `fail` says for 10 s while events arrive, then heals.
async fn database_link_heals(fail: fn(&Proxy)) {
    let proxy = Proxy::start(target_of(&admin_url(), 5432)).await;
    let app = spawn_app_with(AppOptions {
        database_via: Some(proxy.addr),
        env: vec![("RESOURCE_DATA__DATABASE__QUERY_TIMEOUT".into(), "2s".into())],
        ..Default::default()
    })
    .await;
    let broker = Broker::connect().await;
    publish_creates(&app, &broker, 1..=100).await;
    wait_settled(&app, 100, Duration::from_secs(20)).await;

    fail(&proxy);
    publish_creates(&app, &broker, 101..=200).await;
    wait_readiness(&app, "database", "unavailable", Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let healed = tokio::time::Instant::now();
    proxy.restore();

    wait_settled(&app, 200, Duration::from_secs(30)).await;
    wait_readiness(&app, "database", "ok", Duration::from_secs(5)).await;
    eprintln!("settled {:?} after the link healed", healed.elapsed());
    assert_nothing_lost_or_doubled(&app, &broker, 200).await;
}

#[tokio::test]
async fn a_black_holed_database_link_heals_and_nothing_is_lost_or_doubled() {
    // Every connection, old and new, is held open and swallows what it is sent.
    database_link_heals(Proxy::blackhole).await;
}

#[tokio::test]
async fn a_stalled_database_link_heals_and_nothing_is_lost_or_doubled() {
    // Nothing moves for 10 s, then every byte held arrives.
    database_link_heals(Proxy::stall).await;
}

#[tokio::test]
async fn a_black_holed_broker_link_heals_and_nothing_is_lost_or_doubled() {
    let proxy = Proxy::start(target_of(&amqp_url(), 5672)).await;
    let app = spawn_app_with(AppOptions {
        broker_via: Some(proxy.addr),
        env: vec![("RESOURCE_DATA__RABBITMQ__HEARTBEAT".into(), "2s".into())],
        ..Default::default()
    })
    .await;
    // The test's own connection goes straight to the broker.
    let broker = Broker::connect().await;
    publish_creates(&app, &broker, 1..=100).await;
    wait_settled(&app, 100, Duration::from_secs(20)).await;

    proxy.blackhole();
    publish_creates(&app, &broker, 101..=200).await;
    wait_readiness(&app, "broker", "unavailable", Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    proxy.restore();

    wait_settled(&app, 200, Duration::from_secs(30)).await;
    wait_readiness(&app, "broker", "ok", Duration::from_secs(10)).await;
    assert_nothing_lost_or_doubled(&app, &broker, 200).await;
}

#[tokio::test]
async fn a_slow_database_with_a_reconcile_backlog_never_starves_api_calls() {
    use futures::StreamExt;
    let fake = fake_kube::FakeKube::start(fake_kube::Options::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig_yaml("instances")).unwrap();
    let proxy = Proxy::start(target_of(&admin_url(), 5432)).await;
    let env = [
        ("RESOURCE_DATA__KUBERNETES__ENABLED", "true"),
        ("RESOURCE_DATA__KUBERNETES__KUBECONFIG", kubeconfig.to_str().unwrap()),
        ("RESOURCE_DATA__KUBERNETES__NAMESPACE", "instances"),
        ("RESOURCE_DATA__KUBERNETES__POLL_INTERVAL", "100ms"),
        ("RESOURCE_DATA__KUBERNETES__API_QPS", "2000"),
        ("RESOURCE_DATA__KUBERNETES__CONCURRENCY", "32"),
        ("RESOURCE_SERVER__HTTP__TIMEOUT", "20s"),
        // Long enough to open a connection over the slow link: what is left to cause a
        // 503 is every pooled connection held by something else.
        ("RESOURCE_DATA__DATABASE__ACQUIRE_TIMEOUT", "3s"),
    ];
    let app = spawn_app_with(AppOptions {
        database_via: Some(proxy.addr),
        env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Default::default()
    })
    .await;
    // Thousands of instances owed Pods, as after a restart.
    let seeds: Vec<crate::helpers::Seed> =
        (1..=3000).map(|id| crate::helpers::Seed::new(id).status("CREATING")).collect();
    crate::helpers::seed(&app.pool, &seeds).await;
    // Connections are opened while the link is fast enough (a connection over the slow
    // link takes longer than a request may wait for one): bursts of calls grow the pool.
    proxy.delay(Duration::from_millis(20));
    for _ in 0..3 {
        let burst = (0..64).map(|_| app.get("/v1/resources?page_size=1"));
        futures::future::join_all(burst).await;
    }
    // A slow link: every round trip, a COMMIT included, takes half a second more.
    proxy.delay(Duration::from_millis(250));

    // API calls for 10 s while the reconciler works through the backlog.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let calls = futures::stream::iter(0..)
        .take_while(|_| async move { tokio::time::Instant::now() < until });
    let statuses: Vec<u16> = calls
        .map(|n: u32| {
            let app = &app;
            async move {
                let path = if n.is_multiple_of(2) {
                    "/v1/resources?page_size=10".to_owned()
                } else {
                    format!("/v1/resources/{}", n % 3000 + 1)
                };
                app.get(&path).await.status().as_u16()
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    proxy.delay(Duration::ZERO);

    let refused = statuses.iter().filter(|s| **s == 503).count();
    assert!(statuses.len() > 100, "only {} API calls in 10 s: starved", statuses.len());
    assert_eq!(refused, 0, "{refused} of {} API calls answered 503", statuses.len());
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    let pods = fake.list(fake_kube::Kind::Pod, "instances").len();
    assert!(pods > 10, "the reconciler worked meanwhile ({pods} pods)");
}
