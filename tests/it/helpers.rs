//! Test harness: a database of its own per test, the real `resource` binary started
//! against it on free ports, and helpers to seed rows and call both transports.
//!
//! The shared parts (database and broker names per test, the service's environment,
//! starting, awaiting and stopping the binary) are the `test-support` crate, which the
//! benchmarks use too; this module adds what only the tests need.
//!
//! `TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) names a
//! server and a database to connect to for creating the per-test databases, and
//! `TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`) the broker.
//! `TEST_LOG=1` forwards the service's log lines to the test output.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use sqlx::PgPool;
use test_support::{Backends, Database, Env, Logs, MqNames, Service, base_url, http_client};

pub const BIN: &str = env!("CARGO_BIN_EXE_resource");

/// How long a started process may take to log "serving".
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a serving process may take to answer `/readyz` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a process may take to exit after SIGTERM before it is killed.
const TERMINATE_GRACE: Duration = Duration::from_secs(15);
/// How long a gRPC channel may take to connect, and a gRPC call to answer.
const GRPC_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const GRPC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a one-shot run of the binary (`migrate`, `version`, a refused start) may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The servers the tests use: `TEST_DATABASE_URL` and `TEST_AMQP_URL`.
pub fn backends() -> Backends {
    Backends::from_env("TEST")
}

/// The admin URL used to create and drop per-test databases.
pub fn admin_url() -> String {
    backends().admin_url
}

/// The URL of the test broker.
pub fn amqp_url() -> String {
    backends().amqp_url
}

/// A database of the test's own, `resource_test_<uuid>`, dropped with the value.
pub async fn test_db() -> Database {
    Database::create_unique(&admin_url(), "resource_test").await
}

fn echo() -> bool {
    std::env::var("TEST_LOG").is_ok_and(|v| v == "1")
}

pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A gRPC endpoint at `url` whose connect and every call are bounded.
pub fn grpc_endpoint(url: &str) -> tonic::transport::Endpoint {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("a gRPC URL")
        .connect_timeout(GRPC_CONNECT_TIMEOUT)
        .timeout(GRPC_TIMEOUT)
}

/// Runs the binary to its end (it is killed after a minute) and returns its output.
pub async fn run_to_end(cmd: &mut tokio::process::Command) -> std::process::Output {
    let output = cmd.kill_on_drop(true).output();
    tokio::time::timeout(RUN_TIMEOUT, output)
        .await
        .unwrap_or_else(|_| panic!("the binary ran longer than {RUN_TIMEOUT:?}"))
        .expect("run the binary")
}

/// The `resource` binary running against a test database and its own broker names.
///
/// Fields drop in order: the process first, then its broker names and its database.
pub struct TestApp {
    pub http: String,
    pub grpc: String,
    pub client: reqwest::Client,
    pub logs: Logs,
    service: Service,
    pub pool: PgPool,
    pub mq: MqNames,
    env: Env,
    conf_dir: tempfile::TempDir,
    _db: Database,
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
    let db = test_db().await;
    let amqp_url = amqp_url();
    let mq = MqNames::unique("test", &amqp_url);
    let conf_dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo_path("configs/config.yaml"), conf_dir.path().join("config.yaml")).unwrap();

    let amqp = opts.broker_via.map_or(amqp_url.clone(), |addr| crate::proxy::via(&amqp_url, addr));
    let database = {
        let url = opts.database_via.map_or(db.url.clone(), |addr| crate::proxy::via(&db.url, addr));
        match &opts.database_password {
            Some(pw) => url.replacen("://postgres@", &format!("://postgres:{pw}@"), 1),
            None => url,
        }
    };
    let mut env = Env::new(&database).with_broker(&amqp, &mq);
    env.set("RESOURCE_DATA__RABBITMQ__RETRY_DELAY", "200ms")
        .set("RESOURCE_DATA__RABBITMQ__CONNECT_TIMEOUT", "2s")
        .set("RESOURCE_LOG__LEVEL", "info,resource=debug");
    env.extend(opts.env);

    let (service, http, grpc) = launch(&env, conf_dir.path()).await;
    let pool = db.pool(4).await;
    let mut app = TestApp {
        http,
        grpc,
        client: http_client(),
        logs: service.logs.clone(),
        service,
        pool,
        mq,
        env,
        conf_dir,
        _db: db,
    };
    app.wait_ready().await;
    app
}

/// Starts the binary and waits until it logs "serving"; returns it with its REST and
/// gRPC base URLs.
async fn launch(env: &Env, conf_dir: &Path) -> (Service, String, String) {
    let mut service = Service::spawn(Path::new(BIN), conf_dir, env, echo());
    let serving = service.wait_for_messages(&["serving"], START_TIMEOUT).await;
    let (http, grpc) = (base_url(&serving[0], "http"), base_url(&serving[0], "grpc"));
    (service, http, grpc)
}

/// The lines of `logs` that are JSON objects, parsed.
pub fn json_lines(logs: &Logs) -> Vec<serde_json::Value> {
    let lines = logs.lock().unwrap().clone();
    lines.iter().filter_map(|line| serde_json::from_str(line).ok()).collect()
}

/// A second process of the service on the same database, broker names and cluster.
pub struct Replica {
    pub http: String,
    pub logs: Logs,
    service: Service,
}

impl Replica {
    /// SIGTERM, then its exit status (killed, and the test failed, after 15 s).
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.service.terminate(TERMINATE_GRACE).await
    }
}

impl TestApp {
    pub async fn replica(&self) -> Replica {
        self.replica_with(&[]).await
    }

    /// A replica with `overrides` on top of this process's environment.
    pub async fn replica_with(&self, overrides: &[(&str, &str)]) -> Replica {
        let mut env = self.env.clone();
        env.extend(overrides.iter().copied());
        let (service, http, _) = launch(&env, self.conf_dir.path()).await;
        Replica { http, logs: service.logs.clone(), service }
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

    /// A channel to the gRPC listener; connecting and every call are bounded.
    pub async fn grpc_channel(&self) -> tonic::transport::Channel {
        grpc_endpoint(&self.grpc).connect().await.expect("connect gRPC")
    }

    /// Waits until `/readyz` answers 200: the database answers and the consumer has
    /// declared its topology, so published events are routed.
    pub async fn wait_ready(&mut self) {
        self.service.wait_ready(&self.client, &self.http, READY_TIMEOUT).await;
    }

    /// Waits (at most `within`) for the first JSON log line from the `from`-th on that
    /// `matches` accepts.
    pub async fn wait_for_line(
        &mut self,
        what: &str,
        from: usize,
        within: Duration,
        matches: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.service.wait_for_line(what, from, within, matches).await
    }

    /// The JSON lines of the log so far (other lines are left out).
    pub fn json_logs(&self) -> Vec<serde_json::Value> {
        json_lines(&self.logs)
    }

    /// Kills the service with SIGKILL (no chance to clean up) and waits for it.
    pub async fn kill(&mut self) {
        self.service.kill().await;
    }

    /// Starts the service again on the same database, broker names and configuration.
    pub async fn restart(&mut self) {
        let (service, http, grpc) = launch(&self.env, self.conf_dir.path()).await;
        self.logs = service.logs.clone();
        self.service = service;
        self.http = http;
        self.grpc = grpc;
        self.wait_ready().await;
    }

    /// Sends SIGTERM and waits for the exit status (killed, and the test failed, after 15 s).
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.service.terminate(TERMINATE_GRACE).await
    }

    /// Waits up to `within` for the service to exit on its own.
    pub async fn exited(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.service.exited(within).await
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
