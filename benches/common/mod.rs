//! Setup the benchmark programs share: settings from the environment, a database and
//! RabbitMQ exchanges and queues of a run's own, and the service binary started on them.
//! Each bench includes it with `mod common;`.
//!
//! The parts the integration tests need too (database and broker names per run, the
//! service's environment, starting and stopping the binary) are the `test-support`
//! crate; this module adds the service's own configuration types and event generator.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use resource::{
    conf::RabbitMq,
    publish::{Outgoing, PublishArgs, messages},
};
use serde_json::Value;
use test_support::{Backends, Database, Env, MqNames, Service};

/// The service binary, built by cargo for the benches.
const BIN: &str = env!("CARGO_BIN_EXE_resource");

/// How long a started service may take to log what a bench waits for.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The setting `key` from the environment, or `default` when it is unset or does not parse.
pub fn env_or<T: FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The servers: `BENCH_DATABASE_URL` and `BENCH_AMQP_URL`, by default the local ones.
pub fn backends() -> Backends {
    Backends::from_env("BENCH")
}

/// The service's configuration directory, `configs/`.
fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
}

/// Starts the service on `configs/` with `env` and waits until it has logged each message
/// of `wait_for`; returns it and the fields of those lines, in that order. Its log goes on
/// to stderr when `echo`. It is killed when dropped.
pub async fn start(env: &Env, wait_for: &[&str], echo: bool) -> (Service, Vec<Value>) {
    let mut service = Service::spawn(Path::new(BIN), &configs(), env, echo);
    let logged = service.wait_for_messages(wait_for, START_TIMEOUT).await;
    (service, logged)
}

/// Kills the service and waits for it to exit.
pub async fn stop(mut service: Service) {
    service.kill().await;
}

/// A database and RabbitMQ exchanges and queues of one run's own, for the service under test.
#[allow(dead_code)] // list_resources reuses one database and uses no broker.
pub struct Run {
    db: Database,
    names: MqNames,
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
        backends().amqp_url
    }

    /// Whether `BENCH_SERVICE_LOG` is set: the service's log then goes to stderr.
    pub fn echo() -> bool {
        std::env::var("BENCH_SERVICE_LOG").is_ok()
    }

    /// Creates database `db` (dropping one an interrupted run left) and the settings of
    /// exchanges and queues named `bench.{suffix}.*`.
    pub async fn new(db: &str, suffix: &str) -> Self {
        let backends = backends();
        let db = Database::create(&backends.admin_url, db).await;
        let names = MqNames::with_suffix("bench", suffix, &backends.amqp_url);
        let mq = rabbitmq(&backends.amqp_url, &names);
        Run { db_url: db.url.clone(), db, names, amqp_url: backends.amqp_url, mq }
    }

    /// The environment of the service on the run's database, exchanges and queues, logging
    /// at the level `BENCH_SERVICE_LOG` or else `level`; callers add their own settings.
    pub fn service(&self, level: &str) -> Env {
        let level = std::env::var("BENCH_SERVICE_LOG").unwrap_or_else(|_| level.into());
        let mut env = Env::new(&self.db_url).with_broker(&self.amqp_url, &self.names);
        env.set("RESOURCE_LOG__LEVEL", level);
        env
    }

    /// Deletes the run's queues and exchanges and drops its database.
    pub async fn finish(self) {
        self.names.remove().await;
        self.db.remove().await;
    }
}

/// The service's RabbitMQ settings from `configs/`, on `amqp_url` with the exchanges and
/// queues `names`.
fn rabbitmq(amqp_url: &str, names: &MqNames) -> RabbitMq {
    let mut mq = resource::conf::load(&configs()).expect("configs/ loads").data.rabbitmq;
    mq.url = amqp_url.to_owned().into();
    mq.exchange.clone_from(&names.exchange);
    mq.queue.clone_from(&names.queue);
    mq.dead_letter_exchange.clone_from(&names.dead_letter_exchange);
    mq.dead_letter_queue.clone_from(&names.dead_letter_queue);
    mq.retry_queue.clone_from(&names.retry_queue);
    mq.status_queue.clone_from(&names.status_queue);
    mq
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

/// `server.connections.max_streams` of `configs/`: the most streams one HTTP/2 connection
/// may hold open at once.
#[allow(dead_code)] // only watch opens many streams per connection.
pub fn max_streams() -> u32 {
    resource::conf::load(&configs()).expect("configs/ loads").server.connections.max_streams
}
