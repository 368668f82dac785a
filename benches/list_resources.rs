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
    pb::resource::v1::ListResourcesRequest,
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
        "\n== ListResources: {} rows, page_size {PAGE_SIZE}, {} connections, {} s per run ==",
        s.rows, s.clients, s.seconds
    );
    // The exact bytes of a page the service answers, served by nginx as a static file:
    // the cost of HTTP alone, on the same cores.
    let page = {
        let token = random_token(s.rows, &Filter::none(), &mut 7);
        let url = format!("{http}/v1/resources?page_size={PAGE_SIZE}&page_token={token}");
        let r = test_support::http_client().get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap()
    };
    let pg_before = pgbench(&s, &url);
    let nginx = Nginx::start(&page);
    let fixed = nginx.wrk(&s);
    drop(nginx);
    let rest = rest_load(&s, &http, &Filter::none());
    let grpc_stats = grpc_load(&s, &grpc, &Filter::none()).await;
    let pg_after = pgbench(&s, &url);
    let pg = (pg_before + pg_after) / 2.0;
    // Both costs share the same two cores: a page costs the database's time plus HTTP's.
    let bound = 1.0 / (1.0 / pg + 1.0 / fixed.rate);

    println!("{:<30} {:>10} {:>9} {:>9} {:>9}", "", "pages/s", "p50 ms", "p99 ms", "vs bound");
    let row = |name: &str, rate: f64, p50: Option<f64>, p99: Option<f64>| {
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
        println!(
            "{name:<30} {rate:>10.0} {:>9} {:>9} {:>8.0}%",
            ms(p50),
            ms(p99),
            100.0 * rate / bound
        );
    };
    row("PostgreSQL (pgbench) before", pg_before, None, None);
    row("PostgreSQL (pgbench) after", pg_after, None, None);
    row("nginx, the page as a file", fixed.rate, Some(fixed.p50_ms), Some(fixed.p99_ms));
    row("bound 1/(1/pgbench+1/nginx)", bound, None, None);
    row("REST GET /v1/resources", rest.rate, Some(rest.p50_ms), Some(rest.p99_ms));
    row("gRPC ListResources", grpc_stats.rate, Some(grpc_stats.p50_ms), Some(grpc_stats.p99_ms));
    println!(
        "page {} bytes; errors: nginx {}, REST {}, gRPC {}",
        page.len(),
        fixed.errors,
        rest.errors,
        grpc_stats.errors
    );

    // Filtered pages (issue 16), against the unfiltered rate of the same transport.
    println!(
        "\n{:<36} {:>10} {:>9} {:>9} {:>13}",
        "filtered", "pages/s", "p50 ms", "p99 ms", "vs unfiltered"
    );
    let mut errors = 0;
    for (name, filter) in
        [("label_selector=team=a", Filter::team_a()), ("gpu_model=Tesla A100", Filter::a100())]
    {
        for transport in ["REST", "gRPC"] {
            let (st, unfiltered) = if transport == "REST" {
                (rest_load(&s, &http, &filter), &rest)
            } else {
                (grpc_load(&s, &grpc, &filter).await, &grpc_stats)
            };
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

struct Stats {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
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

/// How many distinct random positions a load cycles through.
const POSITIONS: usize = 20_000;

fn random_tokens(rows: i64, filter: &Filter) -> Vec<String> {
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    (0..POSITIONS).map(|_| random_token(rows, filter, &mut seed)).collect()
}

/// REST pages at random positions, loaded by wrk like the static file.
fn rest_load(s: &Settings, base: &str, filter: &Filter) -> Stats {
    let paths: Vec<String> = random_tokens(s.rows, filter)
        .into_iter()
        .map(|t| format!("/v1/resources?page_size={PAGE_SIZE}&page_token={t}{}", filter.query))
        .collect();
    let st = wrk(s, base, &paths);
    // A full page of 50 resources is well over 10 kB; an error body is not.
    assert!(st.bytes_per_request > 10_000.0, "REST pages of {} bytes", st.bytes_per_request);
    st.stats
}

struct WrkRun {
    stats: Stats,
    bytes_per_request: f64,
}

/// wrk with `s.clients` connections (one thread each) for `s.seconds` on `base`, cycling
/// through `paths` (each thread from its own place in the list).
fn wrk(s: &Settings, base: &str, paths: &[String]) -> WrkRun {
    let mut script = String::from("local paths = {\n");
    for p in paths {
        script.push_str(&format!("  \"{p}\",\n"));
    }
    script.push_str(
        r#"}
local threads, n = 0, 0
function setup(thread)
  thread:set("start", threads * 7919)
  threads = threads + 1
end
function init(args)
  n = start
end
function request()
  n = n % #paths + 1
  return wrk.format("GET", paths[n])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d\n", summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout, summary.bytes))
end
"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("load.lua");
    std::fs::write(&file, script).unwrap();
    let out = std::process::Command::new("wrk")
        .arg("-t")
        .arg(s.clients.to_string())
        .arg("-c")
        .arg(s.clients.to_string())
        .arg("-d")
        .arg(format!("{}s", s.seconds))
        .args(["--timeout", "5s", "-s"])
        .arg(&file)
        .arg(base)
        .output()
        .expect("wrk is on PATH (make bench installs it: scripts/bench-deps.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    let f: Vec<f64> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("wrk printed no result: {stdout}"))
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let (requests, micros) = (f[0], f[1]);
    WrkRun {
        stats: Stats {
            rate: requests / (micros / 1e6),
            p50_ms: f[2] / 1e3,
            p99_ms: f[3] / 1e3,
            errors: (f[4] + f[5]) as u64,
        },
        bytes_per_request: f[6] / requests.max(1.0),
    }
}

/// nginx serving one file, `/page.json`, from a directory of its own, until dropped.
struct Nginx {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(body: &[u8]) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // Its workers may run as another user.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("page.json"), body).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let d = dir.path().display();
        // As production nginx serves static files: sendfile, keep-alive without a limit,
        // no access log; one worker per core.
        let conf = format!(
            "daemon off;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n\
               keepalive_requests 100000000;\n  keepalive_timeout 60s;\n\
               client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n\
               scgi_temp_path {d}/scgi;\n\
               types {{ application/json json; }}\n\
               server {{ listen 127.0.0.1:{port}; root {d}; }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let bin = if std::path::Path::new("/usr/sbin/nginx").exists() {
            "/usr/sbin/nginx"
        } else {
            "nginx"
        };
        let child = std::process::Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .spawn()
            .expect("nginx is installed (make bench installs it: scripts/bench-deps.sh)");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }

    fn wrk(&self, s: &Settings) -> Stats {
        let run = wrk(s, &self.url, &["/page.json".to_owned()]);
        assert!(run.bytes_per_request > 10_000.0, "nginx sent {} bytes", run.bytes_per_request);
        run.stats
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: nginx's fast shutdown, the workers with it.
        let _ = std::process::Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

/// gRPC pages at random positions, from a client as lean as wrk: requests encoded ahead,
/// responses counted, not decoded. One HTTP/2 connection per client.
async fn grpc_load(s: &Settings, addr: &str, filter: &Filter) -> Stats {
    use prost::Message;
    let requests: Arc<Vec<bytes::Bytes>> = Arc::new(
        random_tokens(s.rows, filter)
            .into_iter()
            .map(|t| {
                ListResourcesRequest {
                    page_size: PAGE_SIZE,
                    page_token: t,
                    ..filter.request.clone()
                }
                .encode_to_vec()
                .into()
            })
            .collect(),
    );
    let deadline = Instant::now() + Duration::from_secs(s.seconds);
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..s.clients {
        let (addr, requests, errors) = (addr.to_owned(), requests.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let channel = tonic::transport::Endpoint::from_shared(addr)
                .unwrap()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(30))
                .connect()
                .await
                .unwrap();
            let mut client = tonic::client::Grpc::new(channel);
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                "/resource.v1.resourceService/ListResources",
            );
            let mut latencies = Vec::with_capacity(200_000);
            let mut n = c * 7919;
            while Instant::now() < deadline {
                n = (n + 1) % requests.len();
                let t = Instant::now();
                let ok = match client.ready().await {
                    Ok(()) => client
                        .unary(tonic::Request::new(requests[n].clone()), path.clone(), Counted)
                        .await
                        .is_ok_and(|r| *r.get_ref() > 2_000),
                    Err(_) => false,
                };
                latencies.push(t.elapsed());
                if !ok {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

/// Sends encoded messages as they are; receives a message as its length.
#[derive(Clone, Copy)]
struct Counted;

impl tonic::codec::Codec for Counted {
    type Encode = bytes::Bytes;
    type Decode = usize;
    type Encoder = Counted;
    type Decoder = Counted;
    fn encoder(&mut self) -> Counted {
        Counted
    }
    fn decoder(&mut self) -> Counted {
        Counted
    }
}

impl tonic::codec::Encoder for Counted {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: bytes::Bytes,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Counted {
    type Item = usize;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<usize>, tonic::Status> {
        let n = bytes::Buf::remaining(buf);
        bytes::Buf::advance(buf, n);
        Ok(Some(n))
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
