//! REST: the greeter, ListResources and GetResource, and the error model.

use std::collections::HashSet;

use serde_json::Value;

use crate::{
    helpers::{AppOptions, Seed, seed, spawn_app, spawn_app_with},
    proxy::{Proxy, target_of},
};

#[tokio::test]
async fn the_greeter_answers_like_the_kratos_layout() {
    let app = spawn_app().await;

    let (status, body) = app.get_json("/helloworld/kratos").await;

    assert_eq!(status, 200);
    assert_eq!(body, serde_json::json!({"message": "Hello kratos"}));
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let app = spawn_app().await;

    let (live, _) = app.get_json("/healthz").await;
    let (ready, body) = app.get_json("/readyz").await;

    assert_eq!(live, 200);
    assert_eq!(ready, 200);
    assert_eq!(body["checks"]["database"], "ok");
}

/// Walks every page of `query`, returning the ids in order.
async fn walk(app: &crate::helpers::TestApp, query: &str) -> Vec<i64> {
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let (status, body) =
            app.get_json(&format!("/v1/resources?{query}&page_token={token}")).await;
        assert_eq!(status, 200, "{body}");
        ids.extend(page_ids(&body));
        token = body["next_page_token"].as_str().unwrap().to_owned();
        if token.is_empty() {
            return ids;
        }
    }
}

fn page_ids(body: &Value) -> Vec<i64> {
    body["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["instance_id"].as_str().expect("int64 as a string").parse().unwrap())
        .collect()
}

#[tokio::test]
async fn pages_cover_every_instance_once_newest_first_under_each_filter() {
    let app = spawn_app().await;
    let rows: Vec<Seed> = (1..=137)
        .map(|id| {
            let owner = if id % 3 == 0 { "alice" } else { "bob" };
            let status = match id % 5 {
                0 => "STOPPED",
                1 => "DELETED",
                _ => "RUNNING",
            };
            let name = if id % 2 == 0 { "even" } else { "odd" };
            Seed::new(id).owner(owner).status(status).named(name)
        })
        .collect();
    seed(&app.pool, &rows).await;
    let expect = |pred: &dyn Fn(&Seed) -> bool| -> Vec<i64> {
        let mut ids: Vec<i64> = rows.iter().filter(|r| pred(r)).map(|r| r.id).collect();
        ids.sort_unstable_by(|a, b| b.cmp(a));
        ids
    };

    let cases: Vec<(&str, Vec<i64>)> = vec![
        ("page_size=10", expect(&|r| r.status != "DELETED")),
        ("page_size=7&user_id=alice", expect(&|r| r.user_id == "alice" && r.status != "DELETED")),
        ("page_size=4&status=STOPPED", expect(&|r| r.status == "STOPPED")),
        ("page_size=9&status=deleted", expect(&|r| r.status == "DELETED")),
        (
            "page_size=6&name=even&user_id=bob",
            expect(&|r| r.name == "even" && r.user_id == "bob" && r.status != "DELETED"),
        ),
        ("page_size=1000", expect(&|r| r.status != "DELETED")),
        ("", expect(&|r| r.status != "DELETED")),
    ];
    for (query, want) in cases {
        let got = walk(&app, query).await;

        assert_eq!(got, want, "{query}");
    }
}

#[tokio::test]
async fn the_default_page_is_50_and_the_last_page_has_no_token() {
    let app = spawn_app().await;
    seed(&app.pool, &(1..=60).map(Seed::new).collect::<Vec<_>>()).await;

    let (_, first) = app.get_json("/v1/resources").await;
    let token = first["next_page_token"].as_str().unwrap();
    let (_, second) = app.get_json(&format!("/v1/resources?page_token={token}")).await;

    assert_eq!(page_ids(&first).len(), 50);
    assert_eq!(page_ids(&second).len(), 10);
    assert_eq!(second["next_page_token"], "");
}

#[tokio::test]
async fn pagination_is_stable_when_instances_arrive_between_pages() {
    let app = spawn_app().await;
    seed(&app.pool, &(1000..1030).map(Seed::new).collect::<Vec<_>>()).await;

    let (_, first) = app.get_json("/v1/resources?page_size=10").await;
    // Newer instances (higher snowflake ids) arrive while the client pages.
    seed(&app.pool, &(2000..2005).map(Seed::new).collect::<Vec<_>>()).await;
    let mut ids = page_ids(&first);
    let mut token = first["next_page_token"].as_str().unwrap().to_owned();
    while !token.is_empty() {
        let (_, page) =
            app.get_json(&format!("/v1/resources?page_size=10&page_token={token}")).await;
        ids.extend(page_ids(&page));
        token = page["next_page_token"].as_str().unwrap().to_owned();
    }

    let want: Vec<i64> = (1000..1030).rev().collect();
    assert_eq!(ids, want, "no duplicates, no gaps");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 30);
}

#[tokio::test]
async fn get_returns_every_field_including_zero_values() {
    let app = spawn_app().await;
    seed(&app.pool, &[Seed::new(1_234_567_890).owner("123").named("GPU 计算实例")]).await;
    sqlx::query("UPDATE instance_specs SET cpu = 8, memory = 32768, gpu = 2, config_json = '{\"env\": {\"A\": \"1\"}}'")
        .execute(&app.pool)
        .await
        .unwrap();

    let (status, body) = app.get_json("/v1/resources/1234567890").await;

    assert_eq!(status, 200);
    assert_eq!(body["instance_id"], "1234567890");
    assert_eq!(body["user_id"], "123");
    assert_eq!(body["name"], "GPU 计算实例");
    assert_eq!(body["status"], "RUNNING");
    assert_eq!(body["status_reason"], "");
    assert_eq!(
        body["spec"],
        serde_json::json!({"cpu": 8, "memory": 32768, "gpu": 2, "gpu_model": "Tesla A100",
                           "image": "ubuntu:22.04", "config_json": {"env": {"A": "1"}}})
    );
    assert_eq!(
        body["endpoint"],
        serde_json::json!({"pod_name": "", "pod_ip": "", "service_host": "", "ports": []})
    );
    for ts in ["created_at", "updated_at"] {
        let raw = body[ts].as_str().unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(raw).is_ok(), "{ts}: {raw}");
    }
}

#[tokio::test]
async fn a_deleted_instance_is_hidden_from_the_list_but_readable() {
    let app = spawn_app().await;
    seed(&app.pool, &[Seed::new(5).status("DELETED"), Seed::new(6)]).await;

    let (_, list) = app.get_json("/v1/resources").await;
    let (status, one) = app.get_json("/v1/resources/5").await;

    assert_eq!(page_ids(&list), vec![6]);
    assert_eq!(status, 200);
    assert_eq!(one["status"], "DELETED");
    assert!(one["deleted_at"].is_string());
}

#[tokio::test]
async fn an_unknown_instance_is_404_with_the_error_body() {
    let app = spawn_app().await;

    let (status, body) = app.get_json("/v1/resources/42").await;

    assert_eq!(status, 404);
    assert_eq!(
        body,
        serde_json::json!({"code": 404, "reason": "INSTANCE_NOT_FOUND",
                           "message": "instance 42 not found", "metadata": {"instance_id": "42"}})
    );
}

#[tokio::test]
async fn malformed_input_is_400_with_a_reason_never_500() {
    let app = spawn_app().await;
    seed(&app.pool, &(1..=3).map(Seed::new).collect::<Vec<_>>()).await;
    let (_, page) = app.get_json("/v1/resources?page_size=1&user_id=u1").await;
    let token_for_user = page["next_page_token"].as_str().unwrap().to_owned();

    let cases = [
        ("/v1/resources?page_size=abc", "INVALID_ARGUMENT"),
        ("/v1/resources?page_size=-1", "INVALID_PAGE_SIZE"),
        ("/v1/resources?page_size=1001", "INVALID_PAGE_SIZE"),
        ("/v1/resources?page_size=99999999999", "INVALID_ARGUMENT"),
        ("/v1/resources?page_token=forged", "INVALID_PAGE_TOKEN"),
        ("/v1/resources?page_token=AQAAAAAAAAAFAAAAAAAAAAAAAAAA", "INVALID_PAGE_TOKEN"),
        // A token is only valid with the filters that produced it.
        (&*format!("/v1/resources?page_token={token_for_user}&user_id=u2"), "INVALID_PAGE_TOKEN"),
        ("/v1/resources?status=PAUSED", "INVALID_ARGUMENT"),
        ("/v1/resources/abc", "INVALID_ARGUMENT"),
        ("/v1/resources/0", "INVALID_ARGUMENT"),
        ("/v1/resources/-7", "INVALID_ARGUMENT"),
        ("/v1/resources/99999999999999999999", "INVALID_ARGUMENT"),
    ];
    for (path, reason) in cases {
        let (status, body) = app.get_json(path).await;

        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["code"], 400, "{path}");
        assert_eq!(body["reason"], reason, "{path}: {body}");
        assert!(!body["message"].as_str().unwrap().is_empty());
    }
}

#[tokio::test]
async fn unknown_query_parameters_are_ignored() {
    let app = spawn_app().await;
    seed(&app.pool, &[Seed::new(1)]).await;

    let (status, body) = app.get_json("/v1/resources?foo=bar&pageSize=abc").await;

    assert_eq!(status, 200);
    assert_eq!(page_ids(&body), vec![1]);
}

/// POSTs a body of `len` bytes over a raw socket and reads the answer. The server may
/// answer 413 and close before the body is written; an HTTP client then reports the
/// broken pipe instead of the response, so the body is written beside the read and
/// its write errors are ignored.
async fn post_oversized(http: &str, len: usize) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let connect = tokio::net::TcpStream::connect(http.trim_start_matches("http://"));
    let stream = tokio::time::timeout(std::time::Duration::from_secs(5), connect)
        .await
        .expect("connected in time")
        .unwrap();
    let (mut read, mut write) = stream.into_split();
    let head = format!(
        "POST /v1/resources HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        let _ = write.write_all(head.as_bytes()).await;
        let _ = write.write_all(&vec![b'x'; len]).await;
        write
    });
    let mut response = Vec::new();
    let read_all = read.read_to_end(&mut response);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), read_all).await;
    writer.abort();
    let text = String::from_utf8_lossy(&response);
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{text}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    // A chunked body: the JSON object is between the first '{' and the last '}'.
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) => &body[a..=b],
        _ => panic!("no JSON body: {text}"),
    };
    (status, serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {text}")))
}

#[tokio::test]
async fn unknown_routes_methods_and_oversized_bodies_get_the_error_body() {
    let app = spawn_app().await;

    let (nf, nf_body) = app.get_json("/v2/nothing").await;
    let ma = app.client.delete(format!("{}/healthz", app.http)).send().await.unwrap();
    let (big_status, big_body) = post_oversized(&app.http, 2 << 20).await;

    assert_eq!((nf, nf_body["reason"].as_str().unwrap()), (404, "NOT_FOUND"));
    assert_eq!(ma.status(), 405);
    assert_eq!(ma.json::<Value>().await.unwrap()["reason"], "METHOD_NOT_ALLOWED");
    assert_eq!(big_status, 413);
    assert_eq!(big_body["reason"], "PAYLOAD_TOO_LARGE");

    // A 20 KB path is not echoed back, nor logged, whole. (A fresh connection: the one
    // above may be closed after the 413 without the client knowing yet.)
    let long = format!("{}/{}", app.http, "p".repeat(20_000));
    let response = test_support::http_client().get(long).send().await.expect("GET a long path");
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    let message = body["message"].as_str().unwrap();
    assert!(message.len() < 400 && message.contains("20001 bytes"), "{message}");
    let logged = app.logs.lock().unwrap().iter().map(String::len).max().unwrap_or(0);
    assert!(logged < 4_096, "a log line of {logged} bytes");
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = spawn_app().await;

    let minted = app.get("/healthz").await;
    let echoed = app
        .client
        .get(format!("{}/healthz", app.http))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();

    assert!(minted.headers().get("x-request-id").is_some());
    assert_eq!(echoed.headers()["x-request-id"], "abc-123");
    let mut logged = false;
    for _ in 0..20 {
        logged = app.logs.lock().unwrap().iter().any(|line| line.contains("abc-123"));
        if logged {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(logged, "the request id is in the service log");
}

#[tokio::test]
async fn a_database_outage_is_503_without_internal_detail_and_heals() {
    let db_target = target_of(&crate::helpers::admin_url(), 5432);
    let proxy = Proxy::start(db_target).await;
    let app =
        spawn_app_with(AppOptions { database_via: Some(proxy.addr), ..Default::default() }).await;
    seed(&app.pool, &[Seed::new(1)]).await;
    assert_eq!(app.get_json("/v1/resources/1").await.0, 200);

    proxy.cut();
    let (list_status, list_body) = app.get_json("/v1/resources").await;
    let (get_status, get_body) = app.get_json("/v1/resources/1").await;
    // Readiness is checked at most twice a second: it says so within that.
    let mut ready = app.get_json("/readyz").await;
    for _ in 0..20 {
        if ready.0 == 503 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        ready = app.get_json("/readyz").await;
    }
    let (ready_status, ready_body) = ready;

    for (status, body) in [(list_status, &list_body), (get_status, &get_body)] {
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["reason"], "SERVICE_UNAVAILABLE");
        assert_eq!(body["message"], "service unavailable");
        let text = body.to_string().to_lowercase();
        for leak in ["select", "sql", "instances", "connection", "pool", "127.0.0.1"] {
            assert!(!text.contains(leak), "{leak} leaked: {text}");
        }
    }
    assert_eq!(ready_status, 503);
    assert_eq!(ready_body["checks"]["database"], "unavailable");

    proxy.restore();
    let mut healed = false;
    for _ in 0..50 {
        if app.get_json("/v1/resources/1").await.0 == 200 {
            healed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(healed, "the service recovers once the database is back");
}

#[tokio::test]
async fn sigterm_stops_the_service_with_exit_0() {
    let mut app = spawn_app().await;
    assert_eq!(app.get_json("/healthz").await.0, 200);

    let status = app.terminate().await;

    assert_eq!(status.code(), Some(0));
}
