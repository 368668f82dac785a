//! RabbitMQ transport: consumes `INSTANCE_*` events in batches, applies each batch in one
//! transaction through `EventService`, then dead-letters, delays or acknowledges each
//! delivery. See README "Event ingestion" for the guarantees.
//!
//! Designed against lapin's known traps: every connect and declare is bounded
//! (lapin#437, #470); the connection, channel and consumer are supervised and rebuilt
//! when they go quiet or die (lapin#389); a delivery is acknowledged once, on the channel
//! that delivered it, and a batch from a lost channel is never acknowledged on a new one
//! (lapin#322) — it is redelivered and de-duplicated instead.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use lapin::{
    BasicProperties, Channel, Confirmation,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::{self, AmqpError, STATUS_EVENT_TYPE},
    biz::{Backoff, ErrorKind, Probe, RepoError},
    conf,
    pb::mq::v1 as pb,
    service::{Disposition, EventService, Inbound},
};

/// How often the connection and channel are checked while no delivery arrives.
const SUPERVISE_EVERY: Duration = Duration::from_secs(2);
/// Quiet for this long while the queue holds ready messages: the consumer went silent
/// (lapin#389) and the session is rebuilt.
const SILENCE_LIMIT: Duration = Duration::from_secs(30);
/// Internal failures of a single event are retried this often before it is
/// dead-lettered with reason `INTERNAL`.
const INTERNAL_ATTEMPTS: usize = 3;

/// The event consumer; `run` it until shutdown.
pub struct Consumer {
    conf: conf::RabbitMq,
    events: Arc<EventService>,
    connected: Arc<AtomicBool>,
}

/// Readiness of the broker, as the consumer last saw it.
pub struct BrokerProbe {
    connected: Arc<AtomicBool>,
}

#[async_trait]
impl Probe for BrokerProbe {
    fn name(&self) -> &'static str {
        "broker"
    }

    async fn check(&self) -> Result<(), RepoError> {
        if self.connected.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(RepoError::Unavailable("the event consumer is not connected".into()))
        }
    }
}

/// Why a consumer session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error("{0}")]
    Lost(String),
}

impl From<lapin::Error> for SessionError {
    fn from(e: lapin::Error) -> Self {
        SessionError::Lost(e.to_string())
    }
}

impl Consumer {
    /// A consumer of `conf.queue` feeding `events`.
    pub fn new(conf: conf::RabbitMq, events: Arc<EventService>) -> Self {
        Self { conf, events, connected: Arc::new(AtomicBool::new(false)) }
    }

    /// The readiness probe of this consumer's connection.
    pub fn probe(&self) -> BrokerProbe {
        BrokerProbe { connected: self.connected.clone() }
    }

    /// Consumes until `shutdown` is cancelled, reconnecting with backoff whenever the
    /// broker goes away. On shutdown it stops taking deliveries, finishes and
    /// acknowledges the batch in hand, and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        while !shutdown.is_cancelled() {
            match self.session(&shutdown, &mut backoff).await {
                Ok(()) => break,
                Err(e) => {
                    self.connected.store(false, Ordering::Relaxed);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "event consumer lost the broker; reconnecting");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.connected.store(false, Ordering::Relaxed);
        tracing::info!("event consumer stopped");
    }

    async fn session(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), SessionError> {
        let t = self.conf.connect_timeout;
        let conn = amqp::connect(&self.conf, "resource-consumer").await?;
        let topology = amqp::declare_topology(&self.conf, &conn).await?;
        let channel = amqp::confirm_channel(&self.conf, &conn).await?;
        amqp::bounded(
            "set the prefetch",
            t,
            channel.basic_qos(self.conf.prefetch, BasicQosOptions::default()),
        )
        .await?;
        let mut deliveries = amqp::bounded(
            "start consuming",
            t,
            channel.basic_consume(
                self.conf.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        self.connected.store(true, Ordering::Relaxed);
        backoff.reset();
        tracing::info!(queue = %self.conf.queue, prefetch = self.conf.prefetch, "consuming events");

        let mut supervise = tokio::time::interval(SUPERVISE_EVERY);
        let mut last_delivery = tokio::time::Instant::now();
        loop {
            let first = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(SessionError::Lost("the broker cancelled the consumer".into())),
                },
                _ = supervise.tick() => {
                    if !conn.status().connected() || !channel.status().connected() {
                        return Err(SessionError::Lost("connection or channel closed".into()));
                    }
                    if last_delivery.elapsed() > SILENCE_LIMIT {
                        self.check_not_silent(&channel, topology).await?;
                        last_delivery = tokio::time::Instant::now();
                    }
                    continue;
                }
            };
            last_delivery = tokio::time::Instant::now();
            // Whatever else is already buffered joins the batch: under load batches grow,
            // when idle a single event is applied at once.
            let mut batch = vec![first];
            while batch.len() < self.conf.batch_size {
                match deliveries.next().now_or_never() {
                    Some(Some(Ok(delivery))) => batch.push(delivery),
                    _ => break,
                }
            }
            // A batch is never abandoned half-way because of shutdown: it is finished
            // and acknowledged, or (database down) left unacknowledged for redelivery.
            let (size, started) = (batch.len(), std::time::Instant::now());
            self.process(&channel, batch, shutdown).await?;
            tracing::debug!(size, elapsed_us = started.elapsed().as_micros() as u64, "batch done");
        }

        let _ = channel.close(200, "shutting down".into()).await;
        let _ = conn.close(200, "shutting down".into()).await;
        Ok(())
    }

    /// Fails when the queue holds ready messages although nothing was delivered for
    /// `SILENCE_LIMIT`: the consumer is stuck and must be rebuilt. With a single active
    /// consumer, a replica that is not the active one receives nothing by design: only
    /// the queue's sole consumer can be stuck.
    async fn check_not_silent(
        &self,
        channel: &Channel,
        topology: amqp::Topology,
    ) -> Result<(), SessionError> {
        let queue = amqp::bounded(
            "check the event queue",
            self.conf.connect_timeout,
            channel.queue_declare(
                self.conf.queue.as_str().into(),
                lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            ),
        )
        .await?;
        let standing_by = topology.single_active_consumer && queue.consumer_count() > 1;
        if queue.message_count() > 0 && !standing_by {
            return Err(SessionError::Lost(format!(
                "no delivery for {SILENCE_LIMIT:?} while {} messages wait",
                queue.message_count()
            )));
        }
        Ok(())
    }

    async fn process(
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
        let Some(dispositions) = self.apply(&inbound, shutdown).await else {
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
                Disposition::RetryLater => {
                    let tried =
                        amqp::header_int(delivery.properties.headers().as_ref(), "x-retry-count")
                            .unwrap_or(0);
                    if tried < i64::from(self.conf.max_retries) {
                        Some(self.retry_later(delivery, tried + 1))
                    } else {
                        let message = format!(
                            "instance not found after {} attempts {:?} apart",
                            tried + 1,
                            self.conf.retry_delay
                        );
                        Some(self.dead_letter(delivery, "INSTANCE_NOT_FOUND", &message))
                    }
                }
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

    /// Applies a batch; retries while the database is unavailable (never dead-letters
    /// for it) and isolates an event that fails internally. `None`: shutdown came first.
    async fn apply(
        &self,
        inbound: &[Inbound],
        shutdown: &CancellationToken,
    ) -> Option<Vec<Disposition>> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match self.events.handle(inbound).await {
                Ok(dispositions) => return Some(dispositions),
                Err(e) if e.kind() == ErrorKind::Unavailable => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = ?e, retry_in = ?delay, "database unavailable; batch kept for retry");
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = ?e, size = inbound.len(), "batch failed; applying its events one by one");
                    return self.apply_one_by_one(inbound, shutdown).await;
                }
            }
        }
    }

    async fn apply_one_by_one(
        &self,
        inbound: &[Inbound],
        shutdown: &CancellationToken,
    ) -> Option<Vec<Disposition>> {
        let mut out = Vec::with_capacity(inbound.len());
        for message in inbound {
            let mut attempt = 0;
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            let disposition = loop {
                match self.events.handle(std::slice::from_ref(message)).await {
                    Ok(mut d) => break d.remove(0),
                    Err(e) if e.kind() == ErrorKind::Unavailable => {}
                    Err(e) => {
                        attempt += 1;
                        if attempt >= INTERNAL_ATTEMPTS {
                            tracing::error!(error = ?e, message_id = %message.audit_id, "event keeps failing; dead-lettering it");
                            break Disposition::DeadLetter {
                                reason: "INTERNAL",
                                message: "internal error".into(),
                            };
                        }
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                }
            };
            out.push(disposition);
        }
        Some(out)
    }

    fn dead_letter(&self, d: &Delivery, reason: &str, message: &str) -> Reroute {
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

    fn retry_later(&self, d: &Delivery, attempt: i64) -> Reroute {
        let mut headers = d.properties.headers().clone().unwrap_or_default();
        headers.insert("x-retry-count".into(), AMQPValue::LongLongInt(attempt));
        // Through the default exchange straight into the retry queue.
        Reroute {
            exchange: String::new(),
            routing_key: self.conf.retry_queue.clone(),
            properties: d.properties.clone().with_headers(headers),
            reason: format!("INSTANCE_NOT_FOUND (retry {attempt})"),
        }
    }
}

/// Where a delivery that was not applied goes instead: the dead-letter exchange or the
/// retry queue, with its headers, and why (for the log).
struct Reroute {
    exchange: String,
    routing_key: String,
    properties: BasicProperties,
    reason: String,
}

/// Decodes a delivery by content type: protobuf (absent, `application/x-protobuf`,
/// `application/protobuf`) or proto3 JSON (`application/json`).
fn decode(d: &Delivery) -> Inbound {
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
    Inbound { event, message_id, audit_id }
}
