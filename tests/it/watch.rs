//! WatchResources over gRPC and Server-Sent Events (issue 16): live changes in version
//! order, resuming repeats nothing and misses nothing (across a restart), a change that
//! commits late is still delivered, two replicas, tenancy, an expired token.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use resource::pb::resource::v1::{
    Resource, Status, WatchResourcesRequest, WatchResourcesResponse,
    resource_service_client::ResourceServiceClient,
};
use serde_json::{Value, json};
use tonic::{Code, Request, Streaming};

use crate::helpers::{AppOptions, TestApp, spawn_app_with};

/// How long a change may take to reach a watcher before the test fails.
const DELIVERY: Duration = Duration::from_secs(10);

const SECRET: &str = "test-only-hs256-secret-of-32-bytes+";

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// A service with the environment `extra` besides the test defaults.
pub(crate) async fn app(extra: &[(&str, &str)]) -> TestApp {
    spawn_app_with(AppOptions { env: env(extra), ..AppOptions::default() }).await
}

pub(crate) fn spec() -> Value {
    json!({"cpu": 1, "memory": 64, "image": "nginx:1.25"})
}

/// Creates an instance through REST at `http`; its id.
async fn create(app: &TestApp, http: &str, user: &str, name: &str) -> i64 {
    let body = json!({"name": name, "user_id": user, "spec": spec()});
    app.create_at(http, &body).await["instance_id"].as_str().unwrap().parse().unwrap()
}

async fn act(app: &TestApp, id: i64, verb: &str) {
    let url = format!("{}/v1/resources/{id}:{verb}", app.http);
    let response = app.client.post(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{verb} {id}: {}", response.text().await.unwrap());
}

async fn delete(app: &TestApp, id: i64) {
    let response =
        app.client.delete(format!("{}/v1/resources/{id}", app.http)).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

/// A gRPC watch; its first response is the starting heartbeat.
async fn watch(app: &TestApp, req: WatchResourcesRequest) -> Streaming<WatchResourcesResponse> {
    watch_as(app, req, None).await.expect("the watch opens")
}

async fn watch_as(
    app: &TestApp,
    req: WatchResourcesRequest,
    token: Option<&str>,
) -> Result<Streaming<WatchResourcesResponse>, tonic::Status> {
    let mut client = ResourceServiceClient::new(app.grpc_channel().await);
    let mut req = Request::new(req);
    if let Some(token) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let mut stream = client.watch_resources(req).await?.into_inner();
    let first = next(&mut stream).await;
    assert!(first.resource.is_none() && !first.resume_token.is_empty(), "{first:?}");
    Ok(stream)
}

async fn next(stream: &mut Streaming<WatchResourcesResponse>) -> WatchResourcesResponse {
    tokio::time::timeout(DELIVERY, stream.message())
        .await
        .expect("a response in time")
        .expect("no stream error")
        .expect("the stream goes on")
}

/// The next `n` changes (heartbeats skipped), with the token after the last.
async fn changes(
    stream: &mut Streaming<WatchResourcesResponse>,
    n: usize,
) -> (Vec<Resource>, String) {
    let (mut out, mut token) = (Vec::new(), String::new());
    while out.len() < n {
        let response = next(stream).await;
        token = response.resume_token;
        out.extend(response.resource);
    }
    (out, token)
}

/// Nothing but heartbeats for `quiet`.
async fn no_change_within(stream: &mut Streaming<WatchResourcesResponse>, quiet: Duration) {
    let until = tokio::time::Instant::now() + quiet;
    while let Ok(got) = tokio::time::timeout_at(until, stream.message()).await {
        let response = got.expect("no stream error").expect("the stream goes on");
        assert!(response.resource.is_none(), "unexpected change {:?}", response.resource);
    }
}

fn summary(resources: &[Resource]) -> Vec<(i64, i32)> {
    resources.iter().map(|r| (r.instance_id, r.status)).collect()
}

/// Versions of the instance, in the order the change log holds them.
async fn logged_versions(app: &TestApp, id: i64) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT version FROM instance_changes WHERE instance_id = $1 ORDER BY tick, seq",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn live_changes_arrive_in_order_and_a_resumed_watch_repeats_nothing_and_misses_nothing() {
    let mut app = app(&[]).await;
    let mut stream = watch(&app, WatchResourcesRequest::default()).await;

    let a = create(&app, &app.http, "u1", "a").await;
    let b = create(&app, &app.http, "u1", "b").await;
    act(&app, a, "stop").await;
    delete(&app, b).await;
    let (seen, token) = changes(&mut stream, 4).await;
    assert_eq!(
        summary(&seen),
        vec![
            (a, Status::Running as i32),
            (b, Status::Running as i32),
            (a, Status::Stopped as i32),
            (b, Status::Deleted as i32),
        ],
        "creates, a stop and a delete, in commit order"
    );
    no_change_within(&mut stream, Duration::from_millis(500)).await;
    drop(stream);

    // While no one watches: changes, and a restart of the service.
    act(&app, a, "start").await;
    let c = create(&app, &app.http, "u2", "c").await;
    app.restart().await;
    delete(&app, a).await;

    let mut resumed =
        watch(&app, WatchResourcesRequest { resume_token: token.clone(), ..Default::default() })
            .await;
    let (seen, _) = changes(&mut resumed, 3).await;
    assert_eq!(
        summary(&seen),
        vec![(a, Status::Running as i32), (c, Status::Running as i32), (a, Status::Deleted as i32)],
        "exactly the changes after the token"
    );
    no_change_within(&mut resumed, Duration::from_millis(500)).await;
    assert_eq!(logged_versions(&app, a).await, vec![1, 2, 3, 4]);

    // The same token again gives the same changes: resuming is repeatable.
    let mut again =
        watch(&app, WatchResourcesRequest { resume_token: token, ..Default::default() }).await;
    let (seen_again, _) = changes(&mut again, 3).await;
    assert_eq!(summary(&seen_again), summary(&seen));
}

#[tokio::test]
async fn a_change_that_commits_late_is_delivered_and_not_skipped_on_resume() {
    let app = app(&[]).await;
    let slow_owner = create(&app, &app.http, "slow", "first").await;
    let other = create(&app, &app.http, "fast", "other").await;
    let mut stream = watch(&app, WatchResourcesRequest::default()).await;

    // Hold the slow owner's usage counter: their next create writes its instance and its
    // change (taking a sequence number) and then waits, uncommitted, at the counter.
    let mut holder = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM quota_usage WHERE scope = 'user:slow' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let late = tokio::spawn({
        let (client, http) = (app.client.clone(), app.http.clone());
        async move {
            let body = json!({"name": "late", "user_id": "slow", "spec": spec()});
            let response = client.post(format!("{http}/v1/resources")).json(&body).send().await;
            let body: Value = response.unwrap().json().await.unwrap();
            body["instance_id"].as_str().unwrap().parse::<i64>().unwrap()
        }
    });
    // Wait until the slow create has written its change row.
    let deadline = tokio::time::Instant::now() + DELIVERY;
    loop {
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND query LIKE 'INSERT INTO quota_usage%'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if pending > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the slow create never blocked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A later change commits first and is delivered.
    act(&app, other, "stop").await;
    let (fast, token_after_fast) = changes(&mut stream, 1).await;
    assert_eq!(summary(&fast), vec![(other, Status::Stopped as i32)]);

    holder.commit().await.unwrap();
    let late = late.await.unwrap();
    let (slow, _) = changes(&mut stream, 1).await;
    assert_eq!(summary(&slow), vec![(late, Status::Running as i32)], "delivered live");
    let (fast_seq, slow_seq): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT max(seq) FROM instance_changes WHERE instance_id = $1), \
                (SELECT max(seq) FROM instance_changes WHERE instance_id = $2)",
    )
    .bind(other)
    .bind(late)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(slow_seq < fast_seq, "the late change took the lower sequence number");

    // And a watch resumed from the token taken before the late commit gets it too.
    let mut resumed =
        watch(&app, WatchResourcesRequest { resume_token: token_after_fast, ..Default::default() })
            .await;
    let (slow, _) = changes(&mut resumed, 1).await;
    assert_eq!(summary(&slow), vec![(late, Status::Running as i32)]);
    no_change_within(&mut resumed, Duration::from_millis(300)).await;
    assert_ne!(slow_owner, late);
}

#[tokio::test]
async fn a_watcher_on_one_replica_sees_changes_made_through_another() {
    let app = app(&[]).await;
    let second = app.replica().await;
    let mut on_first = watch(&app, WatchResourcesRequest::default()).await;

    let mut made = Vec::new();
    for i in 0..10 {
        let http = if i % 2 == 0 { &second.http } else { &app.http };
        made.push(create(&app, http, "u1", &format!("r{i}")).await);
    }
    let (seen, _) = changes(&mut on_first, 10).await;
    let mut seen: Vec<i64> = seen.iter().map(|r| r.instance_id).collect();
    seen.sort_unstable();
    made.sort_unstable();
    assert_eq!(seen, made, "every change, once, whichever replica made it");
    no_change_within(&mut on_first, Duration::from_millis(500)).await;
}

fn token(claims: Value) -> String {
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
}

fn user(sub: &str) -> String {
    token(json!({"sub": sub, "exp": chrono::Utc::now().timestamp() + 300}))
}

#[tokio::test]
async fn a_user_watches_only_their_own_instances_and_an_admin_every_one() {
    let app = app(&[("RESOURCE_AUTH__MODE", "jwt"), ("RESOURCE_AUTH__JWT__SECRET", SECRET)]).await;
    let admin =
        token(json!({"sub": "root", "role": "admin", "exp": chrono::Utc::now().timestamp() + 300}));
    let (u1, u2) = (user("u1"), user("u2"));
    let mut own = watch_as(&app, WatchResourcesRequest::default(), Some(&u1)).await.unwrap();
    let mut asks_other = watch_as(
        &app,
        WatchResourcesRequest { user_id: "u2".into(), ..Default::default() },
        Some(&u1),
    )
    .await
    .unwrap();
    let mut all = watch_as(&app, WatchResourcesRequest::default(), Some(&admin)).await.unwrap();
    let unauthenticated = watch_as(&app, WatchResourcesRequest::default(), None).await;
    assert_eq!(unauthenticated.unwrap_err().code(), Code::Unauthenticated);

    for (token, name) in [(&u2, "theirs"), (&u1, "mine"), (&u2, "theirs-too")] {
        let response = app
            .client
            .post(format!("{}/v1/resources", app.http))
            .bearer_auth(token)
            .json(&json!({"name": name, "spec": spec()}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let (mine, _) = changes(&mut own, 1).await;
    assert_eq!(mine[0].name, "mine");
    assert_eq!(mine[0].user_id, "u1");
    no_change_within(&mut own, Duration::from_millis(500)).await;
    no_change_within(&mut asks_other, Duration::from_millis(100)).await;
    let (every, _) = changes(&mut all, 3).await;
    let names: Vec<&str> = every.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["theirs", "mine", "theirs-too"]);
}

#[tokio::test]
async fn filters_name_status_and_owner_apply_to_the_state_after_each_change() {
    let app = app(&[]).await;
    let mut stopped =
        watch(&app, WatchResourcesRequest { status: Status::Stopped as i32, ..Default::default() })
            .await;
    let mut named =
        watch(&app, WatchResourcesRequest { name: "web".into(), ..Default::default() }).await;
    let web = create(&app, &app.http, "u1", "web").await;
    let db = create(&app, &app.http, "u1", "db").await;
    act(&app, db, "stop").await;
    act(&app, web, "stop").await;
    let (s, _) = changes(&mut stopped, 2).await;
    assert_eq!(summary(&s), vec![(db, Status::Stopped as i32), (web, Status::Stopped as i32)]);
    let (n, _) = changes(&mut named, 2).await;
    assert_eq!(summary(&n), vec![(web, Status::Running as i32), (web, Status::Stopped as i32)]);
}

#[tokio::test]
async fn a_token_older_than_the_retention_is_refused_and_a_bad_one_is_invalid() {
    let mut app =
        app(&[("RESOURCE_WATCH__RETENTION", "1h"), ("RESOURCE_WATCH__HEARTBEAT", "200ms")]).await;
    let mut stream = watch(&app, WatchResourcesRequest::default()).await;
    let first = create(&app, &app.http, "u1", "old").await;
    let (_, old_token) = changes(&mut stream, 1).await;
    let second = create(&app, &app.http, "u1", "old-too").await;
    changes(&mut stream, 1).await;
    // A heartbeat once caught up: its token is past every change so far.
    let beat = next(&mut stream).await;
    assert!(beat.resource.is_none());
    let later_token = beat.resume_token;
    drop(stream);
    assert_ne!(first, second);

    // The ticks age past the retention; a restart prunes at once.
    sqlx::query("UPDATE watch_ticks SET ticked_at = now() - interval '2 hours'")
        .execute(&app.pool)
        .await
        .unwrap();
    app.restart().await;
    let deadline = tokio::time::Instant::now() + DELIVERY;
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM instance_changes")
        .fetch_one(&app.pool)
        .await
        .unwrap()
        > 0
    {
        assert!(tokio::time::Instant::now() < deadline, "the log was never pruned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = ResourceServiceClient::new(app.grpc_channel().await);
    let expired = client
        .watch_resources(WatchResourcesRequest { resume_token: old_token, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(expired.code(), Code::FailedPrecondition, "{expired:?}");
    assert!(expired.message().contains("older than"), "{}", expired.message());
    // A token past every pruned change lost nothing: it still resumes.
    let mut at_end =
        watch(&app, WatchResourcesRequest { resume_token: later_token, ..Default::default() })
            .await;
    let third = create(&app, &app.http, "u1", "new").await;
    let (seen, _) = changes(&mut at_end, 1).await;
    assert_eq!(seen[0].instance_id, third);

    let rest = app.client.get(format!("{}/v1/resources:watch?resume_token=AAAA", app.http));
    let response = rest.send().await.unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["reason"], "INVALID_ARGUMENT");
    assert_eq!(body["metadata"]["field"], "resume_token");
}

/// One Server-Sent Event.
#[derive(Debug, Default)]
pub(crate) struct Sse {
    pub(crate) event: String,
    pub(crate) id: String,
    pub(crate) data: Value,
}

/// Reads events from an SSE response body.
pub(crate) struct SseReader {
    body: reqwest::Response,
    buf: String,
}

impl SseReader {
    pub(crate) fn new(response: reqwest::Response) -> Self {
        Self { body: response, buf: String::new() }
    }

    /// The next event (an `error` event too); `Err` when none came within `within`, the
    /// stream failed or ended, or its data is not JSON.
    pub(crate) async fn read(&mut self, within: Duration) -> Result<Sse, String> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..end + 2).collect();
                let mut event = Sse { event: "message".into(), ..Default::default() };
                for line in raw.lines() {
                    if let Some((field, value)) = line.split_once(':') {
                        let value = value.strip_prefix(' ').unwrap_or(value);
                        match field {
                            "event" => event.event = value.to_owned(),
                            "id" => event.id = value.to_owned(),
                            "data" => {
                                event.data = serde_json::from_str(value)
                                    .map_err(|e| format!("bad data {value}: {e}"))?;
                            }
                            _ => {}
                        }
                    }
                }
                return Ok(event);
            }
            let chunk = tokio::time::timeout(within, self.body.chunk())
                .await
                .map_err(|_| "no event in time".to_owned())?
                .map_err(|e| format!("read error: {e}"))?
                .ok_or_else(|| "the stream ended".to_owned())?;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    async fn next(&mut self) -> Sse {
        self.read(DELIVERY).await.unwrap()
    }

    async fn next_change(&mut self) -> Sse {
        loop {
            let event = self.next().await;
            if event.event == "message" {
                return event;
            }
            assert_eq!(event.event, "heartbeat", "{event:?}");
        }
    }
}

#[tokio::test]
async fn rest_streams_server_sent_events_with_heartbeats_and_resumes_from_last_event_id() {
    let app = app(&[("RESOURCE_WATCH__HEARTBEAT", "200ms")]).await;
    let open = |last_event_id: Option<String>| {
        let mut req = app.client.get(format!("{}/v1/resources:watch?name=sse", app.http));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        req.timeout(Duration::from_secs(60)).send()
    };
    let response = open(None).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut events = SseReader::new(response);
    let start = events.next().await;
    assert_eq!(start.event, "heartbeat");
    assert!(start.data.get("resource").is_none_or(Value::is_null), "{start:?}");
    assert_eq!(start.data["resume_token"], start.id);

    // Silence is broken by heartbeats.
    let beat = events.next().await;
    assert_eq!(beat.event, "heartbeat");

    let id = create(&app, &app.http, "u1", "sse").await;
    create(&app, &app.http, "u1", "not-this-one").await;
    let created = events.next_change().await;
    assert_eq!(created.data["resource"]["instance_id"], id.to_string());
    assert_eq!(created.data["resource"]["status"], "RUNNING");
    assert_eq!(created.data["resume_token"], created.id);
    drop(events);

    // A reconnecting EventSource sends the last id it saw.
    act(&app, id, "stop").await;
    let mut resumed = SseReader::new(open(Some(created.id.clone())).await.unwrap());
    let stopped = resumed.next_change().await;
    assert_eq!(stopped.data["resource"]["instance_id"], id.to_string());
    assert_eq!(stopped.data["resource"]["status"], "STOPPED");

    // Statuses are checked like ListResources'.
    let bad = app.client.get(format!("{}/v1/resources:watch?status=NOPE", app.http));
    assert_eq!(bad.send().await.unwrap().status(), 400);
}

#[tokio::test]
async fn a_watcher_behind_a_black_holed_database_link_gets_every_change_once_it_heals() {
    use crate::{
        helpers::admin_url,
        proxy::{Proxy, target_of},
    };
    // The watcher's replica reaches the database through a proxy; the other replica, which
    // makes the changes, directly.
    let proxy = Proxy::start(target_of(&admin_url(), 5432)).await;
    let app = spawn_app_with(AppOptions {
        database_via: Some(proxy.addr),
        env: env(&[("RESOURCE_DATA__DATABASE__QUERY_TIMEOUT", "2s")]),
        ..AppOptions::default()
    })
    .await;
    let name = app.pool.connect_options().get_database().unwrap().to_owned();
    let direct = test_support::database_url(&admin_url(), &name);
    let writer = app.replica_with(&[("RESOURCE_DATA__DATABASE__SOURCE", &direct)]).await;
    let mut stream = watch(&app, WatchResourcesRequest::default()).await;
    let before = create(&app, &writer.http, "u1", "before").await;
    let (seen, _) = changes(&mut stream, 1).await;
    assert_eq!(seen[0].instance_id, before);

    // Every connection of the watcher's replica, its listener's included, now swallows
    // what it is sent and stays dead even after the link heals.
    proxy.blackhole();
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(create(&app, &writer.http, "u1", &format!("during-{i}")).await);
    }
    // A watch cannot start without the log: it is refused, not left hanging.
    let mut client = ResourceServiceClient::new(app.grpc_channel().await);
    let refused = tokio::time::timeout(
        Duration::from_secs(15),
        client.watch_resources(WatchResourcesRequest::default()),
    )
    .await
    .expect("refused within the request timeout")
    .unwrap_err();
    assert!(matches!(refused.code(), Code::Unavailable | Code::DeadlineExceeded), "{refused:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.restore();
    for i in 0..5 {
        made.push(create(&app, &writer.http, "u1", &format!("after-{i}")).await);
    }

    let (seen, _) = changes(&mut stream, 10).await;
    let seen: Vec<i64> = seen.iter().map(|r| r.instance_id).collect();
    assert_eq!(seen, made, "every change once, in commit order");
    no_change_within(&mut stream, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn label_gpu_and_image_filters_and_label_changes_reach_watchers() {
    let app = app(&[]).await;
    let mut team_a = watch(
        &app,
        WatchResourcesRequest { label_selector: "team=a,env!=prod".into(), ..Default::default() },
    )
    .await;
    let mut a100 =
        watch(&app, WatchResourcesRequest { gpu_model: "Tesla A100".into(), ..Default::default() })
            .await;
    let body = |name: &str, labels: Value, gpu: i32| {
        json!({"name": name, "user_id": "u1", "labels": labels,
               "spec": {"cpu": 1, "memory": 64, "gpu": gpu, "image": "nginx:1.25"}})
    };
    let labelled = app.create_at(&app.http, &body("a-dev", json!({"team": "a"}), 2)).await;
    app.create_at(&app.http, &body("a-prod", json!({"team": "a", "env": "prod"}), 0)).await;
    app.create_at(&app.http, &body("b", json!({"team": "b"}), 0)).await;
    let id: i64 = labelled["instance_id"].as_str().unwrap().parse().unwrap();

    let (seen, _) = changes(&mut team_a, 1).await;
    assert_eq!(seen[0].name, "a-dev");
    assert_eq!(seen[0].labels.get("team").map(String::as_str), Some("a"));
    let (seen, _) = changes(&mut a100, 1).await;
    assert_eq!(seen[0].instance_id, id);

    // A label change is a change: it moves the instance out of the selector.
    let put = app
        .client
        .put(format!("{}/v1/resources/{id}/labels", app.http))
        .json(&json!({"team": "a", "env": "prod"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200, "{}", put.text().await.unwrap());
    let (seen, _) = changes(&mut a100, 1).await;
    assert_eq!(seen[0].labels.get("env").map(String::as_str), Some("prod"));
    no_change_within(&mut team_a, Duration::from_millis(500)).await;

    for bad in ["label_selector=team%20in%20(a", "gpu_model=Voodoo", "created_after=yesterday"] {
        let url = format!("{}/v1/resources:watch?{bad}", app.http);
        let response = app.client.get(url).send().await.unwrap();
        assert_eq!(response.status(), 400, "{bad}");
    }
}
