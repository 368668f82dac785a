//! Soak: `BENCH_SOAK_SECONDS` (default 600) of mixed REST and event load at a fixed rate
//! against the release binary (fresh database, its own exchanges and queues, no cluster,
//! auth none). Reports latency percentiles overall and per kind of request, errors
//! (target 0) and the service's resident memory after a 10 s warm-up and at the end
//! (target: growth <= 10 %), sampled every 30 s. FAIL lines do not fail the run.
//!
//! `make bench` runs it. Environment: `BENCH_SOAK_SECONDS`, `BENCH_SOAK_API_RPS` (default
//! 200), `BENCH_SOAK_EVENTS_PER_S` (default 200), `BENCH_DATABASE_URL`, `BENCH_AMQP_URL`,
//! `BENCH_SERVICE_LOG` (echo the service's logs).

mod common;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use common::{Run, env_or, rss_kib};
use lapin::{BasicProperties, Confirmation, options::BasicPublishOptions};
use prost::Message;
use resource::{
    biz::snowflake::Snowflake,
    pb::mq::v1::{Event, EventType, InstanceSpec},
};

/// Kinds of request, and the kind of request `n` by `n % 20`: 50, 20, 15, 10 and 5 %.
const KINDS: [&str; 5] = ["list page_size=50", "create", "get", "stop/start", "audit-logs"];
const MIX: [usize; 20] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4];
/// Owner of the instances events create (API callers create as "soak").
const EVENT_USER: i64 = 7;

#[derive(Default)]
struct Stats {
    latency_us: [Mutex<Vec<u64>>; 5],
    errors: AtomicU64,
    first_errors: Mutex<Vec<String>>,
    sent: AtomicU64,
    in_flight: AtomicU64,
    ids: Mutex<Vec<String>>,
    published: AtomicU64,
    created_events: AtomicU64,
    event_errors: AtomicU64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: u64 = env_or("BENCH_SOAK_SECONDS", 600);
    let api_rps: f64 = env_or("BENCH_SOAK_API_RPS", 200.0);
    let events_per_s: f64 = env_or("BENCH_SOAK_EVENTS_PER_S", 200.0);
    let warmup = 10.min(secs / 2);
    let suffix = Run::suffix();
    println!("\n== Soak: {secs} s, {api_rps} API requests/s + {events_per_s} events/s ==");

    // A fresh database and its own exchanges and queues.
    let run = Run::new(&format!("resource_bench_soak_{suffix}"), &suffix).await;
    let env = run.service("warn,resource::server=info");
    let (mut child, logged) =
        common::start(&env, &["serving", "consuming events"], Run::echo()).await;
    let pid = child.id().expect("running");
    let base = test_support::base_url(&logged[0], "http");

    let stats = Arc::new(Stats::default());
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    // A few instances so that reads and actions have targets from the first tick.
    for n in 0..20 {
        let r = client.post(format!("{base}/v1/resources")).json(&create_body(&suffix, n));
        let v: serde_json::Value = r.send().await.unwrap().json().await.unwrap();
        stats.ids.lock().unwrap().push(v["instance_id"].as_str().expect("created").to_owned());
    }
    let conn = resource::amqp::connect(&run.mq, "soak-publisher").await.expect("reach RabbitMQ");
    let channel = resource::amqp::confirm_channel(&run.mq, &conn).await.unwrap();

    let started = Instant::now();
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    let api = tokio::spawn({
        let (stats, base, suffix) = (stats.clone(), base.clone(), suffix.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / api_rps));
            for n in 1_000u64.. {
                if tick.tick().await >= end {
                    break;
                }
                stats.in_flight.fetch_add(1, Relaxed);
                let (client, base, stats, suffix) =
                    (client.clone(), base.clone(), stats.clone(), suffix.clone());
                tokio::spawn(async move {
                    request(&client, &base, &suffix, n, &stats).await;
                    stats.in_flight.fetch_sub(1, Relaxed);
                });
            }
        }
    });
    let events = tokio::spawn({
        let (stats, exchange) = (stats.clone(), run.mq.exchange.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / events_per_s));
            let (ids, mut created) = (Snowflake::new(1002), Vec::new());
            for n in 0u64.. {
                if tick.tick().await >= end {
                    break;
                }
                // One in ten stops an instance an event created 500 events earlier.
                let now = chrono::Utc::now().timestamp();
                let mut event = Event { user_id: EVENT_USER, timestamp: now, ..Default::default() };
                if n % 10 == 9 && created.len() > 500 {
                    event.event_type = EventType::InstanceStopped as i32;
                    event.instance_id = created[created.len() - 500];
                } else {
                    event.event_type = EventType::InstanceCreated as i32;
                    event.instance_id = ids.next_id();
                    event.name = format!("soak-{}", event.instance_id);
                    let image = "ubuntu:22.04".into();
                    event.spec = Some(InstanceSpec {
                        cpus: 1,
                        memory_mb: 1024,
                        image,
                        ..Default::default()
                    });
                    created.push(event.instance_id);
                }
                let key =
                    if event.spec.is_some() { "instance.created" } else { "instance.stopped" };
                let props = BasicProperties::default()
                    .with_content_type("application/x-protobuf".into())
                    .with_message_id(uuid::Uuid::new_v4().to_string().into())
                    .with_delivery_mode(2);
                let options = BasicPublishOptions { mandatory: true, ..Default::default() };
                let body = event.encode_to_vec();
                match channel
                    .basic_publish(exchange.as_str().into(), key.into(), options, &body, props)
                    .await
                {
                    Ok(confirm) => {
                        let (stats, created) = (stats.clone(), event.spec.is_some());
                        stats.in_flight.fetch_add(1, Relaxed);
                        tokio::spawn(async move {
                            match confirm.await {
                                Ok(Confirmation::Ack(None)) => {
                                    stats.published.fetch_add(1, Relaxed);
                                    stats.created_events.fetch_add(u64::from(created), Relaxed);
                                }
                                other => {
                                    stats.event_errors.fetch_add(1, Relaxed);
                                    note(
                                        &stats,
                                        format!("event {key}: {:.200}", format!("{other:?}")),
                                    );
                                }
                            }
                            stats.in_flight.fetch_sub(1, Relaxed);
                        });
                    }
                    Err(e) => {
                        stats.event_errors.fetch_add(1, Relaxed);
                        note(&stats, format!("event {key}: publish: {e}"));
                    }
                }
            }
        }
    });

    // Resident memory: after the warm-up, every 30 s, and at the end.
    println!("{:>6} {:>10} {:>10} {:>10} {:>8}", "t s", "RSS MB", "requests", "events", "errors");
    let mut rss_start = 0;
    let mut rss_end = 0;
    for t in 1..=secs {
        tokio::time::sleep_until((started + Duration::from_secs(t)).into()).await;
        let rss = rss_kib(pid);
        if t == warmup {
            rss_start = rss;
        }
        if t == warmup || t % 30 == 0 || t == secs {
            rss_end = rss;
            println!(
                "{t:>6} {:>10.1} {:>10} {:>10} {:>8}",
                rss as f64 / 1024.0,
                stats.sent.load(Relaxed),
                stats.published.load(Relaxed),
                stats.errors.load(Relaxed) + stats.event_errors.load(Relaxed)
            );
        }
    }
    api.await.unwrap();
    events.await.unwrap();
    while stats.in_flight.load(Relaxed) > 0 && started.elapsed().as_secs() < secs + 15 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();

    // Drain: wait until every created event is an instance, or 30 s without progress.
    let pool = sqlx::PgPool::connect(&run.db_url).await.unwrap();
    let (mut applied, mut last_progress) = (0, Instant::now());
    let wanted = stats.created_events.load(Relaxed) as i64;
    while applied < wanted && last_progress.elapsed() < Duration::from_secs(30) {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM instances WHERE user_id = $1")
            .bind(EVENT_USER.to_string())
            .fetch_one(&pool)
            .await
            .unwrap();
        if n > applied {
            (applied, last_progress) = (n, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    println!("duration                {elapsed:.1} s (RSS start after {warmup} s of load)");
    println!("requests sent           {}", stats.sent.load(Relaxed));
    println!(
        "{:<22} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "latency ms", "count", "p50", "p90", "p99", "max"
    );
    let mut all = Vec::new();
    for (kind, lat) in KINDS.iter().zip(&stats.latency_us) {
        let mut lat = lat.lock().unwrap().clone();
        all.extend_from_slice(&lat);
        print_latency(kind, &mut lat);
    }
    print_latency("all", &mut all);
    let errors = stats.errors.load(Relaxed);
    let event_errors = stats.event_errors.load(Relaxed);
    println!("errors                  {errors} API, {event_errors} events; the first:");
    for e in stats.first_errors.lock().unwrap().iter() {
        println!("  {e}");
    }
    println!(
        "events published        {} confirmed ({} INSTANCE_CREATED), {event_errors} not confirmed",
        stats.published.load(Relaxed),
        stats.created_events.load(Relaxed)
    );
    println!("events applied          {applied} instances created by events of {wanted}");
    let growth = 100.0 * (rss_end as f64 - rss_start as f64) / rss_start.max(1) as f64;
    println!(
        "resident memory         {:.1} MB at {warmup} s, {:.1} MB at the end: {growth:+.1} %",
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0
    );
    let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
    println!(
        "{}: errors = 0 ({} API, {event_errors} events)",
        verdict(errors + event_errors == 0),
        errors
    );
    if let Some(status) = child.try_wait() {
        println!("the service exited during the run: {status}");
    }
    // No resident memory at the end means the service is gone: that is no pass.
    println!("{}: RSS growth <= 10 % ({growth:+.1} %)", verdict(rss_end > 0 && growth <= 10.0));

    let _ = conn.close(200, "done".into()).await;
    common::stop(child).await;
    pool.close().await;
    run.finish().await;
}

fn create_body(suffix: &str, n: u64) -> serde_json::Value {
    serde_json::json!({"name": format!("soak-{n}"), "user_id": "soak",
        "request_id": format!("soak-{suffix}-{n}"),
        "spec": {"cpu": 1, "memory": 1024, "gpu": 0, "image": "ubuntu:22.04"}})
}

/// Request `n` of the mix: kind by `n % 20`, target instance picked from those created.
async fn request(client: &reqwest::Client, base: &str, suffix: &str, n: u64, stats: &Stats) {
    let kind = MIX[(n % 20) as usize];
    let id = {
        let ids = stats.ids.lock().unwrap();
        ids[(n.wrapping_mul(2_654_435_761) % ids.len() as u64) as usize].clone()
    };
    let url = match (kind, n % 20) {
        (0, _) => format!("{base}/v1/resources?page_size=50"),
        (1, _) => format!("{base}/v1/resources"),
        (2, _) => format!("{base}/v1/resources/{id}"),
        (3, 17) => format!("{base}/v1/resources/{id}:stop"),
        (3, _) => format!("{base}/v1/resources/{id}:start"),
        _ => format!("{base}/v1/resources/{id}/audit-logs"),
    };
    let req = match kind {
        0 | 2 | 4 => client.get(&url),
        1 => client.post(&url).json(&create_body(suffix, n)),
        _ => client.post(&url),
    };
    stats.sent.fetch_add(1, Relaxed);
    let t = Instant::now();
    let result = match req.send().await {
        Ok(r) => {
            let status = r.status();
            r.text().await.map(|body| (status, body))
        }
        Err(e) => Err(e),
    };
    stats.latency_us[kind].lock().unwrap().push(t.elapsed().as_micros() as u64);
    let what = match result {
        Ok((status, body)) if status.is_success() => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if let (1, Some(id)) = (kind, v["instance_id"].as_str()) {
                stats.ids.lock().unwrap().push(id.to_owned());
            }
            return;
        }
        // A stop or start racing another one may be refused as an illegal transition.
        Ok((status, _)) if status == 409 && kind == 3 => return,
        Ok((status, body)) => format!("{} {url}: {status} {:.200}", KINDS[kind], body),
        Err(e) => format!("{} {url}: {e}", KINDS[kind]),
    };
    stats.errors.fetch_add(1, Relaxed);
    note(stats, what);
}

/// Keeps the first few errors for the report.
fn note(stats: &Stats, what: String) {
    let mut first = stats.first_errors.lock().unwrap();
    if first.len() < 5 {
        first.push(what);
    }
}

fn print_latency(name: &str, lat: &mut [u64]) {
    if lat.is_empty() {
        return println!("{name:<22} {:>8}", 0);
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1e3;
    let p: Vec<_> = [0.5, 0.9, 0.99, 1.0].map(|q| format!("{:>9.2}", pct(q))).into();
    println!("{name:<22} {:>8} {}", lat.len(), p.join(" "));
}
