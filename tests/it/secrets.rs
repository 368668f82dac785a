//! Logs never carry secrets: a secret goes in through every entry point and the captured
//! logs (debug level for the service) are searched for it.

use jsonwebtoken::{EncodingKey, Header};
use resource::pb::resource::v1::{
    ListResourcesRequest, resource_service_client::ResourceServiceClient,
};
use serde_json::json;
use tonic::Request;

use crate::helpers::{AppOptions, spawn_app_with};

const DB_PASSWORD: &str = "Pw-db-7f3a9c1e";
const JWT_SECRET: &str = "Jwt-secret-5b2d8e4f-a17c93e0b6d24f81";
const CONFIG_VALUE: &str = "Cfg-value-1c9e7a3b";

#[tokio::test]
async fn no_secret_reaches_the_logs() {
    let mut app = spawn_app_with(AppOptions {
        env: vec![
            ("RESOURCE_AUTH__MODE".into(), "jwt".into()),
            ("RESOURCE_AUTH__JWT__SECRET".into(), JWT_SECRET.into()),
        ],
        database_password: Some(DB_PASSWORD.into()),
        ..Default::default()
    })
    .await;
    let exp = chrono::Utc::now().timestamp() + 300;
    let token = jsonwebtoken::encode(
        &Header::default(),
        &json!({"sub": "alice", "exp": exp}),
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();
    let forged = jsonwebtoken::encode(
        &Header::default(),
        &json!({"sub": "alice", "exp": exp}),
        &EncodingKey::from_secret(b"wrong"),
    )
    .unwrap();

    // REST: a create with a secret in config_json, a bad one, a refused token.
    let url = format!("{}/v1/resources", app.http);
    let body = json!({"name": "s", "spec": {"cpu": 1, "memory": 64, "image": "nginx",
                      "config_json": {"env": {"API_KEY": CONFIG_VALUE}}}});
    let created = app.client.post(&url).bearer_auth(&token).json(&body).send().await.unwrap();
    assert_eq!(created.status(), 200);
    let bad = json!({"name": "s", "spec": {"cpu": 0, "memory": 64, "image": "nginx",
                     "config_json": {"env": {"API_KEY": CONFIG_VALUE}, "ports": [{"port": 0, "name": CONFIG_VALUE}]}}});
    let refused = app.client.post(&url).bearer_auth(&token).json(&bad).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    let forged_call = app.client.get(&url).bearer_auth(&forged).send().await.unwrap();
    assert_eq!(forged_call.status(), 401);

    // gRPC: a valid and a forged token.
    let mut grpc = ResourceServiceClient::new(app.grpc_channel().await);
    for t in [&token, &forged] {
        let mut req = Request::new(ListResourcesRequest::default());
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        let _ = grpc.list_resources(req).await;
    }
    // And a restart, which logs the configuration it starts with.
    app.restart().await;
    let _ = app.terminate().await;

    let logs = app.logs.lock().unwrap().join("\n");
    assert!(logs.len() > 1000, "the logs were captured");
    for secret in [DB_PASSWORD, JWT_SECRET, CONFIG_VALUE, token.as_str(), forged.as_str()] {
        assert!(!logs.contains(secret), "{secret:?} appears in the logs");
    }
}
