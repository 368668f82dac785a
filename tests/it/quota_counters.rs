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
