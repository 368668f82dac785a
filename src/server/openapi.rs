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
    DescriptorPool, DynamicMessage, EnumDescriptor, ExtensionDescriptor, FieldDescriptor,
    FileDescriptor, Kind, MessageDescriptor, MethodDescriptor,
};
use serde_json::{Map, Value, json};

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
        | "resource.v1.ListResourcesRequest.name" => json!({
            "maxLength": biz::instance::MAX_TEXT_LEN,
            "pattern": NO_CONTROL_CHARACTERS,
        }),
        "resource.v1.ListResourcesRequest.page_size"
        | "resource.v1.ListAuditLogsRequest.page_size" => {
            json!({ "minimum": 0, "maximum": max_page_size })
        }
        _ if field.ends_with(".instance_id") => json!({ "minimum": 1 }),
        _ => return None,
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
        ],
        "resource.v1.ListResourcesReply" => &["resources", "next_page_token"],
        "resource.v1.ListAuditLogsReply" => &["entries", "next_page_token"],
        "resource.v1.AuditEntry" => {
            &["id", "instance_id", "actor", "source", "action", "outcome", "created_at"]
        }
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
                if in_path || field.name() == binding.body || !is_scalar(&field) {
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
        responses.insert(
            "200".into(),
            json!({
                "description": comment(&output.parent_file(), output.path()),
                "content": { "application/json": { "schema": self.message_ref(&output) } },
                "links": self.links(&output),
            }),
        );
        let mut errors: Vec<&str> = COMMON_ERRORS.to_vec();
        if binding.path.contains("{instance_id}") {
            errors.extend(INSTANCE_ERRORS);
        }
        if binding.verb != "get" {
            errors.extend(MUTATION_ERRORS);
        }
        if self.secured(method) {
            errors.push("401");
            if method.name() == "CreateResource" {
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

    /// Schemas of every message and enum referenced, and of the error body.
    fn schemas(&mut self) -> Value {
        let mut schemas = Map::new();
        schemas.insert("Error".into(), self.error_schema());
        let mut done = BTreeSet::new();
        // Generating a schema may reference further messages; repeat until closed.
        while let Some(name) = self.referenced.difference(&done).next().cloned() {
            done.insert(name.clone());
            let schema = if let Some(schema) = json_value_schema(&name) {
                // Free JSON refers to its own parts.
                for part in
                    ["google.protobuf.Value", "google.protobuf.ListValue", "google.protobuf.Struct"]
                {
                    self.referenced.insert(part.to_owned());
                }
                schema
            } else if let Some(message) = self.pool.get_message_by_name(&name) {
                self.message_schema(&message, false)
            } else if let Some(enumeration) = self.pool.get_enum_by_name(&name) {
                enum_schema(&enumeration)
            } else {
                continue;
            };
            schemas.insert(name, schema);
        }
        Value::Object(schemas)
    }

    fn error_schema(&mut self) -> Value {
        let reason = match self.pool.get_enum_by_name("resource.v1.ErrorReason") {
            Some(reasons) => self.enum_ref(&reasons),
            None => json!({ "type": "string" }),
        };
        json!({
            "type": "object",
            "description": "Every error answer. `reason` is machine-readable and the same as \
                `google.rpc.ErrorInfo.reason` on gRPC; `message` is for people.",
            "required": ["code", "reason", "message", "metadata"],
            "properties": {
                "code": { "type": "integer", "description": "The HTTP status code." },
                "reason": reason,
                "message": { "type": "string" },
                "metadata": {
                    "type": "object",
                    "additionalProperties": { "type": "string" },
                    "description": "Details such as the offending field or the current status.",
                },
            },
        })
    }

    /// The schema of `message`; `partial`: no field is required (a PATCH body).
    fn message_schema(&mut self, message: &MessageDescriptor, partial: bool) -> Value {
        let required = if partial { &[] } else { required(message.full_name()) };
        let mut properties = Map::new();
        for field in message.fields() {
            let mut schema = self.field_schema(&field);
            let description = comment(&field.parent_file(), field.path());
            if !description.is_empty() {
                schema = with_description(schema, description);
            }
            // proto3 JSON reads `null` as "unset" (the HTTP server drops such fields).
            if !field.is_list() && !field.is_map() && !required.contains(&field.name()) {
                schema = nullable(schema);
            }
            properties.insert(field.name().to_owned(), schema);
        }
        let mut schema = json!({
            "type": "object",
            "description": comment(&message.parent_file(), message.path()),
            "properties": properties,
        });
        if !required.is_empty() {
            schema["required"] = json!(required);
        }
        schema
    }

    fn field_schema(&mut self, field: &FieldDescriptor) -> Value {
        let schema = self.unconstrained_field_schema(field);
        self.constrained(field, schema)
    }

    /// Adds the checks of [`constraints`] to a field's schema.
    fn constrained(&self, field: &FieldDescriptor, schema: Value) -> Value {
        match (constraints(field.full_name(), self.limits), schema) {
            (Some(Value::Object(mut extra)), Value::Object(mut schema)) => {
                // A 64-bit integer in JSON is a decimal string: numeric bounds do not apply.
                if schema.get("type") == Some(&json!("string")) {
                    extra.retain(|key, _| !matches!(key.as_str(), "minimum" | "maximum"));
                }
                schema.extend(extra);
                Value::Object(schema)
            }
            (_, schema) => schema,
        }
    }

    fn unconstrained_field_schema(&mut self, field: &FieldDescriptor) -> Value {
        if field.is_map() {
            let Kind::Message(entry) = field.kind() else {
                unreachable!("map fields are messages")
            };
            let value = entry.map_entry_value_field();
            return json!({ "type": "object", "additionalProperties": self.kind_schema(&value.kind()) });
        }
        let schema = self.kind_schema(&field.kind());
        if field.is_list() { json!({ "type": "array", "items": schema }) } else { schema }
    }

    /// The proto3 JSON spelling of one value of a kind.
    fn kind_schema(&mut self, kind: &Kind) -> Value {
        match kind {
            Kind::Double | Kind::Float => json!({ "type": "number" }),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                json!({ "type": "integer", "format": "int32" })
            }
            Kind::Uint32 | Kind::Fixed32 => {
                json!({ "type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX })
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                json!({ "type": "string", "format": "int64", "pattern": "^-?[0-9]{1,19}$" })
            }
            Kind::Uint64 | Kind::Fixed64 => {
                json!({ "type": "string", "format": "uint64", "pattern": "^[0-9]{1,20}$" })
            }
            Kind::Bool => json!({ "type": "boolean" }),
            Kind::String => json!({ "type": "string" }),
            Kind::Bytes => json!({ "type": "string", "format": "byte" }),
            Kind::Enum(enumeration) => self.enum_ref(enumeration),
            Kind::Message(message) => match well_known(message.full_name()) {
                Some(schema) => schema,
                // Struct, Value and ListValue (free JSON) and our messages: components.
                None => self.message_ref(message),
            },
        }
    }

    fn message_ref(&mut self, message: &MessageDescriptor) -> Value {
        self.referenced.insert(message.full_name().to_owned());
        json!({ "$ref": format!("{SCHEMA_PREFIX}{}", message.full_name()) })
    }

    fn enum_ref(&mut self, enumeration: &EnumDescriptor) -> Value {
        self.referenced.insert(enumeration.full_name().to_owned());
        json!({ "$ref": format!("{SCHEMA_PREFIX}{}", enumeration.full_name()) })
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

fn is_scalar(field: &FieldDescriptor) -> bool {
    !field.is_list() && !matches!(field.kind(), Kind::Message(_))
}

/// Well-known types have their own JSON spelling.
fn well_known(full_name: &str) -> Option<Value> {
    Some(match full_name {
        "google.protobuf.Timestamp" => json!({ "type": "string", "format": "date-time" }),
        "google.protobuf.Duration" => {
            json!({ "type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$" })
        }
        "google.protobuf.Empty" => json!({ "type": "object" }),
        _ => return None,
    })
}

/// Free JSON (`Struct`, `Value`, `ListValue`): anything but the NUL character, which
/// PostgreSQL cannot store, so the service refuses it.
fn json_value_schema(full_name: &str) -> Option<Value> {
    let no_nul = json!({ "type": "string", "pattern": "^[^\\u0000]*$" });
    let reference = |name: &str| json!({ "$ref": format!("{SCHEMA_PREFIX}{name}") });
    Some(match full_name {
        "google.protobuf.Struct" => json!({
            "type": "object",
            "description": "A JSON object.",
            "propertyNames": no_nul,
            "additionalProperties": reference("google.protobuf.Value"),
        }),
        "google.protobuf.ListValue" => {
            json!({ "type": "array", "items": reference("google.protobuf.Value") })
        }
        "google.protobuf.Value" => json!({
            "description": "Any JSON value.",
            "anyOf": [
                { "type": ["null", "boolean", "number"] },
                no_nul,
                reference("google.protobuf.ListValue"),
                reference("google.protobuf.Struct"),
            ],
        }),
        _ => return None,
    })
}

fn enum_schema(enumeration: &EnumDescriptor) -> Value {
    let names: Vec<String> = enumeration.values().map(|v| v.name().to_owned()).collect();
    let described: Vec<String> = enumeration
        .values()
        .map(|v| format!("- `{}`: {}", v.name(), comment(&v.parent_file(), v.path())))
        .collect();
    json!({
        "type": "string",
        "enum": names,
        "description": format!(
            "{}\n\n{}",
            comment(&enumeration.parent_file(), enumeration.path()),
            described.join("\n")
        ),
    })
}

/// Also `null` (OpenAPI 3.1: a type list, or `anyOf` for a reference).
fn nullable(schema: Value) -> Value {
    match schema.get("type").cloned() {
        Some(Value::String(kind)) => {
            let mut schema = schema;
            schema["type"] = json!([kind, "null"]);
            schema
        }
        _ => json!({ "anyOf": [schema, { "type": "null" }] }),
    }
}

fn with_description(mut schema: Value, description: String) -> Value {
    schema["description"] = Value::String(description);
    schema
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
        ("403", "Only an admin creates instances for another user."),
        ("404", "The instance does not exist (or belongs to another user)."),
        ("409", "The change conflicts with the instance's state or a previous request."),
        ("413", "The body exceeds `server.http.max_body_bytes`."),
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
mod tests {
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
        assert!(
            doc["paths"]["/v1/resources/{instance_id}:start"]["post"].get("requestBody").is_none()
        );
        assert!(patch["responses"]["409"].is_object());
        assert!(list["responses"].get("409").is_none(), "a list changes nothing");
        assert!(list.get("security").is_none() && list["responses"].get("401").is_none());
        let secured = document(&Limits::default(), true);
        let list = &secured["paths"]["/v1/resources"]["get"];
        assert_eq!(list["security"], json!([{ "bearer": [] }]));
        assert!(list["responses"]["401"].is_object());
        assert!(secured["paths"]["/healthz"]["get"].get("security").is_none(), "probes stay open");
    }
}
