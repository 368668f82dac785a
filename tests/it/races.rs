//! Many concurrent writers on one instance — REST and gRPC calls on two replicas and
//! events competing for the same row — and the proof that nothing was lost: every
//! applied change is in the final state's history, and the audit trail is an unbroken
//! chain (each row's `before` is the previous row's `after`, the last `after` is the row
//! as stored).

use std::time::Duration;

use futures::{FutureExt, future::BoxFuture};
use resource::pb::{
    mq::v1::EventType,
    resource::v1::{
        ResourceActionRequest, ResourceSpec, UpdateResourceSpecRequest,
        resource_service_client::ResourceServiceClient,
    },
};
use serde_json::{Value, json};
use sqlx::PgPool;

use fake_kube::{FakeKube, Kind, Options};

use crate::{
    helpers::{AppOptions, TestApp, spawn_app_with},
    mq::{Broker, event},
};

/// One audit row, as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct AuditRow {
    pub id: i64,
    pub action: String,
    pub outcome: String,
    pub request_id: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

/// The trail of `instance_id`, oldest first.
pub(crate) async fn audit_rows(pool: &PgPool, instance_id: i64) -> Vec<AuditRow> {
    sqlx::query_as(
        "SELECT id, action, outcome, request_id, before, after FROM audit_logs \
         WHERE instance_id = $1 ORDER BY id",
    )
    .bind(instance_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Asserts the trail of `instance_id` is an unbroken chain ending at the stored row.
pub(crate) async fn assert_unbroken_chain(pool: &PgPool, instance_id: i64) -> Vec<AuditRow> {
    let rows = audit_rows(pool, instance_id).await;
    assert!(!rows.is_empty(), "instance {instance_id} has no audit trail");
    assert_eq!(rows[0].action, "CREATE", "the trail starts with the create");
    assert!(rows[0].before.is_none(), "a create has no before");
    for pair in rows.windows(2) {
        let (prev, next) = (&pair[0], &pair[1]);
        assert_eq!(
            next.before,
            prev.after,
            "audit row {} ({} {} by {:?}) does not start where row {} ({} {} by {:?}) ended",
            next.id,
            next.action,
            next.outcome,
            next.request_id,
            prev.id,
            prev.action,
            prev.outcome,
            prev.request_id
        );
    }
    let last = rows.last().unwrap().after.clone().expect("the last row has an after");
    let (status, reason, version, cpu, memory, gpu, image, config): (
        String,
        String,
        i64,
        i32,
        i32,
        i32,
        String,
        Value,
    ) = sqlx::query_as(
        "SELECT i.status, i.status_reason, i.version, s.cpu, s.memory, s.gpu, s.image, s.config_json \
         FROM instances i JOIN instance_specs s USING (instance_id) WHERE i.instance_id = $1",
    )
    .bind(instance_id)
    .fetch_one(pool)
    .await
    .unwrap();
    let stored = json!({
        "status": status, "status_reason": reason, "version": version,
        "spec": {"cpu": cpu, "memory": memory, "gpu": gpu, "image": image},
    });
    let seen = json!({
        "status": last["status"], "status_reason": last["status_reason"], "version": last["version"],
        "spec": {"cpu": last["spec"]["cpu"], "memory": last["spec"]["memory"],
                 "gpu": last["spec"]["gpu"], "image": last["spec"]["image"]},
    });
    assert_eq!(seen, stored, "the last audited state is the state stored");
    assert_eq!(last["config_json"], config, "the audited config_json is the stored one");
    let applied = rows.iter().filter(|r| r.outcome == "ok").count() as i64;
    assert_eq!(version, applied, "the create and every applied change bumped the version once");
    rows
}

/// What one concurrent mutation asked for.
struct Asked {
    request_id: String,
    /// The image a spec change asked for.
    image: Option<String>,
    /// The HTTP status it was answered with, gRPC codes mapped to theirs (`None` for
    /// events, which answer nothing).
    answer: Option<u16>,
}

/// Runs `count` mixed mutations of instance `id` at once: PATCHes, stops and starts over
/// REST on `app` and on the replica at `replica_http`, spec changes, stops and starts
/// over gRPC, and STOP, START and SPEC_CHANGED events.
async fn mutate_concurrently(
    app: &TestApp,
    replica_http: &str,
    id: i64,
    round: &str,
    count: usize,
) -> Vec<Asked> {
    let broker = Broker::connect().await;
    let grpc = ResourceServiceClient::new(app.grpc_channel().await);
    let grpc_answer = |result: Result<(), tonic::Status>| match result {
        Ok(()) => 200,
        Err(s) if s.code() == tonic::Code::FailedPrecondition => 409,
        Err(s) => panic!("gRPC call failed: {s:?}"),
    };
    let mut ops: Vec<BoxFuture<'_, Asked>> = Vec::new();
    for n in 0..count {
        let request_id = format!("{round}-{n}");
        let http = if n % 2 == 0 { app.http.clone() } else { replica_http.to_owned() };
        let client = app.client.clone();
        let rest = move |method: reqwest::Method,
                         path: String,
                         body: Option<Value>,
                         rid: String| {
            async move {
                let mut req = client
                    .request(method, format!("{http}{path}"))
                    .header("x-request-id", rid.as_str());
                if let Some(body) = body {
                    req = req.json(&body);
                }
                req.send().await.expect("a REST answer").status().as_u16()
            }
        };
        let cpu = i32::try_from(n % 8 + 1).unwrap();
        let op: BoxFuture<'_, Asked> = match n % 8 {
            0 | 1 => {
                let image = format!("nginx:1.{n}");
                let body = json!({"cpu": cpu, "image": image});
                let path = format!("/v1/resources/{id}/spec");
                async move {
                    let answer = rest(reqwest::Method::PATCH, path, Some(body), request_id.clone());
                    Asked { request_id, image: Some(image), answer: Some(answer.await) }
                }
                .boxed()
            }
            2 | 3 => {
                let verb = if n % 8 == 2 { "stop" } else { "start" };
                let path = format!("/v1/resources/{id}:{verb}");
                async move {
                    let answer = rest(reqwest::Method::POST, path, None, request_id.clone()).await;
                    Asked { request_id, image: None, answer: Some(answer) }
                }
                .boxed()
            }
            4 => {
                let mut grpc = grpc.clone();
                let image = format!("redis:7.{n}");
                let spec =
                    ResourceSpec { memory: 2048, image: image.clone(), ..Default::default() };
                async move {
                    let mut req = tonic::Request::new(UpdateResourceSpecRequest {
                        instance_id: id,
                        spec: Some(spec),
                        update_mask: None,
                    });
                    req.metadata_mut().insert("x-request-id", request_id.parse().unwrap());
                    let answer = grpc_answer(grpc.update_resource_spec(req).await.map(drop));
                    Asked { request_id, image: Some(image), answer: Some(answer) }
                }
                .boxed()
            }
            5 => {
                let mut grpc = grpc.clone();
                async move {
                    let mut req = tonic::Request::new(ResourceActionRequest { instance_id: id });
                    req.metadata_mut().insert("x-request-id", request_id.parse().unwrap());
                    let result = if n % 16 == 5 {
                        grpc.stop_resource(req).await
                    } else {
                        grpc.start_resource(req).await
                    };
                    let answer = grpc_answer(result.map(drop));
                    Asked { request_id, image: None, answer: Some(answer) }
                }
                .boxed()
            }
            _ => {
                let broker = &broker;
                // Distinct timestamps as well as distinct message ids, so these events are
                // distinct commands whichever identity rule applies.
                let timestamp = 1_800_000_000 + i64::try_from(n).unwrap();
                let (e, image) = match n % 24 {
                    6 | 7 => (event(EventType::InstanceStopped, id, timestamp), None),
                    14 | 15 => (event(EventType::InstanceStarted, id, timestamp), None),
                    _ => {
                        let image = format!("busybox:1.{n}");
                        let mut e = event(EventType::InstanceSpecChanged, id, timestamp);
                        e.spec = Some(resource::pb::mq::v1::InstanceSpec {
                            cpus: cpu,
                            memory_mb: 512,
                            gpu: String::new(),
                            image: image.clone(),
                        });
                        (e, Some(image))
                    }
                };
                async move {
                    broker.publish_with_id(app, &e, &request_id).await;
                    Asked { request_id, image, answer: None }
                }
                .boxed()
            }
        };
        ops.push(op);
    }
    let asked = futures::future::join_all(ops).await;

    let events = asked.iter().filter(|a| a.answer.is_none()).count() as i64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let consumed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_logs WHERE instance_id = $1 AND source = 'mq'",
        )
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if consumed >= events {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {consumed} of {events} events applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    asked
}

/// Every mutation has exactly one audit row, and every applied spec change is the one
/// its request asked for; the trail is an unbroken chain. Returns the trail.
async fn assert_every_mutation_audited(app: &TestApp, id: i64, asked: &[Asked]) -> Vec<AuditRow> {
    let rows = assert_unbroken_chain(&app.pool, id).await;
    for a in asked {
        let mine: Vec<&AuditRow> = rows.iter().filter(|r| r.request_id == a.request_id).collect();
        assert_eq!(mine.len(), 1, "{} has {} audit rows", a.request_id, mine.len());
        if let (Some(image), "ok") = (&a.image, mine[0].outcome.as_str()) {
            let after = mine[0].after.as_ref().unwrap();
            assert_eq!(
                after["spec"]["image"],
                json!(image),
                "{} applied another spec",
                a.request_id
            );
        }
        let outcome = mine[0].outcome.as_str();
        match a.answer {
            Some(200) => {
                assert!(matches!(outcome, "ok" | "ignored"), "{}: 200 but {outcome}", a.request_id)
            }
            Some(409) => assert_eq!(outcome, "rejected", "{}: 409", a.request_id),
            Some(other) => panic!("{} was answered {other}", a.request_id),
            None => {}
        }
    }
    let applied_specs =
        rows.iter().filter(|r| r.action == "CHANGE_SPEC" && r.outcome == "ok").count();
    assert!(
        applied_specs > asked.len() / 8,
        "the race exercised spec changes ({applied_specs} applied)"
    );
    rows
}

#[tokio::test]
async fn two_hundred_forty_concurrent_mutations_on_one_instance_lose_nothing() {
    // Calls are not cut by the request timeout: every one of them must answer.
    let app = spawn_app_with(AppOptions {
        env: vec![
            ("RESOURCE_SERVER__HTTP__TIMEOUT".into(), "60s".into()),
            ("RESOURCE_SERVER__GRPC__TIMEOUT".into(), "60s".into()),
        ],
        ..Default::default()
    })
    .await;
    let replica = app.replica().await;
    let body = json!({"name": "contended", "user_id": "u1",
                      "spec": {"cpu": 1, "memory": 1024, "gpu": 0, "image": "nginx:1.0"}});
    let id = id_of(&app.create_at(&app.http, &body).await);

    let asked = mutate_concurrently(&app, &replica.http, id, "race", 240).await;

    // Without a cluster every move is legal: every call is applied or an audited no-op.
    assert!(asked.iter().all(|a| a.answer.is_none_or(|code| code == 200)));
    assert_every_mutation_audited(&app, id, &asked).await;
    crate::quota_counters::assert_counters_match_sql(&app.pool).await;
}

#[tokio::test]
async fn mutations_racing_the_reconciler_on_two_replicas_lose_nothing() {
    let fake =
        FakeKube::start(Options { kubelet_delay: Duration::from_millis(30), ..Options::default() })
            .await
            .expect("start the fake API server");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig_yaml("instances")).unwrap();
    let app = spawn_app_with(AppOptions {
        env: vec![
            ("RESOURCE_SERVER__HTTP__TIMEOUT".into(), "60s".into()),
            ("RESOURCE_SERVER__GRPC__TIMEOUT".into(), "60s".into()),
            ("RESOURCE_DATA__KUBERNETES__ENABLED".into(), "true".into()),
            ("RESOURCE_DATA__KUBERNETES__KUBECONFIG".into(), kubeconfig.display().to_string()),
            ("RESOURCE_DATA__KUBERNETES__NAMESPACE".into(), "instances".into()),
            ("RESOURCE_DATA__KUBERNETES__POLL_INTERVAL".into(), "50ms".into()),
            ("RESOURCE_DATA__KUBERNETES__API_QPS".into(), "1000".into()),
        ],
        ..Default::default()
    })
    .await;
    let replica = app.replica().await;
    let body = json!({"name": "contended", "user_id": "u1",
                      "spec": {"cpu": 1, "memory": 1024, "gpu": 0, "image": "nginx:1.0"}});
    let id = id_of(&app.create_at(&app.http, &body).await);

    // Spread over a few seconds, so that the reconciler's moves land between them.
    let mut asked = Vec::new();
    for round in 0..4 {
        let round = format!("round{round}");
        asked.extend(mutate_concurrently(&app, &replica.http, id, &round, 40).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Let the reconciler finish what is in flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let stored = loop {
        let (status, image): (String, String) = sqlx::query_as(
            "SELECT i.status, s.image FROM instances i JOIN instance_specs s USING (instance_id) \
             WHERE i.instance_id = $1",
        )
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if matches!(status.as_str(), "RUNNING" | "STOPPED" | "FAILED") {
            break (status, image);
        }
        assert!(tokio::time::Instant::now() < deadline, "never settled: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let rows = assert_every_mutation_audited(&app, id, &asked).await;
    let moves = rows.iter().filter(|r| r.action == "STATUS_CHANGE").count();
    assert!(moves > 4, "the reconciler took part ({moves} moves)");
    crate::quota_counters::assert_counters_match_sql(&app.pool).await;
    // The cluster runs what is stored: no reconcile step applied a spec it read before a
    // later change committed.
    if stored.0 == "RUNNING" {
        let pod = fake.get(Kind::Pod, "instances", &format!("inst-{id}")).expect("the pod");
        assert_eq!(pod["spec"]["containers"][0]["image"], json!(stored.1));
    }
}

fn id_of(resource: &Value) -> i64 {
    resource["instance_id"].as_str().expect("an instance_id").parse().unwrap()
}

#[tokio::test]
async fn a_request_answered_504_while_it_waited_its_turn_is_never_applied() {
    // A short timeout and a slow database: most of 150 concurrent PATCHes of one
    // instance time out while they wait for their turn.
    let proxy =
        crate::proxy::Proxy::start(crate::proxy::target_of(&crate::helpers::admin_url(), 5432))
            .await;
    let app = spawn_app_with(AppOptions {
        env: vec![("RESOURCE_SERVER__HTTP__TIMEOUT".into(), "300ms".into())],
        database_via: Some(proxy.addr),
        ..Default::default()
    })
    .await;
    let body = json!({"name": "hot", "user_id": "u1",
                      "spec": {"cpu": 1, "memory": 1024, "gpu": 0, "image": "nginx:1.0"}});
    let id = id_of(&app.create_at(&app.http, &body).await);
    proxy.delay(Duration::from_millis(10));

    let patches = (0..150).map(|n| {
        let app = &app;
        async move {
            let response = app
                .client
                .patch(format!("{}/v1/resources/{id}/spec", app.http))
                .header("x-request-id", format!("hot-{n}"))
                .json(&json!({"image": format!("nginx:1.{n}")}))
                .send()
                .await
                .unwrap();
            (format!("hot-{n}"), response.status().as_u16())
        }
    });
    let answers = futures::future::join_all(patches).await;
    proxy.delay(Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(2)).await; // anything still running finishes

    let rows = assert_unbroken_chain(&app.pool, id).await;
    let audited = |rid: &str| rows.iter().any(|r| r.request_id == rid);
    let timed_out: Vec<&String> =
        answers.iter().filter(|(_, s)| *s == 504).map(|(r, _)| r).collect();
    assert!(timed_out.len() > 50, "the test needs timeouts: {answers:?}");
    for (rid, status) in &answers {
        if *status == 200 {
            assert!(audited(rid), "{rid} answered 200 but not applied");
        } else {
            assert_eq!(*status, 504, "{rid}");
        }
    }
    // Only the request in the middle of its transaction when its time ran out may still
    // have been applied: none of those that were still waiting for their turn.
    let applied_late = timed_out.iter().filter(|rid| audited(rid)).count();
    assert!(applied_late <= 2, "{applied_late} requests answered 504 were applied afterwards");
}
