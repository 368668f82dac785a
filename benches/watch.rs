//! WatchResources fan-out: 1,000 gRPC watchers while instances change at a steady rate
//! through REST; the delay from commit to delivery per change per watcher (target: p99
//! under 1 s), and that every watcher gets every change exactly once. Beside it, in the
//! same run and on the same database, the pipeline it is bounded by: a bare sqlx client
//! committing `INSERT ...; SELECT pg_notify(...)` at the same rate while one `PgListener`
//! receives them.
//!
//! The commit instant is not visible to a client, so both measure from an upper bound of
//! it: the instant the request was sent. A delay thus includes the request's own latency.
//! A change is told apart by its instance and `updated_at` (which the REST answer returns
//! too), and its status is checked against the one the request asked for.
//!
//! `make bench` runs it. Environment: `BENCH_WATCHERS` (default 1,000),
//! `BENCH_STREAMS_PER_CONNECTION` (default 100, at most `server.connections.max_streams`),
//! `BENCH_SECONDS` of changes (default 10), `BENCH_CHANGE_RATE` per second (default 100),
//! `BENCH_CHANGE_CLIENTS` (default 4), `BENCH_DATABASE_URL`, `BENCH_AMQP_URL`,
//! `BENCH_SERVICE_LOG`. The database `resource_bench_watch` is created afresh each run.

mod common;

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Run, env_or, rss_kib};
use resource::pb::resource::v1::{
    Resource, Status, WatchResourcesRequest, WatchResourcesResponse,
    resource_service_client::ResourceServiceClient,
};
use serde_json::json;
use sqlx::{Executor, postgres::PgListener};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::{Streaming, transport::Channel};

/// How long opening every watch, and delivering the last change, may take.
const PATIENCE: Duration = Duration::from_secs(60);
/// One create in this many changes; the others stop or start an instance made before.
const CREATE_EVERY: usize = 4;

struct Settings {
    watchers: usize,
    per_connection: usize,
    seconds: u64,
    rate: f64,
    clients: usize,
}

impl Settings {
    fn changes(&self) -> usize {
        (self.rate * self.seconds as f64).round() as usize
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let s = Settings {
        watchers: env_or("BENCH_WATCHERS", 1000).max(1),
        per_connection: env_or("BENCH_STREAMS_PER_CONNECTION", 100).max(1),
        seconds: env_or("BENCH_SECONDS", 10).max(1),
        rate: env_or("BENCH_CHANGE_RATE", 100.0_f64).max(0.1),
        clients: env_or("BENCH_CHANGE_CLIENTS", 4).max(1),
    };
    let max_streams = common::max_streams() as usize;
    assert!(
        s.per_connection <= max_streams,
        "BENCH_STREAMS_PER_CONNECTION {} exceeds server.connections.max_streams {max_streams}",
        s.per_connection
    );
    let connections = s.watchers.div_ceil(s.per_connection);
    println!(
        "\n== WatchResources: {} gRPC watchers over {connections} HTTP/2 connections \
         (max_streams {max_streams}), {} changes/s through REST from {} clients for {} s ==",
        s.watchers, s.rate, s.clients, s.seconds
    );

    let run = Run::new("resource_bench_watch", &Run::suffix()).await;
    let reference = reference(&s, &run.db_url).await;
    let service = service_run(&s, &run, connections).await;
    run.finish().await;

    let (svc, rf) = (&service.delays, &reference.delays);
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9} {:>12}",
        "", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "deliveries/s"
    );
    println!(
        "{:<44} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>12.0}",
        "reference: INSERT + pg_notify -> PgListener",
        rf.p50,
        rf.p99,
        rf.p999,
        rf.max,
        reference.rate
    );
    println!(
        "{:<44} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>12.0}",
        format!("service: REST change -> {} watchers", service.watchers),
        svc.p50,
        svc.p99,
        svc.p999,
        svc.max,
        service.rate
    );
    println!(
        "target: p99 under 1 s: {} (p99 {:.2} ms; {:.1}x the reference's p99 of {:.2} ms)",
        if svc.p99 < 1000.0 { "met" } else { "MISSED" },
        svc.p99,
        svc.p99 / rf.p99,
        rf.p99
    );
    println!(
        "reference: {} of {} notifications received, {} missing, {} duplicate",
        reference.received, reference.sent, reference.missing, reference.duplicates
    );
    println!(
        "service: {} changes made ({} creates, {} stops/starts; REST p50 {:.2} ms, p99 \
         {:.2} ms, {} errors), {} deliveries of {} expected; missing {}, duplicate {}, \
         unknown {}, wrong status {}, out of order {}; stream errors {}",
        service.made,
        service.creates,
        service.made - service.creates,
        service.rest.p50,
        service.rest.p99,
        service.rest_errors,
        service.delivered,
        service.made * service.watchers,
        service.missing,
        service.duplicates,
        service.unknown,
        service.wrong_status,
        service.out_of_order,
        service.stream_errors.len()
    );
    println!(
        "opening {} watches at once: first heartbeats p50 {:.1} ms, max {:.1} ms; {} \
         refused",
        s.watchers, service.open.p50, service.open.max, service.open_errors
    );
    println!(
        "service process: resident memory {:.1} MB before the watches, {:.1} MB with them, \
         peak {:.1} MB; CPU {:.0}% of one core while changes flowed",
        service.rss_idle as f64 / 1024.0,
        service.rss_open as f64 / 1024.0,
        service.rss_peak as f64 / 1024.0,
        service.cpu_percent
    );
    for e in service.stream_errors.iter().take(5) {
        println!("stream error: {e}");
    }
    if let Some(e) = &service.first_rest_error {
        println!("first REST error: {e}");
    }

    let exact = service.missing == 0
        && service.duplicates == 0
        && service.unknown == 0
        && service.wrong_status == 0
        && service.out_of_order == 0
        && service.stream_errors.is_empty()
        && service.open_errors == 0
        && service.rest_errors == 0;
    assert!(exact, "not every watcher got every change exactly once, in order (see above)");
    assert!(
        reference.missing == 0 && reference.duplicates == 0,
        "the reference lost or repeated notifications"
    );
}

/// Percentiles of delays, in milliseconds.
#[derive(Debug, Default, Clone, Copy)]
struct Pcts {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// Percentiles of `micros` (sorted here).
fn pcts(micros: &mut [u32]) -> Pcts {
    if micros.is_empty() {
        return Pcts::default();
    }
    micros.sort_unstable();
    let at = |p: f64| {
        let i = ((micros.len() as f64 * p).ceil() as usize).clamp(1, micros.len()) - 1;
        f64::from(micros[i]) / 1e3
    };
    Pcts { p50: at(0.50), p99: at(0.99), p999: at(0.999), max: at(1.0) }
}

/// Microseconds since `epoch`.
fn micros(epoch: Instant) -> u32 {
    u32::try_from(epoch.elapsed().as_micros()).unwrap_or(u32::MAX)
}

/// Calls `make(i)` for i in 0..`count` at `rate` per second from now on, each as a task
/// of its own, so that a slow one does not hold back the next (an open loop); waits for
/// them all.
async fn paced<F, Fut>(rate: f64, count: usize, mut make: F)
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let start = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut tasks = JoinSet::new();
    for i in 0..count {
        tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
        tasks.spawn(make(i));
        while tasks.try_join_next().is_some() {}
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a paced task");
    }
}

// ---------------------------------------------------------------------------------------
// The reference: the database alone.

struct Reference {
    delays: Pcts,
    sent: usize,
    received: usize,
    missing: usize,
    duplicates: usize,
    rate: f64,
}

/// At `s.rate` for `s.seconds`, from `s.clients` connections, commits one row and a
/// `pg_notify` per transaction while one listener receives them; send -> receive delays.
async fn reference(s: &Settings, url: &str) -> Reference {
    let count = s.changes();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(s.clients as u32)
        .min_connections(s.clients as u32)
        .connect(url)
        .await
        .expect("connect the bench database");
    pool.execute(
        "CREATE TABLE bench_ref (n bigint PRIMARY KEY, state jsonb NOT NULL, \
         at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .unwrap();
    // Every connection opened before the clock starts.
    let mut held = Vec::new();
    for _ in 0..s.clients {
        held.push(pool.acquire().await.unwrap());
    }
    drop(held);

    let mut listener = PgListener::connect(url).await.unwrap();
    listener.listen("bench_ref").await.unwrap();
    let epoch = Instant::now();
    let sent: Arc<Vec<AtomicU32>> = Arc::new((0..count).map(|_| AtomicU32::new(0)).collect());
    let stop = CancellationToken::new();
    let receiver = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut got: Vec<(usize, u32)> = Vec::with_capacity(count);
            loop {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    heard = listener.recv() => {
                        let n = heard.expect("the listener receives");
                        let at = micros(epoch);
                        got.push((n.payload().parse().expect("a number"), at));
                    }
                }
            }
            got
        }
    });

    let state = json!({"name": "bench", "user_id": "bench", "status": "RUNNING",
        "spec": {"cpu": 1, "memory": 64, "image": "nginx:1.25"}})
    .to_string();
    let first = micros(epoch);
    paced(s.rate, count, |i| {
        let (pool, sent, state) = (pool.clone(), sent.clone(), state.clone());
        async move {
            sent[i].store(micros(epoch), Ordering::Relaxed);
            // One round trip, one implicit transaction: the row, then the announcement.
            let sql = format!(
                "INSERT INTO bench_ref (n, state) VALUES ({i}, '{state}'); \
                 SELECT pg_notify('bench_ref', '{i}')"
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&pool).await.expect("commit");
        }
    })
    .await;
    let expected: i64 =
        sqlx::query_scalar("SELECT count(*) FROM bench_ref").fetch_one(&pool).await.unwrap();
    assert_eq!(expected as usize, count);
    // Give the last notifications time to arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let got = receiver.await.unwrap();
    pool.execute("DROP TABLE bench_ref").await.unwrap();
    pool.close().await;

    let mut seen = vec![0u32; count];
    let mut delays = Vec::with_capacity(count);
    let mut last = first;
    for (n, at) in &got {
        seen[*n] += 1;
        if seen[*n] == 1 {
            delays.push(at.saturating_sub(sent[*n].load(Ordering::Relaxed)));
            last = last.max(*at);
        }
    }
    let missing = seen.iter().filter(|c| **c == 0).count();
    let duplicates = seen.iter().map(|c| c.saturating_sub(1) as usize).sum();
    Reference {
        delays: pcts(&mut delays),
        sent: count,
        received: got.len(),
        missing,
        duplicates,
        rate: (count - missing) as f64 / (f64::from(last - first) / 1e6).max(1e-9),
    }
}

// ---------------------------------------------------------------------------------------
// The service.

/// One change made through REST, as its answer gave it.
struct Made {
    id: i64,
    updated_ns: i64,
    status: i32,
    sent_us: u32,
}

/// One change as a watcher received it.
struct Delivery {
    id: i64,
    updated_ns: i64,
    status: i32,
    at_us: u32,
}

struct ServiceRun {
    watchers: usize,
    delays: Pcts,
    rest: Pcts,
    rest_errors: usize,
    first_rest_error: Option<String>,
    open: Pcts,
    open_errors: usize,
    made: usize,
    creates: usize,
    delivered: usize,
    rate: f64,
    missing: usize,
    duplicates: usize,
    unknown: usize,
    wrong_status: usize,
    out_of_order: usize,
    stream_errors: Vec<String>,
    rss_idle: u64,
    rss_open: u64,
    rss_peak: u64,
    cpu_percent: f64,
}

fn updated_ns(r: &Resource) -> i64 {
    r.updated_at.as_ref().map_or(0, |t| t.seconds * 1_000_000_000 + i64::from(t.nanos))
}

/// CPU time (user + system) of `pid` so far, in clock ticks (Linux).
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command's closing parenthesis; utime and stime are 14 and 15.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

async fn service_run(s: &Settings, run: &Run, connections: usize) -> ServiceRun {
    let mut env = run.service("warn,resource::server=info");
    // Every watcher on one replica, well under its limit.
    env.set("RESOURCE_WATCH__MAX_WATCHERS", (s.watchers * 2).max(10_000).to_string());
    let (child, logged) = common::start(&env, &["serving"], Run::echo()).await;
    let pid = child.id().expect("running");
    let http = test_support::base_url(&logged[0], "http");
    let grpc = test_support::base_url(&logged[0], "grpc");
    let rss_idle = rss_kib(pid);

    // The watches, spread over `connections` HTTP/2 connections, all opened at once.
    let mut channels = Vec::new();
    for _ in 0..connections {
        let channel = tonic::transport::Endpoint::from_shared(grpc.clone())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("a gRPC connection");
        channels.push(channel);
    }
    let opening = (0..s.watchers).map(|w| open(channels[w % connections].clone()));
    let opened = tokio::time::timeout(PATIENCE, futures::future::join_all(opening))
        .await
        .expect("every watch opens in time");
    let mut open_us = Vec::new();
    let mut streams = Vec::new();
    let mut open_errors = 0;
    let mut stream_errors = Vec::new();
    for o in opened {
        match o {
            Ok((stream, took)) => {
                open_us.push(took);
                streams.push(stream);
            }
            Err(e) => {
                open_errors += 1;
                stream_errors.push(format!("opening: {e}"));
            }
        }
    }
    let watchers = streams.len();
    let rss_open = rss_kib(pid);

    // Every stream read in a task of its own until told to stop.
    let epoch = Instant::now();
    let stop = CancellationToken::new();
    let delivered = Arc::new(AtomicU64::new(0));
    let capacity = s.changes() + 16;
    let mut readers = JoinSet::new();
    for stream in streams {
        readers.spawn(follow(stream, epoch, stop.clone(), delivered.clone(), capacity));
    }

    // The changes, at a steady rate.
    let clients: Vec<reqwest::Client> =
        (0..s.clients).map(|_| test_support::http_client()).collect();
    let made = Arc::new(Mutex::new(Vec::<Made>::with_capacity(s.changes())));
    let rest_us = Arc::new(Mutex::new(Vec::<u32>::with_capacity(s.changes())));
    let idle = Arc::new(Mutex::new(VecDeque::<(i64, bool)>::new()));
    let rest_errors = Arc::new(AtomicUsize::new(0));
    let first_rest_error = Arc::new(Mutex::new(None::<String>));
    let creates = Arc::new(AtomicUsize::new(0));
    let (cpu_before, started) = (cpu_ticks(pid), Instant::now());
    let peak = Arc::new(AtomicU64::new(rss_open));
    let sampler = tokio::spawn({
        let (peak, stop) = (peak.clone(), stop.clone());
        async move {
            while !stop.is_cancelled() {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    paced(s.rate, s.changes(), |i| {
        let client = clients[i % clients.len()].clone();
        let (made, rest_us, idle) = (made.clone(), rest_us.clone(), idle.clone());
        let (errors, first_error, creates) =
            (rest_errors.clone(), first_rest_error.clone(), creates.clone());
        // Stop or start an instance no request is changing, or else make one.
        let target = if i % CREATE_EVERY == 0 { None } else { idle.lock().unwrap().pop_front() };
        let http = http.clone();
        async move {
            let (request, status) = match target {
                None => {
                    creates.fetch_add(1, Ordering::Relaxed);
                    let body = json!({"name": format!("w{i}"), "user_id": format!("u{}", i % 10),
                        "spec": {"cpu": 1, "memory": 64, "image": "nginx:1.25"}});
                    (client.post(format!("{http}/v1/resources")).json(&body), Status::Running)
                }
                Some((id, true)) => {
                    (client.post(format!("{http}/v1/resources/{id}:stop")), Status::Stopped)
                }
                Some((id, false)) => {
                    (client.post(format!("{http}/v1/resources/{id}:start")), Status::Running)
                }
            };
            let sent_us = micros(epoch);
            let answer = match request.send().await {
                Ok(r) if r.status() == 200 => r.bytes().await.map_err(|e| e.to_string()),
                Ok(r) => Err(format!("{}: {}", r.status(), r.text().await.unwrap_or_default())),
                Err(e) => Err(e.to_string()),
            };
            let took = micros(epoch) - sent_us;
            let resource = answer.and_then(|body| {
                serde_json::from_slice::<Resource>(&body).map_err(|e| format!("the answer: {e}"))
            });
            match resource {
                Ok(r) => {
                    rest_us.lock().unwrap().push(took);
                    made.lock().unwrap().push(Made {
                        id: r.instance_id,
                        updated_ns: updated_ns(&r),
                        status: r.status,
                        sent_us,
                    });
                    if r.status != status as i32 {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert_with(|| {
                            format!("asked for {status:?}, the answer says {}", r.status)
                        });
                    }
                    idle.lock()
                        .unwrap()
                        .push_back((r.instance_id, r.status == Status::Running as i32));
                }
                Err(e) => {
                    // The change may or may not have committed: the instance is left alone.
                    errors.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().unwrap().get_or_insert(e);
                }
            }
        }
    })
    .await;
    let cpu_percent = {
        let ticks = cpu_ticks(pid).saturating_sub(cpu_before) as f64;
        // USER_HZ is 100 on Linux.
        100.0 * ticks / 100.0 / started.elapsed().as_secs_f64()
    };

    // Until every watcher has every change (or patience runs out), then a little longer
    // for any duplicate.
    let made = std::mem::take(&mut *made.lock().unwrap());
    let expected = (made.len() * watchers) as u64;
    let deadline = Instant::now() + PATIENCE;
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let _ = sampler.await;
    let rss_peak = peak.load(Ordering::Relaxed);
    let mut per_watcher = Vec::new();
    while let Some(done) = readers.join_next().await {
        let (deliveries, error) = done.expect("a reader");
        stream_errors.extend(error);
        per_watcher.push(deliveries);
    }
    common::stop(child).await;

    // Each change by its instance and `updated_at`.
    let index: HashMap<(i64, i64), usize> =
        made.iter().enumerate().map(|(n, m)| ((m.id, m.updated_ns), n)).collect();
    assert_eq!(index.len(), made.len(), "two changes with one instance and updated_at");
    let first_sent = made.iter().map(|m| m.sent_us).min().unwrap_or(0);
    let mut delays = Vec::with_capacity(made.len() * watchers);
    let (mut missing, mut duplicates, mut unknown, mut wrong_status, mut out_of_order) =
        (0, 0, 0, 0, 0);
    let (mut delivered, mut last) = (0, first_sent);
    let mut seen = vec![0u32; made.len()];
    let mut newest: HashMap<i64, i64> = HashMap::new();
    for deliveries in per_watcher {
        seen.fill(0);
        newest.clear();
        delivered += deliveries.len();
        for d in deliveries {
            last = last.max(d.at_us);
            let prev = newest.insert(d.id, d.updated_ns).unwrap_or(i64::MIN);
            if d.updated_ns <= prev {
                out_of_order += 1;
            }
            let Some(&n) = index.get(&(d.id, d.updated_ns)) else {
                unknown += 1;
                continue;
            };
            seen[n] += 1;
            if seen[n] > 1 {
                continue;
            }
            if d.status != made[n].status {
                wrong_status += 1;
            }
            delays.push(d.at_us.saturating_sub(made[n].sent_us));
        }
        missing += seen.iter().filter(|c| **c == 0).count();
        duplicates += seen.iter().map(|c| c.saturating_sub(1) as usize).sum::<usize>();
    }
    let mut rest_us = std::mem::take(&mut *rest_us.lock().unwrap());
    ServiceRun {
        watchers,
        delays: pcts(&mut delays),
        rest: pcts(&mut rest_us),
        rest_errors: rest_errors.load(Ordering::Relaxed),
        first_rest_error: first_rest_error.lock().unwrap().take(),
        open: pcts(&mut open_us),
        open_errors,
        made: made.len(),
        creates: creates.load(Ordering::Relaxed),
        delivered,
        rate: delivered as f64 / (f64::from(last - first_sent) / 1e6).max(1e-9),
        missing,
        duplicates,
        unknown,
        wrong_status,
        out_of_order,
        stream_errors,
        rss_idle,
        rss_open,
        rss_peak,
        cpu_percent,
    }
}

/// Opens a watch from now on `channel` and reads its first response, the starting
/// heartbeat; the stream and how long that took, in microseconds.
async fn open(channel: Channel) -> Result<(Streaming<WatchResourcesResponse>, u32), tonic::Status> {
    let started = Instant::now();
    let mut client = ResourceServiceClient::new(channel);
    let mut stream = client.watch_resources(WatchResourcesRequest::default()).await?.into_inner();
    let first = stream
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unknown("the stream ended before its first response"))?;
    assert!(
        first.resource.is_none() && !first.resume_token.is_empty(),
        "the first response is a heartbeat with the start token: {first:?}"
    );
    Ok((stream, micros(started)))
}

/// Reads `stream` until `stop`; every change received (heartbeats skipped) and the error
/// that ended it early, if one did.
async fn follow(
    mut stream: Streaming<WatchResourcesResponse>,
    epoch: Instant,
    stop: CancellationToken,
    delivered: Arc<AtomicU64>,
    capacity: usize,
) -> (Vec<Delivery>, Option<String>) {
    let mut got = Vec::with_capacity(capacity);
    let error = loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break None,
            message = stream.message() => match message {
                Ok(Some(response)) => {
                    let at_us = micros(epoch);
                    if let Some(r) = response.resource {
                        got.push(Delivery {
                            id: r.instance_id,
                            updated_ns: updated_ns(&r),
                            status: r.status,
                            at_us,
                        });
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(None) => break Some("the stream ended".to_owned()),
                Err(e) => break Some(format!("{}: {}", e.code(), e.message())),
            },
        }
    };
    (got, error)
}
