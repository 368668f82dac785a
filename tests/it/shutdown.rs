//! Graceful shutdown: SIGTERM with a stream still open, bounded by server.shutdown_timeout.

use std::time::{Duration, Instant};

use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::helpers::{AppOptions, spawn_app_with};

#[tokio::test]
async fn an_open_stream_cannot_hold_the_process_past_the_shutdown_timeout() {
    let mut app = spawn_app_with(AppOptions {
        env: vec![("RESOURCE_SERVER__SHUTDOWN_TIMEOUT".into(), "1s".into())],
        ..Default::default()
    })
    .await;
    // grpc.health.v1.Health/Watch never ends on its own: an HTTP/2 stream that a
    // graceful shutdown would wait for forever.
    let mut health = HealthClient::new(app.grpc_channel().await);
    let mut watch = health
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a first status in time")
        .expect("a first status")
        .expect("a message");

    let started = Instant::now();
    let status = app.terminate().await;
    let took = started.elapsed();
    assert!(status.success(), "a clean stop: {status:?}");
    assert!(took < Duration::from_secs(5), "stopped within the bound, took {took:?}");
    let logs = app.logs.lock().unwrap().join("\n");
    assert!(logs.contains("shutdown deadline"), "the forced close is logged");
}

#[tokio::test]
async fn an_idle_service_stops_at_once_with_status_0() {
    let mut app = spawn_app_with(AppOptions::default()).await;
    assert_eq!(app.get("/v1/resources").await.status(), 200);
    let started = Instant::now();
    let status = app.terminate().await;
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}
