//! Reconcile throughput: `BENCH_INSTANCES` (default 5,000) INSTANCE_CREATED events, from
//! the start of publishing until every Pod exists in the fake cluster (crates/fake-kube,
//! in-process) and every instance is RUNNING in the database, with the API requests the
//! service made by verb. The bound is the configured API rate (`api_qps` cluster writes
//! per second): the target is a bring-up at >= 90 % of it, never above it in any second.
//!
//! Then, from the same run: requests per instance at rest (through several resyncs;
//! target 0), the latency of creates issued while resyncs of every instance run, and
//! requests per instance after every watch is cut and its history expired (a relist).
//!
//! `make bench` runs it. Environment: `BENCH_INSTANCES`, `BENCH_API_QPS` (default 200),
//! `BENCH_DATABASE_URL`, `BENCH_AMQP_URL`, `BENCH_SERVICE_LOG` (echo the service's logs).

mod common;

use std::time::{Duration, Instant};

use common::{Run, env_or};
use fake_kube::{FakeKube, Kind, Options};
use resource::publish::publish;

const NS: &str = "bench";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: u64 = env_or("BENCH_INSTANCES", 5_000);
    let api_qps: u32 = env_or("BENCH_API_QPS", 200);
    let suffix = Run::suffix();

    let batch = common::created_events(n, 1001);
    println!("\n== Reconcile: {n} INSTANCE_CREATED events -> Pods RUNNING in a fake cluster ==");

    // A fresh database, its own exchanges and queues, and the fake cluster.
    let run = Run::new(&format!("resource_bench_reconcile_{suffix}"), &suffix).await;

    let fake = FakeKube::start(Options::default()).await.expect("start the fake API server");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig, NS).unwrap();

    let mut env = run.service("warn,resource::server::mq=info");
    env.set("RESOURCE_DATA__KUBERNETES__ENABLED", "true")
        .set("RESOURCE_DATA__KUBERNETES__KUBECONFIG", kubeconfig.to_str().expect("a UTF-8 path"))
        .set("RESOURCE_DATA__KUBERNETES__NAMESPACE", NS)
        .set("RESOURCE_DATA__KUBERNETES__POLL_INTERVAL", "100ms")
        .set("RESOURCE_DATA__KUBERNETES__RESYNC_INTERVAL", "10s")
        .set("RESOURCE_DATA__KUBERNETES__API_QPS", api_qps.to_string())
        .set("RESOURCE_DATA__KUBERNETES__CONCURRENCY", "32");
    let (child, _) = common::start(&env, &["consuming events"], Run::echo()).await;

    // Timing starts with publishing; the service is already consuming and reconciling.
    let pool = sqlx::PgPool::connect(&run.db_url).await.unwrap();
    let before = fake.requests();
    let started = Instant::now();
    publish(&run.mq, &batch, 0.0, |_| {}).await.expect("publish");
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
        "writes/s (to all Pods exist)   {:.1} = {:.0}% of api_qps (Pod and Service applies)",
        req.patch as f64 / pods_at.unwrap_or(elapsed),
        100.0 * req.patch as f64 / pods_at.unwrap_or(elapsed) / f64::from(api_qps)
    );
    println!(
        "cluster writes/s               {:.1} (create+patch+delete) = {:.0}% of api_qps {api_qps}",
        writes as f64 / done,
        100.0 * writes as f64 / done / f64::from(api_qps)
    );

    let log = fake.request_log();
    let writes: Vec<std::time::Instant> =
        log.iter().filter(|r| r.verb.is_write()).map(|r| r.at).collect();
    let most_in_a_second = writes
        .iter()
        .enumerate()
        .map(|(i, start)| {
            writes[i..].iter().take_while(|t| **t < *start + Duration::from_secs(1)).count()
        })
        .max()
        .unwrap_or(0);
    println!("most writes in any second      {most_in_a_second} (api_qps {api_qps})");
    println!("requests per instance          {:.2} (bring-up)", req.total as f64 / n as f64);

    // At rest, through three resyncs of every instance.
    let rest_for = Duration::from_secs(30);
    let before = fake.requests();
    let log_mark = fake.request_log().len();
    tokio::time::sleep(rest_for).await;
    let rest = fake.requests().since(&before);
    let per_object = fake
        .request_log()
        .iter()
        .skip(log_mark)
        .filter(|r| !r.name.is_empty() && r.kind != Some(Kind::Namespace))
        .count();
    let minutes = rest_for.as_secs_f64() / 60.0;
    println!(
        "at rest ({} s, resync 10 s)     {} requests ({} naming an instance's object) = {:.4} per instance per minute",
        rest_for.as_secs(),
        rest.total,
        per_object,
        per_object as f64 / n as f64 / minutes
    );

    // Creates issued while every instance is being resynced.
    let mut latencies = Vec::new();
    for _ in 0..10 {
        let one = common::created_events(1, 1002);
        let id = one[0].event.instance_id;
        let at = Instant::now();
        publish(&run.mq, &one, 0.0, |_| {}).await.expect("publish");
        loop {
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM instances WHERE instance_id = $1")
                    .bind(id)
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
            if status.as_deref() == Some("RUNNING") || at.elapsed() > Duration::from_secs(60) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        latencies.push(at.elapsed().as_secs_f64());
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "create -> RUNNING during resyncs median {:.3} s, max {:.3} s (10 creates, {n} instances resynced every 10 s)",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );

    // Every watch cut with its history gone: each kind is listed again, once.
    let before = fake.requests();
    fake.expire_history();
    fake.end_watches();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let relist = fake.requests().since(&before);
    println!(
        "after a relist (5 s)           {} requests: list {} watch {} get {} writes {} = {:.4} per instance",
        relist.total,
        relist.list,
        relist.watch,
        relist.get,
        relist.create + relist.patch + relist.delete + relist.update,
        relist.total as f64 / n as f64
    );

    common::stop(child).await;
    pool.close().await;
    fake.shutdown().await;
    run.finish().await;
    assert!(running_at.is_some(), "reconcile did not finish: {running} of {n} RUNNING");
}
