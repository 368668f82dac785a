//! Test harness: a database of its own per test, the real `resource` binary started
//! against it on free ports, and helpers to seed rows and call both transports.
//!
//! `TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) names a
//! server and a database to connect to for creating the per-test databases.
//! `TEST_LOG=1` forwards the service's log lines to the test output.

use std::{
    collections::HashMap,
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use sqlx::{Connection, Executor, PgConnection, PgPool, postgres::PgPoolOptions};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::oneshot,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_resource");

/// The admin URL used to create and drop per-test databases.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `admin_url` with its database replaced by `name`.
fn url_for(name: &str) -> String {
    let admin = admin_url();
    let (base, query) = admin.split_once('?').map_or((admin.as_str(), None), |(b, q)| (b, Some(q)));
    let root = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    }
}

/// A database of its own, dropped when the value is.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> Self {
        let name = format!("resource_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url()).await.unwrap_or_else(|e| {
            panic!(
                "cannot reach PostgreSQL at {} ({e}); start it (see README: make test prepares it) \
                 or set TEST_DATABASE_URL",
                admin_url()
            )
        });
        admin
            .execute(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
            .await
            .expect("create test database");
        let url = url_for(&name);
        Self { name, url }
    }

    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.url)
            .await
            .expect("connect test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime guarantee: use a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&admin_url()).await {
                    let _ = admin
                        .execute(sqlx::AssertSqlSafe(format!(
                            r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#
                        )))
                        .await;
                }
            });
        })
        .join();
    }
}

/// The admin URL of the test broker.
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Exchange and queue names of one test, so tests share the broker without meeting.
#[derive(Clone, Debug)]
pub struct MqNames {
    pub exchange: String,
    pub queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub retry_queue: String,
    pub status_queue: String,
}

impl MqNames {
    fn unique() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let id = &id[..12];
        Self {
            exchange: format!("test.{id}.events"),
            queue: format!("test.{id}.instance-events"),
            dead_letter_exchange: format!("test.{id}.events.dlx"),
            dead_letter_queue: format!("test.{id}.instance-events.dead"),
            retry_queue: format!("test.{id}.instance-events.retry"),
            status_queue: format!("test.{id}.instance-status"),
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            ("EXCHANGE", &self.exchange),
            ("QUEUE", &self.queue),
            ("DEAD_LETTER_EXCHANGE", &self.dead_letter_exchange),
            ("DEAD_LETTER_QUEUE", &self.dead_letter_queue),
            ("RETRY_QUEUE", &self.retry_queue),
            ("STATUS_QUEUE", &self.status_queue),
        ]
        .into_iter()
        .map(|(k, v)| (format!("RESOURCE_DATA__RABBITMQ__{k}"), v.clone()))
        .collect()
    }
}

impl Drop for MqNames {
    fn drop(&mut self) {
        // Plain strings: a clone of `self` would run this `drop` again.
        let queues = [&self.queue, &self.dead_letter_queue, &self.retry_queue, &self.status_queue]
            .map(|q| q.clone());
        let exchanges = [&self.exchange, &self.dead_letter_exchange].map(|e| e.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
                let Ok(conn) = lapin::Connection::connect(&amqp_url(), Default::default()).await
                else {
                    return;
                };
                let Ok(ch) = conn.create_channel().await else { return };
                for q in &queues {
                    let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
                }
                for e in &exchanges {
                    let _ = ch
                        .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
                let _ = conn.close(200, "done".into()).await;
            });
        })
        .join();
    }
}

/// The `resource` binary running against a test database and its own broker names.
pub struct TestApp {
    pub http: String,
    pub grpc: String,
    pub pool: PgPool,
    pub client: reqwest::Client,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub mq: MqNames,
    env: HashMap<String, String>,
    child: Child,
    conf_dir: tempfile::TempDir,
    _db: TestDb,
}

/// Options for [`spawn_app_with`].
#[derive(Default)]
pub struct AppOptions {
    /// Extra `RESOURCE_…` environment overrides.
    pub env: Vec<(String, String)>,
    /// Reach the test database through this address (a test-controlled proxy).
    pub database_via: Option<std::net::SocketAddr>,
    /// Reach the broker through this address (a test-controlled proxy).
    pub broker_via: Option<std::net::SocketAddr>,
    /// Put this password in the database URL (trust authentication ignores it).
    pub database_password: Option<String>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

pub async fn spawn_app_with(opts: AppOptions) -> TestApp {
    let db = TestDb::create().await;
    let mq = MqNames::unique();
    let conf_dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo_path("configs/config.yaml"), conf_dir.path().join("config.yaml")).unwrap();

    let amqp = opts.broker_via.map_or(amqp_url(), |addr| crate::proxy::via(&amqp_url(), addr));
    let mut env: HashMap<String, String> = HashMap::from([
        ("RESOURCE_DATA__DATABASE__SOURCE".into(), {
            let url =
                opts.database_via.map_or(db.url.clone(), |addr| crate::proxy::via(&db.url, addr));
            match &opts.database_password {
                Some(pw) => url.replacen("://postgres@", &format!("://postgres:{pw}@"), 1),
                None => url,
            }
        }),
        ("RESOURCE_DATA__RABBITMQ__URL".into(), amqp),
        ("RESOURCE_DATA__RABBITMQ__RETRY_DELAY".into(), "200ms".into()),
        ("RESOURCE_DATA__RABBITMQ__CONNECT_TIMEOUT".into(), "2s".into()),
        ("RESOURCE_SERVER__HTTP__ADDR".into(), "127.0.0.1:0".into()),
        ("RESOURCE_SERVER__GRPC__ADDR".into(), "127.0.0.1:0".into()),
        ("RESOURCE_LOG__FORMAT".into(), "json".into()),
        ("RESOURCE_LOG__LEVEL".into(), "info,resource=debug".into()),
    ]);
    env.extend(mq.env());
    env.extend(opts.env);

    let (child, logs, http, grpc) = launch(&env, conf_dir.path()).await;
    let pool = db.pool().await;
    let app = TestApp {
        http,
        grpc,
        pool,
        // Idle pooled connections are dropped before the service closes them (after
        // `header_read_timeout`, 10 s), as a well-behaved client does: otherwise a request
        // sent just as the server closes fails with IncompleteMessage.
        client: reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client"),
        logs,
        mq,
        env,
        child,
        conf_dir,
        _db: db,
    };
    app.wait_ready().await;
    app
}

type Launched = (Child, Arc<Mutex<Vec<String>>>, String, String);

async fn launch(env: &HashMap<String, String>, conf_dir: &std::path::Path) -> Launched {
    let mut child = Command::new(BIN)
        .arg("-conf")
        .arg(conf_dir)
        .envs(env)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the resource binary");

    let logs = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = oneshot::channel();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    tokio::spawn(collect_logs(BufReader::new(stderr), logs.clone(), None));
    tokio::spawn(collect_logs(BufReader::new(stdout), logs.clone(), Some(ready_tx)));

    let (http, grpc) = match tokio::time::timeout(Duration::from_secs(30), ready_rx).await {
        Ok(Ok(addrs)) => addrs,
        _ => panic!("the service did not start; its log:\n{}", logs.lock().unwrap().join("\n")),
    };
    (child, logs, format!("http://{http}"), format!("http://{grpc}"))
}

async fn collect_logs<R: tokio::io::AsyncRead + Unpin>(
    reader: BufReader<R>,
    logs: Arc<Mutex<Vec<String>>>,
    mut ready: Option<oneshot::Sender<(String, String)>>,
) {
    let echo = std::env::var("TEST_LOG").is_ok_and(|v| v == "1");
    let mut lines = reader.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if echo {
            eprintln!("[resource] {line}");
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["message"] == "serving"
            && let Some(tx) = ready.take()
        {
            let addr = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            let _ = tx.send((addr("http"), addr("grpc")));
        }
        logs.lock().unwrap().push(line);
    }
}

pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A second process of the service on the same database, broker names and cluster.
pub struct Replica {
    pub http: String,
    pub logs: Arc<Mutex<Vec<String>>>,
    child: Child,
}

impl Replica {
    /// SIGTERM, then its exit status (within 15 s).
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        terminate(&mut self.child).await
    }
}

async fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let pid = child.id().expect("running") as i32;
    let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits within 15 s")
        .expect("exit status")
}

impl TestApp {
    pub async fn replica(&self) -> Replica {
        let (child, logs, http, _) = launch(&self.env, self.conf_dir.path()).await;
        Replica { http, logs, child }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(format!("{}{path}", self.http)).send().await.expect("GET")
    }

    /// Creates an instance through the REST API at `http` (this process or a replica's
    /// address) and returns the created resource.
    pub async fn create_at(&self, http: &str, body: &serde_json::Value) -> serde_json::Value {
        let response =
            self.client.post(format!("{http}/v1/resources")).json(body).send().await.expect("POST");
        assert_eq!(response.status(), 200, "create refused");
        response.json().await.expect("a JSON body")
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self.get(path).await;
        let status = response.status().as_u16();
        let body = response.json().await.expect("a JSON body");
        (status, body)
    }

    pub async fn grpc_channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.grpc.clone())
            .unwrap()
            .connect()
            .await
            .expect("connect gRPC")
    }

    /// Waits until `/readyz` answers 200: the database answers and the consumer has
    /// declared its topology, so published events are routed.
    pub async fn wait_ready(&self) {
        for _ in 0..300 {
            if self.get("/readyz").await.status() == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the service never became ready; its log:\n{}",
            self.logs.lock().unwrap().join("\n")
        );
    }

    /// Kills the service with SIGKILL (no chance to clean up) and waits for it.
    pub async fn kill(&mut self) {
        self.child.start_kill().expect("kill");
        self.child.wait().await.expect("exit status");
    }

    /// Starts the service again on the same database, broker names and configuration.
    pub async fn restart(&mut self) {
        let (child, logs, http, grpc) = launch(&self.env, self.conf_dir.path()).await;
        self.child = child;
        self.logs = logs;
        self.http = http;
        self.grpc = grpc;
        self.wait_ready().await;
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        terminate(&mut self.child).await
    }

    /// Waits up to `within` for the service to exit on its own.
    pub async fn exited(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(within, self.child.wait()).await.ok().map(|s| s.expect("exit status"))
    }
}

/// One row to seed.
#[derive(Clone, Debug)]
pub struct Seed {
    pub id: i64,
    pub user_id: String,
    pub name: String,
    pub status: &'static str,
}

impl Seed {
    pub fn new(id: i64) -> Self {
        Self { id, user_id: "u1".into(), name: format!("inst-{id}"), status: "RUNNING" }
    }
    pub fn owner(mut self, user: &str) -> Self {
        self.user_id = user.into();
        self
    }
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }
    pub fn status(mut self, status: &'static str) -> Self {
        self.status = status;
        self
    }
}

/// Inserts instances with their specs directly (the write API comes with later issues).
pub async fn seed(pool: &PgPool, rows: &[Seed]) {
    let mut tx = pool.begin().await.unwrap();
    for r in rows {
        let deleted_at = (r.status == "DELETED").then(chrono::Utc::now);
        sqlx::query(
            "INSERT INTO instances (instance_id, user_id, name, status, deleted_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(r.id)
        .bind(&r.user_id)
        .bind(&r.name)
        .bind(r.status)
        .bind(deleted_at)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO instance_specs (instance_id, cpu, memory, gpu, image) VALUES ($1, 2, 4096, 0, 'ubuntu:22.04')",
        )
        .bind(r.id)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
}
