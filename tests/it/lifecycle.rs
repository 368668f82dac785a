//! The lifecycle API on both transports: create, get, stop, start, resize, delete and the
//! audit trail; idempotent creates; illegal moves; concurrent updates.

use resource::pb::resource::v1::{
    CreateResourceRequest, ListAuditLogsRequest, ResourceActionRequest, ResourceSpec,
    UpdateResourceSpecRequest, resource_service_client::ResourceServiceClient,
};
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{AppOptions, TestApp, spawn_app, spawn_app_with};

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = app.client.request(method, format!("{}{path}", app.http));
    if let Some(body) = body {
        req = req.json(&body);
    }
    let response = req.send().await.expect("request");
    (response.status().as_u16(), response.json().await.expect("a JSON body"))
}

fn create_body(name: &str, request_id: &str) -> Value {
    json!({"name": name, "user_id": "u1", "request_id": request_id,
           "spec": {"cpu": 2, "memory": 2048, "gpu": 0, "image": "nginx:1.25", "config_json": {"env": {"A": "1"}}}})
}

/// (action, outcome, source) of the trail, newest first, walking every page.
async fn trail(app: &TestApp, id: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let (status, page) = send(
            app,
            reqwest::Method::GET,
            &format!("/v1/resources/{id}/audit-logs?page_size=2&page_token={token}"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{page}");
        for e in page["entries"].as_array().unwrap() {
            out.push((
                e["action"].as_str().unwrap().into(),
                e["outcome"].as_str().unwrap().into(),
                e["source"].as_str().unwrap().into(),
            ));
        }
        token = page["next_page_token"].as_str().unwrap().to_owned();
        if token.is_empty() {
            return out;
        }
    }
}

fn row(action: &str, outcome: &str, source: &str) -> (String, String, String) {
    (action.into(), outcome.into(), source.into())
}

#[tokio::test]
async fn the_whole_life_of_an_instance_over_rest_with_its_audit_trail() {
    let app = spawn_app().await;
    use reqwest::Method as M;

    let (status, created) =
        send(&app, M::POST, "/v1/resources", Some(create_body("web", "r1"))).await;
    assert_eq!(status, 200, "{created}");
    let id = created["instance_id"].as_str().unwrap().to_owned();
    assert_eq!(created["status"], "RUNNING");
    assert_eq!(created["spec"]["config_json"], json!({"env": {"A": "1"}}));

    let (_, stopped) = send(&app, M::POST, &format!("/v1/resources/{id}:stop"), None).await;
    let (_, again) = send(&app, M::POST, &format!("/v1/resources/{id}:stop"), None).await;
    let (_, started) = send(&app, M::POST, &format!("/v1/resources/{id}:start"), None).await;
    let resize = json!({"cpu": 8, "memory": 32768, "gpu": 2, "image": "nginx:1.26"});
    let (_, resized) =
        send(&app, M::PATCH, &format!("/v1/resources/{id}/spec"), Some(resize)).await;
    let (_, deleted) = send(&app, M::DELETE, &format!("/v1/resources/{id}"), None).await;
    let (illegal, refused) = send(&app, M::POST, &format!("/v1/resources/{id}:start"), None).await;

    assert_eq!(stopped["status"], "STOPPED");
    assert_eq!(again["status"], "STOPPED");
    assert_eq!(started["status"], "RUNNING");
    assert_eq!(resized["spec"]["gpu_model"], "Tesla A100");
    assert_eq!(resized["spec"]["cpu"], 8);
    assert_eq!(deleted["status"], "DELETED");
    assert_eq!(illegal, 409);
    assert_eq!(refused["reason"], "ILLEGAL_TRANSITION");
    assert_eq!(
        trail(&app, &id).await,
        vec![
            row("START", "rejected", "http"),
            row("DELETE", "ok", "http"),
            row("CHANGE_SPEC", "ok", "http"),
            row("START", "ok", "http"),
            row("STOP", "ignored", "http"),
            row("STOP", "ok", "http"),
            row("CREATE", "ok", "http"),
        ]
    );
    let (_, list) = send(&app, M::GET, "/v1/resources", None).await;
    assert!(
        list["resources"].as_array().unwrap().is_empty(),
        "deleted instances leave the default list"
    );
}

#[tokio::test]
async fn creates_are_idempotent_per_user_and_request_id() {
    let app = spawn_app().await;
    use reqwest::Method as M;

    let (_, first) = send(&app, M::POST, "/v1/resources", Some(create_body("web", "r1"))).await;
    let (_, second) = send(&app, M::POST, "/v1/resources", Some(create_body("web", "r1"))).await;
    let (reused, conflict) =
        send(&app, M::POST, "/v1/resources", Some(create_body("other", "r1"))).await;
    let mut other_user = create_body("web", "r1");
    other_user["user_id"] = json!("u2");
    let (_, third) = send(&app, M::POST, "/v1/resources", Some(other_user)).await;
    let (_, no_key_a) = send(&app, M::POST, "/v1/resources", Some(create_body("web", ""))).await;
    let (_, no_key_b) = send(&app, M::POST, "/v1/resources", Some(create_body("web", ""))).await;

    assert_eq!(first["instance_id"], second["instance_id"]);
    assert_eq!(reused, 409);
    assert_eq!(conflict["reason"], "REQUEST_ID_REUSED");
    assert_ne!(third["instance_id"], first["instance_id"]);
    assert_ne!(no_key_a["instance_id"], no_key_b["instance_id"]);
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM instances").fetch_one(&app.pool).await.unwrap();
    assert_eq!(count, 4);

    // The refusal is on the trail of the instance the request_id made.
    let id = first["instance_id"].as_str().unwrap();
    assert_eq!(
        trail(&app, id).await,
        [row("CREATE", "rejected", "http"), row("CREATE", "ok", "http")]
    );
    let (_, page) = send(&app, M::GET, &format!("/v1/resources/{id}/audit-logs"), None).await;
    let refusal = &page["entries"][0];
    assert!(refusal["reason"].as_str().unwrap().starts_with("REQUEST_ID_REUSED"), "{refusal}");
    assert_eq!(refusal["before"], refusal["after"], "a refusal changes nothing");
}

#[tokio::test]
async fn bad_requests_and_unknown_instances_get_the_error_body() {
    let app = spawn_app().await;
    use reqwest::Method as M;

    let cases = [
        (
            M::POST,
            "/v1/resources".to_owned(),
            Some(json!({"name": "x", "spec": {"cpu": 0, "memory": 1, "image": "a"}})),
            400,
            "INVALID_SPEC",
        ),
        (
            M::POST,
            "/v1/resources".to_owned(),
            Some(json!({"name": "x", "spec": {"cpu": 1, "memory": 1, "gpu": 9, "image": "a"}})),
            400,
            "INVALID_GPU_TYPE",
        ),
        (
            M::POST,
            "/v1/resources".to_owned(),
            Some(json!({"name": "", "spec": {"cpu": 1, "memory": 1, "image": "a"}})),
            400,
            "INVALID_ARGUMENT",
        ),
        (M::POST, "/v1/resources".to_owned(), Some(json!({"name": "x"})), 400, "INVALID_SPEC"),
        (
            M::POST,
            "/v1/resources".to_owned(),
            Some(json!("not an object")),
            400,
            "INVALID_ARGUMENT",
        ),
        (M::POST, "/v1/resources/42:stop".to_owned(), None, 404, "INSTANCE_NOT_FOUND"),
        (M::POST, "/v1/resources/42:reboot".to_owned(), None, 404, "NOT_FOUND"),
        (M::POST, "/v1/resources/abc:stop".to_owned(), None, 400, "INVALID_ARGUMENT"),
        (M::DELETE, "/v1/resources/42".to_owned(), None, 404, "INSTANCE_NOT_FOUND"),
        (M::GET, "/v1/resources/42/audit-logs".to_owned(), None, 404, "INSTANCE_NOT_FOUND"),
        (
            M::PATCH,
            "/v1/resources/42/spec".to_owned(),
            Some(json!({"cpu": 1, "memory": 1, "image": "a"})),
            404,
            "INSTANCE_NOT_FOUND",
        ),
    ];
    for (method, path, body, want, reason) in cases {
        let (status, error) = send(&app, method.clone(), &path, body).await;

        assert_eq!(
            (status, error["reason"].as_str().unwrap()),
            (want, reason),
            "{method} {path}: {error}"
        );
        assert_eq!(error["code"], want);
    }
}

#[tokio::test]
async fn the_lifecycle_over_grpc_is_audited_as_grpc() {
    let app = spawn_app().await;
    let mut client = ResourceServiceClient::new(app.grpc_channel().await);
    let spec =
        ResourceSpec { cpu: 2, memory: 2048, image: "ubuntu:22.04".into(), ..Default::default() };

    let created = client
        .create_resource(CreateResourceRequest {
            name: "g".into(),
            spec: Some(spec.clone()),
            user_id: "u9".into(),
            request_id: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = created.instance_id;
    client.stop_resource(ResourceActionRequest { instance_id: id }).await.unwrap();
    client.start_resource(ResourceActionRequest { instance_id: id }).await.unwrap();
    let resized = client
        .update_resource_spec(UpdateResourceSpecRequest {
            instance_id: id,
            spec: Some(ResourceSpec { cpu: 4, ..spec }),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    client.delete_resource(ResourceActionRequest { instance_id: id }).await.unwrap();
    let illegal =
        client.start_resource(ResourceActionRequest { instance_id: id }).await.unwrap_err();
    let missing = client.stop_resource(ResourceActionRequest { instance_id: 1 }).await.unwrap_err();
    let trail = client
        .list_audit_logs(ListAuditLogsRequest { instance_id: id, ..Default::default() })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(resized.spec.unwrap().cpu, 4);
    assert_eq!(illegal.code(), Code::FailedPrecondition);
    assert_eq!(illegal.get_error_details().error_info().unwrap().reason, "ILLEGAL_TRANSITION");
    assert_eq!(missing.code(), Code::NotFound);
    let actions: Vec<(&str, &str, &str)> = trail
        .entries
        .iter()
        .map(|e| (e.action.as_str(), e.outcome.as_str(), e.source.as_str()))
        .collect();
    assert_eq!(
        actions,
        vec![
            ("START", "rejected", "grpc"),
            ("DELETE", "ok", "grpc"),
            ("CHANGE_SPEC", "ok", "grpc"),
            ("START", "ok", "grpc"),
            ("STOP", "ok", "grpc"),
            ("CREATE", "ok", "grpc"),
        ]
    );
}

#[tokio::test]
async fn twenty_concurrent_conflicting_updates_are_serialised_with_one_audit_row_each() {
    // Each request must answer: on a loaded machine the default 1 s could cut one short.
    let app = spawn_app_with(AppOptions {
        env: vec![("RESOURCE_SERVER__HTTP__TIMEOUT".into(), "30s".into())],
        ..Default::default()
    })
    .await;
    let (_, created) =
        send(&app, reqwest::Method::POST, "/v1/resources", Some(create_body("web", ""))).await;
    let id = created["instance_id"].as_str().unwrap().to_owned();

    let updates = (1..=20).map(|cpu| {
        let app = &app;
        let id = id.clone();
        async move {
            let body = json!({"cpu": cpu, "memory": 1024, "gpu": 0, "image": "nginx:1.25"});
            send(app, reqwest::Method::PATCH, &format!("/v1/resources/{id}/spec"), Some(body)).await
        }
    });
    let results = futures::future::join_all(updates).await;

    let applied = results.iter().filter(|(status, _)| *status == 200).count();
    assert_eq!(applied, 20, "{results:?}");
    let (version, cpu): (i64, i32) = sqlx::query_as(
        "SELECT i.version, s.cpu FROM instances i JOIN instance_specs s USING (instance_id) WHERE i.instance_id = $1",
    )
    .bind(id.parse::<i64>().unwrap())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let changes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_logs WHERE instance_id = $1 AND action = 'CHANGE_SPEC' AND outcome = 'ok'",
    )
    .bind(id.parse::<i64>().unwrap())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    // Every applied change bumped the version once and wrote one row: no lost update.
    assert_eq!(version, 1 + changes);
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_logs WHERE instance_id = $1 AND action = 'CHANGE_SPEC'",
    )
    .bind(id.parse::<i64>().unwrap())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    // One row per request: applied, or an audited no-op when it asked for the spec in place.
    assert_eq!(rows, 20);
    assert!(changes >= 19, "at most the request equal to the current spec is a no-op");
    let last: i32 = sqlx::query_scalar(
        "SELECT (after->'spec'->>'cpu')::int FROM audit_logs \
         WHERE instance_id = $1 AND outcome = 'ok' ORDER BY id DESC LIMIT 1",
    )
    .bind(id.parse::<i64>().unwrap())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(last, cpu, "the last audited change is the state that stayed");
}
