//! Authentication and tenancy on both transports, with `auth.mode: jwt`.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use resource::pb::resource::v1::{
    CreateResourceRequest, GetResourceRequest, ListAuditLogsRequest, ListResourcesRequest,
    ResourceActionRequest, ResourceSpec, UpdateResourceSpecRequest,
    resource_service_client::ResourceServiceClient,
};
use serde_json::{Value, json};
use tonic::{Code, Request};

use crate::helpers::{AppOptions, TestApp, repo_path, spawn_app_with};

const SECRET: &str = "test-only-hs256-secret";

async fn app_with_jwt(extra: &[(&str, &str)]) -> TestApp {
    let mut env = vec![
        ("RESOURCE_AUTH__MODE".to_owned(), "jwt".to_owned()),
        ("RESOURCE_AUTH__JWT__SECRET".to_owned(), SECRET.to_owned()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    spawn_app_with(AppOptions { env, ..AppOptions::default() }).await
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn hs256(claims: Value) -> String {
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
}

fn user(sub: &str) -> String {
    hs256(json!({"sub": sub, "exp": now() + 300}))
}

fn admin() -> String {
    hs256(json!({"sub": "root", "role": "admin", "exp": now() + 300}))
}

async fn rest(
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

fn spec() -> Value {
    json!({"cpu": 1, "memory": 128, "image": "nginx:1.25"})
}

async fn create_as(app: &TestApp, token: &str, name: &str) -> String {
    let (status, body) = rest(
        app,
        Some(token),
        reqwest::Method::POST,
        "/v1/resources",
        Some(json!({"name": name, "spec": spec()})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["instance_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn rest_refuses_missing_and_bad_tokens_without_detail() {
    let app = app_with_jwt(&[]).await;
    let unsigned = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(json!({"sub": "mallory", "exp": now() + 300}).to_string())
        )
    };
    let forged = {
        let key = EncodingKey::from_secret(b"not-the-secret");
        jsonwebtoken::encode(&Header::default(), &json!({"sub": "a", "exp": now() + 300}), &key)
            .unwrap()
    };
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("bad signature", Some(forged)),
        ("expired", Some(hs256(json!({"sub": "a", "exp": now() - 3600})))),
        (
            "not yet valid",
            Some(hs256(json!({"sub": "a", "exp": now() + 7200, "nbf": now() + 3600}))),
        ),
        ("alg none", Some(unsigned)),
        ("garbage", Some("not.a.jwt".into())),
    ];
    for (what, token) in cases {
        let (status, body) =
            rest(&app, token.as_deref(), reqwest::Method::GET, "/v1/resources", None).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["reason"], "UNAUTHENTICATED", "{what}");
        assert_eq!(body["message"], "missing or invalid credentials", "{what}: no detail");
    }
    // Probes and the document stay open.
    for path in ["/healthz", "/readyz", "/openapi.json"] {
        assert_eq!(app.get(path).await.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn rest_users_see_and_touch_only_their_own_instances() {
    let app = app_with_jwt(&[]).await;
    use reqwest::Method as M;
    let (alice, bob) = (user("alice"), user("bob"));
    let a = create_as(&app, &alice, "a").await;
    let b = create_as(&app, &bob, "b").await;

    // Bob's instance does not exist for Alice, whatever she tries.
    let attempts = [
        (M::GET, format!("/v1/resources/{b}"), None),
        (M::GET, format!("/v1/resources/{b}/audit-logs"), None),
        (M::POST, format!("/v1/resources/{b}:stop"), None),
        (M::POST, format!("/v1/resources/{b}:start"), None),
        (M::PATCH, format!("/v1/resources/{b}/spec"), Some(spec())),
        (M::DELETE, format!("/v1/resources/{b}"), None),
    ];
    for (method, path, body) in attempts {
        let (status, answer) = rest(&app, Some(&alice), method.clone(), &path, body).await;
        assert_eq!(status, 404, "{method} {path}: {answer}");
        assert_eq!(answer["reason"], "INSTANCE_NOT_FOUND");
    }
    let (_, still) = rest(&app, Some(&bob), M::GET, &format!("/v1/resources/{b}"), None).await;
    assert_eq!(still["status"], "RUNNING", "untouched by Alice");

    let (_, mine) = rest(&app, Some(&alice), M::GET, "/v1/resources", None).await;
    let ids: Vec<&str> = mine["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["instance_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [a.as_str()]);
    let (_, theirs) = rest(&app, Some(&alice), M::GET, "/v1/resources?user_id=bob", None).await;
    assert!(theirs["resources"].as_array().unwrap().is_empty());

    // Alice cannot create for Bob; she owns what she creates.
    let (status, body) = rest(
        &app,
        Some(&alice),
        M::POST,
        "/v1/resources",
        Some(json!({"name": "x", "user_id": "bob", "spec": spec()})),
    )
    .await;
    assert_eq!((status, body["reason"].as_str()), (403, Some("PERMISSION_DENIED")));
    let (_, own) = rest(&app, Some(&alice), M::GET, &format!("/v1/resources/{a}"), None).await;
    assert_eq!(own["user_id"], "alice");
    let (_, trail) =
        rest(&app, Some(&alice), M::GET, &format!("/v1/resources/{a}/audit-logs"), None).await;
    assert_eq!(trail["entries"][0]["actor"], "alice", "the token's sub is the audited actor");

    // An admin sees and acts on everything.
    let root = admin();
    let (_, all) = rest(&app, Some(&root), M::GET, "/v1/resources", None).await;
    assert_eq!(all["resources"].as_array().unwrap().len(), 2);
    let (status, _) =
        rest(&app, Some(&root), M::POST, &format!("/v1/resources/{b}:stop"), None).await;
    assert_eq!(status, 200);
}

fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    result.map_or_else(|status| status.code(), |_| Code::Ok)
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut req = Request::new(message);
    if let Some(token) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    req
}

#[tokio::test]
async fn grpc_authenticates_and_isolates_users_too() {
    let app = app_with_jwt(&[]).await;
    let mut client = ResourceServiceClient::new(app.grpc_channel().await);
    let (alice, bob) = (user("alice"), user("bob"));

    let missing = client.list_resources(with_token(ListResourcesRequest::default(), None)).await;
    assert_eq!(missing.unwrap_err().code(), Code::Unauthenticated);
    let expired = hs256(json!({"sub": "alice", "exp": now() - 3600}));
    let refused =
        client.list_resources(with_token(ListResourcesRequest::default(), Some(&expired))).await;
    let status = refused.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::Unauthenticated, "missing or invalid credentials")
    );

    let spec =
        ResourceSpec { cpu: 1, memory: 128, image: "nginx:1.25".into(), ..Default::default() };
    let create =
        CreateResourceRequest { name: "b".into(), spec: Some(spec.clone()), ..Default::default() };
    let b = client.create_resource(with_token(create, Some(&bob))).await.unwrap().into_inner();
    assert_eq!(b.user_id, "bob");
    let id = b.instance_id;

    let a = Some(alice.as_str());
    let act = |id| ResourceActionRequest { instance_id: id };
    let codes = [
        (
            "get",
            code(client.get_resource(with_token(GetResourceRequest { instance_id: id }, a)).await),
        ),
        ("stop", code(client.stop_resource(with_token(act(id), a)).await)),
        ("start", code(client.start_resource(with_token(act(id), a)).await)),
        ("delete", code(client.delete_resource(with_token(act(id), a)).await)),
        (
            "resize",
            code(
                client
                    .update_resource_spec(with_token(
                        UpdateResourceSpecRequest {
                            instance_id: id,
                            spec: Some(spec),
                            update_mask: None,
                        },
                        a,
                    ))
                    .await,
            ),
        ),
        (
            "audit",
            code(
                client
                    .list_audit_logs(with_token(
                        ListAuditLogsRequest { instance_id: id, ..Default::default() },
                        a,
                    ))
                    .await,
            ),
        ),
    ];
    for (what, code) in codes {
        assert_eq!(code, Code::NotFound, "{what}");
    }

    let listed =
        client.list_resources(with_token(ListResourcesRequest::default(), a)).await.unwrap();
    assert!(listed.into_inner().resources.is_empty());
    let root = admin();
    let all = client
        .list_resources(with_token(ListResourcesRequest::default(), Some(&root)))
        .await
        .unwrap();
    assert_eq!(all.into_inner().resources.len(), 1);
}

#[tokio::test]
async fn rs256_tokens_verify_with_the_public_key_and_hs256_ones_do_not() {
    let public = repo_path("tests/fixtures/jwt-test-rsa.pub.pem");
    let app = app_with_jwt(&[
        ("RESOURCE_AUTH__JWT__ALGORITHM", "RS256"),
        ("RESOURCE_AUTH__JWT__PUBLIC_KEY_FILE", public.to_str().unwrap()),
    ])
    .await;
    let private = std::fs::read(repo_path("tests/fixtures/jwt-test-rsa.pem")).unwrap();
    let key = EncodingKey::from_rsa_pem(&private).unwrap();
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &json!({"sub": "carol", "exp": now() + 300}),
        &key,
    )
    .unwrap();
    let (status, _) = rest(&app, Some(&token), reqwest::Method::GET, "/v1/resources", None).await;
    assert_eq!(status, 200);
    // The wrong algorithm (an HS256 token, even one signed with the public key's bytes).
    let confused = {
        let pem = std::fs::read(&public).unwrap();
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "carol", "exp": now() + 300}),
            &EncodingKey::from_secret(&pem),
        )
        .unwrap()
    };
    let (status, _) =
        rest(&app, Some(&confused), reqwest::Method::GET, "/v1/resources", None).await;
    assert_eq!(status, 401);
}
