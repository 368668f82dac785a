//! The schemas of the OpenAPI document: messages, enums and well-known types as pbjson
//! spells them in JSON, with the limits requests are checked against.

use std::collections::BTreeSet;

use prost_reflect::{EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use super::*;

impl Generator<'_> {
    /// Schemas of every message and enum referenced, and of the error body.
    pub(super) fn schemas(&mut self) -> Value {
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

    pub(super) fn error_schema(&mut self) -> Value {
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
    pub(super) fn message_schema(&mut self, message: &MessageDescriptor, partial: bool) -> Value {
        let required = if partial { &[] } else { required(message.full_name()) };
        let mut properties = Map::new();
        for field in message.fields() {
            let mut schema = self.field_schema(&field);
            let description = comment(&field.parent_file(), field.path());
            if !description.is_empty() {
                schema = with_description(schema, description);
            }
            // proto3 JSON reads `null` as "unset" (the HTTP server drops such fields), a
            // map's (labels) included.
            if !field.is_list() && !required.contains(&field.name()) {
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
        if super::CLOSED.contains(&message.full_name()) {
            // Either spelling proto3 JSON reads (`memory_mb`, `memoryMb`), not both at once,
            // and no other field.
            let mut one_spelling = Vec::new();
            for field in message.fields() {
                if field.json_name() != field.name() {
                    let same = schema["properties"][field.name()].clone();
                    schema["properties"][field.json_name()] = same;
                    // (A null is no value: the server drops it.)
                    let set = json!({ "not": { "type": "null" } });
                    one_spelling.push(json!({ "not": {
                        "required": [field.name(), field.json_name()],
                        "properties": { field.name(): set, field.json_name(): set },
                    } }));
                }
            }
            schema["additionalProperties"] = json!(false);
            if !one_spelling.is_empty() {
                schema["allOf"] = json!(one_spelling);
            }
        }
        schema
    }

    pub(super) fn field_schema(&mut self, field: &FieldDescriptor) -> Value {
        let schema = self.unconstrained_field_schema(field);
        self.constrained(field, schema)
    }

    /// Adds the checks of [`constraints`] to a field's schema.
    pub(super) fn constrained(&self, field: &FieldDescriptor, schema: Value) -> Value {
        match (constraints(field.full_name(), self.limits), schema) {
            (Some(Value::Object(mut extra)), Value::Object(mut schema)) => {
                // A 64-bit integer in JSON is a decimal string: numeric bounds do not apply.
                let mut bounds = Map::new();
                if schema.get("type") == Some(&json!("string")) {
                    for key in ["minimum", "maximum"] {
                        if let Some(bound) = extra.remove(key) {
                            bounds.insert(key.to_owned(), bound);
                        }
                    }
                }
                schema.extend(extra);
                if reads_numbers(field) {
                    // ... or, where a request may write it so, a JSON number within them.
                    let mut number = json!({ "type": "integer", "format": "int64" });
                    if let Value::Object(number) = &mut number {
                        number.extend(bounds);
                    }
                    return json!({ "anyOf": [Value::Object(schema), number] });
                }
                Value::Object(schema)
            }
            (_, schema) => schema,
        }
    }

    pub(super) fn unconstrained_field_schema(&mut self, field: &FieldDescriptor) -> Value {
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
    pub(super) fn kind_schema(&mut self, kind: &Kind) -> Value {
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

    pub(super) fn message_ref(&mut self, message: &MessageDescriptor) -> Value {
        self.referenced.insert(message.full_name().to_owned());
        json!({ "$ref": format!("{SCHEMA_PREFIX}{}", message.full_name()) })
    }

    pub(super) fn enum_ref(&mut self, enumeration: &EnumDescriptor) -> Value {
        self.referenced.insert(enumeration.full_name().to_owned());
        json!({ "$ref": format!("{SCHEMA_PREFIX}{}", enumeration.full_name()) })
    }
}

/// Whether a request may write `field`, a 64-bit integer, as a JSON number too.
fn reads_numbers(field: &FieldDescriptor) -> bool {
    matches!(field.kind(), Kind::Int64 | Kind::Sint64 | Kind::Sfixed64)
        && NUMBERS_OR_STRINGS.contains(&field.parent_message().full_name())
}

/// Well-known types have their own JSON spelling.
pub(super) fn well_known(full_name: &str) -> Option<Value> {
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
pub(super) fn json_value_schema(full_name: &str) -> Option<Value> {
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

pub(super) fn enum_schema(enumeration: &EnumDescriptor) -> Value {
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
pub(super) fn nullable(schema: Value) -> Value {
    match schema.get("type").cloned() {
        Some(Value::String(kind)) => {
            let mut schema = schema;
            schema["type"] = json!([kind, "null"]);
            schema
        }
        _ => json!({ "anyOf": [schema, { "type": "null" }] }),
    }
}

pub(super) fn with_description(mut schema: Value, description: String) -> Value {
    schema["description"] = Value::String(description);
    schema
}
