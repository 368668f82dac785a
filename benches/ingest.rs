//! Ingest throughput: 100,000 pre-published INSTANCE_CREATED events, from consumer start
//! until all are committed, next to a bare lapin consumer that acknowledges the same
//! number of messages without doing any work, on the same broker in the same run.
//! Beside it, in the same run, the same events on a fresh database with quotas configured
//! (#15): per-user limits and a GPU capacity for every type, high enough that nothing is
//! refused, so the work is the same and the difference is the cost of enforcing them
//! (target: at least 90 % of the rate without quotas). The two alternate, each on a
//! database and queues of its own, and the fastest run of each is compared.
//! Also reports the service's peak resident memory.
//!
//! `make bench` runs it. Environment: `BENCH_EVENTS` (default 100,000),
//! `BENCH_INGEST_ROUNDS` (default 2: the service without quotas, with, with, without),
//! `BENCH_DATABASE_URL`, `BENCH_AMQP_URL`.

mod common;

use std::time::{Duration, Instant};

use common::{Run, env_or, rss_kib};
use futures::StreamExt;
use lapin::{
    BasicProperties, Connection,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::FieldTable,
};
use resource::publish::{Outgoing, publish};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events: u64 = env_or("BENCH_EVENTS", 100_000);
    let rounds: usize = env_or("BENCH_INGEST_ROUNDS", 2).max(1);
    let suffix = Run::suffix();

    // The events, built once and used by every contender.
    let batch = common::created_events(events, 1000);
    let limits = quota_limits(events);

    println!("\n== Ingest: {events} INSTANCE_CREATED events, pre-published ==");
    let bare = bare_consumer(&Run::amqp_url(), &suffix, &batch).await;
    let (mut plain, mut quota) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // A B, then B A: each variant runs first as often as second, so that a drift of
        // the machine (caches warming, a neighbour's load) favours neither.
        let order = if round % 2 == 0 { [false, true] } else { [true, false] };
        for with_quotas in order {
            if with_quotas {
                let db = "resource_bench_ingest_quota";
                let run = service_ingest(db, &format!("{suffix}{round}q"), &batch, &limits).await;
                assert_eq!(run.refused, 0, "the quotas refused events: not the same work");
                quota.push(run);
            } else {
                let db = "resource_bench_ingest";
                plain.push(service_ingest(db, &format!("{suffix}{round}"), &batch, &[]).await);
            }
        }
    }
    let (best_plain, best_quota) = (fastest(&plain), fastest(&quota));

    println!("{:<46} {:>12}", "", "events/s");
    println!("{:<46} {:>12.0}", "publisher with confirms (pre-publish)", best_plain.publish_rate);
    println!("{:<46} {:>12.0}", "bare consumer (ack multiple every 100)", bare);
    println!(
        "{:<46} {:>12.0}   {:.0}% of bare",
        "service: consumer start -> all committed",
        best_plain.rate,
        100.0 * best_plain.rate / bare
    );
    println!(
        "{:<46} {:>12.0}   {:.1}% of without quotas (target >= 90%)",
        "  the same with quotas configured",
        best_quota.rate,
        100.0 * best_quota.rate / best_plain.rate
    );
    println!(
        "(fastest of {rounds} runs each; over all runs {:.0} and {:.0} events/s, {:.1}%)",
        overall(&plain),
        overall(&quota),
        100.0 * overall(&quota) / overall(&plain)
    );
    for (name, runs) in [("without quotas", &plain), ("with quotas   ", &quota)] {
        for run in runs {
            println!(
                "{name}: {:>6.0} events/s; ingest {:.2} s; audit rows {}; status outbox \
                 drained after {:.2} s; resident memory {:.1} MB at consumer start, peak \
                 {:.1} MB",
                run.rate,
                run.ingest,
                run.audited,
                run.with_outbox,
                run.rss_start as f64 / 1024.0,
                run.peak_rss as f64 / 1024.0
            );
        }
    }
    println!(
        "quotas: per user (every event has one owner) instances {events}, cpu {}, memory_mb \
         {}, gpus {events}; gpu_capacity {events} for every type; nothing refused",
        8 * events,
        16 * 1024 * events,
    );
}

/// The run with the highest rate: on a shared machine, the least disturbed.
fn fastest(runs: &[Ingest]) -> &Ingest {
    runs.iter().max_by(|a, b| a.rate.total_cmp(&b.rate)).expect("at least one run")
}

/// Events per second over every run together.
fn overall(runs: &[Ingest]) -> f64 {
    runs.iter().map(|r| r.rate * r.ingest).sum::<f64>() / runs.iter().map(|r| r.ingest).sum::<f64>()
}

/// What one run of the service did.
struct Ingest {
    publish_rate: f64,
    /// Events per second, consumer start until all committed.
    rate: f64,
    /// Seconds, consumer start until all committed.
    ingest: f64,
    /// Seconds, consumer start until the status outbox was empty.
    with_outbox: f64,
    audited: i64,
    /// Instances recorded FAILED (refused for quota or capacity).
    refused: i64,
    rss_start: u64,
    peak_rss: u64,
}

/// `quota.*` overrides no event of `created_events(events, _)` runs into: the generator
/// asks for 1..=8 cores, 1..=16 GB and a GPU on three events in four, all for one owner.
fn quota_limits(events: u64) -> Vec<(String, String)> {
    let mut env = vec![
        ("RESOURCE_QUOTA__PER_USER__INSTANCES".to_owned(), events.to_string()),
        ("RESOURCE_QUOTA__PER_USER__CPU".to_owned(), (8 * events).to_string()),
        ("RESOURCE_QUOTA__PER_USER__MEMORY_MB".to_owned(), (16 * 1024 * events).to_string()),
        ("RESOURCE_QUOTA__PER_USER__GPUS".to_owned(), events.to_string()),
    ];
    for gpu in 1..=6 {
        env.push((format!("RESOURCE_QUOTA__GPU_CAPACITY__{gpu}"), events.to_string()));
    }
    env
}

/// Pre-publishes `batch` to a fresh database `db` and queues `bench.{suffix}.*`, starts
/// the service with `extra` settings, and measures until every event is committed and
/// every status event published.
async fn service_ingest(
    db: &str,
    suffix: &str,
    batch: &[Outgoing],
    extra: &[(String, String)],
) -> Ingest {
    let events = batch.len() as u64;
    let run = Run::new(db, suffix).await;
    let started = Instant::now();
    publish(&run.mq, batch, 0.0, |_| {}).await.expect("pre-publish");
    let publish_rate = events as f64 / started.elapsed().as_secs_f64();

    let mut env = run.service("warn,resource::server::mq=info");
    env.extend(extra.iter().cloned());
    let (child, _) = common::start(&env, &["consuming events"], Run::echo()).await;
    let pid = child.id().expect("running");
    let consumer_started = Instant::now();
    let rss_start = rss_kib(pid);

    let pool = sqlx::PgPool::connect(&run.db_url).await.unwrap();
    let mut peak_rss = rss_start;
    loop {
        peak_rss = peak_rss.max(rss_kib(pid));
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM instances").fetch_one(&pool).await.unwrap();
        if n as u64 >= events {
            break;
        }
        assert!(
            consumer_started.elapsed() < Duration::from_secs(600),
            "ingest did not finish ({n} applied)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ingest = consumer_started.elapsed().as_secs_f64();
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_logs").fetch_one(&pool).await.unwrap();
    let refused: i64 = sqlx::query_scalar("SELECT count(*) FROM instances WHERE status = 'FAILED'")
        .fetch_one(&pool)
        .await
        .unwrap();
    // The outbox drains after ingest; report how long the status events took in all.
    loop {
        peak_rss = peak_rss.max(rss_kib(pid));
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM status_outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let with_outbox = consumer_started.elapsed().as_secs_f64();

    common::stop(child).await;
    pool.close().await;
    run.finish().await;
    Ingest {
        publish_rate,
        rate: events as f64 / ingest,
        ingest,
        with_outbox,
        audited,
        refused,
        rss_start,
        peak_rss,
    }
}

/// Consumes `batch.len()` pre-published messages with prefetch 1000, acknowledging with
/// `multiple` every 100, doing nothing else; returns messages per second.
async fn bare_consumer(amqp_url: &str, suffix: &str, batch: &[resource::publish::Outgoing]) -> f64 {
    let conn = Connection::connect(amqp_url, Default::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let queue = format!("bench.{suffix}.bare");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    for chunk in batch.chunks(1000) {
        for m in chunk {
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    Default::default(),
                    &m.body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap();
        }
        channel.wait_for_confirms().await.unwrap();
    }
    channel.basic_qos(1000, BasicQosOptions::default()).await.unwrap();
    let started = Instant::now();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut n = 0;
    while let Some(Ok(delivery)) = consumer.next().await {
        n += 1;
        if n % 100 == 0 || n == batch.len() {
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }
        if n == batch.len() {
            break;
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    let _ = conn.close(200, "done".into()).await;
    rate
}
