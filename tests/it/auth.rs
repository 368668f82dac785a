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

const SECRET: &str = "test-only-hs256-secret-of-32-bytes+";

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
    // The caller is the token's subject: the owner of what it creates, and the audited actor.
    let id = create_as(&app, &token, "carols").await;
    let (_, got) =
        rest(&app, Some(&token), reqwest::Method::GET, &format!("/v1/resources/{id}"), None).await;
    assert_eq!(got["user_id"], "carol", "{got}");
    let (_, trail) = rest(
        &app,
        Some(&token),
        reqwest::Method::GET,
        &format!("/v1/resources/{id}/audit-logs"),
        None,
    )
    .await;
    let actors: Vec<&Value> =
        trail["entries"].as_array().unwrap().iter().map(|e| &e["actor"]).collect();
    assert_eq!(actors, [&json!("carol")], "{trail}");
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

/// An RS256 token signed with the test key, with a `kid` and `typ` in its header, as
/// identity providers issue them.
fn idp_token(claims: Value) -> String {
    let private = std::fs::read(repo_path("tests/fixtures/jwt-test-rsa.pem")).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-2026-12".into());
    header.typ = Some("at+jwt".into());
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_pem(&private).unwrap()).unwrap()
}

/// One identity provider: how the service is configured for it, and the claims of an
/// admin's and of a plain user's access token (shapes of `shared/fixtures/idp-token-claims.md`).
struct Provider {
    name: &'static str,
    config: Vec<(&'static str, &'static str)>,
    admin: Value,
    user: Value,
}

fn providers() -> Vec<Provider> {
    let (iat, exp) = (now() - 10, now() + 300);
    vec![
        Provider {
            name: "Keycloak",
            config: vec![
                ("RESOURCE_AUTH__JWT__AUDIENCE", "account"),
                ("RESOURCE_AUTH__JWT__ISSUER", "https://sso.example.com/realms/cloud"),
                ("RESOURCE_AUTH__JWT__ROLES_CLAIM", "realm_access.roles"),
            ],
            admin: json!({"exp": exp, "iat": iat, "jti": "8f1c2b7e", "iss": "https://sso.example.com/realms/cloud",
                "aud": "account", "sub": "5d6c1f0e-7a1b-4c2d-9e8f-0a1b2c3d4e5f", "typ": "Bearer", "azp": "console",
                "session_state": "a1b2", "acr": "1", "allowed-origins": ["https://console.example.com"],
                "realm_access": {"roles": ["offline_access", "admin"]},
                "resource_access": {"account": {"roles": ["manage-account"]}},
                "scope": "openid email profile", "sid": "a1b2", "email_verified": true, "preferred_username": "alice"}),
            user: json!({"exp": exp, "iat": iat, "iss": "https://sso.example.com/realms/cloud", "aud": "account",
                "sub": "9e8f0a1b-2c3d-4e5f-5d6c-1f0e7a1b4c2d", "typ": "Bearer", "azp": "console",
                "realm_access": {"roles": ["offline_access"]},
                "resource_access": {"account": {"roles": ["admin"]}}}),
        },
        Provider {
            name: "Auth0",
            config: vec![
                ("RESOURCE_AUTH__JWT__AUDIENCE", "https://api.example.com"),
                ("RESOURCE_AUTH__JWT__ISSUER", "https://tenant.eu.auth0.com/"),
                ("RESOURCE_AUTH__JWT__ROLES_CLAIM", "https://example.com/roles"),
            ],
            admin: json!({"iss": "https://tenant.eu.auth0.com/", "sub": "auth0|64f0c0ffee",
                "aud": ["https://api.example.com", "https://tenant.eu.auth0.com/userinfo"], "iat": iat, "exp": exp,
                "azp": "Xy12", "scope": "openid profile", "https://example.com/roles": ["admin"]}),
            user: json!({"iss": "https://tenant.eu.auth0.com/", "sub": "auth0|64f0c0ffef",
                "aud": ["https://api.example.com", "https://tenant.eu.auth0.com/userinfo"], "iat": iat, "exp": exp,
                "azp": "Xy12", "scope": "openid profile admin", "https://example.com/roles": []}),
        },
        Provider {
            name: "Entra ID",
            config: vec![
                ("RESOURCE_AUTH__JWT__AUDIENCE", "api://6e74172b-be56-4843-9ff4-e66a39bb12e3"),
                (
                    "RESOURCE_AUTH__JWT__ISSUER",
                    "https://login.microsoftonline.com/72f988bf-86f1/v2.0",
                ),
                ("RESOURCE_AUTH__JWT__ROLES_CLAIM", "roles"),
                ("RESOURCE_AUTH__JWT__ADMIN_ROLE", "Admin"),
            ],
            admin: json!({"aud": "api://6e74172b-be56-4843-9ff4-e66a39bb12e3",
                "iss": "https://login.microsoftonline.com/72f988bf-86f1/v2.0", "iat": iat, "nbf": iat, "exp": exp,
                "azp": "6e74", "azpacr": "0", "name": "Alice", "oid": "690222be", "preferred_username": "alice@example.com",
                "roles": ["Admin"], "scp": "access_as_user", "sub": "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
                "tid": "72f988bf", "ver": "2.0"}),
            user: json!({"aud": "api://6e74172b-be56-4843-9ff4-e66a39bb12e3",
                "iss": "https://login.microsoftonline.com/72f988bf-86f1/v2.0", "iat": iat, "nbf": iat, "exp": exp,
                "roles": ["admin", "Reader"], "sub": "BBBBBBBBBBBBBBBBBBBBBIkzqFVrSaSaFHy782bbtaQ", "ver": "2.0"}),
        },
        Provider {
            name: "Dex",
            config: vec![
                ("RESOURCE_AUTH__JWT__AUDIENCE", "resource"),
                ("RESOURCE_AUTH__JWT__ISSUER", "https://dex.example.com"),
                ("RESOURCE_AUTH__JWT__ROLES_CLAIM", "groups"),
                ("RESOURCE_AUTH__JWT__ADMIN_ROLE", "admins"),
            ],
            admin: json!({"iss": "https://dex.example.com", "sub": "CiQwOGE4Njg0Yi1kYjg4LTRiNzMtOTBhOS0zY2QxNjYxZjU0NjYSBWxvY2Fs",
                "aud": "resource", "exp": exp, "iat": iat, "at_hash": "x", "email": "alice@example.com",
                "email_verified": true, "name": "Alice", "groups": ["admins"]}),
            user: json!({"iss": "https://dex.example.com", "sub": "CiQxOGE4Njg0Yi1kYjg4", "aud": "resource",
                "exp": exp, "iat": iat, "groups": ["developers"]}),
        },
    ]
}

#[tokio::test]
async fn tokens_shaped_as_real_identity_providers_issue_them_are_accepted() {
    let public = repo_path("tests/fixtures/jwt-test-rsa.pub.pem");
    for provider in providers() {
        let mut config = vec![
            ("RESOURCE_AUTH__JWT__ALGORITHM", "RS256"),
            ("RESOURCE_AUTH__JWT__PUBLIC_KEY_FILE", public.to_str().unwrap()),
        ];
        config.extend(provider.config.iter().copied());
        let app = app_with_jwt(&config).await;
        let (admin, user) = (idp_token(provider.admin.clone()), idp_token(provider.user.clone()));
        let name = provider.name;

        // The user creates an instance of their own; the admin sees it, the user is its owner.
        let id = create_as(&app, &user, "mine").await;
        let (status, got) =
            rest(&app, Some(&user), reqwest::Method::GET, &format!("/v1/resources/{id}"), None)
                .await;
        assert_eq!(status, 200, "{name}: {got}");
        assert_eq!(got["user_id"], provider.user["sub"], "{name}: the owner is the token's sub");
        let (_, all) = rest(&app, Some(&admin), reqwest::Method::GET, "/v1/resources", None).await;
        assert_eq!(
            all["resources"].as_array().map(Vec::len),
            Some(1),
            "{name}: the admin sees all"
        );
        let (status, _) = rest(
            &app,
            Some(&user),
            reqwest::Method::POST,
            "/v1/resources",
            Some(json!({"name": "x", "user_id": "someone-else", "spec": spec()})),
        )
        .await;
        assert_eq!(status, 403, "{name}: a user without the admin role is no admin");
        let admin_id = create_as(&app, &admin, "theirs").await;
        let (status, _) = rest(
            &app,
            Some(&user),
            reqwest::Method::GET,
            &format!("/v1/resources/{admin_id}"),
            None,
        )
        .await;
        assert_eq!(status, 404, "{name}: another user's instance does not exist for the user");

        // The audience and the issuer are checked.
        let mut claims = provider.admin.clone();
        claims["aud"] = json!("https://someone-else.example.com");
        let mut wrong_iss = provider.admin.clone();
        wrong_iss["iss"] = json!("https://evil.example.com");
        let mut no_aud = provider.admin.clone();
        no_aud.as_object_mut().unwrap().remove("aud");
        for (what, claims) in
            [("another audience", claims), ("another issuer", wrong_iss), ("no aud", no_aud)]
        {
            let token = idp_token(claims);
            let (status, _) =
                rest(&app, Some(&token), reqwest::Method::GET, "/v1/resources", None).await;
            assert_eq!(status, 401, "{name}: a token with {what} is refused");
        }
    }
}

#[tokio::test]
async fn without_a_configured_audience_a_tokens_aud_is_not_checked() {
    let public = repo_path("tests/fixtures/jwt-test-rsa.pub.pem");
    let app = app_with_jwt(&[
        ("RESOURCE_AUTH__JWT__ALGORITHM", "RS256"),
        ("RESOURCE_AUTH__JWT__PUBLIC_KEY_FILE", public.to_str().unwrap()),
    ])
    .await;
    let keycloak = &providers()[0];
    let token = idp_token(keycloak.admin.clone());
    let (status, body) =
        rest(&app, Some(&token), reqwest::Method::GET, "/v1/resources", None).await;
    assert_eq!(status, 200, "{body}");
    // The default roles claim is the top-level `role`: Keycloak's realm roles do not count.
    let (status, _) = rest(
        &app,
        Some(&token),
        reqwest::Method::POST,
        "/v1/resources",
        Some(json!({"name": "x", "user_id": "someone-else", "spec": spec()})),
    )
    .await;
    assert_eq!(status, 403);
}
