//! Where a delivery that was not simply acknowledged goes: the dead-letter exchange or the
//! retry queue, with the headers that say why.

use lapin::{
    BasicProperties,
    message::Delivery,
    types::{AMQPValue, LongString},
};

use super::Consumer;
use crate::service::DeadLetterReason;

/// Where a delivery that was not applied goes instead: the dead-letter exchange or the
/// retry queue, with its headers, and why (for the log).
pub(super) struct Reroute {
    pub(super) exchange: String,
    pub(super) routing_key: String,
    pub(super) properties: BasicProperties,
    pub(super) reason: String,
}

impl Consumer {
    /// To the dead-letter exchange, with `x-reject-reason`, `x-reject-message` and where
    /// the delivery was first published.
    pub(super) fn dead_letter(
        &self,
        d: &Delivery,
        reason: DeadLetterReason,
        message: &str,
    ) -> Reroute {
        let reason = reason.as_str();
        let mut headers = d.properties.headers().clone().unwrap_or_default();
        headers.insert(
            "x-reject-reason".into(),
            AMQPValue::LongString(LongString::from(reason.to_owned())),
        );
        headers.insert(
            "x-reject-message".into(),
            AMQPValue::LongString(LongString::from(message.to_owned())),
        );
        headers.insert(
            "x-original-exchange".into(),
            AMQPValue::LongString(d.exchange.as_str().into()),
        );
        headers.insert(
            "x-original-routing-key".into(),
            AMQPValue::LongString(d.routing_key.as_str().into()),
        );
        Reroute {
            exchange: self.conf.dead_letter_exchange.clone(),
            routing_key: d.routing_key.to_string(),
            properties: d.properties.clone().with_headers(headers),
            reason: reason.to_owned(),
        }
    }

    /// To the retry queue, with `x-retry-count` set to `retry`.
    pub(super) fn retry_later(&self, d: &Delivery, retry: i64) -> Reroute {
        let mut headers = d.properties.headers().clone().unwrap_or_default();
        headers.insert("x-retry-count".into(), AMQPValue::LongLongInt(retry));
        // Through the default exchange straight into the retry queue.
        Reroute {
            exchange: String::new(),
            routing_key: self.conf.retry_queue.clone(),
            properties: d.properties.clone().with_headers(headers),
            reason: format!("INSTANCE_NOT_FOUND (retry {retry})"),
        }
    }
}
