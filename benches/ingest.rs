//! Ingest throughput: 100,000 pre-published INSTANCE_CREATED events, from consumer start
//! until all are committed, next to a bare lapin consumer that acknowledges the same
//! number of messages without doing any work, on the same broker in the same run.
//! Also reports the service's peak resident memory.
//!
//! `make bench` runs it. Environment: `BENCH_EVENTS` (default 100,000),
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
use resource::publish::publish;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events: u64 = env_or("BENCH_EVENTS", 100_000);
    let suffix = Run::suffix();

    // The events, built once and used by both contenders.
    let batch = common::created_events(events, 1000);

    println!("\n== Ingest: {events} INSTANCE_CREATED events, pre-published ==");
    let bare = bare_consumer(&Run::amqp_url(), &suffix, &batch).await;

    // The service against a fresh database and its own exchange and queues.
    let run = Run::new("resource_bench_ingest", &suffix).await;
    let started = Instant::now();
    publish(&run.mq, &batch, 0.0, |_| {}).await.expect("pre-publish");
    let publish_rate = events as f64 / started.elapsed().as_secs_f64();

    let env = run.service("warn,resource::server::mq=info");
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
    let rate = events as f64 / ingest;
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

    println!("{:<46} {:>12}", "", "events/s");
    println!("{:<46} {:>12.0}", "publisher with confirms (pre-publish)", publish_rate);
    println!("{:<46} {:>12.0}", "bare consumer (ack multiple every 100)", bare);
    println!(
        "{:<46} {:>12.0}   {:.0}% of bare",
        "service: consumer start -> all committed",
        rate,
        100.0 * rate / bare
    );
    println!(
        "ingest {ingest:.2} s; audit rows {audited}; status outbox drained after {with_outbox:.2} s"
    );
    println!(
        "service resident memory: {:.1} MB at consumer start, peak {:.1} MB",
        rss_start as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );

    common::stop(child).await;
    pool.close().await;
    run.finish().await;
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
