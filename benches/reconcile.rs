//! Reconcile throughput: `BENCH_INSTANCES` (default 5,000) INSTANCE_CREATED events, from
//! the start of publishing until every Pod exists in the fake cluster (crates/fake-kube,
//! in-process) and every instance is RUNNING in the database, with the API requests the
//! service made by verb. The target is a run limited by the configured API rate (cluster
//! writes per second), not by the service.
//!
//! `make bench` runs it. Environment: `BENCH_INSTANCES`, `BENCH_API_QPS` (default 200),
//! `BENCH_DATABASE_URL`, `BENCH_AMQP_URL`, `BENCH_SERVICE_LOG` (echo the service's logs).

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use fake_kube::{FakeKube, Kind, Options};
use lapin::{Connection, options::QueueDeleteOptions};
use resource::publish::{PublishArgs, messages, publish};
use sqlx::{Connection as _, Executor, PgConnection};
use tokio::io::{AsyncBufReadExt, BufReader};

const NS: &str = "bench";

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: u64 = env_or("BENCH_INSTANCES", 5_000);
    let api_qps: u32 = env_or("BENCH_API_QPS", 200);
    let admin_url = std::env::var("BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let amqp_url = std::env::var("BENCH_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let configs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");

    let args = PublishArgs {
        file: None,
        count: Some(n),
        kind: "created".into(),
        rate: 0.0,
        encoding: "protobuf".into(),
        node_id: 1001,
        user_id: 7,
        quiet: true,
    };
    let batch = messages(&args).expect("generated events");
    println!("\n== Reconcile: {n} INSTANCE_CREATED events -> Pods RUNNING in a fake cluster ==");

    // A fresh database, its own exchanges and queues, and the fake cluster.
    let db = format!("resource_bench_reconcile_{suffix}");
    let mut admin = PgConnection::connect(&admin_url).await.expect("reach PostgreSQL");
    admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}"))).await.unwrap();
    let db_url = format!("{}/{db}", &admin_url[..admin_url.rfind('/').unwrap()]);
    let mut conf = resource::conf::load(&configs).expect("configs/ loads");
    let mq = &mut conf.data.rabbitmq;
    mq.url = amqp_url.clone().into();
    mq.exchange = format!("bench.{suffix}.events");
    mq.queue = format!("bench.{suffix}.instance-events");
    mq.dead_letter_exchange = format!("bench.{suffix}.dlx");
    mq.dead_letter_queue = format!("bench.{suffix}.dead");
    mq.retry_queue = format!("bench.{suffix}.retry");
    mq.status_queue = format!("bench.{suffix}.status");
    let mq = conf.data.rabbitmq.clone();

    let fake = FakeKube::start(Options::default()).await.expect("start the fake API server");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig, NS).unwrap();

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_resource"))
        .arg("-conf")
        .arg(&configs)
        .env("RESOURCE_DATA__DATABASE__SOURCE", &db_url)
        .env("RESOURCE_DATA__RABBITMQ__URL", &amqp_url)
        .env("RESOURCE_DATA__RABBITMQ__EXCHANGE", &mq.exchange)
        .env("RESOURCE_DATA__RABBITMQ__QUEUE", &mq.queue)
        .env("RESOURCE_DATA__RABBITMQ__DEAD_LETTER_EXCHANGE", &mq.dead_letter_exchange)
        .env("RESOURCE_DATA__RABBITMQ__DEAD_LETTER_QUEUE", &mq.dead_letter_queue)
        .env("RESOURCE_DATA__RABBITMQ__RETRY_QUEUE", &mq.retry_queue)
        .env("RESOURCE_DATA__RABBITMQ__STATUS_QUEUE", &mq.status_queue)
        .env("RESOURCE_DATA__KUBERNETES__ENABLED", "true")
        .env("RESOURCE_DATA__KUBERNETES__KUBECONFIG", &kubeconfig)
        .env("RESOURCE_DATA__KUBERNETES__NAMESPACE", NS)
        .env("RESOURCE_DATA__KUBERNETES__POLL_INTERVAL", "100ms")
        .env("RESOURCE_DATA__KUBERNETES__RESYNC_INTERVAL", "30s")
        .env("RESOURCE_DATA__KUBERNETES__API_QPS", api_qps.to_string())
        .env("RESOURCE_DATA__KUBERNETES__CONCURRENCY", "32")
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
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains("consuming events") {
            break;
        }
    }
    tokio::spawn(async move {
        let echo = std::env::var("BENCH_SERVICE_LOG").is_ok();
        while let Ok(Some(line)) = lines.next_line().await {
            if echo {
                eprintln!("{line}");
            }
        }
    });

    // Timing starts with publishing; the service is already consuming and reconciling.
    let pool = sqlx::PgPool::connect(&db_url).await.unwrap();
    let before = fake.requests();
    let started = Instant::now();
    publish(&mq, &batch, 0.0, |_| {}).await.expect("publish");
    let published = started.elapsed().as_secs_f64();
    let (mut pods_at, mut running_at) = (None, None);
    let (mut pods, mut running) = (0, 0);
    while pods_at.is_none() || running_at.is_none() {
        pods = fake.list(Kind::Pod, NS).len() as u64;
        running =
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM instances WHERE status = 'RUNNING'")
                .fetch_one(&pool)
                .await
                .unwrap() as u64;
        let t = started.elapsed().as_secs_f64();
        if pods >= n && pods_at.is_none() {
            pods_at = Some(t);
        }
        if running >= n && running_at.is_none() {
            running_at = Some(t);
        }
        if started.elapsed() > Duration::from_secs(300) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let req = fake.requests().since(&before);

    let fmt = |at: Option<f64>, got: u64| match at {
        Some(s) => format!("{s:.2} s"),
        None => format!("not reached in 300 s ({got} of {n})"),
    };
    let done = running_at.unwrap_or(elapsed);
    let writes = req.create + req.patch + req.delete;
    println!("instances                      {n}");
    println!("published (with confirms)      {published:.2} s");
    println!("all Pods exist after           {}", fmt(pods_at, pods));
    println!("all instances RUNNING after    {}", fmt(running_at, running));
    println!("instances/s (to all RUNNING)   {:.1}", running as f64 / done);
    println!(
        "API requests                   {} total: get {} list {} watch {} create {} update {} \
         patch {} delete {} other {}",
        req.total,
        req.get,
        req.list,
        req.watch,
        req.create,
        req.update,
        req.patch,
        req.delete,
        req.other
    );
    println!("API requests/s                 {:.1}", req.total as f64 / elapsed);
    // One limiter token per apply (Pod patch, plus a Service apply or delete) or removal.
    println!(
        "Pod patches/s                  {:.1} = {:.0}% of api_qps (to all Pods exist)",
        req.patch as f64 / pods_at.unwrap_or(elapsed),
        100.0 * req.patch as f64 / pods_at.unwrap_or(elapsed) / f64::from(api_qps)
    );
    println!(
        "cluster writes/s               {:.1} (create+patch+delete) = {:.0}% of api_qps {api_qps}",
        writes as f64 / done,
        100.0 * writes as f64 / done / f64::from(api_qps)
    );

    let _ = child.start_kill();
    let _ = child.wait().await;
    pool.close().await;
    fake.shutdown().await;
    cleanup(&amqp_url, &mq).await;
    admin
        .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")))
        .await
        .unwrap();
    assert!(running_at.is_some(), "reconcile did not finish: {running} of {n} RUNNING");
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
