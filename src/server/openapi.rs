//! `GET /openapi.json`: the OpenAPI 3.1 document of the REST API, generated from the
//! compiled protos rather than written by hand.
//!
//! Each RPC's `google.api.http` annotation gives its verb, path template and body; the
//! message definitions give the schemas, spelled as the REST layer (pbjson) reads and
//! writes them: proto field names, 64-bit integers as decimal strings, enums by name,
//! `Timestamp` as RFC 3339, `Struct` as a JSON object. Comments in the protos become
//! descriptions. The error body and the routes that are not RPCs (health, this document)
//! come from this file, next to the handlers that serve them.

use std::collections::BTreeSet;

use prost_reflect::{
    DescriptorPool, DynamicMessage, ExtensionDescriptor, FieldDescriptor, FileDescriptor, Kind,
    MessageDescriptor, MethodDescriptor,
};
use serde_json::{Map, Value, json};

mod schema;

use crate::{
    biz::{self, Limits},
    pb,
};

/// The services whose HTTP bindings are published.
const SERVICES: &[&str] = &["resource.v1.resourceService", "helloworld.v1.Greeter"];

/// Error statuses every operation can answer.
const COMMON_ERRORS: &[&str] = &["400", "500", "503", "504"];
/// Further error statuses of operations on one instance.
const INSTANCE_ERRORS: &[&str] = &["404"];
/// Further error statuses of operations that change an instance.
const MUTATION_ERRORS: &[&str] = &["409", "413"];
/// Further error statuses of operations that change anything else (a quota).
const CHANGE_ERRORS: &[&str] = &["413"];
/// RPCs whose change may add to what an owner's instances hold, so a quota or the GPU
/// capacity may refuse it (429).
const TAKES_QUOTA: &[&str] = &["CreateResource", "StartResource", "UpdateResourceSpec"];
/// RPCs that some authenticated callers may not make (403): creating for another user,
/// reading another user's quota, setting one.
const RESTRICTED: &[&str] = &["CreateResource", "GetQuota", "SetQuota"];
/// Messages whose 64-bit integers a request body may write as JSON numbers as well as
/// strings (the proto3 JSON mapping reads both; responses carry strings).
const NUMBERS_OR_STRINGS: &[&str] = &["resource.v1.QuotaLimits"];
/// Messages whose request body refuses a field that is none of theirs (it replaces them
/// all: an ignored misspelt field would silently remove a value), so the document says
/// which names it takes.
const CLOSED: &[&str] = &["resource.v1.QuotaLimits"];

const SCHEMA_PREFIX: &str = "#/components/schemas/";

/// Builds the document from the descriptor set compiled into the binary; the ranges the
/// service enforces (`limits`) become schema constraints.
pub fn document(limits: &Limits, authenticated: bool) -> Value {
    // The descriptor set is produced by build.rs from the same protos the servers are
    // generated from; the unit tests below decode it, so this cannot fail at run time.
    let pool = DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET)
        .expect("build.rs compiles a valid descriptor set into the binary");
    Generator::new(&pool, limits, authenticated).document()
}

/// Text without control characters (Unicode category Cc), as `biz::validate_text` checks.
const NO_CONTROL_CHARACTERS: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$";

/// What the service checks beyond the proto types, by `message.field`, so that the
/// document describes exactly which values are accepted.
fn constraints(field: &str, limits: &Limits) -> Option<Value> {
    let max_page_size = biz::instance::MAX_PAGE_SIZE;
    Some(match field {
        "resource.v1.ResourceSpec.cpu" => json!({ "minimum": 1, "maximum": limits.max_cpu }),
        "resource.v1.ResourceSpec.memory" => {
            json!({ "minimum": 1, "maximum": limits.max_memory_mb })
        }
        "resource.v1.ResourceSpec.gpu" => {
            json!({ "minimum": 0, "maximum": biz::GpuType::ALL.len() - 1 })
        }
        "resource.v1.ResourceSpec.image" => {
            json!({ "minLength": 1, "maxLength": 512, "pattern": biz::instance::IMAGE_PATTERN })
        }
        "resource.v1.CreateResourceRequest.name" => json!({
            "minLength": 1,
            "maxLength": limits.max_name_len,
            "pattern": NO_CONTROL_CHARACTERS,
        }),
        "resource.v1.CreateResourceRequest.user_id"
        | "resource.v1.CreateResourceRequest.request_id"
        | "resource.v1.ListResourcesRequest.user_id"
        | "resource.v1.ListResourcesRequest.name"
        | "resource.v1.WatchResourcesRequest.user_id"
        | "resource.v1.WatchResourcesRequest.name" => json!({
            "maxLength": biz::instance::MAX_TEXT_LEN,
            "pattern": NO_CONTROL_CHARACTERS,
        }),
        "resource.v1.ListResourcesRequest.page_size"
        | "resource.v1.ListAuditLogsRequest.page_size" => {
            json!({ "minimum": 0, "maximum": max_page_size })
        }
        "resource.v1.GetQuotaRequest.user_id" | "resource.v1.SetQuotaRequest.user_id" => json!({
            "minLength": 1,
            "maxLength": biz::instance::MAX_TEXT_LEN,
            "pattern": NO_CONTROL_CHARACTERS,
        }),
        // 0 (unlimited) or more; a string as Rust's `i64::from_str` reads it (a `+` and
        // leading zeros allowed, `-0` is 0).
        _ if field.starts_with("resource.v1.QuotaLimits.") => json!({
            "minimum": 0,
            "maximum": i64::MAX,
            "pattern": format!("^(\\+?0*({})|-0+)$", decimal_at_most(i64::MAX.unsigned_abs())),
        }),
        "resource.v1.Resource.labels"
        | "resource.v1.CreateResourceRequest.labels"
        | "resource.v1.SetResourceLabelsRequest.labels" => labels_schema(),
        "resource.v1.ListResourcesRequest.label_selector"
        | "resource.v1.WatchResourcesRequest.label_selector" => json!({
            "maxLength": biz::instance::MAX_SELECTOR_LEN,
            "pattern": NO_CONTROL_CHARACTERS,
        }),
        "resource.v1.ListResourcesRequest.image" | "resource.v1.WatchResourcesRequest.image" => {
            json!({
                "maxLength": biz::instance::MAX_TEXT_LEN,
                "pattern": NO_CONTROL_CHARACTERS,
            })
        }
        "resource.v1.Explanation.source" => json!({ "enum": ["cluster", "database"] }),
        "resource.v1.Condition.status" => json!({ "enum": ["True", "False", "Unknown"] }),
        _ if field.ends_with(".instance_id") => json!({ "minimum": 1 }),
        _ => return None,
    })
}

/// Label maps exactly as `biz::instance::validate_labels` checks them: at most 64; a key
/// is an optional lower-case DNS subdomain prefix of at most 234 characters and `/`, then
/// a name of 1 to 63 of `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, not under the reserved
/// `resource.io`; a value is empty or like a name.
fn labels_schema() -> Value {
    const WORD: &str = "[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?";
    const DNS: &str =
        "[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?(?:\\.[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?)*";
    let prefix_len = biz::instance::MAX_LABEL_PREFIX_LEN;
    json!({
        "maxProperties": biz::instance::MAX_LABELS,
        "propertyNames": {
            "anyOf": [
                { "pattern": format!("^{WORD}$") },
                { "allOf": [
                    { "pattern": format!("^{DNS}/{WORD}$") },
                    { "pattern": format!("^[^/]{{1,{prefix_len}}}/") },
                ] },
            ],
            "not": { "pattern": "^(?:[^/]*\\.)?resource\\.io/" },
        },
        "additionalProperties": { "type": "string", "pattern": format!("^(?:{WORD})?$") },
    })
}

/// Fields a request must carry and a response always carries (pbjson writes every
/// field but an unset message), by message.
fn required(message: &str) -> &'static [&'static str] {
    match message {
        "resource.v1.CreateResourceRequest" => &["name", "spec"],
        "resource.v1.ResourceSpec" => &["cpu", "memory", "image"],
        "resource.v1.Resource" => &[
            "instance_id",
            "user_id",
            "name",
            "status",
            "status_reason",
            "spec",
            "endpoint",
            "created_at",
            "updated_at",
            "labels",
        ],
        "resource.v1.ListResourcesReply" => &["resources", "next_page_token"],
        "resource.v1.ListAuditLogsReply" => &["entries", "next_page_token"],
        "resource.v1.AuditEntry" => {
            &["id", "instance_id", "actor", "source", "action", "outcome", "created_at"]
        }
        "resource.v1.Quota" => &["user_id", "limits", "usage", "own"],
        "resource.v1.QuotaAmounts" => &["instances", "cpu", "memory_mb", "gpus"],
        "resource.v1.Capacity" => &["gpus"],
        "resource.v1.GpuCapacity" => &["gpu", "gpu_model", "used"],
        // Explain (issue 16, item 4).
        "resource.v1.Explanation" => &["resource", "summary", "conditions", "events", "source"],
        "resource.v1.Condition" => &["type", "status", "reason", "message"],
        "resource.v1.ClusterEvent" => &["type", "reason", "message", "count"],
        _ => &[],
    }
}

struct Generator<'a> {
    pool: &'a DescriptorPool,
    limits: &'a Limits,
    /// Bearer tokens are required (`auth.mode: jwt`).
    authenticated: bool,
    http: Option<ExtensionDescriptor>,
    /// Message and enum schemas referenced so far, by full name.
    referenced: BTreeSet<String>,
    /// Every operation id with its path parameters, to link responses to operations.
    operations: Vec<(String, BTreeSet<String>)>,
}

/// One HTTP binding of an RPC.
struct Binding {
    verb: &'static str,
    path: String,
    body: String,
}

// === impl Generator ===

impl<'a> Generator<'a> {
    fn new(pool: &'a DescriptorPool, limits: &'a Limits, authenticated: bool) -> Self {
        Self {
            pool,
            limits,
            authenticated,
            http: pool.get_extension_by_name("google.api.http"),
            referenced: BTreeSet::new(),
            operations: Vec::new(),
        }
    }

    /// Whether a method asks for a token: all of them when authentication is on, but
    /// the Greeter, which stays open as in the Go service.
    fn secured(&self, method: &MethodDescriptor) -> bool {
        self.authenticated && method.parent_service().full_name() != "helloworld.v1.Greeter"
    }

    fn document(mut self) -> Value {
        let services: Vec<_> =
            SERVICES.iter().filter_map(|name| self.pool.get_service_by_name(name)).collect();
        for method in services.iter().flat_map(|s| s.methods()) {
            for binding in self.bindings(&method) {
                self.operations.push((method.name().to_owned(), template_fields(&binding.path)));
            }
        }
        let mut paths = Map::new();
        let mut tags = Vec::new();
        for service in services {
            tags.push(json!({
                "name": service.name(),
                "description": comment(&service.parent_file(), service.path()),
            }));
            for method in service.methods() {
                for binding in self.bindings(&method) {
                    let operation = self.operation(&method, &binding);
                    let item = paths
                        .entry(binding.path.clone())
                        .or_insert_with(|| Value::Object(Map::new()));
                    item[binding.verb] = operation;
                }
            }
        }
        add_operational_routes(&mut paths);

        json!({
            "openapi": "3.1.0",
            "info": {
                "title": "resource",
                "version": env!("CARGO_PKG_VERSION"),
                "description": "Cloud compute instances over REST. The same API is served over \
                    gRPC as `resource.v1.resourceService`; both are generated from one proto.",
            },
            "tags": tags,
            "paths": paths,
            "components": {
                "schemas": self.schemas(),
                "responses": error_responses(),
                "securitySchemes": {
                    "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                        "description": "`sub` is the user id; `role: admin` sees every instance." },
                },
            },
        })
    }

    /// The `google.api.http` bindings of an RPC (the rule and its additional bindings).
    fn bindings(&self, method: &MethodDescriptor) -> Vec<Binding> {
        let Some(ext) = &self.http else { return Vec::new() };
        let options = method.options();
        if !options.has_extension(ext) {
            return Vec::new();
        }
        let Some(rule) = options.get_extension(ext).as_message().cloned() else {
            return Vec::new();
        };
        let mut bindings: Vec<Binding> = binding(&rule).into_iter().collect();
        if let Some(more) = rule.get_field_by_name("additional_bindings")
            && let Some(list) = more.as_list()
        {
            bindings.extend(list.iter().filter_map(|v| v.as_message()).filter_map(binding));
        }
        bindings
    }

    fn operation(&mut self, method: &MethodDescriptor, binding: &Binding) -> Value {
        let input = method.input();
        let path_fields = template_fields(&binding.path);
        let mut parameters = Vec::new();
        for name in &path_fields {
            if let Some(field) = input.get_field_by_name(name) {
                parameters.push(json!({
                    "name": name,
                    "in": "path",
                    "required": true,
                    "description": comment(&field.parent_file(), field.path()),
                    "schema": self.constrained(&field, path_schema(&field)),
                }));
            }
        }
        if binding.body != "*" {
            for field in input.fields() {
                let in_path = path_fields.contains(field.name());
                if in_path || field.name() == binding.body || !is_query_parameter(&field) {
                    continue;
                }
                let mut schema = self.field_schema(&field);
                if field.kind() != Kind::String {
                    // `?status=` or `?page_size=` (empty) means unset, as a zero value does.
                    schema = json!({ "anyOf": [schema, { "type": "string", "enum": [""] }] });
                }
                parameters.push(json!({
                    "name": field.name(),
                    "in": "query",
                    "required": false,
                    "description": comment(&field.parent_file(), field.path()),
                    "schema": schema,
                }));
            }
        }

        let mut operation = json!({
            "operationId": method.name(),
            "tags": [method.parent_service().name()],
            "summary": first_sentence(&comment(&method.parent_file(), method.path())),
            "description": comment(&method.parent_file(), method.path()),
            "parameters": parameters,
            "responses": self.responses(method, binding),
        });
        if let Some(body) = self.request_body(&input, &binding.body, &path_fields) {
            operation["requestBody"] = body;
        }
        if self.secured(method) {
            operation["security"] = json!([{ "bearer": [] }]);
        }
        operation
    }

    fn request_body(
        &mut self,
        input: &MessageDescriptor,
        body: &str,
        path_fields: &BTreeSet<String>,
    ) -> Option<Value> {
        let schema = match body {
            "" => return None,
            "*" if path_fields.is_empty() => self.message_ref(input),
            "*" => {
                let mut schema = self.message_schema(input, false);
                if let Some(props) = schema["properties"].as_object_mut() {
                    props.retain(|name, _| !path_fields.contains(name));
                }
                schema
            }
            field => {
                let field = input.get_field_by_name(field)?;
                match field.kind() {
                    // With an update mask the body is partial: the fields it carries are
                    // the mask (REST has no mask parameter), so none is required.
                    Kind::Message(message) if input.get_field_by_name("update_mask").is_some() => {
                        self.message_schema(&message, true)
                    }
                    _ => self.field_schema(&field),
                }
            }
        };
        Some(json!({
            "required": true,
            "content": { "application/json": { "schema": schema } },
        }))
    }

    fn responses(&mut self, method: &MethodDescriptor, binding: &Binding) -> Value {
        let output = method.output();
        let mut responses = Map::new();
        // A server-streaming RPC answers Server-Sent Events, each event's data one message.
        let media =
            if method.is_server_streaming() { "text/event-stream" } else { "application/json" };
        responses.insert(
            "200".into(),
            json!({
                "description": comment(&output.parent_file(), output.path()),
                "content": { media: { "schema": self.message_ref(&output) } },
                "links": self.links(&output),
            }),
        );
        let mut errors: Vec<&str> = COMMON_ERRORS.to_vec();
        if method.is_server_streaming() {
            errors.push("410");
        }
        if binding.path.contains("{instance_id}") {
            errors.extend(INSTANCE_ERRORS);
        }
        if binding.verb != "get" {
            let on_instance = output.full_name() == "resource.v1.Resource";
            errors.extend(if on_instance { MUTATION_ERRORS } else { CHANGE_ERRORS });
        }
        if TAKES_QUOTA.contains(&method.name()) {
            errors.push("429");
        }
        if self.secured(method) {
            errors.push("401");
            if RESTRICTED.contains(&method.name()) {
                errors.push("403");
            }
        }
        for code in errors {
            responses
                .insert(code.into(), json!({ "$ref": format!("#/components/responses/{code}") }));
        }
        Value::Object(responses)
    }

    /// Operations whose path parameters this response carries (a created instance's id
    /// leads to getting, stopping or deleting it), as OpenAPI links.
    fn links(&self, output: &MessageDescriptor) -> Value {
        let links: Map<String, Value> = self
            .operations
            .iter()
            .filter(|(_, params)| {
                !params.is_empty() && params.iter().all(|p| output.get_field_by_name(p).is_some())
            })
            .map(|(operation, params)| {
                let parameters: Map<String, Value> = params
                    .iter()
                    .map(|p| (p.clone(), Value::String(format!("$response.body#/{p}"))))
                    .collect();
                let link = json!({ "operationId": operation, "parameters": parameters });
                (operation.clone(), link)
            })
            .collect();
        Value::Object(links)
    }
}

/// Verb, path and body of one `HttpRule`.
fn binding(rule: &DynamicMessage) -> Option<Binding> {
    const VERBS: [&str; 5] = ["get", "put", "post", "delete", "patch"];
    let verb = VERBS.into_iter().find(|verb| rule.has_field_by_name(verb))?;
    let path = rule.get_field_by_name(verb)?.as_str()?.to_owned();
    let body = rule
        .get_field_by_name("body")
        .and_then(|b| b.as_str().map(str::to_owned))
        .unwrap_or_default();
    Some(Binding { verb, path, body })
}

/// The `{field}` names of a path template.
fn template_fields(path: &str) -> BTreeSet<String> {
    path.split('{')
        .skip(1)
        .filter_map(|rest| rest.split_once('}'))
        .map(|(name, _)| name.split('=').next().unwrap_or(name).to_owned())
        .collect()
}

/// A regular expression (without anchors) matching the decimal numbers from 0 to `bound`
/// written with as many digits as `bound` or fewer: every shorter number, then, digit by
/// digit, those of its length that are smaller, and `bound` itself.
fn decimal_at_most(bound: u64) -> String {
    let digits = bound.to_string();
    let len = digits.len();
    let mut alternatives = Vec::new();
    if len > 1 {
        alternatives.push(format!("[0-9]{{1,{}}}", len - 1));
    }
    for (i, d) in digits.bytes().map(|b| b - b'0').enumerate() {
        if d > 0 {
            let rest = len - i - 1;
            let tail = if rest == 0 { String::new() } else { format!("[0-9]{{{rest}}}") };
            alternatives.push(format!("{}[0-{}]{tail}", &digits[..i], d - 1));
        }
    }
    alternatives.push(digits);
    alternatives.join("|")
}

/// A path segment is not JSON: a 64-bit id there is a plain decimal integer.
fn path_schema(field: &FieldDescriptor) -> Value {
    match field.kind() {
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            json!({ "type": "integer", "format": "int64" })
        }
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({ "type": "integer", "format": "int32" })
        }
        _ => json!({ "type": "string" }),
    }
}

/// Whether a field can be a query parameter: a scalar, or a `Timestamp` (RFC 3339).
fn is_scalar(field: &FieldDescriptor) -> bool {
    !field.is_list()
        && match field.kind() {
            Kind::Message(m) => m.full_name() == "google.protobuf.Timestamp",
            _ => true,
        }
}

/// A field a query string can carry: a scalar, or a `Timestamp` (RFC 3339 text).
fn is_query_parameter(field: &FieldDescriptor) -> bool {
    is_scalar(field)
        || (!field.is_list()
            && matches!(field.kind(), Kind::Message(m) if m.full_name() == "google.protobuf.Timestamp"))
}

/// The leading comment of a descriptor, joined into one paragraph per blank line.
fn comment(file: &FileDescriptor, path: &[i32]) -> String {
    let Some(info) = &file.file_descriptor_proto().source_code_info else { return String::new() };
    info.location
        .iter()
        .find(|location| location.path == path)
        .and_then(|location| location.leading_comments.as_deref())
        .map(|text| text.lines().map(str::trim).collect::<Vec<_>>().join("\n").trim().to_owned())
        .unwrap_or_default()
}

fn first_sentence(text: &str) -> String {
    let line = text.replace('\n', " ");
    match line.split_once(". ") {
        Some((first, _)) => format!("{first}."),
        None => line,
    }
}

/// One shared response per error status, all with the error body.
fn error_responses() -> Value {
    let described = [
        ("400", "The request is malformed: a parameter, the body or the page token."),
        ("401", "No valid bearer token (the reason is never given)."),
        (
            "403",
            "Only an admin creates instances for another user, reads another user's quota or sets a quota.",
        ),
        ("404", "The instance does not exist (or belongs to another user)."),
        ("409", "The change conflicts with the instance's state or a previous request."),
        (
            "410",
            "The watch's `resume_token` is older than `watch.retention` \
             (`RESUME_TOKEN_EXPIRED`): list again, then watch from now.",
        ),
        ("413", "The body exceeds `server.http.max_body_bytes`."),
        (
            "429",
            "The change would take the owner over a quota limit (`QUOTA_EXCEEDED`; metadata \
             `limit`, `value`, `usage`, `requested`, `user_id`) or every instance of the GPU \
             type the fleet has room for is live (`CAPACITY_EXHAUSTED`; metadata `gpu`, \
             `gpu_model`, `value`, `usage`). Retrying helps only once something is freed.",
        ),
        ("500", "An unexpected failure; the cause is in the service log."),
        ("503", "A dependency is unavailable; retry later."),
        ("504", "The request did not finish within `server.http.timeout`."),
    ];
    let responses: Map<String, Value> = described
        .into_iter()
        .map(|(code, description)| {
            let response = json!({
                "description": description,
                "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } },
            });
            (code.to_owned(), response)
        })
        .collect();
    Value::Object(responses)
}

/// Routes that are not RPCs: probes and this document.
fn add_operational_routes(paths: &mut Map<String, Value>) {
    let checks = json!({
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": { "type": "string", "enum": ["ok", "unavailable"] },
            "checks": {
                "type": "object",
                "additionalProperties": { "type": "string", "enum": ["ok", "unavailable"] },
            },
        },
    });
    paths.insert(
        "/healthz".into(),
        json!({ "get": {
            "operationId": "Healthz",
            "tags": ["operations"],
            "summary": "Liveness: the process answers.",
            "responses": { "200": { "description": "Alive.", "content": { "application/json": {
                "schema": { "type": "object", "required": ["status"],
                    "properties": { "status": { "type": "string", "enum": ["ok"] } } } } } } },
        } }),
    );
    paths.insert(
        "/readyz".into(),
        json!({ "get": {
            "operationId": "Readyz",
            "tags": ["operations"],
            "summary": "Readiness: every dependency answers.",
            "responses": {
                "200": { "description": "Ready.", "content": { "application/json": { "schema": checks } } },
                "503": { "description": "A dependency is down.", "content": { "application/json": { "schema": checks } } },
            },
        } }),
    );
    paths.insert(
        "/openapi.json".into(),
        json!({ "get": {
            "operationId": "OpenApi",
            "tags": ["operations"],
            "summary": "This document.",
            "responses": { "200": { "description": "OpenAPI 3.0.",
                "content": { "application/json": { "schema": { "type": "object" } } } } },
        } }),
    );
}

#[cfg(test)]
mod tests;
