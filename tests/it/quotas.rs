//! Quotas and GPU capacity over both transports (issue 15): creates and resizes over a
//! limit are refused 429 / RESOURCE_EXHAUSTED with the limit named, deleting frees and
//! stopping keeps, admins set owners' limits, users read only their own quota, and
//! `GET /v1/capacity` says what is left — every figure checked against a SQL count.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use resource::pb::resource::v1::{
    CreateResourceRequest, GetCapacityRequest, GetQuotaRequest, QuotaLimits, ResourceSpec,
    SetQuotaRequest, UpdateResourceSpecRequest, resource_service_client::ResourceServiceClient,
};
use serde_json::{Value, json};
use tonic::{Code, Request, transport::Channel};
use tonic_types::StatusExt;

use crate::helpers::{AppOptions, TestApp, spawn_app_with};

const SECRET: &str = "test-only-hs256-secret-of-32-bytes+";

/// The service with bearer tokens and `quota` overrides (`("PER_USER__INSTANCES", "2")`).
async fn app_with_quota(quota: &[(&str, &str)]) -> TestApp {
    let mut env = vec![
        ("RESOURCE_AUTH__MODE".to_owned(), "jwt".to_owned()),
        ("RESOURCE_AUTH__JWT__SECRET".to_owned(), SECRET.to_owned()),
    ];
    env.extend(quota.iter().map(|(k, v)| (format!("RESOURCE_QUOTA__{k}"), (*v).to_owned())));
    spawn_app_with(AppOptions { env, ..AppOptions::default() }).await
}

fn token(claims: Value) -> String {
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
}

fn user(sub: &str) -> String {
    token(json!({"sub": sub, "exp": chrono::Utc::now().timestamp() + 300}))
}

fn admin() -> String {
    token(json!({"sub": "root", "role": "admin", "exp": chrono::Utc::now().timestamp() + 300}))
}

/// A REST call as `token`: the status and the JSON body (`null` when there is none).
async fn rest(
    app: &TestApp,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = app.client.request(method, format!("{}{path}", app.http)).bearer_auth(token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let response = req.send().await.expect("a response within the client's timeout");
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

fn spec(cpu: i32, gpu: i32) -> Value {
    json!({"cpu": cpu, "memory": 256, "gpu": gpu, "image": "nginx:1.25"})
}

/// `POST /v1/resources` as `token`.
async fn create(app: &TestApp, token: &str, name: &str, spec: Value) -> (u16, Value) {
    let body = json!({"name": name, "spec": spec});
    rest(app, token, Method::POST, "/v1/resources", Some(body)).await
}

/// Creates an instance that must be accepted; returns its id.
async fn created(app: &TestApp, token: &str, name: &str, spec: Value) -> String {
    let (status, body) = create(app, token, name, spec).await;
    assert_eq!(status, 200, "{name}: {body}");
    body["instance_id"].as_str().unwrap().to_owned()
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

async fn grpc(app: &TestApp) -> ResourceServiceClient<Channel> {
    ResourceServiceClient::new(app.grpc_channel().await)
}

fn grpc_create(name: &str, cpu: i32, gpu: i32) -> CreateResourceRequest {
    CreateResourceRequest {
        name: name.into(),
        spec: Some(ResourceSpec {
            cpu,
            memory: 256,
            gpu,
            image: "nginx:1.25".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The error's `ErrorInfo`: its reason, domain `resource.v1`, and metadata.
fn error_info(status: &tonic::Status) -> (String, std::collections::HashMap<String, String>) {
    let info = status.get_error_details().error_info().cloned().expect("ErrorInfo in details");
    assert_eq!(info.domain, "resource.v1");
    (info.reason, info.metadata)
}

/// What `user_id`'s instances hold by SQL: every instance but DELETED and FAILED ones.
async fn held_by_sql(app: &TestApp, user_id: &str) -> [i64; 4] {
    let row: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(s.cpu), 0)::bigint, coalesce(sum(s.memory), 0)::bigint, \
                count(*) FILTER (WHERE s.gpu <> 0) \
         FROM instances i JOIN instance_specs s ON s.instance_id = i.instance_id \
         WHERE i.user_id = $1 AND i.status NOT IN ('DELETED', 'FAILED')",
    )
    .bind(user_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    [row.0, row.1, row.2, row.3]
}

/// Live instances of GPU type `gpu` by SQL.
async fn gpu_used_by_sql(app: &TestApp, gpu: i32) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM instances i JOIN instance_specs s ON s.instance_id = i.instance_id \
         WHERE s.gpu = $1 AND i.status NOT IN ('DELETED', 'FAILED')",
    )
    .bind(gpu)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// A `QuotaAmounts` JSON object as numbers, in field order.
fn amounts(value: &Value) -> [i64; 4] {
    ["instances", "cpu", "memory_mb", "gpus"].map(|field| {
        let raw = value[field].as_str().unwrap_or_else(|| panic!("{field} as a string: {value}"));
        raw.parse().unwrap()
    })
}

#[tokio::test]
async fn a_create_over_the_instance_limit_is_429_quota_exceeded_over_rest() {
    let app = app_with_quota(&[("PER_USER__INSTANCES", "2")]).await;
    let alice = user("alice");
    created(&app, &alice, "a1", spec(1, 0)).await;
    created(&app, &alice, "a2", spec(1, 0)).await;

    let (status, body) = create(&app, &alice, "a3", spec(1, 0)).await;

    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], 429);
    assert_eq!(body["reason"], "QUOTA_EXCEEDED");
    assert_eq!(
        body["metadata"],
        json!({"limit": "instances", "value": "2", "usage": "2", "requested": "1",
               "user_id": "alice"})
    );
    assert_eq!(held_by_sql(&app, "alice").await[0], 2, "nothing was created");
    created(&app, &user("bob"), "b1", spec(1, 0)).await;
}

#[tokio::test]
async fn a_create_over_the_instance_limit_is_resource_exhausted_over_grpc() {
    let app = app_with_quota(&[("PER_USER__INSTANCES", "2")]).await;
    let alice = user("alice");
    let mut client = grpc(&app).await;
    for name in ["a1", "a2"] {
        client.create_resource(with_token(grpc_create(name, 1, 0), &alice)).await.unwrap();
    }

    let refused =
        client.create_resource(with_token(grpc_create("a3", 1, 0), &alice)).await.unwrap_err();

    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let (reason, metadata) = error_info(&refused);
    assert_eq!(reason, "QUOTA_EXCEEDED");
    assert_eq!(metadata["limit"], "instances");
    assert_eq!(metadata["value"], "2");
    assert_eq!(metadata["usage"], "2");
    assert_eq!(metadata["requested"], "1");
    assert_eq!(metadata["user_id"], "alice");
    assert_eq!(held_by_sql(&app, "alice").await[0], 2, "nothing was created");
}

#[tokio::test]
async fn a_create_over_gpu_capacity_is_capacity_exhausted_on_both_transports() {
    let app = app_with_quota(&[("GPU_CAPACITY__2", "1")]).await;
    let (alice, bob) = (user("alice"), user("bob"));
    created(&app, &alice, "a100", spec(1, 2)).await;
    let mut client = grpc(&app).await;

    let (status, body) = create(&app, &bob, "second a100", spec(1, 2)).await;
    let refused =
        client.create_resource(with_token(grpc_create("third", 1, 2), &bob)).await.unwrap_err();

    assert_eq!(status, 429, "{body}");
    assert_eq!(body["reason"], "CAPACITY_EXHAUSTED");
    let metadata = &body["metadata"];
    assert_eq!((&metadata["gpu"], &metadata["gpu_model"]), (&json!("2"), &json!("Tesla A100")));
    assert_eq!((&metadata["value"], &metadata["usage"]), (&json!("1"), &json!("1")));
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let (reason, metadata) = error_info(&refused);
    assert_eq!(reason, "CAPACITY_EXHAUSTED");
    assert_eq!((metadata["gpu"].as_str(), metadata["gpu_model"].as_str()), ("2", "Tesla A100"));
    assert_eq!(gpu_used_by_sql(&app, 2).await, 1, "one A100 instance, as the capacity says");
    created(&app, &bob, "h100", spec(1, 3)).await;
    created(&app, &bob, "no gpu", spec(1, 0)).await;
}

#[tokio::test]
async fn a_resize_over_the_cpu_limit_is_429_and_leaves_the_instance_unchanged() {
    let app = app_with_quota(&[("PER_USER__CPU", "4")]).await;
    let alice = user("alice");
    let id = created(&app, &alice, "small", spec(2, 0)).await;
    let spec_path = format!("/v1/resources/{id}/spec");
    let mut client = grpc(&app).await;

    let (status, body) =
        rest(&app, &alice, Method::PATCH, &spec_path, Some(json!({"cpu": 8}))).await;
    let patch = UpdateResourceSpecRequest {
        instance_id: id.parse().unwrap(),
        spec: Some(ResourceSpec { cpu: 6, ..Default::default() }),
        update_mask: Some(pbjson_types::FieldMask { paths: vec!["cpu".into()] }),
    };
    let refused = client.update_resource_spec(with_token(patch, &alice)).await.unwrap_err();

    assert_eq!(status, 429, "{body}");
    assert_eq!(body["reason"], "QUOTA_EXCEEDED");
    assert_eq!(
        body["metadata"],
        json!({"limit": "cpu", "value": "4", "usage": "2", "requested": "6", "user_id": "alice"}),
        "a resize asks for the difference"
    );
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let (reason, metadata) = error_info(&refused);
    assert_eq!((reason.as_str(), metadata["requested"].as_str()), ("QUOTA_EXCEEDED", "4"));
    let (_, instance) = rest(&app, &alice, Method::GET, &format!("/v1/resources/{id}"), None).await;
    assert_eq!(instance["spec"]["cpu"], 2, "unchanged: {instance}");
    assert_eq!(instance["status"], "RUNNING");
    assert_eq!(held_by_sql(&app, "alice").await[1], 2);
    let (status, body) =
        rest(&app, &alice, Method::PATCH, &spec_path, Some(json!({"cpu": 4}))).await;
    assert_eq!((status, &body["spec"]["cpu"]), (200, &json!(4)), "up to the limit: {body}");
}

#[tokio::test]
async fn a_stopped_instance_still_counts_and_deleting_one_frees_its_share() {
    let app = app_with_quota(&[("PER_USER__INSTANCES", "2")]).await;
    let alice = user("alice");
    let first = created(&app, &alice, "a1", spec(1, 0)).await;
    created(&app, &alice, "a2", spec(1, 0)).await;

    let (stopped, _) =
        rest(&app, &alice, Method::POST, &format!("/v1/resources/{first}:stop"), None).await;
    let (after_stop, refusal) = create(&app, &alice, "a3", spec(1, 0)).await;
    let (deleted, _) =
        rest(&app, &alice, Method::DELETE, &format!("/v1/resources/{first}"), None).await;
    let (after_delete, body) = create(&app, &alice, "a3", spec(1, 0)).await;

    assert_eq!(stopped, 200);
    assert_eq!(after_stop, 429, "a stopped instance keeps its reservation: {refusal}");
    assert_eq!(refusal["metadata"]["usage"], "2");
    assert_eq!(deleted, 200);
    assert_eq!(after_delete, 200, "the deleted instance's share is free: {body}");
    let (status, quota) = rest(&app, &alice, Method::GET, "/v1/quotas/alice", None).await;
    assert_eq!(status, 200, "{quota}");
    assert_eq!(amounts(&quota["usage"])[0], 2);
    assert_eq!(held_by_sql(&app, "alice").await[0], 2);
}

#[tokio::test]
async fn the_quota_shows_the_limits_in_force_and_usage_equal_to_a_sql_count() {
    let app = app_with_quota(&[("PER_USER__INSTANCES", "10"), ("PER_USER__CPU", "64")]).await;
    let alice = user("alice");
    created(&app, &alice, "cpu", spec(4, 0)).await;
    let gpu = created(&app, &alice, "gpu", spec(2, 2)).await;
    let stopped = created(&app, &alice, "stopped", spec(1, 4)).await;
    let deleted = created(&app, &alice, "deleted", spec(8, 1)).await;
    created(&app, &user("bob"), "not alice's", spec(16, 2)).await;
    rest(&app, &alice, Method::POST, &format!("/v1/resources/{stopped}:stop"), None).await;
    rest(&app, &alice, Method::DELETE, &format!("/v1/resources/{deleted}"), None).await;
    let (status, resized) = rest(
        &app,
        &alice,
        Method::PATCH,
        &format!("/v1/resources/{gpu}/spec"),
        Some(json!({"cpu": 3, "memory": 1024})),
    )
    .await;
    assert_eq!(status, 200, "{resized}");

    let (status, quota) = rest(&app, &alice, Method::GET, "/v1/quotas/alice", None).await;
    let reply = grpc(&app)
        .await
        .get_quota(with_token(GetQuotaRequest { user_id: "alice".into() }, &alice))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(status, 200, "{quota}");
    let by_sql = held_by_sql(&app, "alice").await;
    assert_eq!(by_sql, [3, 4 + 3 + 1, 256 + 1024 + 256, 2], "the SQL count itself");
    assert_eq!(amounts(&quota["usage"]), by_sql);
    assert_eq!(quota["user_id"], "alice");
    assert_eq!(amounts(&quota["limits"]), [10, 64, 0, 0], "0 is unlimited");
    assert_eq!(quota["own"], json!({}), "no limits of her own");
    let usage = reply.usage.unwrap();
    assert_eq!([usage.instances, usage.cpu, usage.memory_mb, usage.gpus], by_sql);
    assert_eq!(reply.limits.unwrap().instances, 10);
    assert_eq!(reply.own.unwrap(), QuotaLimits::default());
}

#[tokio::test]
async fn an_admin_raises_a_limit_and_the_create_then_succeeds() {
    let app = app_with_quota(&[("PER_USER__INSTANCES", "2"), ("PER_USER__GPUS", "1")]).await;
    let (alice, root) = (user("alice"), admin());
    created(&app, &alice, "a1", spec(1, 0)).await;
    created(&app, &alice, "a2", spec(1, 0)).await;
    let (refused, _) = create(&app, &alice, "a3", spec(1, 0)).await;
    assert_eq!(refused, 429);

    // int64 as a string or a number, as proto3 JSON reads them.
    let raise = json!({"instances": "3", "gpus": 2});
    let (status, quota) = rest(&app, &root, Method::PUT, "/v1/quotas/alice", Some(raise)).await;
    let (third, _) = create(&app, &alice, "a3", spec(1, 0)).await;
    let (fourth, refusal) = create(&app, &alice, "a4", spec(1, 0)).await;

    assert_eq!(status, 200, "{quota}");
    assert_eq!(quota["user_id"], "alice");
    assert_eq!(quota["own"], json!({"instances": "3", "gpus": "2"}), "what was set, no more");
    assert_eq!(amounts(&quota["limits"]), [3, 0, 0, 2]);
    assert_eq!(amounts(&quota["usage"]), [2, 2, 512, 0]);
    assert_eq!(third, 200, "the raised limit admits the third");
    assert_eq!(fourth, 429);
    assert_eq!(refusal["metadata"]["value"], "3");

    // Over gRPC: 0 is unlimited, and the previous own limits are replaced as a whole.
    let set = SetQuotaRequest {
        user_id: "alice".into(),
        limits: Some(QuotaLimits { instances: Some(0), ..Default::default() }),
    };
    let reply = grpc(&app).await.set_quota(with_token(set, &root)).await.unwrap().into_inner();
    assert_eq!(reply.limits.unwrap().instances, 0, "unlimited");
    assert_eq!(reply.limits.unwrap().gpus, 1, "gpus back to the default");
    assert_eq!(reply.own.unwrap(), QuotaLimits { instances: Some(0), ..Default::default() });
    created(&app, &alice, "a4", spec(1, 0)).await;
    let (status, quota) = rest(&app, &alice, Method::GET, "/v1/quotas/alice", None).await;
    assert_eq!((status, amounts(&quota["usage"])[0]), (200, 4));
    assert_eq!(held_by_sql(&app, "alice").await[0], 4);
}

#[tokio::test]
async fn only_admins_set_quotas_and_a_user_reads_only_their_own() {
    let app = app_with_quota(&[("PER_USER__INSTANCES", "2")]).await;
    let (alice, root) = (user("alice"), admin());
    let mut client = grpc(&app).await;
    let raise = || Some(json!({"instances": 100}));

    let (set_own, denied) = rest(&app, &alice, Method::PUT, "/v1/quotas/alice", raise()).await;
    let (set_other, _) = rest(&app, &alice, Method::PUT, "/v1/quotas/bob", raise()).await;
    let (read_other, other) = rest(&app, &alice, Method::GET, "/v1/quotas/bob", None).await;
    let (read_own, own) = rest(&app, &alice, Method::GET, "/v1/quotas/alice", None).await;
    let (admin_reads, bobs) = rest(&app, &root, Method::GET, "/v1/quotas/bob", None).await;
    let set = SetQuotaRequest { user_id: "alice".into(), limits: Some(QuotaLimits::default()) };
    let grpc_set = client.set_quota(with_token(set, &alice)).await.unwrap_err();
    let get = GetQuotaRequest { user_id: "bob".into() };
    let grpc_read_other = client.get_quota(with_token(get, &alice)).await.unwrap_err();
    let get = GetQuotaRequest { user_id: "alice".into() };
    let grpc_read_own = client.get_quota(with_token(get, &alice)).await.unwrap().into_inner();

    assert_eq!((set_own, &denied["reason"]), (403, &json!("PERMISSION_DENIED")), "{denied}");
    assert_eq!(set_other, 403);
    assert_eq!((read_other, &other["reason"]), (403, &json!("PERMISSION_DENIED")), "{other}");
    assert_eq!(read_own, 200, "{own}");
    assert_eq!(amounts(&own["limits"])[0], 2, "the PUTs changed nothing");
    assert_eq!((admin_reads, &bobs["user_id"]), (200, &json!("bob")));
    assert_eq!(grpc_set.code(), Code::PermissionDenied);
    assert_eq!(error_info(&grpc_set).0, "PERMISSION_DENIED");
    assert_eq!(grpc_read_other.code(), Code::PermissionDenied);
    assert_eq!(grpc_read_own.user_id, "alice");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM quota_overrides")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "no limit was stored");
}

#[tokio::test]
async fn a_negative_limit_is_400_and_changes_nothing() {
    let app = app_with_quota(&[("PER_USER__INSTANCES", "2")]).await;
    let root = admin();

    let (status, body) =
        rest(&app, &root, Method::PUT, "/v1/quotas/alice", Some(json!({"cpu": -1}))).await;
    let (as_string, _) =
        rest(&app, &root, Method::PUT, "/v1/quotas/alice", Some(json!({"gpus": "-3"}))).await;
    let (not_an_object, _) =
        rest(&app, &root, Method::PUT, "/v1/quotas/alice", Some(json!([1]))).await;
    // A misspelt limit is refused, not ignored: ignored, the PUT would remove the limits.
    let (misspelt, misspelt_body) =
        rest(&app, &root, Method::PUT, "/v1/quotas/alice", Some(json!({"instance": 5}))).await;
    let set = SetQuotaRequest {
        user_id: "alice".into(),
        limits: Some(QuotaLimits { instances: Some(-5), ..Default::default() }),
    };
    let grpc_refused = grpc(&app).await.set_quota(with_token(set, &root)).await.unwrap_err();

    assert_eq!(status, 400, "{body}");
    assert_eq!(body["reason"], "INVALID_ARGUMENT");
    assert_eq!(body["metadata"]["field"], "limits");
    assert_eq!((as_string, not_an_object), (400, 400));
    assert_eq!(misspelt, 400, "{misspelt_body}");
    assert!(misspelt_body["message"].as_str().unwrap().contains("\"instance\" is not a limit"));
    assert_eq!(grpc_refused.code(), Code::InvalidArgument);
    let (_, quota) = rest(&app, &root, Method::GET, "/v1/quotas/alice", None).await;
    assert_eq!(quota["own"], json!({}), "nothing was stored: {quota}");
    assert_eq!(amounts(&quota["limits"])[0], 2);
}

#[tokio::test]
async fn capacity_shows_capacity_used_and_free_per_gpu_type() {
    let app = app_with_quota(&[("GPU_CAPACITY__2", "3"), ("GPU_CAPACITY__4", "1")]).await;
    let (alice, bob) = (user("alice"), user("bob"));
    created(&app, &alice, "a100", spec(1, 2)).await;
    let stopped = created(&app, &bob, "stopped a100", spec(1, 2)).await;
    let deleted = created(&app, &bob, "deleted a100", spec(1, 2)).await;
    created(&app, &alice, "t4", spec(1, 4)).await;
    created(&app, &alice, "v100", spec(1, 1)).await;
    created(&app, &alice, "no gpu", spec(1, 0)).await;
    rest(&app, &bob, Method::POST, &format!("/v1/resources/{stopped}:stop"), None).await;
    rest(&app, &bob, Method::DELETE, &format!("/v1/resources/{deleted}"), None).await;

    // Any authenticated caller reads it, not only admins.
    let (status, body) = rest(&app, &user("carol"), Method::GET, "/v1/capacity", None).await;
    let reply = grpc(&app)
        .await
        .get_capacity(with_token(GetCapacityRequest {}, &user("carol")))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(status, 200, "{body}");
    let gpus = body["gpus"].as_array().unwrap();
    let codes: Vec<i64> = gpus.iter().map(|g| g["gpu"].as_i64().unwrap()).collect();
    assert_eq!(codes, [1, 2, 3, 4, 5, 6], "every GPU type, by code");
    assert_eq!(
        gpus[1],
        json!({"gpu": 2, "gpu_model": "Tesla A100", "capacity": "3", "used": "2", "free": "1"}),
        "the stopped A100 counts, the deleted one does not"
    );
    assert_eq!(
        gpus[3],
        json!({"gpu": 4, "gpu_model": "Tesla T4", "capacity": "1", "used": "1", "free": "0"})
    );
    assert_eq!(
        gpus[0],
        json!({"gpu": 1, "gpu_model": "Tesla V100", "used": "1"}),
        "an unlimited type has no capacity and no free"
    );
    for (gpu, entry) in codes.iter().zip(gpus) {
        let used: i64 = entry["used"].as_str().unwrap().parse().unwrap();
        assert_eq!(used, gpu_used_by_sql(&app, *gpu as i32).await, "GPU {gpu}");
    }
    assert_eq!(reply.gpus.len(), 6);
    let a100 = &reply.gpus[1];
    assert_eq!((a100.capacity, a100.used, a100.free), (Some(3), 2, Some(1)));
    assert_eq!((reply.gpus[0].capacity, reply.gpus[0].free), (None, None));
    let (status, _) = create(&app, &alice, "second t4", spec(1, 4)).await;
    assert_eq!(status, 429, "no T4 is free");
}

#[tokio::test]
async fn quota_routes_answer_wrong_methods_405_and_need_a_token() {
    let app = app_with_quota(&[]).await;
    let root = admin();

    let allowed = app.client.post(format!("{}/v1/quotas/alice", app.http)).send().await.unwrap();
    let (post, body) = rest(&app, &root, Method::POST, "/v1/quotas/alice", None).await;
    let (delete, _) = rest(&app, &root, Method::DELETE, "/v1/quotas/alice", None).await;
    let (put_capacity, _) = rest(&app, &root, Method::PUT, "/v1/capacity", None).await;
    let anonymous = app.get("/v1/capacity").await;

    assert_eq!((post, &body["reason"]), (405, &json!("METHOD_NOT_ALLOWED")), "{body}");
    assert_eq!((delete, put_capacity), (405, 405));
    assert_eq!(allowed.headers()["allow"], "GET,HEAD,PUT", "before authentication");
    assert_eq!(anonymous.status(), 401);
}
