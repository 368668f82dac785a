//! Ingest throughput: 100,000 pre-published INSTANCE_CREATED events, from consumer start
//! until all are committed, next to a bare lapin consumer that acknowledges the same
//! number of messages without doing any work, on the same broker in the same run.
//! Also reports the service's peak resident memory.
//!
//! `make bench` runs it. Environment: `BENCH_EVENTS` (default 100,000),
//! `BENCH_DATABASE_URL`, `BENCH_AMQP_URL`.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use futures::StreamExt;
use lapin::{
    BasicProperties, Connection,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::FieldTable,
};
use resource::publish::{PublishArgs, messages, publish};
use sqlx::{Connection as _, Executor, PgConnection};
use tokio::io::{AsyncBufReadExt, BufReader};

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events: u64 = env_or("BENCH_EVENTS", 100_000);
    let admin_url = std::env::var("BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let amqp_url = std::env::var("BENCH_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();

    // The events, built once and used by both contenders.
    let args = PublishArgs {
        file: None,
        count: Some(events),
        kind: "created".into(),
        rate: 0.0,
        encoding: "protobuf".into(),
        node_id: 1000,
        user_id: 7,
        quiet: true,
    };
    let batch = messages(&args).expect("generated events");

    println!("\n== Ingest: {events} INSTANCE_CREATED events, pre-published ==");
    let bare = bare_consumer(&amqp_url, &suffix, &batch).await;

    // The service against a fresh database and its own exchange and queues.
    let db = "resource_bench_ingest";
    let mut admin = PgConnection::connect(&admin_url).await.expect("reach PostgreSQL");
    admin
        .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")))
        .await
        .unwrap();
    admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}"))).await.unwrap();
    let db_url = format!("{}/{db}", &admin_url[..admin_url.rfind('/').unwrap()]);
    let mut conf =
        resource::conf::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs"))
            .expect("configs/ loads");
    let mq = &mut conf.data.rabbitmq;
    mq.url = amqp_url.clone().into();
    mq.exchange = format!("bench.{suffix}.events");
    mq.queue = format!("bench.{suffix}.instance-events");
    mq.dead_letter_exchange = format!("bench.{suffix}.dlx");
    mq.dead_letter_queue = format!("bench.{suffix}.dead");
    mq.retry_queue = format!("bench.{suffix}.retry");
    mq.status_queue = format!("bench.{suffix}.status");
    let mq = conf.data.rabbitmq.clone();
    let started = Instant::now();
    publish(&mq, &batch, 0.0, |_| {}).await.expect("pre-publish");
    let publish_rate = events as f64 / started.elapsed().as_secs_f64();

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_resource"))
        .arg("-conf")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs"))
        .env("RESOURCE_DATA__DATABASE__SOURCE", &db_url)
        .env("RESOURCE_DATA__RABBITMQ__URL", &amqp_url)
        .env("RESOURCE_DATA__RABBITMQ__EXCHANGE", &mq.exchange)
        .env("RESOURCE_DATA__RABBITMQ__QUEUE", &mq.queue)
        .env("RESOURCE_DATA__RABBITMQ__DEAD_LETTER_EXCHANGE", &mq.dead_letter_exchange)
        .env("RESOURCE_DATA__RABBITMQ__DEAD_LETTER_QUEUE", &mq.dead_letter_queue)
        .env("RESOURCE_DATA__RABBITMQ__RETRY_QUEUE", &mq.retry_queue)
        .env("RESOURCE_DATA__RABBITMQ__STATUS_QUEUE", &mq.status_queue)
        .env("RESOURCE_SERVER__HTTP__ADDR", "127.0.0.1:0")
        .env("RESOURCE_SERVER__GRPC__ADDR", "127.0.0.1:0")
        .env("RESOURCE_LOG__FORMAT", "json")
        .env(
            "RESOURCE_LOG__LEVEL",
            std::env::var("BENCH_SERVICE_LOG")
                .unwrap_or_else(|_| "warn,resource::server::mq=info".into()),
        )
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the service");
    let pid = child.id().expect("running");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains("consuming events") {
            break;
        }
    }
    let consumer_started = Instant::now();
    tokio::spawn(async move {
        let echo = std::env::var("BENCH_SERVICE_LOG").is_ok();
        while let Ok(Some(line)) = lines.next_line().await {
            if echo {
                eprintln!("{line}");
            }
        }
    });
    let rss_start = rss_kib(pid);

    let pool = sqlx::PgPool::connect(&db_url).await.unwrap();
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

    let _ = child.start_kill();
    let _ = child.wait().await;
    pool.close().await;
    cleanup(&amqp_url, &conf.data.rabbitmq).await;
    admin
        .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")))
        .await
        .unwrap();
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

async fn cleanup(amqp_url: &str, mq: &resource::conf::RabbitMq) {
    let conn = Connection::connect(amqp_url, Default::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    for q in [&mq.queue, &mq.dead_letter_queue, &mq.retry_queue, &mq.status_queue] {
        let _ = channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
    }
    for e in [&mq.exchange, &mq.dead_letter_exchange] {
        let _ = channel.exchange_delete(e.as_str().into(), Default::default()).await;
    }
    let _ = conn.close(200, "done".into()).await;
}

/// Resident memory of `pid` in KiB (Linux).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}
