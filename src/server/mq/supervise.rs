//! Supervision of the consumer session: connect, declare and consume, watch the link, and
//! rebuild it with backoff when it dies or goes silent.

use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::{
    Channel,
    options::{BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use tokio_util::sync::CancellationToken;

use super::Consumer;
use crate::{
    amqp::{self, AmqpError},
    biz::Backoff,
};

/// How often the connection and channel are checked while no delivery arrives.
const SUPERVISE_EVERY: Duration = Duration::from_secs(2);
/// Quiet for this long while the queue holds ready messages: the consumer went silent
/// (lapin#389) and the session is rebuilt.
const SILENCE_LIMIT: Duration = Duration::from_secs(30);

/// Why a consumer session ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
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
    /// Consumes until `shutdown` is cancelled, reconnecting with backoff whenever the
    /// broker goes away. On shutdown it stops taking deliveries, finishes and
    /// acknowledges the batch in hand, and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        while !shutdown.is_cancelled() {
            match self.session(&shutdown, &mut backoff).await {
                Ok(()) => break,
                Err(e) => {
                    self.probe.set_connected(false);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "event consumer lost the broker; reconnecting");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.probe.set_connected(false);
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
        self.probe.set_connected(true);
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
}
