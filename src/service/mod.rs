//! Service layer: implements the API messages of `pb` over the `biz` use cases, for every
//! transport alike: it maps messages, and settles each event delivery by one policy.
//!
//! Depends on `biz` and `pb`; never on sqlx, tonic status types or axum.

pub mod event;
pub mod greeter;
pub mod health;
pub mod page_token;
pub mod resource;
pub mod resume_token;

pub use event::{BrokerProbe, DeadLetterReason, Disposition, EventService, Inbound, Retries};
pub use greeter::GreeterService;
pub use health::{HealthService, Readiness};
pub use resource::{
    Caller, ResourceAction, ResourceService, Source, integral_numbers, is_user_id, status_named,
};
