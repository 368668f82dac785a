//! Slow, idle and greedy clients on both listeners: slowloris headers, silent sockets,
//! HTTP/2 connections that only send the preface, idle keep-alive connections, slow
//! request bodies, and more connections than the cap. Each is cut off within its bound.

use std::time::{Duration, Instant};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::helpers::{AppOptions, TestApp, spawn_app_with};

/// The service with short bounds, so the test sees them act.
async fn app() -> TestApp {
    let env = [
        ("RESOURCE_SERVER__CONNECTIONS__MAX", "8"),
        ("RESOURCE_SERVER__CONNECTIONS__FIRST_BYTE_TIMEOUT", "2s"),
        ("RESOURCE_SERVER__CONNECTIONS__HEADER_READ_TIMEOUT", "2s"),
        ("RESOURCE_SERVER__CONNECTIONS__KEEPALIVE_INTERVAL", "1s"),
        ("RESOURCE_SERVER__CONNECTIONS__KEEPALIVE_TIMEOUT", "1s"),
        ("RESOURCE_SERVER__HTTP__BODY_TIMEOUT", "2s"),
    ];
    spawn_app_with(AppOptions {
        env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Default::default()
    })
    .await
}

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

/// A raw connection to `url`'s listener, opened within 5 s.
async fn connect(url: &str) -> TcpStream {
    tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr(url)))
        .await
        .expect("connected in time")
        .expect("connected")
}

/// Reads until the server closes the connection (or it is reset); how long that took.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {} // a response or a SETTINGS/PING frame: keep reading
            Err(_) => panic!("the connection was still open after {limit:?}"),
        }
    }
}

#[tokio::test]
async fn silent_and_preface_only_connections_are_closed_on_both_listeners() {
    let app = app().await;
    for listener in [&app.http, &app.grpc] {
        // A socket that sends nothing at all.
        let mut silent = connect(listener).await;
        let took = closed_within(&mut silent, Duration::from_secs(6)).await;
        assert!(took >= Duration::from_millis(1500), "{listener}: closed after {took:?}");

        // An HTTP/2 client that sends the preface, then nothing: not even a PING answer.
        let mut preface = connect(listener).await;
        preface.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        closed_within(&mut preface, Duration::from_secs(8)).await;
    }
}

#[tokio::test]
async fn slowloris_headers_and_idle_keep_alive_connections_are_closed() {
    let app = app().await;
    // One header line every second: the whole head never arrives in time.
    let mut slow = connect(&app.http).await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let mut closed = false;
    for n in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if slow.write_all(format!("X-Slow-{n}: 1\r\n").as_bytes()).await.is_err() {
            closed = true;
            break;
        }
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(10), slow.read(&mut buf)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a slowloris client was still served after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());

    // A keep-alive connection that goes idle after its first request.
    let mut idle = connect(&app.http).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    closed_within(&mut idle, Duration::from_secs(6)).await;
}

#[tokio::test]
async fn a_slow_request_body_is_408_with_the_error_body() {
    let app = app().await;
    let mut stream = connect(&app.http).await;
    stream
        .write_all(b"POST /v1/resources HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"name\":")
        .await
        .unwrap();
    let started = Instant::now();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&response).contains("\r\n\r\n{") {
        let n = tokio::time::timeout(Duration::from_secs(6), stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "closed without an answer");
        response.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"reason\":\"REQUEST_TIMEOUT\""), "{text}");
    assert!(started.elapsed() >= Duration::from_millis(1500), "{:?}", started.elapsed());
    let logs = app.logs.lock().unwrap().clone();
    assert!(
        !logs.iter().any(|l| l.contains("\"level\":\"ERROR\"")),
        "a slow client is not a server error: {logs:?}"
    );
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_until_one_is_cut_off() {
    let app = app().await;
    // The cap (8) taken by clients that never finish their headers.
    let mut hogs = Vec::new();
    for _ in 0..8 {
        let mut s = connect(&app.http).await;
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        hogs.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let response = reqwest::Client::new()
        .get(format!("{}/healthz", app.http))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("served once a slot frees");
    assert_eq!(response.status(), 200);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1000),
        "served after {waited:?}: the cap did not hold the ninth connection back"
    );
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}

/// The server's first SETTINGS frame after an HTTP/2 preface, as (id, value) pairs.
async fn server_settings(listener: &str) -> Vec<(u16, u32)> {
    let mut stream = connect(listener).await;
    // Preface, then an empty SETTINGS frame (length 0, type 4, flags 0, stream 0).
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut head))
        .await
        .expect("a SETTINGS frame in time")
        .unwrap();
    assert_eq!(head[3], 4, "{listener}: the first frame is SETTINGS");
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut payload))
        .await
        .expect("the SETTINGS payload in time")
        .unwrap();
    payload
        .chunks(6)
        .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
        .collect()
}

#[tokio::test]
async fn one_connection_may_open_only_so_many_streams_on_both_listeners() {
    let env = [("RESOURCE_SERVER__CONNECTIONS__MAX_STREAMS", "32")];
    let app = spawn_app_with(AppOptions {
        env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Default::default()
    })
    .await;
    for listener in [&app.http, &app.grpc] {
        // SETTINGS_MAX_CONCURRENT_STREAMS (0x3): without it a client may open streams
        // that are never finished, each holding memory (20,000 grew the service by 300 MB).
        let settings = server_settings(listener).await;
        assert!(settings.contains(&(3, 32)), "{listener}: {settings:?}");
    }
}
