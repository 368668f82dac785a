//! Setup the benchmark programs share: settings from the environment, a database and
//! RabbitMQ exchanges and queues of a run's own, and the service binary started on them.
//! Each bench includes it with `mod common;`.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    str::FromStr,
};

use lapin::{Connection, options::QueueDeleteOptions};
use resource::{
    conf::RabbitMq,
    publish::{Outgoing, PublishArgs, messages},
};
use serde_json::Value;
use sqlx::{Connection as _, Executor, PgConnection};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// The setting `key` from the environment, or `default` when it is unset or does not parse.
pub fn env_or<T: FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The admin database URL: `BENCH_DATABASE_URL`, by default the local PostgreSQL.
pub fn admin_url() -> String {
    std::env::var("BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The URL of database `name` on the server of the admin URL `admin`.
pub fn db_url(admin: &str, name: &str) -> String {
    let i = admin.rfind('/').expect("URL with a database");
    format!("{}/{name}", &admin[..i])
}

/// The service's configuration directory, `configs/`.
fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
}

/// The service binary on `configs/` and database `db_url`, on ephemeral ports, logging JSON
/// to a piped stdout and killed when dropped; callers add their own settings.
pub fn service(db_url: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_resource"));
    cmd.arg("-conf")
        .arg(configs())
        .env("RESOURCE_DATA__DATABASE__SOURCE", db_url)
        .env("RESOURCE_SERVER__HTTP__ADDR", "127.0.0.1:0")
        .env("RESOURCE_SERVER__GRPC__ADDR", "127.0.0.1:0")
        .env("RESOURCE_LOG__FORMAT", "json")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Spawns `cmd` and reads its log until it has logged each message of `wait_for`; returns
/// the child and the fields of those lines, in that order. The rest of the log is read on
/// in the background and copied to stderr when `echo`.
pub async fn start(cmd: &mut Command, wait_for: &[&str], echo: bool) -> (Child, Vec<Value>) {
    let mut child = cmd.spawn().expect("start the service");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = vec![None; wait_for.len()];
    while seen.contains(&None) {
        let Ok(Some(line)) = lines.next_line().await else { panic!("the service did not start") };
        let v: Value = serde_json::from_str(&line).unwrap_or_default();
        if let Some(i) = wait_for.iter().position(|m| v["message"] == *m) {
            seen[i].get_or_insert(v);
        }
    }
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if echo {
                eprintln!("{line}");
            }
        }
    });
    (child, seen.into_iter().flatten().collect())
}

/// Kills the service and waits for it to exit.
pub async fn stop(mut child: Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// A database and RabbitMQ exchanges and queues of one run's own, for the service under test.
#[allow(dead_code)] // list_resources reuses one database and uses no broker.
pub struct Run {
    /// Connection to the admin database, kept to drop the run's database at the end.
    admin: PgConnection,
    /// Name of the run's database.
    db: String,
    /// URL of the run's database.
    pub db_url: String,
    /// URL of the broker, from [`Run::amqp_url`].
    pub amqp_url: String,
    /// The service's RabbitMQ settings, with the run's exchanges and queues.
    pub mq: RabbitMq,
}

#[allow(dead_code)] // list_resources reuses one database and uses no broker.
impl Run {
    /// Eight random hex digits that name a run's exchanges and queues (and database).
    pub fn suffix() -> String {
        uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
    }

    /// The broker URL: `BENCH_AMQP_URL`, by default the local RabbitMQ.
    pub fn amqp_url() -> String {
        std::env::var("BENCH_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    }

    /// Whether `BENCH_SERVICE_LOG` is set: the service's log then goes to stderr.
    pub fn echo() -> bool {
        std::env::var("BENCH_SERVICE_LOG").is_ok()
    }

    /// Creates database `db` (dropping one an interrupted run left) and the settings of
    /// exchanges and queues named `bench.{suffix}.*`.
    pub async fn new(db: &str, suffix: &str) -> Self {
        let admin_url = admin_url();
        let mut admin = PgConnection::connect(&admin_url).await.expect("reach PostgreSQL");
        admin.execute(sqlx::AssertSqlSafe(drop_sql(db))).await.unwrap();
        admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}"))).await.unwrap();
        let amqp_url = Self::amqp_url();
        let mq = rabbitmq(&amqp_url, suffix);
        Run { admin, db: db.into(), db_url: db_url(&admin_url, db), amqp_url, mq }
    }

    /// The service on the run's database, exchanges and queues, logging at the level
    /// `BENCH_SERVICE_LOG` or else `level`.
    pub fn service(&self, level: &str) -> Command {
        let level = std::env::var("BENCH_SERVICE_LOG").unwrap_or_else(|_| level.into());
        let mq = &self.mq;
        let mut cmd = service(&self.db_url);
        cmd.env("RESOURCE_DATA__RABBITMQ__URL", &self.amqp_url)
            .env("RESOURCE_DATA__RABBITMQ__EXCHANGE", &mq.exchange)
            .env("RESOURCE_DATA__RABBITMQ__QUEUE", &mq.queue)
            .env("RESOURCE_DATA__RABBITMQ__DEAD_LETTER_EXCHANGE", &mq.dead_letter_exchange)
            .env("RESOURCE_DATA__RABBITMQ__DEAD_LETTER_QUEUE", &mq.dead_letter_queue)
            .env("RESOURCE_DATA__RABBITMQ__RETRY_QUEUE", &mq.retry_queue)
            .env("RESOURCE_DATA__RABBITMQ__STATUS_QUEUE", &mq.status_queue)
            .env("RESOURCE_LOG__LEVEL", level);
        cmd
    }

    /// Deletes the run's queues and exchanges and drops its database.
    pub async fn finish(mut self) {
        let conn = Connection::connect(&self.amqp_url, Default::default()).await.unwrap();
        let channel = conn.create_channel().await.unwrap();
        let mq = &self.mq;
        for q in [&mq.queue, &mq.dead_letter_queue, &mq.retry_queue, &mq.status_queue] {
            let _ = channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
        }
        for e in [&mq.exchange, &mq.dead_letter_exchange] {
            let _ = channel.exchange_delete(e.as_str().into(), Default::default()).await;
        }
        let _ = conn.close(200, "done".into()).await;
        self.admin.execute(sqlx::AssertSqlSafe(drop_sql(&self.db))).await.unwrap();
    }
}

/// The service's RabbitMQ settings from `configs/`, on `amqp_url` with exchanges and queues
/// named `bench.{suffix}.*`.
fn rabbitmq(amqp_url: &str, suffix: &str) -> RabbitMq {
    let mut mq = resource::conf::load(&configs()).expect("configs/ loads").data.rabbitmq;
    mq.url = amqp_url.to_owned().into();
    mq.exchange = format!("bench.{suffix}.events");
    mq.queue = format!("bench.{suffix}.instance-events");
    mq.dead_letter_exchange = format!("bench.{suffix}.dlx");
    mq.dead_letter_queue = format!("bench.{suffix}.dead");
    mq.retry_queue = format!("bench.{suffix}.retry");
    mq.status_queue = format!("bench.{suffix}.status");
    mq
}

/// The statement that drops database `db`, ending the sessions still on it.
fn drop_sql(db: &str) -> String {
    format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")
}

/// `count` INSTANCE_CREATED events in protobuf, owned by user 7, with snowflake ids of
/// node `node_id`.
#[allow(dead_code)] // soak publishes its own mix of events; list_resources none.
pub fn created_events(count: u64, node_id: u16) -> Vec<Outgoing> {
    let args = PublishArgs {
        file: None,
        count: Some(count),
        kind: "created".into(),
        rate: 0.0,
        encoding: "protobuf".into(),
        node_id,
        user_id: 7,
        quiet: true,
    };
    messages(&args).expect("generated events")
}

/// Resident memory of `pid` in KiB (Linux).
#[allow(dead_code)] // reconcile and list_resources do not measure memory.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}
