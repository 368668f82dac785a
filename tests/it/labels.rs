//! Labels (set on create, replaced by `PUT …/labels` / `SetResourceLabels`, audited,
//! copied onto the Pod and Service) and the list filters of issue 16 (label selector,
//! GPU model, image, creation time), each paged across several pages.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use fake_kube::{FakeKube, Kind, Options};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use resource::pb::resource::v1::{
    CreateResourceRequest, ListResourcesRequest, ResourceSpec, SetResourceLabelsRequest,
    resource_service_client::ResourceServiceClient,
};
use serde_json::{Value, json};
use tonic::Code;

use crate::helpers::{AppOptions, TestApp, spawn_app, spawn_app_with};

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    send_as(app, None, method, path, body).await
}

async fn send_as(
    app: &TestApp,
    token: Option<&str>,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = app.client.request(method, format!("{}{path}", app.http));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let response = req.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

fn create_body(name: &str, labels: Value) -> Value {
    json!({"name": name, "user_id": "u1", "labels": labels,
           "spec": {"cpu": 1, "memory": 256, "image": "nginx:1.25"}})
}

async fn put_labels(app: &TestApp, id: &str, labels: Value) -> (u16, Value) {
    send(app, reqwest::Method::PUT, &format!("/v1/resources/{id}/labels"), Some(labels)).await
}

async fn audit_rows(app: &TestApp, id: &str) -> Vec<Value> {
    let (status, body) =
        send(app, reqwest::Method::GET, &format!("/v1/resources/{id}/audit-logs"), None).await;
    assert_eq!(status, 200, "{body}");
    let mut rows = body["entries"].as_array().unwrap().clone();
    rows.reverse();
    rows
}

#[tokio::test]
async fn labels_are_set_on_create_returned_and_replaced_as_a_whole_with_an_audit_row() {
    let app = spawn_app().await;

    let created = app
        .create_at(&app.http, &create_body("web", json!({"team": "a", "example.com/tier": "web"})))
        .await;
    let id = created["instance_id"].as_str().unwrap().to_owned();
    assert_eq!(created["labels"], json!({"team": "a", "example.com/tier": "web"}));
    let (_, got) = app.get_json(&format!("/v1/resources/{id}")).await;
    assert_eq!(got["labels"], created["labels"]);

    let (status, replaced) = put_labels(&app, &id, json!({"team": "b", "env": ""})).await;
    assert_eq!(status, 200, "{replaced}");
    assert_eq!(replaced["labels"], json!({"team": "b", "env": ""}), "replaced, not merged");
    let (status, same) = put_labels(&app, &id, json!({"env": "", "team": "b"})).await;
    assert_eq!(status, 200, "{same}");
    let indexed: Vec<(String, String)> = sqlx::query_as(
        "SELECT key, value FROM instance_labels WHERE instance_id = $1 ORDER BY key",
    )
    .bind(id.parse::<i64>().unwrap())
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(indexed, [("env".into(), String::new()), ("team".into(), "b".into())]);
    let (status, cleared) = put_labels(&app, &id, json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(cleared["labels"], json!({}));

    let rows = audit_rows(&app, &id).await;
    let actions: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [("CREATE", "ok"), ("SET_LABELS", "ok"), ("SET_LABELS", "ignored"), ("SET_LABELS", "ok")]
    );
    assert_eq!(rows[0]["after"]["labels"], json!({"team": "a", "example.com/tier": "web"}));
    assert_eq!(rows[1]["before"]["labels"], rows[0]["after"]["labels"]);
    assert_eq!(rows[1]["after"]["labels"], json!({"team": "b", "env": ""}));
    assert_eq!(rows[1]["source"], "http");
    let versions: Vec<i64> = rows.iter().map(|r| r["after"]["version"].as_i64().unwrap()).collect();
    assert_eq!(versions, [1, 2, 2, 3], "each change bumps the version, a no-op does not");
    assert_eq!(rows[3]["after"]["labels"], json!({}));
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM instance_labels")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the label rows follow the labels");
}

#[tokio::test]
async fn labels_over_grpc_are_the_same_labels() {
    let app = spawn_app().await;
    let mut client = ResourceServiceClient::new(app.grpc_channel().await);
    let spec =
        ResourceSpec { cpu: 1, memory: 256, image: "nginx:1.25".into(), ..Default::default() };

    let created = client
        .create_resource(CreateResourceRequest {
            name: "g".into(),
            spec: Some(spec),
            user_id: "u1".into(),
            labels: [("team".to_owned(), "a".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.labels.get("team").map(String::as_str), Some("a"));
    let id = created.instance_id;

    let set = client
        .set_resource_labels(SetResourceLabelsRequest {
            instance_id: id,
            labels: [("tier".to_owned(), "api".to_owned())].into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.labels.len(), 1);
    assert_eq!(set.labels["tier"], "api");
    let (_, rest) = app.get_json(&format!("/v1/resources/{id}")).await;
    assert_eq!(rest["labels"], json!({"tier": "api"}));
    let rows = audit_rows(&app, &id.to_string()).await;
    assert_eq!(rows.last().unwrap()["source"], "grpc");

    let refused = client
        .set_resource_labels(SetResourceLabelsRequest {
            instance_id: id,
            labels: [("bad key".to_owned(), "v".to_owned())].into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("bad key"), "{}", refused.message());
}

#[tokio::test]
async fn bad_labels_are_refused_with_a_reason_naming_the_key() {
    let app = spawn_app().await;
    let id = app.create_at(&app.http, &create_body("web", json!({}))).await["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let many: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();

    let cases = [
        (json!({"-team": "a"}), Some("-team")),
        (json!({"team": "a b"}), Some("team")),
        (json!({"team": "v".repeat(64)}), Some("team")),
        (json!({"Example.com/x": "a"}), Some("Example.com/x")),
        (json!({"resource.io/instance-id": "1"}), Some("resource.io/instance-id")),
        (json!({"team": 7}), Some("team")),
        (Value::Object(many), None),
    ];
    for (labels, key) in cases {
        let (status, body) = put_labels(&app, &id, labels.clone()).await;
        assert_eq!(status, 400, "{labels}: {body}");
        assert_eq!(body["reason"], "INVALID_LABELS", "{body}");
        assert_eq!(body["metadata"]["field"], "labels");
        assert_eq!(body["metadata"]["key"].as_str(), key, "{body}");
        if let Some(key) = key {
            assert!(body["message"].as_str().unwrap().contains(key), "{body}");
        }
    }
    let rows = audit_rows(&app, &id).await;
    let refused = rows.iter().filter(|r| r["action"] == "SET_LABELS" && r["outcome"] == "rejected");
    assert_eq!(refused.count(), 6, "refusals of the planner are audited: {rows:?}");
    let (status, body) = put_labels(&app, &id, json!(["team"])).await;
    assert_eq!((status, body["reason"].as_str()), (400, Some("INVALID_ARGUMENT")));

    let (status, body) = send(
        &app,
        reqwest::Method::POST,
        "/v1/resources",
        Some(create_body("x", json!({"a/b/c": "v"}))),
    )
    .await;
    assert_eq!((status, body["reason"].as_str()), (400, Some("INVALID_LABELS")), "{body}");
    let (_, list) = app.get_json("/v1/resources").await;
    assert_eq!(list["resources"].as_array().unwrap().len(), 1, "nothing was created");
}

#[tokio::test]
async fn a_deleted_or_unknown_instance_refuses_label_changes() {
    let app = spawn_app().await;
    let id = app.create_at(&app.http, &create_body("web", json!({}))).await["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) =
        send(&app, reqwest::Method::DELETE, &format!("/v1/resources/{id}"), None).await;
    assert_eq!(status, 200);

    let (status, body) = put_labels(&app, &id, json!({"team": "a"})).await;

    assert_eq!((status, body["reason"].as_str()), (409, Some("ILLEGAL_TRANSITION")), "{body}");
    let rows = audit_rows(&app, &id).await;
    assert_eq!(rows.last().unwrap()["action"], "SET_LABELS");
    assert_eq!(rows.last().unwrap()["outcome"], "rejected");
    let (status, body) = put_labels(&app, "4242", json!({"team": "a"})).await;
    assert_eq!((status, body["reason"].as_str()), (404, Some("INSTANCE_NOT_FOUND")));
}

const SECRET: &str = "test-only-hs256-secret-of-32-bytes+";

fn token(claims: Value) -> String {
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
}

#[tokio::test]
async fn only_the_owner_or_an_admin_changes_labels() {
    let env = vec![
        ("RESOURCE_AUTH__MODE".to_owned(), "jwt".to_owned()),
        ("RESOURCE_AUTH__JWT__SECRET".to_owned(), SECRET.to_owned()),
    ];
    let app = spawn_app_with(AppOptions { env, ..AppOptions::default() }).await;
    let exp = Utc::now().timestamp() + 300;
    let (alice, bob) =
        (token(json!({"sub": "alice", "exp": exp})), token(json!({"sub": "bob", "exp": exp})));
    let admin = token(json!({"sub": "root", "role": "admin", "exp": exp}));
    let body = json!({"name": "a", "spec": {"cpu": 1, "memory": 128, "image": "nginx:1.25"}});
    let (status, created) =
        send_as(&app, Some(&alice), reqwest::Method::POST, "/v1/resources", Some(body)).await;
    assert_eq!(status, 200, "{created}");
    let path = format!("/v1/resources/{}/labels", created["instance_id"].as_str().unwrap());

    let (status, body) =
        send_as(&app, Some(&bob), reqwest::Method::PUT, &path, Some(json!({"team": "b"}))).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (404, Some("INSTANCE_NOT_FOUND")),
        "another user's is not there"
    );
    let (status, _) =
        send_as(&app, None, reqwest::Method::PUT, &path, Some(json!({"team": "b"}))).await;
    assert_eq!(status, 401);
    let (status, body) =
        send_as(&app, Some(&alice), reqwest::Method::PUT, &path, Some(json!({"team": "a"}))).await;
    assert_eq!((status, &body["labels"]), (200, &json!({"team": "a"})));
    let (status, body) =
        send_as(&app, Some(&admin), reqwest::Method::PUT, &path, Some(json!({"team": "c"}))).await;
    assert_eq!((status, &body["labels"]), (200, &json!({"team": "c"})));
}

// === Filters ===

/// Rows 1..=ROWS: what each one is, so the expected pages can be computed.
const ROWS: i64 = 120;

struct Row {
    id: i64,
    labels: serde_json::Map<String, Value>,
    gpu: i32,
    image: &'static str,
    created_at: DateTime<Utc>,
    deleted: bool,
}

fn base_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap()
}

fn row(n: i64) -> Row {
    let mut labels = serde_json::Map::new();
    labels.insert("team".into(), json!(["a", "b", "c"][(n % 3) as usize]));
    match n % 4 {
        0 => {
            labels.insert("env".into(), json!("prod"));
        }
        1 => {
            labels.insert("env".into(), json!("dev"));
        }
        _ => {}
    }
    if n % 5 < 3 {
        labels.insert("tier".into(), json!(["web", "api", "db"][(n % 5) as usize]));
    }
    Row {
        id: n,
        labels,
        gpu: (n % 7) as i32,
        image: if n % 2 == 0 { "nginx:1.25" } else { "ubuntu:22.04" },
        created_at: base_time() + chrono::Duration::minutes(n),
        deleted: n % 10 == 9,
    }
}

async fn seed_rows(app: &TestApp) {
    let mut tx = app.pool.begin().await.unwrap();
    for n in 1..=ROWS {
        let r = row(n);
        sqlx::query(
            "INSERT INTO instances (instance_id, user_id, name, status, labels, created_at, deleted_at) \
             VALUES ($1, 'u1', $2, $3, $4, $5, $6)",
        )
        .bind(r.id)
        .bind(format!("inst-{n}"))
        .bind(if r.deleted { "DELETED" } else { "RUNNING" })
        .bind(Value::Object(r.labels.clone()))
        .bind(r.created_at)
        .bind(r.deleted.then_some(r.created_at))
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO instance_specs (instance_id, cpu, memory, gpu, image) VALUES ($1, 1, 256, $2, $3)",
        )
        .bind(r.id)
        .bind(r.gpu)
        .bind(r.image)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
}

fn label(r: &Row, key: &str) -> Option<String> {
    r.labels.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// Walks every page of `GET /v1/resources?{query}` with page_size 3; returns the ids
/// in the order served and the number of pages.
async fn walk(app: &TestApp, query: &str) -> (Vec<i64>, usize) {
    let (mut ids, mut pages, mut token) = (Vec::new(), 0, String::new());
    loop {
        let path = format!("/v1/resources?page_size=3&{query}&page_token={token}");
        let (status, body) = app.get_json(&path).await;
        assert_eq!(status, 200, "{path}: {body}");
        pages += 1;
        for r in body["resources"].as_array().unwrap() {
            ids.push(r["instance_id"].as_str().unwrap().parse().unwrap());
        }
        token = body["next_page_token"].as_str().unwrap().to_owned();
        if token.is_empty() {
            return (ids, pages);
        }
        assert!(pages < 200, "{query}: the walk does not end");
    }
}

fn expected(keep: impl Fn(&Row) -> bool) -> Vec<i64> {
    (1..=ROWS).rev().map(row).filter(|r| !r.deleted && keep(r)).map(|r| r.id).collect()
}

/// `text` percent-encoded for a query string.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn every_filter_pages_through_exactly_its_instances_newest_first() {
    let app = spawn_app().await;
    seed_rows(&app).await;
    let t = |m: i64| (base_time() + chrono::Duration::minutes(m)).to_rfc3339();
    fn eq(k: &'static str, v: &'static str) -> impl Fn(&Row) -> bool {
        move |r: &Row| label(r, k).as_deref() == Some(v)
    }

    type Keep = Box<dyn Fn(&Row) -> bool>;
    let cases: Vec<(String, Keep)> = vec![
        (format!("label_selector={}", encode("team=a")), Box::new(eq("team", "a"))),
        (
            format!("label_selector={}", encode("env!=prod")),
            Box::new(|r: &Row| label(r, "env").as_deref() != Some("prod")),
        ),
        (
            format!("label_selector={}", encode("tier in (web, api)")),
            Box::new(|r: &Row| matches!(label(r, "tier").as_deref(), Some("web" | "api"))),
        ),
        (
            format!("label_selector={}", encode("tier notin (web)")),
            Box::new(|r: &Row| label(r, "tier").as_deref() != Some("web")),
        ),
        (
            format!("label_selector={}", encode("env")),
            Box::new(|r: &Row| label(r, "env").is_some()),
        ),
        (
            format!("label_selector={}", encode("!tier")),
            Box::new(|r: &Row| label(r, "tier").is_none()),
        ),
        (
            format!("label_selector={}", encode("team=a,env!=prod,tier")),
            Box::new(|r: &Row| {
                eq("team", "a")(r)
                    && label(r, "env").as_deref() != Some("prod")
                    && label(r, "tier").is_some()
            }),
        ),
        ("gpu_model=Tesla%20A100".into(), Box::new(|r: &Row| r.gpu == 2)),
        ("gpu_model=2".into(), Box::new(|r: &Row| r.gpu == 2)),
        ("gpu_model=none".into(), Box::new(|r: &Row| r.gpu == 0)),
        ("image=nginx:1.25".into(), Box::new(|r: &Row| r.image == "nginx:1.25")),
        (
            format!("created_after={}&created_before={}", encode(&t(30)), encode(&t(90))),
            Box::new(|r: &Row| {
                r.created_at > base_time() + chrono::Duration::minutes(30)
                    && r.created_at < base_time() + chrono::Duration::minutes(90)
            }),
        ),
        (
            format!(
                "created_after={}&label_selector={}&image=nginx:1.25",
                encode(&t(60)),
                encode("team in (a,b)")
            ),
            Box::new(|r: &Row| {
                r.created_at > base_time() + chrono::Duration::minutes(60)
                    && r.image == "nginx:1.25"
                    && label(r, "team").as_deref() != Some("c")
            }),
        ),
    ];
    for (query, keep) in &cases {
        let want = expected(keep);
        assert!(want.len() >= 7, "{query}: a test of several pages ({} rows)", want.len());

        let (got, pages) = walk(&app, query).await;

        assert_eq!(got, want, "{query}: no duplicates, no gaps, newest first");
        assert!(pages >= 3, "{query}: {pages} pages");
    }
    let (all, _) = walk(&app, "").await;
    assert_eq!(all, expected(|_| true), "unfiltered, deleted left out");
}

#[tokio::test]
async fn the_filters_are_the_same_over_grpc() {
    let app = spawn_app().await;
    seed_rows(&app).await;
    let mut client = ResourceServiceClient::new(app.grpc_channel().await);
    let ts = |m: i64| {
        let t = base_time() + chrono::Duration::minutes(m);
        pbjson_types::Timestamp { seconds: t.timestamp(), nanos: 0 }
    };
    let req = |token: String| ListResourcesRequest {
        page_size: 4,
        page_token: token,
        label_selector: "team=b".into(),
        gpu_model: String::new(),
        created_after: Some(ts(10)),
        created_before: Some(ts(100)),
        ..Default::default()
    };

    let (mut got, mut token) = (Vec::new(), String::new());
    loop {
        let page = client.list_resources(req(token)).await.unwrap().into_inner();
        got.extend(page.resources.iter().map(|r| r.instance_id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }

    let window = |r: &Row| {
        r.created_at > base_time() + chrono::Duration::minutes(10)
            && r.created_at < base_time() + chrono::Duration::minutes(100)
    };
    assert_eq!(got, expected(|r| label(r, "team").as_deref() == Some("b") && window(r)));
    let empty = ListResourcesRequest {
        created_after: Some(ts(5)),
        created_before: Some(ts(5)),
        ..Default::default()
    };
    let refused = client.list_resources(empty).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_page_token_is_refused_under_other_filters_and_bad_filters_say_why() {
    let app = spawn_app().await;
    seed_rows(&app).await;
    let (_, first) = app
        .get_json(&format!("/v1/resources?page_size=3&label_selector={}", encode("team=a")))
        .await;
    let token = first["next_page_token"].as_str().unwrap().to_owned();
    assert!(!token.is_empty());

    let same = format!(
        "/v1/resources?page_size=3&label_selector={}&page_token={token}",
        encode(" team = a ")
    );
    assert_eq!(app.get_json(&same).await.0, 200, "one selector, two spellings");
    for other in [
        format!("label_selector={}", encode("team=b")),
        String::new(),
        format!("label_selector={}&gpu_model=2", encode("team=a")),
        format!("label_selector={}&image=nginx:1.25", encode("team=a")),
        format!("label_selector={}&created_after=2026-01-01T00:00:00Z", encode("team=a")),
        format!("label_selector={}&created_before=2027-01-01T00:00:00Z", encode("team=a")),
    ] {
        let (status, body) =
            app.get_json(&format!("/v1/resources?page_size=3&{other}&page_token={token}")).await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (400, Some("INVALID_PAGE_TOKEN")),
            "{other}: {body}"
        );
    }

    for (query, reason, says) in [
        (
            format!("label_selector={}", encode("team in (a")),
            "INVALID_LABEL_SELECTOR",
            "never closed",
        ),
        (format!("label_selector={}", encode("te am")), "INVALID_LABEL_SELECTOR", "te am"),
        (format!("label_selector={}", encode(&"k,".repeat(33))), "INVALID_LABEL_SELECTOR", "32"),
        ("gpu_model=Tesla%20Z9".into(), "INVALID_GPU_TYPE", "Tesla Z9"),
        ("created_after=yesterday".into(), "INVALID_ARGUMENT", "created_after"),
        (
            "created_after=2026-02-01T00:00:00Z&created_before=2026-01-01T00:00:00Z".into(),
            "INVALID_ARGUMENT",
            "created_before",
        ),
    ] {
        let (status, body) = app.get_json(&format!("/v1/resources?{query}")).await;
        assert_eq!((status, body["reason"].as_str()), (400, Some(reason)), "{query}: {body}");
        assert!(body["message"].as_str().unwrap().contains(says), "{query}: {body}");
    }
}

#[tokio::test]
async fn filtered_lists_read_indexes_at_a_few_thousand_rows() {
    let app = spawn_app().await;
    let mut conn = app.pool.acquire().await.unwrap();
    // As the service's pools run (`Data::connect`): a Seq Scan in a plan then means no
    // index can serve the statement at all.
    sqlx::query("SET enable_seqscan = off").execute(&mut *conn).await.unwrap();
    sqlx::query(
        "INSERT INTO instances (instance_id, user_id, name, status, labels, created_at) \
         SELECT g, 'u' || (g % 50), 'n' || g, 'RUNNING', \
                CASE WHEN g % 100 = 0 THEN '{\"team\": \"rare\"}'::jsonb ELSE '{\"team\": \"x\"}'::jsonb END, \
                timestamptz '2026-01-01' + g * interval '1 minute' \
         FROM generate_series(1, 5000) g",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO instance_specs (instance_id, cpu, memory, gpu, image) \
         SELECT g, 1, 256, g % 7, CASE WHEN g % 100 = 0 THEN 'rare:1' ELSE 'nginx:1.25' END \
         FROM generate_series(1, 5000) g",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("ANALYZE instances, instance_specs").execute(&mut *conn).await.unwrap();
    // The statements `PgInstanceRepo::list` prepares for these filters, each reading the
    // index of its filter (or the primary key, walked newest first).
    let select = "SELECT i.instance_id FROM instances i JOIN instance_specs s ON s.instance_id = i.instance_id \
                  WHERE i.deleted_at IS NULL AND i.instance_id < 4000 AND s.instance_id < 4000";
    for (filter, index) in [
        (
            "i.instance_id IN (SELECT l.instance_id FROM instance_labels l \
             WHERE l.key = 'team' AND l.value = 'rare' AND l.instance_id < 4000)",
            "instance_labels_pkey",
        ),
        ("i.labels @> '{\"team\": \"rare\"}'", "instances_labels_idx"),
        ("s.gpu = 2", "instance_specs_gpu_idx"),
        ("s.image = 'rare:1'", "instance_specs_image_idx"),
        (
            "i.created_at > timestamptz '2026-01-02' AND i.created_at < timestamptz '2026-01-02 02:00'",
            "instances_created_at_idx",
        ),
    ] {
        let sql = format!("EXPLAIN {select} AND {filter} ORDER BY i.instance_id DESC LIMIT 51");
        let plan: Vec<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_all(&mut *conn).await.unwrap();
        let plan = plan.join("\n");
        assert!(!plan.contains("Seq Scan"), "{filter}:\n{plan}");
        assert!(plan.contains(index) || plan.contains("instances_pkey"), "{filter}:\n{plan}");
    }
}

// === The cluster ===

#[tokio::test]
async fn labels_are_copied_onto_the_pod_and_service_and_follow_changes() {
    let fake = FakeKube::start(Options::default()).await.expect("start the fake API server");
    let (app, cluster) = crate::kube::app_on(fake, None, &[]).await;
    let body = json!({"name": "web", "user_id": "u1", "labels": {"team": "a", "example.com/tier": "web"},
                      "spec": {"cpu": 1, "memory": 256, "image": "nginx:1.25"}});
    let created = app.create_at(&app.http, &body).await;
    let id = created["instance_id"].as_str().unwrap().to_owned();
    crate::kube::wait_status(&app, &id, "RUNNING").await;
    let name = format!("inst-{id}");
    let labels_of = |kind: Kind| {
        cluster
            .fake
            .get(kind, crate::kube::NS, &name)
            .map(|o| o["metadata"]["labels"].clone())
            .unwrap_or_default()
    };

    for kind in [Kind::Pod, Kind::Service] {
        let labels = labels_of(kind);
        assert_eq!(labels["labels.resource.io/team"], "a", "{labels}");
        assert_eq!(labels["example.com.labels.resource.io/tier"], "web", "{labels}");
        assert_eq!(labels["resource.io/instance-id"], id.as_str(), "ours are kept");
    }

    // (A label removed is removed by server-side apply, which drops the fields a manager
    // stops applying; the fake API server merges labels instead, so this looks at a
    // changed and an added label.)
    let (status, _) = put_labels(&app, &id, json!({"team": "b", "env": "prod"})).await;
    assert_eq!(status, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (pod, service) = (labels_of(Kind::Pod), labels_of(Kind::Service));
        let done = |l: &Value| {
            l["labels.resource.io/team"] == "b" && l["labels.resource.io/env"] == "prod"
        };
        if done(&pod) && done(&service) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "labels never followed: {pod} {service}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, now) = app.get_json(&format!("/v1/resources/{id}")).await;
    assert_eq!(now["status"], "RUNNING", "the Pod was updated in place, not replaced");
    let rows = audit_rows(&app, &id).await;
    assert!(rows.iter().all(|r| r["action"] != "K8S_SYNC"), "our own change is no drift: {rows:?}");
}

#[tokio::test]
async fn concurrent_label_writers_on_one_instance_lose_nothing_and_a_watcher_sees_every_version() {
    use resource::pb::resource::v1::WatchResourcesRequest;

    let app = spawn_app().await;
    let created = app.create_at(&app.http, &create_body("raced", json!({"round": "0"}))).await;
    let id = created["instance_id"].as_str().unwrap().to_owned();
    let numeric: i64 = id.parse().unwrap();
    let mut watch = ResourceServiceClient::new(app.grpc_channel().await)
        .watch_resources(WatchResourcesRequest { name: "raced".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().unwrap(); // the starting heartbeat

    // 40 writers, half over REST and half over gRPC, each with labels of its own.
    let channel = app.grpc_channel().await;
    let writers: Vec<_> = (0..40)
        .map(|w| {
            let (app_http, client, channel) =
                (app.http.clone(), app.client.clone(), channel.clone());
            let id = id.clone();
            tokio::spawn(async move {
                let labels = json!({"round": w.to_string(), "writer": format!("w{w}")});
                if w % 2 == 0 {
                    let r = client
                        .put(format!("{app_http}/v1/resources/{id}/labels"))
                        .json(&labels)
                        .send()
                        .await
                        .unwrap();
                    r.status().as_u16()
                } else {
                    let mut grpc = ResourceServiceClient::new(channel);
                    let req = SetResourceLabelsRequest {
                        instance_id: numeric,
                        labels: [
                            ("round".to_owned(), w.to_string()),
                            ("writer".to_owned(), format!("w{w}")),
                        ]
                        .into(),
                    };
                    match grpc.set_resource_labels(req).await {
                        Ok(_) => 200,
                        Err(e) => panic!("gRPC writer {w}: {e:?}"),
                    }
                }
            })
        })
        .collect();
    for w in writers {
        assert_eq!(w.await.unwrap(), 200, "every writer is applied (they queue on the row)");
    }

    let chain = crate::races::assert_unbroken_chain(&app.pool, numeric).await;
    let sets: Vec<_> = chain.iter().filter(|r| r.action == "SET_LABELS").collect();
    assert_eq!(sets.len(), 40, "one audit row per writer");
    let writers: std::collections::BTreeSet<String> = sets
        .iter()
        .map(|r| r.after.as_ref().unwrap()["labels"]["writer"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(writers.len(), 40, "each writer's labels were applied once: {writers:?}");
    let last = chain.last().unwrap().after.clone().unwrap();
    let (_, stored) = app.get_json(&format!("/v1/resources/{id}")).await;
    assert_eq!(stored["labels"], last["labels"], "the stored labels are the last audited ones");
    let version: i64 = sqlx::query_scalar("SELECT version FROM instances WHERE instance_id = $1")
        .bind(numeric)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(version, 41, "one version per writer");
    let indexed: Vec<(String, String)> = sqlx::query_as(
        "SELECT key, value FROM instance_labels WHERE instance_id = $1 ORDER BY key",
    )
    .bind(numeric)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let expected: Vec<(String, String)> = last["labels"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(indexed, expected, "the label index follows the last write");

    // The watcher saw each write once, in the audited order.
    let mut seen = Vec::new();
    while seen.len() < 40 {
        let got = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("every version reaches the watcher")
            .unwrap()
            .unwrap();
        if let Some(r) = got.resource {
            seen.push(r.labels.get("writer").cloned().unwrap_or_default());
        }
    }
    let audited: Vec<String> = sets
        .iter()
        .map(|r| r.after.as_ref().unwrap()["labels"]["writer"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(seen, audited, "the watch is the audit trail, version by version");
}
