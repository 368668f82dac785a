//! Unit tests of `openapi`.

use super::*;

#[test]
fn every_rest_route_is_documented_from_the_proto() {
    let doc = document(&Limits::default(), false);
    let mut routes: Vec<String> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for verb in item.as_object().unwrap().keys() {
            routes.push(format!("{} {path}", verb.to_uppercase()));
        }
    }
    routes.sort();
    assert_eq!(
        routes,
        [
            "DELETE /v1/resources/{instance_id}",
            "GET /healthz",
            "GET /helloworld/{name}",
            "GET /openapi.json",
            "GET /readyz",
            "GET /v1/resources",
            "GET /v1/resources/{instance_id}",
            "GET /v1/resources/{instance_id}/audit-logs",
            "PATCH /v1/resources/{instance_id}/spec",
            "POST /v1/resources",
            "POST /v1/resources/{instance_id}:start",
            "POST /v1/resources/{instance_id}:stop",
        ]
    );
}

#[test]
fn schemas_follow_the_proto3_json_mapping() {
    let doc = document(&Limits::default(), false);
    let resource = &doc["components"]["schemas"]["resource.v1.Resource"]["properties"];
    assert_eq!(resource["instance_id"]["type"], "string", "int64 is a JSON string");
    assert_eq!(resource["created_at"]["format"], "date-time");
    assert_eq!(resource["status"]["$ref"], "#/components/schemas/resource.v1.Status");
    let status = &doc["components"]["schemas"]["resource.v1.Status"];
    assert!(status["enum"].as_array().unwrap().contains(&json!("RUNNING")));
    let spec = &doc["components"]["schemas"]["resource.v1.ResourceSpec"]["properties"];
    let config = &spec["config_json"]["anyOf"][0]["$ref"];
    assert_eq!(config, "#/components/schemas/google.protobuf.Struct", "nullable free JSON");
    assert_eq!(spec["cpu"]["format"], "int32");
    assert!(!resource["spec"]["description"].as_str().unwrap().is_empty(), "comments kept");
}

#[test]
fn parameters_and_bodies_follow_the_http_rules() {
    let doc = document(&Limits::default(), false);
    let list = &doc["paths"]["/v1/resources"]["get"];
    let query: Vec<&str> = list["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(query, ["page_size", "page_token", "user_id", "status", "name"]);
    let patch = &doc["paths"]["/v1/resources/{instance_id}/spec"]["patch"];
    let body = &patch["requestBody"]["content"]["application/json"]["schema"];
    assert!(body["properties"]["cpu"].is_object(), "body: \"spec\" sends the spec alone");
    assert!(body.get("required").is_none(), "with an update mask, every field is optional");
    let params = patch["parameters"].as_array().unwrap();
    assert_eq!(params.len(), 1, "the body's fields are the mask: {params:?}");
    assert_eq!(params[0]["in"], "path");
    assert!(doc["paths"]["/v1/resources/{instance_id}:start"]["post"].get("requestBody").is_none());
    assert!(patch["responses"]["409"].is_object());
    assert!(list["responses"].get("409").is_none(), "a list changes nothing");
    assert!(list.get("security").is_none() && list["responses"].get("401").is_none());
    let secured = document(&Limits::default(), true);
    let list = &secured["paths"]["/v1/resources"]["get"];
    assert_eq!(list["security"], json!([{ "bearer": [] }]));
    assert!(list["responses"]["401"].is_object());
    assert!(secured["paths"]["/healthz"]["get"].get("security").is_none(), "probes stay open");
}
