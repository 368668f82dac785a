//! Service layer: implements the API messages of `pb` over the `biz` use cases, for every
//! transport alike. It maps messages and nothing else.
//!
//! Depends on `biz` and `pb`; never on sqlx, tonic status types or axum.

pub mod event;
pub mod greeter;
pub mod health;
pub mod page_token;
pub mod resource;

pub use event::{Disposition, EventService, Inbound};
pub use greeter::GreeterService;
pub use health::{HealthService, Readiness};
pub use resource::{Caller, ResourceAction, ResourceService};
