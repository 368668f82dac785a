//! Spec changes and creates as clients really send them: partial PATCHes and field masks,
//! retries of a create after the instance changed, and `config_json` at and past its
//! bounds, over REST and gRPC.

use resource::pb::resource::v1::{
    CreateResourceRequest, GetResourceRequest, ListAuditLogsRequest, ListResourcesRequest,
    ResourceSpec, UpdateResourceSpecRequest, resource_service_client::ResourceServiceClient,
};
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    helpers::{AppOptions, TestApp, spawn_app, spawn_app_with},
    races::assert_unbroken_chain,
};

/// Status and raw body text of one REST call.
async fn call_raw(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> (u16, String) {
    let response = app
        .client
        .request(method, format!("{}{path}", app.http))
        .json(&body)
        .send()
        .await
        .expect("a REST answer");
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn call(app: &TestApp, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = call_raw(app, method, path, body).await;
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

fn create_body(request_id: &str, config: Value) -> Value {
    json!({"name": "web", "user_id": "u1", "request_id": request_id,
           "spec": {"cpu": 2, "memory": 2048, "gpu": 2, "image": "nginx:1.25", "config_json": config}})
}

fn id_of(resource: &Value) -> i64 {
    resource["instance_id"].as_str().expect("an instance_id").parse().unwrap()
}

/// `{"l": {"l": … {"v": 1}}}`, `depth` objects deep (the outer one counts).
fn nested(depth: usize) -> Value {
    (1..depth).fold(json!({"v": 1}), |inner, _| json!({ "l": inner }))
}

#[tokio::test]
async fn a_patch_changes_only_the_fields_in_its_body() {
    use reqwest::Method as M;
    let app = spawn_app().await;
    let config = json!({"env": {"A": "1"}, "ports": [{"name": "http", "port": 8080}]});
    let (_, created) = call(&app, M::POST, "/v1/resources", create_body("", config.clone())).await;
    let id = id_of(&created);
    let path = format!("/v1/resources/{id}/spec");

    let (status, resized) = call(&app, M::PATCH, &path, json!({"cpu": 4, "memory": 4096})).await;
    assert_eq!(status, 200, "{resized}");
    assert_eq!(resized["spec"]["cpu"], 4);
    assert_eq!(resized["spec"]["memory"], 4096);
    assert_eq!(resized["spec"]["gpu"], 2, "absent gpu kept");
    assert_eq!(resized["spec"]["image"], "nginx:1.25", "absent image kept");
    assert_eq!(resized["spec"]["config_json"], config, "absent config_json kept");

    let (_, reimaged) =
        call(&app, M::PATCH, &path, json!({"image": "nginx:1.26", "cpu": null})).await;
    assert_eq!(reimaged["spec"]["image"], "nginx:1.26");
    assert_eq!(reimaged["spec"]["cpu"], 4, "null means unset: kept");
    assert_eq!(reimaged["spec"]["config_json"], config, "config_json survives an image change");

    let (_, no_gpu) =
        call(&app, M::PATCH, &path, json!({"gpu": 0, "configJson": {"env": {}}})).await;
    assert_eq!(no_gpu["spec"]["gpu"], 0, "a present zero is a value");
    assert_eq!(no_gpu["spec"]["config_json"], json!({"env": {}}), "config_json is replaced whole");

    let (status, same) = call(&app, M::PATCH, &path, json!({"gpu_model": "ignored", "x": 1})).await;
    assert_eq!(status, 200);
    assert_eq!(same["spec"], no_gpu["spec"], "nothing to change: a no-op");
    let (status, error) = call(&app, M::PATCH, &path, json!({"memory": 0})).await;
    assert_eq!((status, error["reason"].as_str()), (400, Some("INVALID_SPEC")));
    let (status, _) = call(&app, M::PATCH, &path, json!([1])).await;
    assert_eq!(status, 400, "a body that is not an object");

    let rows = assert_unbroken_chain(&app.pool, id).await;
    let outcomes: Vec<(&str, &str)> =
        rows.iter().map(|r| (r.action.as_str(), r.outcome.as_str())).collect();
    assert_eq!(
        outcomes,
        [
            ("CREATE", "ok"),
            ("CHANGE_SPEC", "ok"),
            ("CHANGE_SPEC", "ok"),
            ("CHANGE_SPEC", "ok"),
            ("CHANGE_SPEC", "ignored"),
            ("CHANGE_SPEC", "rejected"),
        ]
    );
    // The trail carries the whole spec, config_json included.
    assert_eq!(rows[1].before.as_ref().unwrap()["config_json"], config);
    assert_eq!(rows[3].after.as_ref().unwrap()["config_json"], json!({"env": {}}));
}

#[tokio::test]
async fn integers_stay_integers_in_resources_and_the_audit_trail() {
    use reqwest::Method as M;
    let app = spawn_app().await;
    let config = json!({"ports": [{"name": "http", "port": 8080}], "env": {"N": 3}, "ratio": 0.5});
    let (_, created) = call(&app, M::POST, "/v1/resources", create_body("", config)).await;
    let id = id_of(&created);
    call(&app, M::PATCH, &format!("/v1/resources/{id}/spec"), json!({"cpu": 3})).await;

    let (_, resource) = call_raw(&app, M::GET, &format!("/v1/resources/{id}"), json!(null)).await;
    let (_, trail) =
        call_raw(&app, M::GET, &format!("/v1/resources/{id}/audit-logs"), json!(null)).await;

    for text in [&resource, &trail] {
        assert!(text.contains(r#""port":8080"#), "{text}");
        assert!(text.contains(r#""N":3"#), "{text}");
        assert!(text.contains(r#""ratio":0.5"#), "fractions are kept: {text}");
        assert!(!text.contains("8080.0") && !text.contains("3.0"), "{text}");
    }
    assert!(trail.contains(r#""cpu":3"#) && trail.contains(r#""cpu":2"#), "{trail}");
    let stored: Value =
        sqlx::query_scalar("SELECT config_json FROM instance_specs WHERE instance_id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        stored.to_string(),
        r#"{"env":{"N":3},"ports":[{"name":"http","port":8080}],"ratio":0.5}"#
    );
}

#[tokio::test]
async fn grpc_updates_take_a_field_mask_or_the_populated_fields() {
    let app = spawn_app().await;
    let mut client = ResourceServiceClient::new(app.grpc_channel().await);
    let spec = ResourceSpec {
        cpu: 2,
        memory: 2048,
        gpu: 2,
        image: "nginx:1.25".into(),
        ..Default::default()
    };
    let created = client
        .create_resource(CreateResourceRequest {
            name: "g".into(),
            spec: Some(spec),
            user_id: "u1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = created.instance_id;
    let update = |spec: ResourceSpec, paths: &[&str]| UpdateResourceSpecRequest {
        instance_id: id,
        spec: Some(spec),
        update_mask: (!paths.is_empty()).then(|| pbjson_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
    };

    // The mask names memory: cpu in the message is not applied.
    let masked = client
        .update_resource_spec(update(
            ResourceSpec { cpu: 99, memory: 4096, ..Default::default() },
            &["memory"],
        ))
        .await
        .unwrap()
        .into_inner()
        .spec
        .unwrap();
    assert_eq!(
        (masked.cpu, masked.memory, masked.gpu, masked.image.as_str()),
        (2, 4096, 2, "nginx:1.25")
    );
    // Without a mask, the populated fields.
    let populated = client
        .update_resource_spec(update(ResourceSpec { cpu: 3, ..Default::default() }, &[]))
        .await
        .unwrap()
        .into_inner()
        .spec
        .unwrap();
    assert_eq!((populated.cpu, populated.memory, populated.gpu), (3, 4096, 2));
    // A zero is applied when the mask names it.
    let cleared = client
        .update_resource_spec(update(ResourceSpec::default(), &["spec.gpu"]))
        .await
        .unwrap()
        .into_inner()
        .spec
        .unwrap();
    assert_eq!((cleared.cpu, cleared.gpu), (3, 0));
    let bogus =
        client.update_resource_spec(update(ResourceSpec::default(), &["owner"])).await.unwrap_err();
    assert_eq!(bogus.code(), Code::InvalidArgument);
    assert_eq!(bogus.get_error_details().error_info().unwrap().metadata["field"], "update_mask");
    assert_unbroken_chain(&app.pool, id).await;
}

#[tokio::test]
async fn a_create_retried_after_the_instance_changed_returns_it_as_it_is_now() {
    use reqwest::Method as M;
    let app = spawn_app().await;
    let config = json!({"env": {"A": "1", "B": "2"}});
    let (_, first) = call(&app, M::POST, "/v1/resources", create_body("r-1", config)).await;
    let id = id_of(&first);
    call(&app, M::POST, &format!("/v1/resources/{id}:stop"), json!(null)).await;
    call(&app, M::PATCH, &format!("/v1/resources/{id}/spec"), json!({"cpu": 8})).await;

    // The same body, its config keys in another order.
    let retry_config = json!({"env": {"B": "2", "A": "1"}});
    let (status, retried) =
        call(&app, M::POST, "/v1/resources", create_body("r-1", retry_config)).await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(id_of(&retried), id);
    assert_eq!(retried["status"], "STOPPED", "as it is now");
    assert_eq!(retried["spec"]["cpu"], 8, "as it is now");

    let mut other = create_body("r-1", json!({"env": {"A": "1", "B": "2"}}));
    other["spec"]["cpu"] = json!(8); // the instance's spec now, but not what r-1 asked for
    let (status, refused) = call(&app, M::POST, "/v1/resources", other).await;
    assert_eq!((status, refused["reason"].as_str()), (409, Some("REQUEST_ID_REUSED")));

    // Many retries at once still make one instance.
    let retries =
        (0..10).map(|_| call(&app, M::POST, "/v1/resources", create_body("r-2", json!({}))));
    let answers = futures::future::join_all(retries).await;
    let ids: std::collections::HashSet<i64> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 200, "{body}");
            id_of(body)
        })
        .collect();
    assert_eq!(ids.len(), 1, "ten concurrent retries, one instance");
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM instances").fetch_one(&app.pool).await.unwrap();
    assert_eq!(count, 2);
    assert_unbroken_chain(&app.pool, id).await;
}

#[tokio::test]
async fn config_json_is_bounded_in_depth_and_size_on_rest() {
    use reqwest::Method as M;
    let app = spawn_app().await;

    let (status, deepest) = call(&app, M::POST, "/v1/resources", create_body("", nested(32))).await;
    assert_eq!(status, 200, "depth 32 is the default limit: {deepest}");
    for (what, config) in [
        ("33 levels", nested(33)),
        ("40 levels", nested(40)),
        ("an array level too many", json!({"a": [nested(31)]})),
        ("over 64 KiB", json!({"blob": "x".repeat(64 * 1024)})),
    ] {
        let (status, error) =
            call(&app, M::POST, "/v1/resources", create_body("", config.clone())).await;
        assert_eq!(
            (status, error["reason"].as_str()),
            (400, Some("INVALID_SPEC")),
            "{what}: {error}"
        );
        assert_eq!(error["metadata"]["field"], "config_json", "{what}");
        let path = format!("/v1/resources/{}/spec", id_of(&deepest));
        let (status, error) = call(&app, M::PATCH, &path, json!({"config_json": config})).await;
        assert_eq!((status, error["reason"].as_str()), (400, Some("INVALID_SPEC")), "PATCH {what}");
    }

    // What is stored within the bounds can be read by a stock gRPC client (prost stops at
    // 100 message levels), in lists, in gets and in the audit trail.
    let mut client = ResourceServiceClient::new(app.grpc_channel().await);
    let id = id_of(&deepest);
    client.get_resource(GetResourceRequest { instance_id: id }).await.expect("GetResource decodes");
    client.list_resources(ListResourcesRequest::default()).await.expect("ListResources decodes");
    client
        .list_audit_logs(ListAuditLogsRequest { instance_id: id, ..Default::default() })
        .await
        .expect("ListAuditLogs decodes");
}

#[tokio::test]
async fn config_json_is_bounded_on_grpc_with_the_configured_limits() {
    let app = spawn_app_with(AppOptions {
        env: vec![
            ("RESOURCE_LIMITS__MAX_CONFIG_DEPTH".into(), "4".into()),
            ("RESOURCE_LIMITS__MAX_CONFIG_BYTES".into(), "100".into()),
        ],
        ..Default::default()
    })
    .await;
    let mut client = ResourceServiceClient::new(app.grpc_channel().await);
    let to_struct = |v: Value| -> pbjson_types::Struct { serde_json::from_value(v).unwrap() };
    let create = |config: Value| CreateResourceRequest {
        name: "g".into(),
        user_id: "u1".into(),
        spec: Some(ResourceSpec {
            cpu: 1,
            memory: 512,
            image: "nginx".into(),
            config_json: Some(to_struct(config)),
            ..Default::default()
        }),
        ..Default::default()
    };

    client.create_resource(create(nested(4))).await.expect("within the limits");
    for config in [nested(5), json!({"blob": "x".repeat(100)})] {
        let error = client.create_resource(create(config)).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert_eq!(error.get_error_details().error_info().unwrap().reason, "INVALID_SPEC");
    }
}

#[tokio::test]
async fn a_rest_update_mask_query_parameter_narrows_the_patch() {
    use reqwest::Method as M;
    let app = spawn_app().await;
    let (_, created) = call(&app, M::POST, "/v1/resources", create_body("", json!({}))).await;
    let id = id_of(&created);

    let path = format!("/v1/resources/{id}/spec?update_mask=image");
    let (status, changed) =
        call(&app, M::PATCH, &path, json!({"cpu": 5, "image": "nginx:1.27"})).await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["spec"]["image"], "nginx:1.27");
    assert_eq!(changed["spec"]["cpu"], 2, "cpu is not in the mask");
    let path = format!("/v1/resources/{id}/spec?update_mask=owner");
    let (status, error) = call(&app, M::PATCH, &path, json!({"image": "nginx:1.28"})).await;
    assert_eq!((status, error["metadata"]["field"].as_str()), (400, Some("update_mask")));
}
