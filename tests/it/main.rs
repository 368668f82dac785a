//! Integration tests: the real binary against real PostgreSQL, one database per test.

mod auth;
mod burst;
mod clients;
mod cluster;
mod config;
mod grpc;
mod helpers;
mod http;
mod kube;
mod lifecycle;
mod metrics;
mod mq;
mod openapi;
mod postgres;
mod proxy;
mod quota_counters;
mod quotas;
mod races;
mod refusals;
mod replicas;
mod secrets;
mod shutdown;
mod specs;
mod stalls;
mod sync_requests;
mod tracing;
