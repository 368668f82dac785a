//! Adversarial tests of WatchResources (issue 16 item 1): concurrent writers on two
//! replicas with watchers that disconnect and resume (and a replica killed mid-stream),
//! a backlog larger than a tick and than the hub's memory, events from the broker,
//! watcher slots freed by vanished clients, connection age, SIGTERM, tokens the service
//! did not issue, and odd requests on the SSE route.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use resource::pb::resource::v1::{
    WatchResourcesRequest, WatchResourcesResponse, resource_service_client::ResourceServiceClient,
};
use serde_json::{Value, json};
use test_support::{Env, Service, base_url};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Streaming;

use crate::{
    helpers::{BIN, TestApp, admin_url, amqp_url, grpc_endpoint, repo_path},
    watch::{SseReader, app, spec},
};

const DELIVERY: Duration = Duration::from_secs(15);

async fn create(client: &reqwest::Client, http: &str, user: &str, name: &str) -> i64 {
    let body = json!({"name": name, "user_id": user, "spec": spec()});
    let response = client.post(format!("{http}/v1/resources")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200, "create: {}", response.text().await.unwrap());
    let body: Value = response.json().await.unwrap();
    body["instance_id"].as_str().unwrap().parse().unwrap()
}

/// The words of a resume token: version | epoch | tick | seq | check.
fn words(token: &str) -> [i64; 3] {
    let raw = URL_SAFE_NO_PAD.decode(token).expect("a base64url token");
    assert_eq!(raw.len(), 29, "{token}");
    let word = |at: usize| i64::from_be_bytes(raw[at..at + 8].try_into().unwrap());
    [word(1), word(9), word(17)]
}

/// (tick, seq) of a resume token.
fn position(token: &str) -> (i64, i64) {
    let [_, tick, seq] = words(token);
    (tick, seq)
}

fn direct_url(app: &TestApp) -> String {
    let name = app.pool.connect_options().get_database().unwrap().to_owned();
    test_support::database_url(&admin_url(), &name)
}

/// A process of the service on `app`'s database this test controls fully (both
/// addresses, SIGKILL, SIGTERM), with the broker consumer off.
struct Proc {
    http: String,
    grpc: String,
    service: Service,
    env: Env,
    conf: tempfile::TempDir,
}

impl Proc {
    async fn start(app: &TestApp, extra: &[(&str, &str)]) -> Self {
        let conf = tempfile::tempdir().unwrap();
        std::fs::copy(repo_path("configs/config.yaml"), conf.path().join("config.yaml")).unwrap();
        let mut env = Env::new(&direct_url(app)).with_broker(&amqp_url(), &app.mq);
        env.set("RESOURCE_DATA__RABBITMQ__CONSUME", "false")
            .set("RESOURCE_LOG__LEVEL", "info,resource=debug");
        env.extend(extra.iter().copied());
        let (service, http, grpc) = Self::launch(&env, conf.path()).await;
        Self { http, grpc, service, env, conf }
    }

    async fn launch(env: &Env, conf: &Path) -> (Service, String, String) {
        let echo = std::env::var("TEST_LOG").is_ok_and(|v| v == "1");
        let mut service = Service::spawn(Path::new(BIN), conf, env, echo);
        let serving = service.wait_for_messages(&["serving"], Duration::from_secs(30)).await;
        (service, base_url(&serving[0], "http"), base_url(&serving[0], "grpc"))
    }

    async fn kill(&mut self) {
        self.service.kill().await;
    }

    async fn restart(&mut self) {
        let (service, http, grpc) = Self::launch(&self.env, self.conf.path()).await;
        self.service = service;
        self.http = http;
        self.grpc = grpc;
    }
}

// ---------------------------------------------------------------------------------------
// Watch clients over both transports.

/// A change seen by a watcher: its position and instance.
type Seen = ((i64, i64), i64);

enum Stream {
    Grpc(Streaming<WatchResourcesResponse>),
    Sse(SseReader),
}

impl Stream {
    async fn grpc(url: &str, token: &str) -> Result<Self, String> {
        let channel = grpc_endpoint(url).connect().await.map_err(|e| e.to_string())?;
        let mut client = ResourceServiceClient::new(channel);
        let req = WatchResourcesRequest { resume_token: token.into(), ..Default::default() };
        let stream = client.watch_resources(req).await.map_err(|e| e.to_string())?.into_inner();
        Ok(Self::Grpc(stream))
    }

    async fn sse(client: &reqwest::Client, http: &str, token: &str) -> Result<Self, String> {
        let response = client
            .get(format!("{http}/v1/resources:watch?resume_token={token}"))
            .timeout(Duration::from_secs(600))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if response.status() != 200 {
            return Err(format!("status {}", response.status()));
        }
        Ok(Self::Sse(SseReader::new(response)))
    }

    /// The next response: (token, instance id of the change, if one).
    async fn next(&mut self, within: Duration) -> Result<(String, Option<i64>), String> {
        match self {
            Stream::Grpc(s) => {
                let got = tokio::time::timeout(within, s.message())
                    .await
                    .map_err(|_| "no response in time".to_owned())?
                    .map_err(|e| format!("stream error: {e}"))?
                    .ok_or_else(|| "the stream ended".to_owned())?;
                Ok((got.resume_token, got.resource.map(|r| r.instance_id)))
            }
            Stream::Sse(s) => {
                let e = s.read(within).await?;
                if e.event == "error" {
                    return Err(format!("error event: {}", e.data));
                }
                let id = e.data["resource"]["instance_id"].as_str().map(|s| s.parse().unwrap());
                if e.event == "message" {
                    assert!(id.is_some(), "a message without a resource: {e:?}");
                }
                Ok((e.id, id))
            }
        }
    }
}

/// The changes in the log after `from`, in position order.
async fn log_after(app: &TestApp, from: (i64, i64)) -> Vec<Seen> {
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT tick, seq, instance_id FROM instance_changes \
         WHERE tick IS NOT NULL AND (tick, seq) > ($1, $2) ORDER BY tick, seq",
    )
    .bind(from.0)
    .bind(from.1)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    rows.into_iter().map(|(t, s, i)| ((t, s), i)).collect()
}

async fn wait_all_placed(app: &TestApp) {
    let deadline = tokio::time::Instant::now() + DELIVERY;
    loop {
        let unplaced: i64 =
            sqlx::query_scalar("SELECT count(*) FROM instance_changes WHERE tick IS NULL")
                .fetch_one(&app.pool)
                .await
                .unwrap();
        if unplaced == 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{unplaced} changes never placed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn first_difference(a: &[Seen], b: &[Seen]) -> String {
    let at = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
    format!(
        "lengths {} vs {}; first difference at {at}: {:?} vs {:?}",
        a.len(),
        b.len(),
        a.get(at.saturating_sub(1)..(at + 3).min(a.len())),
        b.get(at.saturating_sub(1)..(at + 3).min(b.len()))
    )
}

// ---------------------------------------------------------------------------------------
// 1. Concurrent writers through two replicas, resuming watchers, a replica killed.

/// Where a watcher connects: (gRPC url, REST url) of the app and of the replica.
#[derive(Clone)]
struct Endpoints {
    app: (String, String),
    replica: Arc<Mutex<Option<(String, String)>>>,
}

/// Follows from `token`, collecting every change, until `stop` and nothing more came
/// for a while; reconnects (on another endpoint, another transport) after each error,
/// and every `resume_every` changes when it is set.
async fn follower(
    name: &'static str,
    ends: Endpoints,
    client: reqwest::Client,
    token: String,
    resume_every: Option<usize>,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<Seen> {
    let mut token = token;
    let mut seen = Vec::new();
    let mut attempt = 0usize;
    'outer: loop {
        attempt += 1;
        let replica = ends.replica.lock().unwrap().clone();
        let (grpc, http) = match (&replica, attempt % 2) {
            (Some(r), 0) => r.clone(),
            _ => ends.app.clone(),
        };
        let opened = if attempt.is_multiple_of(3) {
            Stream::sse(&client, &http, &token).await
        } else {
            Stream::grpc(&grpc, &token).await
        };
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{name}: cannot open ({e}); again");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (mut since_open, mut responses) = (0usize, 0usize);
        loop {
            let within =
                if stop.is_cancelled() { Duration::from_secs(3) } else { Duration::from_secs(20) };
            match stream.next(within).await {
                Ok((t, change)) => {
                    responses += 1;
                    let p = position(&t);
                    let beat = change.is_none();
                    if let Some(id) = change {
                        seen.push((p, id));
                        since_open += 1;
                    }
                    token = t;
                    // A heartbeat after a silence, once the writers are done: caught up.
                    if beat && responses > 1 && stop.is_cancelled() {
                        break 'outer;
                    }
                    if resume_every.is_some_and(|n| since_open >= n) {
                        continue 'outer;
                    }
                }
                Err(e) if stop.is_cancelled() && e == "no response in time" => break 'outer,
                Err(e) if stop.is_cancelled() && e == "no event in time" => break 'outer,
                Err(e) => {
                    eprintln!("{name}: {e}; resuming from the last token");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue 'outer;
                }
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_writers_two_replicas_a_killed_replica_and_resuming_watchers_see_exactly_the_log() {
    let app = app(&[("RESOURCE_WATCH__HEARTBEAT", "1s")]).await;
    let mut replica = Proc::start(&app, &[("RESOURCE_WATCH__HEARTBEAT", "1s")]).await;
    let client = app.client.clone();
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(create(&client, &app.http, "u1", &format!("w{i}")).await);
    }
    // The starting token, shared by every watcher.
    let mut first = Stream::grpc(&app.grpc, "").await.unwrap();
    let (start, _) = first.next(DELIVERY).await.unwrap();
    drop(first);
    let from = position(&start);

    let ends = Endpoints {
        app: (app.grpc.clone(), app.http.clone()),
        replica: Arc::new(Mutex::new(Some((replica.grpc.clone(), replica.http.clone())))),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let watchers: Vec<_> = [("steady", None), ("resumer-7", Some(7)), ("resumer-31", Some(31))]
        .into_iter()
        .map(|(name, every)| {
            tokio::spawn(follower(
                name,
                ends.clone(),
                client.clone(),
                start.clone(),
                every,
                stop.clone(),
            ))
        })
        .collect();

    // 16 writers x 40 stops and starts over 6 instances, through both replicas; refusals
    // (conflicts, illegal moves) and a dead replica are expected.
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let (client, ids, ends) = (client.clone(), ids.clone(), ends.clone());
            tokio::spawn(async move {
                for n in 0..40usize {
                    let id = ids[(w + n) % ids.len()];
                    let verb = if n % 2 == 0 { "stop" } else { "start" };
                    let replica = ends.replica.lock().unwrap().clone();
                    let http = match (replica, (n / 2) % 2) {
                        (Some((_, http)), 0) => http,
                        _ => ends.app.1.clone(),
                    };
                    let _ = client.post(format!("{http}/v1/resources/{id}:{verb}")).send().await;
                }
            })
        })
        .collect();
    // Mid-stream: the replica is killed -9, and comes back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    *ends.replica.lock().unwrap() = None;
    replica.kill().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    replica.restart().await;
    *ends.replica.lock().unwrap() = Some((replica.grpc.clone(), replica.http.clone()));
    for w in writers {
        w.await.unwrap();
    }
    wait_all_placed(&app).await;
    let expected = log_after(&app, from).await;
    assert!(expected.len() > 100, "the writers made only {} changes", expected.len());
    eprintln!("the writers made {} changes", expected.len());
    // Let the watchers catch up, then stop them after a silence.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    for (w, name) in watchers.into_iter().zip(["steady", "resumer-7", "resumer-31"]) {
        let seen = tokio::time::timeout(Duration::from_secs(60), w).await.unwrap().unwrap();
        assert!(
            seen == expected,
            "{name}: not exactly the log: {}",
            first_difference(&seen, &expected)
        );
    }
}

// ---------------------------------------------------------------------------------------
// 2. A backlog: more than a tick places, more than the hub keeps.

/// Appends `n` unplaced changes of `id` to the log (as one late transaction would),
/// copying its last logged state.
async fn append_backlog(app: &TestApp, id: i64, n: i64) {
    sqlx::query(
        "INSERT INTO instance_changes (instance_id, version, state) \
         SELECT c.instance_id, c.version + g, jsonb_set(c.state, '{version}', to_jsonb(c.version + g)) \
         FROM (SELECT * FROM instance_changes WHERE instance_id = $1 ORDER BY seq DESC LIMIT 1) c, \
         generate_series(1, $2) g ORDER BY g",
    )
    .bind(id)
    .bind(n)
    .execute(&app.pool)
    .await
    .unwrap();
}

async fn collect_changes(stream: &mut Stream, n: usize, within: Duration) -> Vec<Seen> {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = Vec::new();
    while seen.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match stream.next(left.max(Duration::from_millis(1))).await {
            Ok((t, Some(id))) => seen.push((position(&t), id)),
            Ok((_, None)) => {}
            Err(e) => panic!("after {} of {n} changes: {e}", seen.len()),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_of_25000_changes_reaches_live_resumed_and_other_replica_watchers_whole() {
    let app = app(&[]).await;
    let replica = Proc::start(&app, &[]).await;
    let id = create(&app.client, &app.http, "u1", "backlog").await;
    let mut live = Stream::grpc(&app.grpc, "").await.unwrap();
    let (start, _) = live.next(DELIVERY).await.unwrap();
    let mut on_replica = Stream::grpc(&replica.grpc, "").await.unwrap();
    on_replica.next(DELIVERY).await.unwrap();
    let from = position(&start);

    append_backlog(&app, id, 25_000).await;
    // Wake the ticker with one ordinary change.
    let after = create(&app.client, &app.http, "u1", "after").await;
    wait_all_placed(&app).await;
    let expected = log_after(&app, from).await;
    assert_eq!(expected.len(), 25_001);
    assert_eq!(expected.last().unwrap().1, after);

    let got = collect_changes(&mut live, expected.len(), Duration::from_secs(60)).await;
    assert!(got == expected, "live: {}", first_difference(&got, &expected));
    let got = collect_changes(&mut on_replica, expected.len(), Duration::from_secs(60)).await;
    assert!(got == expected, "other replica: {}", first_difference(&got, &expected));
    let mut resumed = Stream::grpc(&app.grpc, &start).await.unwrap();
    let got = collect_changes(&mut resumed, expected.len(), Duration::from_secs(60)).await;
    assert!(got == expected, "resumed: {}", first_difference(&got, &expected));
    let mut sse = Stream::sse(&app.client, &replica.http, &start).await.unwrap();
    let got = collect_changes(&mut sse, expected.len(), Duration::from_secs(120)).await;
    assert!(got == expected, "SSE on the other replica: {}", first_difference(&got, &expected));
}

// ---------------------------------------------------------------------------------------
// 3. Events from the broker.

#[tokio::test]
async fn every_audited_change_of_broker_events_reaches_the_watcher() {
    use resource::pb::mq::v1::EventType;

    use crate::mq::{Broker, created, event, routing_key};
    let app = app(&[]).await;
    let mut stream = Stream::grpc(&app.grpc, "").await.unwrap();
    let (start, _) = stream.next(DELIVERY).await.unwrap();
    let broker = Broker::connect().await;
    let ids: Vec<i64> = (0..20).map(|i| 9_100_000 + i).collect();
    let mut messages = Vec::new();
    for &id in &ids {
        for e in [
            created(id),
            event(EventType::InstanceStopped, id, 1_705_478_500),
            event(EventType::InstanceStarted, id, 1_705_478_600),
            event(EventType::InstanceStopped, id, 1_705_478_700),
        ] {
            use prost::Message;
            messages.push((routing_key(&e), e.encode_to_vec(), lapin::BasicProperties::default()));
        }
    }
    broker.publish_all(&app.mq.exchange, messages, Duration::from_secs(10)).await;
    // Wait for every instance to be STOPPED at version 4 or more.
    let deadline = tokio::time::Instant::now() + DELIVERY;
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM instances WHERE instance_id = ANY($1) AND status = 'STOPPED'",
        )
        .bind(&ids)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if done == ids.len() as i64 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {done} instances got stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What the audit trail says happened: every version each instance went through.
    let audited: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT instance_id, (after->>'version')::bigint FROM audit_logs \
         WHERE instance_id = ANY($1) AND outcome = 'ok' AND after IS NOT NULL ORDER BY id",
    )
    .bind(&ids)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let mut want: BTreeMap<i64, usize> = BTreeMap::new();
    for (id, _) in &audited {
        *want.entry(*id).or_default() += 1;
    }
    let total: usize = want.values().sum();
    assert!(total >= ids.len() * 4, "audited {total}: {audited:?}");
    let mut got: BTreeMap<i64, usize> = BTreeMap::new();
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while seen < total {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match stream.next(left.max(Duration::from_millis(1))).await {
            Ok((_, Some(id))) => {
                *got.entry(id).or_default() += 1;
                seen += 1;
            }
            Ok((_, None)) => {}
            Err(_) => break,
        }
    }
    let logged: i64 =
        sqlx::query_scalar("SELECT count(*) FROM instance_changes WHERE instance_id = ANY($1)")
            .bind(&ids)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        got, want,
        "changes watched per instance vs changes audited (the log holds {logged} of {total} \
         audited versions; watch started at {start})"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Watcher slots.

/// A raw HTTP/1.1 SSE request; the socket once the first event arrived.
async fn raw_sse(http: &str) -> tokio::net::TcpStream {
    try_raw_sse(http).await.expect("the watch is served")
}

async fn watch_status(app: &TestApp) -> u16 {
    let response = app
        .client
        .get(format!("{}/v1/resources:watch", app.http))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

/// Waits up to `within` for a watch to be allowed again; how long it took.
async fn freed_within(app: &TestApp, within: Duration) -> Option<Duration> {
    let started = tokio::time::Instant::now();
    while started.elapsed() < within {
        if watch_status(app).await == 200 {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test]
async fn an_sse_client_that_closes_its_connection_frees_its_watcher_slot_within_two_heartbeats() {
    // HTTP/1 tells a server of a closed socket only when a write fails: the heartbeat
    // bounds how long the slot is held (README, "Watching changes").
    let app =
        app(&[("RESOURCE_WATCH__MAX_WATCHERS", "1"), ("RESOURCE_WATCH__HEARTBEAT", "1s")]).await;
    for round in 0..6 {
        let mut socket = None;
        let started = tokio::time::Instant::now();
        while socket.is_none() {
            socket = try_raw_sse(&app.http).await;
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "round {round}: the slot of the connection closed before was still held 5 s later \
                 (two heartbeats are 2 s)"
            );
        }
        let socket = socket.unwrap();
        assert!(try_raw_sse(&app.http).await.is_none(), "round {round}: a second watch is refused");
        if round % 2 == 1 {
            #[allow(deprecated)]
            socket.set_linger(Some(Duration::ZERO)).unwrap(); // RST
        }
        drop(socket);
    }
}

/// [`raw_sse`], or `None` when refused.
async fn try_raw_sse(http: &str) -> Option<tokio::net::TcpStream> {
    let addr = http.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(format!("GET /v1/resources:watch HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // A refusal is whole once its headers are (its body is not waited for: the connection
    // stays open); a watch once its first event is.
    loop {
        let text = String::from_utf8_lossy(&got);
        let refused = text.contains("\r\n\r\n") && !text.starts_with("HTTP/1.1 200");
        if refused || text.contains("\n\n") {
            break;
        }
        let n = tokio::time::timeout(DELIVERY, socket.read(&mut buf)).await.unwrap().unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    if String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200") {
        Some(socket)
    } else {
        tokio::time::sleep(Duration::from_millis(100)).await;
        None
    }
}

#[tokio::test]
async fn a_grpc_client_whose_connection_drops_frees_its_watcher_slot() {
    use crate::proxy::Proxy;
    let app =
        app(&[("RESOURCE_WATCH__MAX_WATCHERS", "1"), ("RESOURCE_WATCH__HEARTBEAT", "30s")]).await;
    let target = app.grpc.trim_start_matches("http://").parse().unwrap();
    let proxy = Proxy::start(target).await;
    let mut stream = Stream::grpc(&format!("http://{}", proxy.addr), "").await.unwrap();
    stream.next(DELIVERY).await.unwrap();
    assert_eq!(watch_status(&app).await, 503);
    proxy.cut();
    let freed = freed_within(&app, Duration::from_secs(5)).await;
    assert!(freed.is_some(), "the slot of a dropped gRPC connection was still held 5 s later");
    drop(stream);
}

// ---------------------------------------------------------------------------------------
// 5. Connection age and shutdown.

#[tokio::test]
async fn a_grpc_watch_ends_with_unavailable_when_its_connection_reaches_max_connection_age() {
    let app = app(&[
        ("RESOURCE_SERVER__GRPC__MAX_CONNECTION_AGE", "2s"),
        ("RESOURCE_WATCH__HEARTBEAT", "300ms"),
    ])
    .await;
    let mut stream = Stream::grpc(&app.grpc, "").await.unwrap();
    let started = tokio::time::Instant::now();
    let ended = loop {
        match stream.next(Duration::from_secs(5)).await {
            Ok(_) if started.elapsed() < Duration::from_secs(15) => {}
            Ok(_) => break None,
            Err(e) => break Some(e),
        }
    };
    let ended = ended.expect("the stream still went on 15 s after a 2 s max_connection_age");
    assert!(ended.contains("Unavailable") || ended.contains("unavailable"), "{ended}");
    // The server is fine afterwards.
    let mut again = Stream::grpc(&app.grpc, "").await.unwrap();
    again.next(DELIVERY).await.unwrap();
}

#[tokio::test]
async fn sigterm_ends_open_watch_streams_and_the_process_exits_promptly() {
    let mut app = app(&[("RESOURCE_WATCH__HEARTBEAT", "30s")]).await;
    let mut grpc = Stream::grpc(&app.grpc, "").await.unwrap();
    grpc.next(DELIVERY).await.unwrap();
    let mut sse = Stream::sse(&app.client, &app.http, "").await.unwrap();
    sse.next(DELIVERY).await.unwrap();
    let _raw = raw_sse(&app.http).await; // a client that never reads again
    let started = tokio::time::Instant::now();
    let (status, g, s) = tokio::join!(
        app.terminate(),
        grpc.next(Duration::from_secs(15)),
        sse.next(Duration::from_secs(15))
    );
    assert!(started.elapsed() < Duration::from_secs(5), "exit took {:?}", started.elapsed());
    assert!(status.success(), "{status:?}");
    let g = g.expect_err("the gRPC stream ends");
    assert!(g.to_lowercase().contains("unavailable") || g.contains("ended"), "gRPC: {g}");
    assert!(s.is_err(), "the SSE stream ends: {s:?}");
}

#[tokio::test]
async fn an_idle_sse_stream_outlives_the_connection_timeouts() {
    // header_read_timeout and first_byte_timeout are 10 s; the default heartbeat is 15 s.
    let app = app(&[]).await;
    let mut sse = Stream::sse(&app.client, &app.http, "").await.unwrap();
    sse.next(DELIVERY).await.unwrap();
    let beat = sse.next(Duration::from_secs(20)).await;
    assert!(beat.is_ok(), "an idle stream died before its first heartbeat: {beat:?}");
    let id = create(&app.client, &app.http, "u1", "after-idle").await;
    let (_, change) = sse.next(DELIVERY).await.unwrap();
    assert_eq!(change, Some(id));
}

/// A well-formed token for `position` in the log of `like`, as the service encodes one.
fn forge(like: &str, position: (i64, i64)) -> String {
    let mut buf = vec![0x58u8];
    buf.extend_from_slice(&words(like)[0].to_be_bytes());
    buf.extend_from_slice(&position.0.to_be_bytes());
    buf.extend_from_slice(&position.1.to_be_bytes());
    let h = buf
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    buf.extend_from_slice(&((h >> 32) as u32).to_be_bytes());
    URL_SAFE_NO_PAD.encode(buf)
}

// ---------------------------------------------------------------------------------------
// 6. Tokens and requests the service did not issue.

#[tokio::test]
async fn a_token_from_another_deployment_is_refused() {
    let (a, b) = tokio::join!(app(&[]), app(&[]));
    let mut on_a = Stream::grpc(&a.grpc, "").await.unwrap();
    on_a.next(DELIVERY).await.unwrap();
    create(&a.client, &a.http, "u1", "a1").await;
    let (token_of_a, _) = on_a.next(DELIVERY).await.unwrap();
    for i in 0..3 {
        create(&b.client, &b.http, "u1", &format!("b{i}")).await;
    }
    wait_all_placed(&b).await;
    let response = b
        .client
        .get(format!("{}/v1/resources:watch?resume_token={token_of_a}", b.http))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        410,
        "a token issued by another deployment (tick {:?}) was taken as a position in this log",
        position(&token_of_a)
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["reason"], "RESUME_TOKEN_EXPIRED", "{body}");
}

#[tokio::test]
async fn a_change_logged_before_labels_existed_still_reaches_a_resumed_watcher() {
    // The log of a release without labels (0012 before 0011) holds states without them.
    let app = app(&[]).await;
    let mut stream = Stream::grpc(&app.grpc, "").await.unwrap();
    let (start, _) = stream.next(DELIVERY).await.unwrap();
    let id = create(&app.client, &app.http, "u1", "old-row").await;
    wait_all_placed(&app).await;
    drop(stream);
    sqlx::query("UPDATE instance_changes SET state = state - 'labels' WHERE instance_id = $1")
        .bind(id)
        .execute(&app.pool)
        .await
        .unwrap();
    let mut resumed = Stream::grpc(&app.grpc, &start).await.unwrap();
    resumed.next(DELIVERY).await.unwrap(); // the starting heartbeat
    let got = resumed.next(DELIVERY).await;
    assert_eq!(got.map(|(_, id)| id), Ok(Some(id)));
}

#[tokio::test]
async fn odd_requests_on_the_watch_route_get_clean_errors() {
    let app = app(&[]).await;
    let url = format!("{}/v1/resources:watch", app.http);
    let c = &app.client;
    let post = c.post(&url).send().await.unwrap();
    assert_eq!(post.status(), 405, "POST");
    let mut s = Stream::grpc(&app.grpc, "").await.unwrap();
    let (now, _) = s.next(DELIVERY).await.unwrap();
    let (tick, _) = position(&now);
    assert_eq!(forge(&now, position(&now)), now, "forging matches the service");
    // A token from the future (well-formed, past the head: a restored database) is 410,
    // so the client lists again.
    let r = c
        .get(format!("{url}?resume_token={}", forge(&now, (tick + 1000, 0))))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410, "a token from the future");
    // Far beyond i64 ranges of seq at the head: accepted (it names the end of the head tick).
    let r = c
        .get(format!("{url}?resume_token={}", forge(&now, (tick, i64::MAX))))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the end of the head tick");
    drop(r);
    // Huge and malformed tokens are 400, never 500 (or a hang).
    for token in ["x".repeat(60_000), "%00%FF".into(), "V0AAAAAAAAAA".into(), now.to_lowercase()] {
        let r = c
            .get(format!("{url}?resume_token={token}"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap();
        assert!(
            r.status() == 400 || r.status() == 414 || r.status() == 431,
            "token {}…: {}",
            &token[..token.len().min(16)],
            r.status()
        );
    }
    // A bad Last-Event-ID is refused; a good resume_token query wins over it.
    let r = c
        .get(&url)
        .header("Last-Event-ID", "garbage")
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "bad Last-Event-ID");
    let r = c
        .get(format!("{url}?resume_token={now}"))
        .header("Last-Event-ID", "garbage")
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the query token wins");
    drop(r);
    // HEAD: no hang.
    let r = c.head(&url).timeout(Duration::from_secs(5)).send().await;
    assert!(r.is_ok(), "HEAD hung: {r:?}");
    assert!(tick >= 0);
}

// ---------------------------------------------------------------------------------------
// 7. A burst of watches opening while changes flow.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_500_watches_opening_while_changes_flow_all_open_and_all_see_the_next_change() {
    let app = app(&[]).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (client, http, stop) = (app.client.clone(), app.http.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut n, mut failed) = (0, Vec::new());
                while !stop.is_cancelled() {
                    let body =
                        json!({"name": format!("flow-{w}-{n}"), "user_id": "u1", "spec": spec()});
                    let r = client.post(format!("{http}/v1/resources")).json(&body).send().await;
                    match r {
                        Ok(r) if r.status() == 200 => {}
                        Ok(r) => failed.push(r.status().as_u16()),
                        Err(_) => failed.push(0),
                    }
                    n += 1;
                }
                (n, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut channels = Vec::new();
    for _ in 0..5 {
        channels.push(grpc_endpoint(&app.grpc).connect().await.unwrap());
    }
    let opens: Vec<_> = (0..500)
        .map(|i| {
            let channel = channels[i % channels.len()].clone();
            tokio::spawn(async move {
                let mut client = ResourceServiceClient::new(channel);
                let req = WatchResourcesRequest { name: "marker".into(), ..Default::default() };
                client.watch_resources(req).await.map(tonic::Response::into_inner)
            })
        })
        .collect();
    let mut streams = Vec::new();
    let mut refused = BTreeMap::new();
    for o in opens {
        match o.await.unwrap() {
            Ok(s) => streams.push(s),
            Err(e) => *refused.entry(format!("{:?}: {}", e.code(), e.message())).or_insert(0) += 1,
        }
    }
    stop.cancel();
    let (mut writes, mut failed) = (0, Vec::new());
    for w in writers {
        let (n, f) = w.await.unwrap();
        writes += n;
        failed.extend(f);
    }
    assert!(
        refused.is_empty() && failed.is_empty(),
        "{} of 500 watches refused: {refused:?}; meanwhile {} of {writes} creates failed: {failed:?}",
        refused.values().sum::<i32>(),
        failed.len()
    );
    let marker = create(&app.client, &app.http, "u1", "marker").await;
    for (n, s) in streams.iter_mut().enumerate() {
        loop {
            let got = tokio::time::timeout(DELIVERY, s.message()).await.unwrap().unwrap().unwrap();
            if let Some(r) = got.resource {
                assert_eq!(r.instance_id, marker, "watch {n}");
                break;
            }
        }
    }
}

#[tokio::test]
async fn http1_on_the_grpc_port_is_not_served() {
    // gRPC over HTTP/1 would lose its trailers and, for a watch, its pings.
    let app = app(&[]).await;
    let addr = app.grpc.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /resource.v1.resourceService/WatchResources HTTP/1.1\r\nHost: {addr}\r\n\
         content-type: application/grpc\r\ncontent-length: 5\r\n\r\n\0\0\0\0\0"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection was neither answered nor closed");
    assert!(
        !String::from_utf8_lossy(&got).starts_with("HTTP/1"),
        "answered over HTTP/1: {}",
        String::from_utf8_lossy(&got)
    );
}
