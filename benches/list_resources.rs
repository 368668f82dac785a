//! ListResources throughput over REST and gRPC on 1,000,000 instances, page_size 50, next
//! to the rate PostgreSQL itself achieves for the same query (pgbench, same run).
//!
//! Then the same load with filters (issue 16): `label_selector=team=a` (every tenth
//! instance carries the label) and `gpu_model=Tesla A100` (every seventh), each printed
//! with its ratio to the unfiltered rate of the same run (target ≥ 50 %).
//!
//! `make bench` runs it. Environment: `BENCH_DATABASE_URL` (admin URL, default
//! `postgres://postgres@127.0.0.1:5432/postgres`), `BENCH_SECONDS` per measurement
//! (default 10), `BENCH_ROWS` (default 1,000,000), `BENCH_CLIENTS` (default 2),
//! `BENCH_LIST_DATABASE` (default `resource_bench`). That database is created and
//! loaded once and reused by later runs.

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::{backends, env_or};
use resource::{
    biz::{GpuType, InstanceId, ListFilter, instance::LabelSelector},
    pb::resource::v1::{ListResourcesRequest, resource_service_client::ResourceServiceClient},
    service::page_token,
};
use sqlx::{Connection, Executor, PgConnection};

/// Instance ids are spread like snowflakes: BASE + n * STEP.
const BASE: i64 = 400_000_000_000_000_000;
const STEP: i64 = 4096;
const PAGE_SIZE: i32 = 50;

/// The exact statement `PgInstanceRepo::list` prepares for an unfiltered page after a token.
const LIST_SQL: &str = "SELECT i.instance_id, i.user_id, i.name, i.status, i.status_reason, \
     i.pod_name, i.pod_ip, i.service_host, i.ports, i.created_at, i.updated_at, i.deleted_at, \
     i.version, s.cpu, s.memory, s.gpu, s.image, s.config_json \
     FROM instances i JOIN instance_specs s ON s.instance_id = i.instance_id \
     WHERE i.deleted_at IS NULL AND i.instance_id < :bound AND s.instance_id < :bound \
     ORDER BY i.instance_id DESC LIMIT 51";

struct Settings {
    admin_url: String,
    database: String,
    seconds: u64,
    rows: i64,
    clients: usize,
}

/// Which instances a load lists: the query string (REST), the request fields (gRPC) and
/// the filter its page tokens are bound to.
#[derive(Clone)]
struct Filter {
    query: String,
    request: ListResourcesRequest,
    bound: ListFilter,
    /// Fewest rows below a random position, so that its page is full.
    min_depth: i64,
}

impl Filter {
    fn none() -> Self {
        Filter {
            query: String::new(),
            request: ListResourcesRequest::default(),
            bound: ListFilter::default(),
            min_depth: 2,
        }
    }

    /// Every tenth instance is labelled `team=a` (see `prepare`).
    fn team_a() -> Self {
        Filter {
            query: "&label_selector=team%3Da".into(),
            request: ListResourcesRequest {
                label_selector: "team=a".into(),
                ..ListResourcesRequest::default()
            },
            bound: ListFilter {
                labels: LabelSelector::parse("team=a").unwrap(),
                ..ListFilter::default()
            },
            min_depth: 20 * i64::from(PAGE_SIZE),
        }
    }

    /// Every seventh instance has GPU type 2 (`g % 7` in `prepare`).
    fn a100() -> Self {
        Filter {
            query: "&gpu_model=Tesla%20A100".into(),
            request: ListResourcesRequest {
                gpu_model: "Tesla A100".into(),
                ..ListResourcesRequest::default()
            },
            bound: ListFilter { gpu: Some(GpuType::TeslaA100), ..ListFilter::default() },
            min_depth: 14 * i64::from(PAGE_SIZE),
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let s = Settings {
        admin_url: backends().admin_url,
        database: env_or("BENCH_LIST_DATABASE", "resource_bench".to_owned()),
        seconds: env_or("BENCH_SECONDS", 10),
        rows: env_or("BENCH_ROWS", 1_000_000),
        clients: env_or("BENCH_CLIENTS", 2),
    };
    let url = test_support::database_url(&s.admin_url, &s.database);
    prepare(&s, &url).await;
    let (child, http, grpc) = start_service(&url).await;

    println!(
        "\n== ListResources: {} rows, page_size {PAGE_SIZE}, {} clients, {} s per run ==",
        s.rows, s.clients, s.seconds
    );
    let pg_before = pgbench(&s, &url);
    let rest = run_load(&s, Transport::Rest(http.clone()), &Filter::none()).await;
    let grpc_stats = run_load(&s, Transport::Grpc(grpc.clone()), &Filter::none()).await;
    let pg_after = pgbench(&s, &url);
    let pg = (pg_before + pg_after) / 2.0;

    println!("{:<28} {:>10} {:>9} {:>9} {:>9}", "", "pages/s", "p50 ms", "p99 ms", "vs PG");
    println!(
        "{:<28} {:>10.0} {:>9} {:>9} {:>9}",
        "PostgreSQL (pgbench) before", pg_before, "-", "-", "-"
    );
    println!(
        "{:<28} {:>10.0} {:>9} {:>9} {:>9}",
        "PostgreSQL (pgbench) after", pg_after, "-", "-", "-"
    );
    for (name, st) in [("REST GET /v1/resources", &rest), ("gRPC ListResources", &grpc_stats)] {
        println!(
            "{:<28} {:>10.0} {:>9.3} {:>9.3} {:>8.0}%",
            name,
            st.rate,
            st.p50_ms,
            st.p99_ms,
            100.0 * st.rate / pg
        );
    }
    println!("errors: REST {}, gRPC {}", rest.errors, grpc_stats.errors);

    // Filtered pages (issue 16), against the unfiltered rate of the same transport.
    println!(
        "\n{:<36} {:>10} {:>9} {:>9} {:>13}",
        "filtered", "pages/s", "p50 ms", "p99 ms", "vs unfiltered"
    );
    let mut errors = 0;
    for (name, filter) in
        [("label_selector=team=a", Filter::team_a()), ("gpu_model=Tesla A100", Filter::a100())]
    {
        for (transport, base, unfiltered) in [
            ("REST", Transport::Rest(http.clone()), &rest),
            ("gRPC", Transport::Grpc(grpc.clone()), &grpc_stats),
        ] {
            let st = run_load(&s, base, &filter).await;
            errors += st.errors;
            println!(
                "{:<36} {:>10.0} {:>9.3} {:>9.3} {:>12.0}%",
                format!("{transport} {name}"),
                st.rate,
                st.p50_ms,
                st.p99_ms,
                100.0 * st.rate / unfiltered.rate
            );
        }
    }
    println!("errors (filtered): {errors}");

    // Depth does not matter: page 1 and page 10,000 cost the same.
    let first = depth_latency(&http, None).await;
    let deep = depth_latency(&http, Some(s.rows - 10_000 * i64::from(PAGE_SIZE))).await;
    println!("REST mean latency: page 1 {first:.3} ms, page 10,000 {deep:.3} ms");

    common::stop(child).await;
}

async fn prepare(s: &Settings, url: &str) {
    let mut admin = PgConnection::connect(&s.admin_url).await.expect("reach PostgreSQL");
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&s.database)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    if !exists {
        // A name of the operator's choosing, quoted as an identifier.
        let create = format!("CREATE DATABASE \"{}\"", s.database.replace('"', "\"\""));
        admin.execute(sqlx::AssertSqlSafe(create)).await.unwrap();
    }
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    resource::data::MIGRATOR.run(&pool).await.expect("migrate the bench database");
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM instances").fetch_one(&pool).await.unwrap();
    if count != s.rows {
        println!("loading {} instances into {} (once) ...", s.rows, s.database);
        let started = Instant::now();
        pool.execute("TRUNCATE instance_labels, instance_specs, instances").await.unwrap();
        sqlx::query(
            "INSERT INTO instances (instance_id, user_id, name, status, status_reason)
             SELECT $1 + g * $2, 'user-' || (g % 1000), 'instance-' || g,
                    CASE WHEN g % 10 = 0 THEN 'STOPPED' ELSE 'RUNNING' END, ''
             FROM generate_series(1, $3) g",
        )
        .bind(BASE)
        .bind(STEP)
        .bind(s.rows)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO instance_specs (instance_id, cpu, memory, gpu, image, config_json)
             SELECT $1 + g * $2, 1 + g % 16, 1024 * (1 + g % 64), g % 7, 'ubuntu:22.04',
                    '{\"env\": {\"MODE\": \"bench\"}}'
             FROM generate_series(1, $3) g",
        )
        .bind(BASE)
        .bind(STEP)
        .bind(s.rows)
        .execute(&pool)
        .await
        .unwrap();
        println!("loaded in {:.1} s", started.elapsed().as_secs_f64());
    }
    // Every tenth instance is labelled `team=a` (also in a database loaded before labels
    // existed); the others have no labels.
    let labelled: i64 = sqlx::query_scalar("SELECT count(*) FROM instances WHERE labels <> '{}'")
        .fetch_one(&pool)
        .await
        .unwrap();
    if labelled != s.rows / 10 {
        println!("labelling every tenth instance team=a (once) ...");
        sqlx::query(
            "UPDATE instances SET labels = CASE WHEN ((instance_id - $1) / $2) % 10 = 0 \
             THEN '{\"team\": \"a\"}'::jsonb ELSE '{}'::jsonb END \
             WHERE labels <> CASE WHEN ((instance_id - $1) / $2) % 10 = 0 \
             THEN '{\"team\": \"a\"}'::jsonb ELSE '{}'::jsonb END",
        )
        .bind(BASE)
        .bind(STEP)
        .execute(&pool)
        .await
        .unwrap();
        pool.execute("VACUUM instances").await.unwrap();
    }
    // Fresh statistics, and the table in the OS cache for every contender alike.
    pool.execute("ANALYZE").await.unwrap();
    pool.execute("SELECT count(*) FROM instances JOIN instance_specs USING (instance_id)")
        .await
        .unwrap();
    pool.close().await;
}

/// Starts the service on database `url`; returns it with its REST and gRPC base URLs.
async fn start_service(url: &str) -> (test_support::Service, String, String) {
    let mut env = test_support::Env::new(url);
    env.set("RESOURCE_SERVER__HTTP__TIMEOUT", "10s")
        .set("RESOURCE_SERVER__GRPC__TIMEOUT", "10s")
        .set("RESOURCE_LOG__LEVEL", "warn,resource::server=info");
    let (child, logged) = common::start(&env, &["serving"], false).await;
    let http = test_support::base_url(&logged[0], "http");
    let grpc = test_support::base_url(&logged[0], "grpc");
    (child, http, grpc)
}

/// pgbench over the same statement at random depths; returns transactions per second.
fn pgbench(s: &Settings, url: &str) -> f64 {
    let script = std::env::temp_dir().join(format!("resource-bench-{}.sql", std::process::id()));
    let body =
        format!("\\set n random(2, {})\n\\set bound {BASE} + :n * {STEP}\n{};\n", s.rows, LIST_SQL);
    std::fs::write(&script, body).unwrap();
    let out = std::process::Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-T"])
        .arg(s.seconds.to_string())
        .arg("-c")
        .arg(s.clients.to_string())
        .arg("-j")
        .arg(s.clients.to_string())
        .arg("-f")
        .arg(&script)
        .arg(url)
        .output()
        .expect("pgbench (Debian: postgresql-client) is on PATH");
    let _ = std::fs::remove_file(&script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("pgbench prints tps")
}

#[derive(Clone)]
enum Transport {
    Rest(String),
    Grpc(String),
}

struct Stats {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
}

/// A token positioned after a random row at least `filter.min_depth` deep, as a client
/// deep in a walk would hold.
fn random_token(rows: i64, filter: &Filter, seed: &mut u64) -> String {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    let n = filter.min_depth + (*seed % (rows - filter.min_depth + 1) as u64) as i64;
    page_token::encode(InstanceId::try_from(BASE + n * STEP).unwrap(), &filter.bound)
}

async fn run_load(s: &Settings, transport: Transport, filter: &Filter) -> Stats {
    let deadline = Instant::now() + Duration::from_secs(s.seconds);
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..s.clients {
        let transport = transport.clone();
        let filter = filter.clone();
        let errors = errors.clone();
        let rows = s.rows;
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x9E37_79B9_7F4A_7C15_u64 ^ (c as u64 + 1);
            let mut latencies = Vec::with_capacity(200_000);
            match transport {
                Transport::Rest(base) => {
                    // One keep-alive connection per client.
                    let client = reqwest::Client::builder()
                        .pool_max_idle_per_host(1)
                        .connect_timeout(Duration::from_secs(5))
                        .timeout(Duration::from_secs(30))
                        .build()
                        .unwrap();
                    while Instant::now() < deadline {
                        let url = format!(
                            "{base}/v1/resources?page_size={PAGE_SIZE}&page_token={}{}",
                            random_token(rows, &filter, &mut seed),
                            filter.query
                        );
                        let t = Instant::now();
                        let ok = match client.get(&url).send().await {
                            Ok(r) if r.status() == 200 => {
                                r.bytes().await.is_ok_and(|b| b.len() > 1000)
                            }
                            _ => false,
                        };
                        latencies.push(t.elapsed());
                        if !ok {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                Transport::Grpc(addr) => {
                    // One HTTP/2 connection per client.
                    let channel = tonic::transport::Endpoint::from_shared(addr)
                        .unwrap()
                        .connect_timeout(Duration::from_secs(5))
                        .timeout(Duration::from_secs(30))
                        .connect()
                        .await
                        .unwrap();
                    let mut client = ResourceServiceClient::new(channel);
                    while Instant::now() < deadline {
                        let req = ListResourcesRequest {
                            page_size: PAGE_SIZE,
                            page_token: random_token(rows, &filter, &mut seed),
                            ..filter.request.clone()
                        };
                        let t = Instant::now();
                        let ok = client
                            .list_resources(req)
                            .await
                            .is_ok_and(|r| r.get_ref().resources.len() == PAGE_SIZE as usize);
                        latencies.push(t.elapsed());
                        if !ok {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            }
            latencies
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e3;
    Stats {
        rate: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
    }
}

/// Mean latency of 1,000 sequential REST requests for the page after row `depth_row`
/// (`None`: the first page).
async fn depth_latency(base: &str, depth_row: Option<i64>) -> f64 {
    let client = test_support::http_client();
    let token = depth_row
        .map(|n| {
            page_token::encode(
                InstanceId::try_from(BASE + n * STEP).unwrap(),
                &ListFilter::default(),
            )
        })
        .unwrap_or_default();
    let url = format!("{base}/v1/resources?page_size={PAGE_SIZE}&page_token={token}");
    let started = Instant::now();
    for _ in 0..1000 {
        let r = client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    // Seconds for 1,000 requests equals milliseconds per request.
    started.elapsed().as_secs_f64()
}
