//! RabbitMQ plumbing shared by the consumer (`server::mq`), the status publisher
//! (`data::publisher`) and the `publish` tool: bounded connects and the idempotent
//! declaration of the topology. Depends on lapin and `conf` only.
//!
//! Every broker call here is bounded by `connect_timeout`: lapin's connect and declares
//! can wait forever on a broker that is down or refuses the vhost (amqp-rs/lapin#437,
//! #470).

use std::{future::Future, time::Duration};

use lapin::{
    Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use secrecy::ExposeSecret;

use crate::conf;

/// AMQP `type` of the status events this service publishes; its consumer acknowledges
/// and ignores messages of this type should an operator bind too widely.
pub const STATUS_EVENT_TYPE: &str = "mq.v1.InstanceStatusChanged";

/// Why a broker call failed.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The broker refused or dropped the call.
    #[error("{what}: {source}")]
    Broker {
        /// The call.
        what: &'static str,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// `data.rabbitmq.url` is not an AMQP URL.
    #[error("data.rabbitmq.url is not a valid AMQP URL")]
    InvalidUrl,
    /// The broker did not answer in time.
    #[error("{what}: no answer within {timeout:?}")]
    Timeout {
        /// The call.
        what: &'static str,
        /// The bound.
        timeout: Duration,
    },
}

/// Runs one broker call within `timeout`.
///
/// # Errors
/// `AmqpError::Timeout` or the call's own error.
pub async fn bounded<T>(
    what: &'static str,
    timeout: Duration,
    call: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, AmqpError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(AmqpError::Broker { what, source }),
        Err(_) => Err(AmqpError::Timeout { what, timeout }),
    }
}

/// Connects to `conf.url` (whose password is never logged) within `conf.connect_timeout`,
/// with heartbeats every `conf.heartbeat` unless the URL sets its own (`?heartbeat=`): a
/// link that goes silent — a black-holed network, a broker that hangs — is given up
/// after two missed heartbeats instead of being waited on for ever.
///
/// # Errors
/// `AmqpError`.
pub async fn connect(conf: &conf::RabbitMq, name: &str) -> Result<Connection, AmqpError> {
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_owned()));
    let mut uri: lapin::uri::AMQPUri = conf.url.expose_secret().parse().map_err(|_| {
        // The parse error may quote the URL, password included: say only what failed.
        AmqpError::InvalidUrl
    })?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat =
            Some(u16::try_from(conf.heartbeat.as_secs().max(1)).unwrap_or(u16::MAX));
    }
    bounded("connect to RabbitMQ", conf.connect_timeout, Connection::connect_uri(uri, props)).await
}

/// Opens a channel with publisher confirms on.
///
/// # Errors
/// `AmqpError`.
pub async fn confirm_channel(
    conf: &conf::RabbitMq,
    conn: &Connection,
) -> Result<Channel, AmqpError> {
    let channel = bounded("open a channel", conf.connect_timeout, conn.create_channel()).await?;
    bounded(
        "enable publisher confirms",
        conf.connect_timeout,
        channel.confirm_select(lapin::options::ConfirmSelectOptions::default()),
    )
    .await?;
    Ok(channel)
}

/// How the event queue was found or declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// The event queue delivers to one consumer at a time (RabbitMQ's single active
    /// consumer), so events are applied in the order they were published whatever the
    /// number of replicas. `false` for a queue declared before, without it.
    pub single_active_consumer: bool,
}

/// Declares, idempotently, on a channel of its own: the durable topic exchange; the
/// dead-letter fanout exchange and its queue; the event queue (single active consumer)
/// bound with `binding_key`; the retry queue that returns its messages to the event queue
/// after `retry_delay`; and the status queue bound with `status_routing_key`.
///
/// An event queue that exists with other arguments (declared by an earlier version,
/// without single active consumer) is kept as it is, with a warning: the broker refuses
/// to change a queue's arguments, and refusing to start would stop ingest.
///
/// # Errors
/// `AmqpError`.
pub async fn declare_topology(
    conf: &conf::RabbitMq,
    conn: &Connection,
) -> Result<Topology, AmqpError> {
    let t = conf.connect_timeout;
    let mut channel = bounded("open a channel", t, conn.create_channel()).await?;
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    let queue = QueueDeclareOptions { durable: true, ..Default::default() };
    bounded(
        "declare the event exchange",
        t,
        channel.exchange_declare(
            conf.exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        ),
    )
    .await?;
    bounded(
        "declare the dead-letter exchange",
        t,
        channel.exchange_declare(
            conf.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        ),
    )
    .await?;
    bounded(
        "declare the dead-letter queue",
        t,
        channel.queue_declare(conf.dead_letter_queue.as_str().into(), queue, FieldTable::default()),
    )
    .await?;
    bounded(
        "bind the dead-letter queue",
        t,
        channel.queue_bind(
            conf.dead_letter_queue.as_str().into(),
            conf.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    // Messages the broker itself dead-letters (e.g. a rejected delivery) land in the
    // dead-letter queue too. One consumer at a time keeps the publish order.
    let mut events_args = FieldTable::default();
    events_args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(conf.dead_letter_exchange.as_str().into()),
    );
    events_args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    let single_active_consumer =
        declare_or_keep(conn, &mut channel, t, &conf.queue, events_args, "declare the event queue")
            .await?;
    if !single_active_consumer {
        tracing::warn!(
            queue = %conf.queue,
            "the event queue exists without single active consumer: with several replicas, \
             events for one instance may be applied out of order; delete the queue when it \
             is empty and the service declares it anew"
        );
    }
    bounded(
        "bind the event queue",
        t,
        channel.queue_bind(
            conf.queue.as_str().into(),
            conf.exchange.as_str().into(),
            conf.binding_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    // The retry queue has no consumer: after the TTL its messages are dead-lettered
    // through the default exchange straight back into the event queue.
    let mut retry_args = FieldTable::default();
    let ttl_ms = i64::try_from(conf.retry_delay.as_millis()).unwrap_or(i64::MAX);
    retry_args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms));
    retry_args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    retry_args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(conf.queue.as_str().into()),
    );
    let retry_as_configured = declare_or_keep(
        conn,
        &mut channel,
        t,
        &conf.retry_queue,
        retry_args,
        "declare the retry queue",
    )
    .await?;
    if !retry_as_configured {
        tracing::warn!(
            queue = %conf.retry_queue,
            retry_delay = ?conf.retry_delay,
            "the retry queue exists with other arguments (another retry_delay): retries keep \
             the delay it was declared with; delete the queue when it is empty and the service \
             declares it anew"
        );
    }
    // Nobody may read the status queue: it keeps the newest events, for a while.
    let mut status_args = FieldTable::default();
    status_args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(i64::from(conf.status_queue_max_length)),
    );
    let ttl_ms = i64::try_from(conf.status_queue_ttl.as_millis()).unwrap_or(i64::MAX);
    status_args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms));
    status_args.insert("x-overflow".into(), AMQPValue::LongString("drop-head".into()));
    let bounded_status = declare_or_keep(
        conn,
        &mut channel,
        t,
        &conf.status_queue,
        status_args,
        "declare the status queue",
    )
    .await?;
    if !bounded_status {
        tracing::warn!(
            queue = %conf.status_queue,
            max_length = conf.status_queue_max_length,
            ttl = ?conf.status_queue_ttl,
            "the status queue exists with other arguments: the configured bound is not \
             applied; bound it with a RabbitMQ policy (max-length, message-ttl) or delete the \
             queue and the service declares it anew"
        );
    }
    bounded(
        "bind the status queue",
        t,
        channel.queue_bind(
            conf.status_queue.as_str().into(),
            conf.exchange.as_str().into(),
            conf.status_routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(Topology { single_active_consumer })
}

/// Declares the durable queue `name` with `args`; whether it now has them. A queue that
/// exists with other arguments is refused by the broker (PRECONDITION_FAILED, which
/// closes the channel): it is then only checked to exist, on a new channel.
async fn declare_or_keep(
    conn: &Connection,
    channel: &mut Channel,
    t: Duration,
    name: &str,
    args: FieldTable,
    what: &'static str,
) -> Result<bool, AmqpError> {
    let options = QueueDeclareOptions { durable: true, ..Default::default() };
    match bounded(what, t, channel.queue_declare(name.into(), options, args)).await {
        Ok(_) => Ok(true),
        Err(AmqpError::Broker { source, .. }) if is_precondition_failed(&source) => {
            *channel = bounded("open a channel", t, conn.create_channel()).await?;
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            bounded(what, t, channel.queue_declare(name.into(), passive, FieldTable::default()))
                .await?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn is_precondition_failed(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(p)
            if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
    )
}

/// A header value as text, when it is one.
pub fn header_str(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(&ShortString::from(key))? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// A header value as an integer, when it is one.
pub fn header_int(headers: Option<&FieldTable>, key: &str) -> Option<i64> {
    match headers?.inner().get(&ShortString::from(key))? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}
