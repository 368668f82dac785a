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
            "GET /v1/capacity",
            "GET /v1/quotas/{user_id}",
            "GET /v1/resources",
            "GET /v1/resources/{instance_id}",
            "GET /v1/resources/{instance_id}/audit-logs",
            "GET /v1/resources/{instance_id}:explain",
            "GET /v1/resources:watch",
            "PATCH /v1/resources/{instance_id}/spec",
            "POST /v1/resources",
            "POST /v1/resources/{instance_id}:start",
            "POST /v1/resources/{instance_id}:stop",
            "PUT /v1/quotas/{user_id}",
            "PUT /v1/resources/{instance_id}/labels",
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
    assert_eq!(
        query,
        [
            "page_size",
            "page_token",
            "user_id",
            "status",
            "name",
            "label_selector",
            "gpu_model",
            "image",
            "created_after",
            "created_before"
        ]
    );
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

#[test]
fn quota_routes_take_the_limits_as_the_body_and_answer_with_the_quota() {
    let doc = document(&Limits::default(), false);

    let put = &doc["paths"]["/v1/quotas/{user_id}"]["put"];
    let get = &doc["paths"]["/v1/quotas/{user_id}"]["get"];
    let capacity = &doc["paths"]["/v1/capacity"]["get"];

    assert_eq!(put["operationId"], "SetQuota");
    let body = &put["requestBody"]["content"]["application/json"]["schema"];
    assert_eq!(body["$ref"], "#/components/schemas/resource.v1.QuotaLimits", "body: \"limits\"");
    let params = put["parameters"].as_array().unwrap();
    assert_eq!(params.len(), 1, "only the path: {params:?}");
    assert_eq!((&params[0]["name"], &params[0]["in"]), (&json!("user_id"), &json!("path")));
    assert_eq!(params[0]["schema"]["minLength"], 1);
    let ok = |op: &Value| op["responses"]["200"]["content"]["application/json"]["schema"].clone();
    assert_eq!(ok(put)["$ref"], "#/components/schemas/resource.v1.Quota");
    assert_eq!(ok(get)["$ref"], "#/components/schemas/resource.v1.Quota");
    assert_eq!(ok(capacity)["$ref"], "#/components/schemas/resource.v1.Capacity");
    assert!(put["responses"]["413"].is_object());
    assert!(put["responses"].get("409").is_none(), "a quota has no state to conflict with");
    assert!(get["responses"].get("404").is_none(), "every user has a quota");
    assert!(capacity["parameters"].as_array().unwrap().is_empty());
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["resource.v1.Quota"]["required"],
        json!(["user_id", "limits", "usage", "own"])
    );
    assert_eq!(schemas["resource.v1.GpuCapacity"]["required"], json!(["gpu", "gpu_model", "used"]));
    let gpu = &schemas["resource.v1.GpuCapacity"]["properties"];
    assert_eq!(gpu["capacity"]["type"], json!(["string", "null"]), "absent when unlimited");
    assert_eq!(gpu["used"]["type"], "string", "int64 is a JSON string");
}

#[test]
fn only_changes_that_add_to_an_owner_can_be_refused_for_quota() {
    let doc = document(&Limits::default(), true);

    let responses = |path: &str, verb: &str| doc["paths"][path][verb]["responses"].clone();

    for (path, verb) in [
        ("/v1/resources", "post"),
        ("/v1/resources/{instance_id}:start", "post"),
        ("/v1/resources/{instance_id}/spec", "patch"),
    ] {
        assert_eq!(responses(path, verb)["429"]["$ref"], "#/components/responses/429");
    }
    for (path, verb) in [
        ("/v1/resources/{instance_id}:stop", "post"),
        ("/v1/resources/{instance_id}", "delete"),
        ("/v1/quotas/{user_id}", "put"),
        ("/v1/capacity", "get"),
    ] {
        assert!(responses(path, verb).get("429").is_none(), "{verb} {path} frees or reads");
    }
    let too_many = &doc["components"]["responses"]["429"];
    assert!(too_many["description"].as_str().unwrap().contains("QUOTA_EXCEEDED"));
    assert!(responses("/v1/quotas/{user_id}", "get")["403"].is_object(), "another user's quota");
    assert!(responses("/v1/quotas/{user_id}", "put")["403"].is_object(), "admins only");
    assert!(responses("/v1/capacity", "get").get("403").is_none(), "anyone may read it");
    let reasons = &doc["components"]["schemas"]["resource.v1.ErrorReason"]["enum"];
    assert!(reasons.as_array().unwrap().contains(&json!("CAPACITY_EXHAUSTED")));
}

#[test]
fn quota_limits_are_numbers_or_strings_from_zero_to_the_largest_int64() {
    let doc = document(&Limits::default(), false);
    let limits = &doc["components"]["schemas"]["resource.v1.QuotaLimits"];
    let gpus = &limits["properties"]["gpus"]["anyOf"];

    let (string, number) = (&gpus[0]["anyOf"][0], &gpus[0]["anyOf"][1]);
    let pattern = regex::Regex::new(string["pattern"].as_str().unwrap()).unwrap();

    assert_eq!(gpus[1]["type"], "null", "null is unset");
    assert!(limits.get("required").is_none(), "every limit may be left out");
    assert_eq!(
        limits["additionalProperties"],
        json!(false),
        "a body with another field is refused"
    );
    assert_eq!(
        limits["properties"]["memoryMb"], limits["properties"]["memory_mb"],
        "both spellings"
    );
    assert_eq!((&number["type"], &number["minimum"]), (&json!("integer"), &json!(0)));
    assert_eq!(number["maximum"], json!(i64::MAX));
    for accepted in ["0", "7", "+7", "007", "-0", "9223372036854775807", "0009223372036854775807"] {
        assert!(pattern.is_match(accepted), "{accepted} is a limit");
        assert!(accepted.parse::<i64>().is_ok_and(|v| v >= 0), "and Rust reads it so");
    }
    for refused in ["", "-1", "1.5", "1e3", " 1", "9223372036854775808", "10000000000000000000"] {
        assert!(!pattern.is_match(refused), "{refused:?} is no limit");
        assert!(refused.parse::<i64>().is_err() || refused.starts_with('-'));
    }
}

#[test]
fn labels_are_a_map_of_strings_with_the_kubernetes_rules() {
    let doc = document(&Limits::default(), false);
    let put = &doc["paths"]["/v1/resources/{instance_id}/labels"]["put"];
    let body = &put["requestBody"]["content"]["application/json"]["schema"];
    assert_eq!(body["type"], "object", "body: \"labels\" sends the map alone");
    assert_eq!(body["maxProperties"], 64);
    assert_eq!(body["additionalProperties"]["type"], "string");
    assert!(put["responses"]["409"].is_object() && put["responses"]["404"].is_object());
    let resource = &doc["components"]["schemas"]["resource.v1.Resource"]["properties"];
    assert_eq!(resource["labels"]["maxProperties"], 64);
    let list = doc["paths"]["/v1/resources"]["get"]["parameters"].as_array().unwrap().clone();
    let after = list.iter().find(|p| p["name"] == "created_after").unwrap();
    assert_eq!(after["schema"]["anyOf"][0]["format"], "date-time");

    let key = regex_lite(&body["propertyNames"]);
    for ok in ["team", "example.com/team", "a.b-c/x_y.z"] {
        assert!(key(ok), "{ok}");
    }
    for bad in ["-a", "a/b/c", "Example.com/x", "resource.io/x", "x.resource.io/y", ""] {
        assert!(!key(bad), "{bad}");
    }
}

/// Evaluates the key schema of the labels (anyOf of patterns, allOf, not) with the
/// `regex` crate, as a JSON Schema validator would.
fn regex_lite(schema: &Value) -> impl Fn(&str) -> bool + '_ {
    fn holds(schema: &Value, text: &str) -> bool {
        if let Some(p) = schema["pattern"].as_str()
            && !regex::Regex::new(p).unwrap().is_match(text)
        {
            return false;
        }
        if let Some(any) = schema["anyOf"].as_array()
            && !any.iter().any(|s| holds(s, text))
        {
            return false;
        }
        if let Some(all) = schema["allOf"].as_array()
            && !all.iter().all(|s| holds(s, text))
        {
            return false;
        }
        if schema.get("not").is_some() && holds(&schema["not"], text) {
            return false;
        }
        true
    }
    move |text| holds(schema, text)
}
