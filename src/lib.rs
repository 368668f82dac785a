//! `resource`: manages cloud compute instances through gRPC, REST and RabbitMQ events.
//!
//! Layers, outermost first: `server` (transports) → `service` (API mapping) → `biz`
//! (domain and use cases) ← `data` (PostgreSQL). `main.rs` wires them by hand.
#![forbid(unsafe_code)]

pub mod amqp;
pub mod biz;
pub mod cli;
pub mod conf;
pub mod data;
pub mod pb;
pub mod publish;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod telemetry;
