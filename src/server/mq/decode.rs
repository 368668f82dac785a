//! Decoding of a delivery into an `Inbound`: its body by content type, its identity and
//! its trips through the retry queue.

use lapin::message::Delivery;
use prost::Message;

use crate::{amqp, pb::mq::v1 as pb, service::Inbound};

/// Decodes a delivery by content type: protobuf (absent, `application/x-protobuf`,
/// `application/protobuf`) or proto3 JSON (`application/json`).
pub(super) fn decode(d: &Delivery) -> Inbound {
    let content_type =
        d.properties.content_type().as_ref().map(|c| c.as_str().to_ascii_lowercase());
    let media =
        content_type.as_deref().map(|c| c.split(';').next().unwrap_or("").trim().to_owned());
    let event = match media.as_deref() {
        None
        | Some(
            "" | "application/x-protobuf" | "application/protobuf" | "application/octet-stream",
        ) => pb::Event::decode(d.data.as_slice())
            .map_err(|e| format!("undecodable protobuf body: {e}")),
        Some("application/json" | "text/json") => serde_json::from_slice::<pb::Event>(&d.data)
            .map_err(|e| format!("undecodable JSON body: {e}")),
        Some(other) => Err(format!("unsupported content type {other:?}")),
    };
    let message_id =
        d.properties.message_id().as_ref().map(|m| m.to_string()).filter(|m| !m.is_empty());
    let audit_id =
        message_id.clone().unwrap_or_else(|| format!("{}#{}", d.routing_key, d.delivery_tag));
    // A count only we write; anything out of range (a hand-made header) counts as none
    // or as the most, never overflows.
    let retries = amqp::header_int(d.properties.headers().as_ref(), "x-retry-count")
        .unwrap_or(0)
        .clamp(0, i64::from(u32::MAX));
    Inbound { event, message_id, audit_id, retries }
}
