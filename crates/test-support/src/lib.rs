//! What the integration tests (`tests/it`) and the benchmarks (`benches/`) of `resource`
//! share: where PostgreSQL and RabbitMQ are, a database and broker names of a run's own,
//! the environment the service binary runs with, and the binary itself started on a
//! configuration directory, awaited on its log lines or `/readyz`, stopped with SIGTERM
//! (then SIGKILL) and its log collected.
//!
//! It depends on tokio, sqlx, lapin, reqwest and serde_json only, never on `resource`
//! itself: callers pass the binary's path (`env!("CARGO_BIN_EXE_resource")`, which only
//! the tests and benches of the `resource` package can name).
//!
//! ```no_run
//! # async fn example() {
//! use std::{path::Path, time::Duration};
//! use test_support::{Backends, Database, Env, MqNames, Service};
//!
//! let backends = Backends::from_env("TEST");
//! let db = Database::create_unique(&backends.admin_url, "resource_test").await;
//! let mq = MqNames::unique("test", &backends.amqp_url);
//! let env = Env::new(&db.url).with_broker(&backends.amqp_url, &mq);
//! let mut service = Service::spawn(Path::new("target/debug/resource"), Path::new("configs"), &env, false);
//! let serving = service.wait_for_messages(&["serving"], Duration::from_secs(30)).await;
//! let http = test_support::base_url(&serving[0], "http");
//! service.wait_ready(&test_support::http_client(), &http, Duration::from_secs(15)).await;
//! assert!(service.terminate(Duration::from_secs(15)).await.success());
//! mq.remove().await;
//! db.remove().await;
//! # }
//! ```

#![forbid(unsafe_code)]

mod backend;
mod broker;
mod database;
mod service;

pub use backend::{Backends, DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL, database_url};
pub use broker::MqNames;
pub use database::Database;
pub use service::{Env, Logs, Service, base_url, http_client};
