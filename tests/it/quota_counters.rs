//! The usage counters behind quotas: started from what existing instances hold by the
//! migration, and equal to what the instances hold after many concurrent writers on two
//! replicas, with every refusal on the audit trail.

use std::collections::HashMap;

use futures::future::join_all;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{AppOptions, Seed, repo_path, seed, spawn_app_with, test_db};

/// The counters as SQL counts them from the instances: `scope -> [instances, cpu,
/// memory_mb, gpus]`, for every scope that holds something.
pub async fn counted_by_sql(pool: &PgPool) -> HashMap<String, [i64; 4]> {
    let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT 'user:' || i.user_id, count(*), sum(s.cpu)::bigint, sum(s.memory)::bigint, \
         count(*) FILTER (WHERE s.gpu <> 0) \
         FROM instances i JOIN instance_specs s USING (instance_id) \
         WHERE i.status NOT IN ('DELETED', 'FAILED') GROUP BY i.user_id \
         UNION ALL \
         SELECT 'gpu:' || s.gpu, count(*), 0, 0, 0 \
         FROM instances i JOIN instance_specs s USING (instance_id) \
         WHERE i.status NOT IN ('DELETED', 'FAILED') AND s.gpu <> 0 GROUP BY s.gpu",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(scope, a, b, c, d)| (scope, [a, b, c, d])).collect()
}

/// The counters as stored, without the rows that hold nothing.
pub async fn counters(pool: &PgPool) -> HashMap<String, [i64; 4]> {
    let rows: Vec<(String, i64, i64, i64, i64)> =
        sqlx::query_as("SELECT scope, instances, cpu, memory_mb, gpus FROM quota_usage")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter()
        .filter(|(_, a, b, c, d)| [a, b, c, d].iter().any(|v| **v != 0))
        .map(|(scope, a, b, c, d)| (scope, [a, b, c, d]))
        .collect()
}

/// Every counter equals what the instances hold.
pub async fn assert_counters_match_sql(pool: &PgPool) {
    assert_eq!(counters(pool).await, counted_by_sql(pool).await, "usage counters drifted");
}

#[tokio::test]
async fn the_migration_counts_what_existing_instances_hold() {
    let db = test_db().await;
    let pool = db.pool(4).await;
    let migrator = sqlx::migrate::Migrator::new(repo_path("migrations")).await.unwrap();
    migrator.run_to(9, &pool).await.unwrap();
    seed(
        &pool,
        &[
            Seed::new(1).owner("a"),
            Seed::new(2).owner("a").status("STOPPED"),
            Seed::new(3).owner("a").status("FAILED"),
            Seed::new(4).owner("a").status("DELETED"),
            Seed::new(5).owner("b").status("DELETING"),
            Seed::new(6).owner("b").status("CREATING"),
        ],
    )
    .await;
    sqlx::query("UPDATE instance_specs SET gpu = 2 WHERE instance_id IN (1, 3, 5)")
        .execute(&pool)
        .await
        .unwrap();

    let out = crate::postgres::migrate(&db).await;

    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = HashMap::from([
        // Seeded specs are 2 CPUs and 4096 MB; STOPPED holds, FAILED and DELETED do not.
        ("user:a".to_owned(), [2, 4, 8192, 1]),
        // DELETING holds until its workload is gone.
        ("user:b".to_owned(), [2, 4, 8192, 1]),
        ("gpu:2".to_owned(), [2, 0, 0, 0]),
    ]);
    assert_eq!(counters(&pool).await, want);
    assert_counters_match_sql(&pool).await;
}

fn create_body(user: &str, cpu: i64, n: usize) -> Value {
    json!({"name": format!("q-{n}"), "user_id": user,
           "spec": {"cpu": cpu, "memory": 512, "gpu": 2, "image": "nginx:1.0"}})
}

#[tokio::test]
async fn concurrent_creates_resizes_and_deletes_on_two_replicas_hold_the_limits() {
    let app = spawn_app_with(AppOptions {
        env: vec![
            ("RESOURCE_SERVER__HTTP__TIMEOUT".into(), "60s".into()),
            ("RESOURCE_QUOTA__PER_USER__CPU".into(), "16".into()),
            ("RESOURCE_QUOTA__GPU_CAPACITY__2".into(), "6".into()),
        ],
        ..Default::default()
    })
    .await;
    let replica = app.replica().await;
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(app.create_at(&app.http, &create_body("u1", 2, n)).await["instance_id"].clone());
    }

    // 160 writers at once, half on each replica: creates, resizes up and down, deletes
    // and starts of the same user's instances.
    let calls = (0..160).map(|n| {
        let http = if n % 2 == 0 { app.http.clone() } else { replica.http.clone() };
        let client = app.client.clone();
        let id = ids[n % ids.len()].as_str().unwrap().to_owned();
        let request_id = format!("race-{n}");
        async move {
            let req = match n % 5 {
                0 => {
                    client.post(format!("{http}/v1/resources")).json(&create_body("u1", 1, n + 10))
                }
                1 | 2 => client
                    .patch(format!("{http}/v1/resources/{id}/spec"))
                    .json(&json!({"cpu": n % 9 + 1})),
                3 => client.post(format!("{http}/v1/resources/{id}:start")),
                _ => client.delete(format!("{http}/v1/resources/{id}")),
            };
            let response = req.header("x-request-id", &request_id).send().await.expect("an answer");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (request_id, n % 5, status, body)
        }
    });
    let answers = join_all(calls).await;

    let mut refused = 0;
    for (request_id, kind, status, body) in &answers {
        match status {
            200 => {}
            // A start of a deleted instance, or a resize of one.
            409 => assert!(matches!(kind, 1..=3), "{request_id}: {body}"),
            429 => {
                refused += 1;
                let reason = body["reason"].as_str().unwrap_or_default();
                assert!(
                    ["QUOTA_EXCEEDED", "CAPACITY_EXHAUSTED"].contains(&reason),
                    "{request_id}: {body}"
                );
            }
            other => panic!("{request_id} answered {other}: {body}"),
        }
    }
    assert!(refused > 0, "the limits were reached: the test tried them");
    let (held_cpu, live_gpu): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(sum(s.cpu), 0)::bigint, count(*) FILTER (WHERE s.gpu = 2) \
         FROM instances i JOIN instance_specs s USING (instance_id) \
         WHERE i.status NOT IN ('DELETED', 'FAILED')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(held_cpu <= 16, "{held_cpu} CPUs held over a limit of 16");
    assert!(live_gpu <= 6, "{live_gpu} A100 instances over a capacity of 6");
    assert_counters_match_sql(&app.pool).await;
    // Every refused resize or start of an existing instance is on its trail.
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_logs WHERE outcome = 'rejected' \
         AND (reason LIKE 'QUOTA_EXCEEDED:%' OR reason LIKE 'CAPACITY_EXHAUSTED:%')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let refused_on_instances =
        answers.iter().filter(|(_, kind, status, _)| *status == 429 && *kind != 0).count();
    assert_eq!(
        audited as usize, refused_on_instances,
        "one rejected audit row per refused change: {answers:?}"
    );
}

/// A create whose unit of work waits on a counter's lock past `server.http.timeout` is
/// answered 504; the creates queued behind it whose callers gave up are never applied,
/// others run beside it, and the stuck one, once its unit has started, completes — so a
/// retry with its `request_id` finds that instance instead of making a second.
#[tokio::test]
async fn creates_stuck_behind_a_locked_counter_are_not_applied_behind_their_callers_backs() {
    let env = vec![("RESOURCE_QUOTA__GPU_CAPACITY__2".to_owned(), "10".to_owned())];
    let app = spawn_app_with(AppOptions { env, ..AppOptions::default() }).await;
    let post = |name: &str, gpu: i32, request_id: &str| {
        let body = json!({"name": name, "request_id": request_id,
                          "spec": {"cpu": 1, "memory": 256, "gpu": gpu, "image": "nginx"}});
        app.client.post(format!("{}/v1/resources", app.http)).json(&body).send()
    };
    assert_eq!(post("seed", 2, "r0").await.unwrap().status(), 200);

    // Another transaction holds the A100 counter's row (a slow writer, a stall).
    let mut tx = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM quota_usage WHERE scope = 'gpu:2' FOR UPDATE")
        .execute(&mut *tx)
        .await
        .unwrap();
    // Every unit of work this replica may run at once gets stuck on it (MAX_DRAINERS).
    let stuck = join_all((0..4).map(|n| post(&format!("stuck-{n}"), 2, &format!("s{n}")))).await;
    let behind = post("behind", 0, "b1").await.unwrap().status().as_u16();
    for answer in stuck {
        assert_eq!(answer.unwrap().status(), 504, "stuck behind the lock past the timeout");
    }
    // Queued behind the stuck units past the timeout, unless a unit was free for it.
    assert!(matches!(behind, 200 | 504), "{behind}");
    tx.rollback().await.unwrap();

    // The stuck creates complete once the lock goes; a retry returns the same instance.
    let retried = post("stuck-0", 2, "s0").await.unwrap();
    assert_eq!(retried.status(), 200);
    let retried: Value = retried.json().await.unwrap();
    let names: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, instance_id::text FROM instances WHERE name <> 'seed' ORDER BY name",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let stuck_0: Vec<_> = names.iter().filter(|(name, _)| name == "stuck-0").collect();
    assert_eq!(stuck_0.len(), 1, "one instance for one request id: {names:?}");
    assert_eq!(retried["instance_id"], json!(stuck_0[0].1));
    assert_eq!(
        names.iter().any(|(name, _)| name == "behind"),
        behind == 200,
        "a create is applied exactly when its caller was told so: {names:?}"
    );
    assert_counters_match_sql(&app.pool).await;
}

/// A burst of creates into a database link that stalls, then heals: every caller is
/// answered within the request timeout while it is stalled, and afterwards a retry of each
/// with its `request_id` makes at most one instance per request, within the limits, with
/// the counters exact — whatever was in flight when the link stalled.
#[tokio::test]
async fn a_burst_into_a_stalled_database_link_makes_one_instance_per_request_once_healed() {
    use crate::proxy::{Proxy, target_of};
    let proxy = Proxy::start(target_of(&crate::helpers::admin_url(), 5432)).await;
    let app = spawn_app_with(AppOptions {
        database_via: Some(proxy.addr),
        env: vec![
            ("RESOURCE_DATA__DATABASE__QUERY_TIMEOUT".into(), "2s".into()),
            ("RESOURCE_QUOTA__PER_USER__INSTANCES".into(), "8".into()),
            ("RESOURCE_QUOTA__GPU_CAPACITY__2".into(), "30".into()),
        ],
        ..Default::default()
    })
    .await;
    let post = |n: usize| {
        let body = json!({"name": format!("req-{n}"), "request_id": format!("req-{n}"),
                          "user_id": format!("u{}", n % 10),
                          "spec": {"cpu": 1, "memory": 256, "gpu": 2, "image": "nginx"}});
        let client = app.client.clone();
        let url = format!("{}/v1/resources", app.http);
        async move {
            let response = client.post(url).json(&body).send().await.expect("an answer");
            (n, response.status().as_u16())
        }
    };
    for n in 0..10 {
        assert_eq!(post(n).await.1, 200);
    }

    proxy.stall();
    let started = tokio::time::Instant::now();
    let stalled = join_all((10..120).map(post)).await;
    let waited = started.elapsed();
    proxy.restore();

    assert!(waited < std::time::Duration::from_secs(5), "answered within the timeout: {waited:?}");
    for (n, status) in &stalled {
        assert!(matches!(status, 200 | 429 | 503 | 504), "req-{n} answered {status}");
    }
    let refused = stalled.iter().filter(|(_, status)| matches!(status, 503 | 504)).count();
    eprintln!("stalled burst: {refused} of {} answered 503/504 in {waited:?}", stalled.len());
    assert!(refused > 0, "the stall reached the creates");
    // Once healed, every request is retried with its request_id until it is answered.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut pending: Vec<usize> = (10..120).collect();
    while !pending.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "still unanswered: {pending:?}");
        let answers = join_all(pending.iter().copied().map(post)).await;
        pending = answers
            .into_iter()
            .filter(|(_, status)| {
                assert!(matches!(status, 200 | 429 | 503 | 504), "answered {status}");
                matches!(status, 503 | 504)
            })
            .map(|(n, _)| n)
            .collect();
        if !pending.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    let per_request: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, count(*) FROM instances GROUP BY name HAVING count(*) > 1")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(per_request, vec![], "one instance per request id");
    let (live, per_user_max): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(sum(n), 0)::bigint, COALESCE(max(n), 0) FROM \
         (SELECT user_id, count(*) AS n FROM instances \
          WHERE status NOT IN ('DELETED', 'FAILED') GROUP BY user_id) per_user",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(live <= 30 && per_user_max <= 8, "{live} live, {per_user_max} for one user");
    assert_eq!(live, 30, "the capacity (30, under 10 users x 8) was filled");
    assert_counters_match_sql(&app.pool).await;
}

/// With a cluster: a FAILED workload frees its GPU place at once, a DELETING instance
/// holds it until its Pod is gone, and capacity is refused meanwhile.
#[tokio::test]
async fn with_a_cluster_failing_frees_and_deleting_holds_until_the_pod_is_gone() {
    use crate::kube::{app_on, create, wait_status};
    let opts = fake_kube::Options {
        failing_images: vec!["nginx:does-not-exist".into()],
        termination_delay: std::time::Duration::from_secs(2),
        ..fake_kube::Options::default()
    };
    let fake = fake_kube::FakeKube::start(opts).await.expect("start the fake API server");
    let (app, _cluster) = app_on(fake, None, &[("RESOURCE_QUOTA__GPU_CAPACITY__2", "2")]).await;
    let a100_used = || async {
        let (status, body) = app.get_json("/v1/capacity").await;
        assert_eq!(status, 200, "{body}");
        let a100 = body["gpus"].as_array().unwrap().iter().find(|g| g["gpu"] == 2).unwrap().clone();
        a100["used"].as_str().unwrap().parse::<i64>().unwrap()
    };
    let refused = || async {
        let body = json!({"name": "over", "user_id": "u1",
                          "spec": {"cpu": 1, "memory": 256, "gpu": 2, "image": "nginx:1.25"}});
        let response =
            app.client.post(format!("{}/v1/resources", app.http)).json(&body).send().await.unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        (status, body["reason"].as_str().unwrap_or_default().to_owned())
    };

    let running = create(&app, "runs", 2, "nginx:1.25", json!({})).await;
    let broken = create(&app, "broken", 2, "nginx:does-not-exist", json!({})).await;
    wait_status(&app, &running, "RUNNING").await;
    wait_status(&app, &broken, "FAILED").await;
    assert_eq!(a100_used().await, 1, "a FAILED instance holds nothing");
    let second = create(&app, "second", 2, "nginx:1.25", json!({})).await;
    wait_status(&app, &second, "RUNNING").await;

    let response =
        app.client.delete(format!("{}/v1/resources/{running}", app.http)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let deleting: Value = response.json().await.unwrap();
    assert_eq!(deleting["status"], "DELETING");
    assert_eq!(
        refused().await,
        (429, "CAPACITY_EXHAUSTED".to_owned()),
        "its Pod still holds the GPU"
    );
    wait_status(&app, &running, "DELETED").await;
    assert_eq!(a100_used().await, 1);
    create(&app, "third", 2, "nginx:1.25", json!({})).await;
    assert_counters_match_sql(&app.pool).await;
}
