//! One batch of deliveries: decoded, applied through `EventService`, each delivery
//! rerouted as its disposition says, then acknowledged together.

use lapin::{
    Channel, Confirmation,
    message::Delivery,
    options::{BasicAckOptions, BasicPublishOptions},
};
use tokio_util::sync::CancellationToken;

use super::{Consumer, decode::decode, supervise::SessionError};
use crate::{
    amqp::{self, STATUS_EVENT_TYPE},
    pb::mq::v1 as pb,
    service::{Disposition, Inbound},
};

impl Consumer {
    /// Applies `batch`, publishes its dead letters and retries, waits for their
    /// confirms, and acknowledges the batch on the channel that delivered it.
    pub(super) async fn process(
        &self,
        channel: &Channel,
        batch: Vec<Delivery>,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        let last_tag = batch.last().map(|d| d.delivery_tag).expect("a batch is never empty");
        let own = |d: &Delivery| {
            d.properties.kind().as_ref().is_some_and(|k| k.as_str() == STATUS_EVENT_TYPE)
        };
        let (ours, work): (Vec<Delivery>, Vec<Delivery>) = batch.into_iter().partition(own);
        if !ours.is_empty() {
            tracing::debug!(count = ours.len(), "ignoring the service's own status events");
        }
        let inbound: Vec<Inbound> = work.iter().map(decode).collect();
        let t = self.conf.connect_timeout;
        if inbound.is_empty() {
            let ack = channel.basic_ack(last_tag, BasicAckOptions { multiple: true });
            amqp::bounded("acknowledge a batch", t, ack).await?;
            return Ok(());
        }
        let Some(dispositions) = self.events.apply(&inbound, self.retries, shutdown).await else {
            // Shutting down while the database is unreachable: leave the batch
            // unacknowledged; the broker redelivers it to whoever consumes next.
            return Err(SessionError::Lost("shutdown while the database is unavailable".into()));
        };

        let mut confirms = Vec::new();
        for ((delivery, inbound), disposition) in work.iter().zip(&inbound).zip(dispositions) {
            let kind = inbound
                .event
                .as_ref()
                .ok()
                .and_then(|e| pb::EventType::try_from(e.event_type).ok())
                .map_or("UNDECODABLE", |t| t.as_str_name());
            let outgoing = match disposition {
                Disposition::Ack => None,
                Disposition::DeadLetter { reason, message } => {
                    Some(self.dead_letter(delivery, reason, &message))
                }
                Disposition::RetryLater { retry } => Some(self.retry_later(delivery, retry)),
            };
            let outcome = match &outgoing {
                None => "acked",
                Some(reroute) if reroute.exchange == self.conf.dead_letter_exchange => {
                    "dead_lettered"
                }
                Some(_) => "retried",
            };
            metrics::counter!("resource_events_consumed_total", "type" => kind, "outcome" => outcome)
                .increment(1);
            if let Some(reroute) = outgoing {
                if outcome == "dead_lettered" {
                    metrics::counter!("resource_events_dead_lettered_total", "reason" => reroute.reason.to_string())
                        .increment(1);
                }
                tracing::info!(
                    message_id = %inbound.audit_id,
                    routing_key = %delivery.routing_key,
                    exchange = %reroute.exchange,
                    reason = %reroute.reason,
                    "event not applied"
                );
                let publish = channel.basic_publish(
                    reroute.exchange.as_str().into(),
                    reroute.routing_key.as_str().into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &delivery.data,
                    reroute.properties,
                );
                confirms.push(amqp::bounded("dead-letter or retry an event", t, publish).await?);
            }
        }
        for confirm in confirms {
            // A confirm that never comes (a silent link) must not hold the batch for ever:
            // unacknowledged, it is redelivered to whoever consumes next.
            match amqp::bounded("confirm a dead letter or retry", t, confirm).await? {
                Confirmation::Ack(None) => {}
                other => {
                    // Not stored by the broker: do not acknowledge; redelivery retries it.
                    return Err(SessionError::Lost(format!(
                        "dead-letter or retry publish not confirmed: {other:?}"
                    )));
                }
            }
        }
        // Ack only after commit (and after dead letters are safely stored): one ack for
        // the whole batch, on the channel that delivered it.
        let ack = channel.basic_ack(last_tag, BasicAckOptions { multiple: true });
        amqp::bounded("acknowledge a batch", t, ack).await?;
        Ok(())
    }
}
