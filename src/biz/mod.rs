//! Business layer: domain entities, their rules, the use cases that drive them, the
//! repository traits they need and the named errors they return.
//!
//! Depends on std, tokio and tokio-util (timers, channels, cancellation), thiserror,
//! futures, async-trait, tracing, metrics, chrono, sha2 and serde_json value types only: nothing
//! here knows about PostgreSQL, a transport, RabbitMQ or Kubernetes.

pub mod access;
pub mod audit;
pub mod backoff;
pub mod cluster;
pub mod error;
pub mod explain;
#[cfg(test)]
pub(crate) mod fake;
pub mod greeter;
pub mod health;
pub mod id;
pub mod instance;
pub mod outbox;
pub mod page;
pub mod quota;
pub mod reconcile;
pub mod snowflake;
pub mod watch;

pub use audit::{Action, Actor, AuditEntry, AuditRecord, AuditRepo, AuditUsecase, Source};
pub use backoff::Backoff;
pub use error::{BoxError, Error, ErrorKind, RepoError, SharedError};
pub use greeter::GreeterUsecase;
pub use health::{HealthUsecase, Probe, ProbeStatus};
pub use instance::{
    Changes, Command, Envelope, EventKey, GpuType, Instance, InstanceId, InstanceRepo,
    InstanceSpec, InstanceStatus, InstanceUsecase, Limits, ListFilter, ListQuery, NewInstance,
    Outcome, Page, Processed, Snapshot, SpecPatch, StatusChange,
};
pub use outbox::{OutboxRelay, OutboxRepo, Pending, StatusPublisher};
pub use quota::{QuotaConf, QuotaRepo, QuotaUsecase};
pub use watch::{WatchConf, WatchHub, WatchUsecase};
