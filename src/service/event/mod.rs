//! Lifecycle events (`mq.v1.Event`) applied through the same use cases as the API, each
//! delivery settled by one delivery policy.

mod command;
mod policy;
mod probe;

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

pub use command::message_key;
pub use policy::{DeadLetterReason, Disposition, Retries};
pub use probe::BrokerProbe;

use self::policy::{Attempt, Step, policy};
use crate::{
    biz::{Backoff, Envelope, Error, InstanceUsecase},
    pb::mq::v1 as pb,
};

/// One delivery, decoded (or not) by the transport.
#[derive(Debug)]
pub struct Inbound {
    /// The event, or why the body could not be decoded.
    pub event: Result<pb::Event, String>,
    /// The producer's AMQP `message_id`, when it set one: the event's identity.
    pub message_id: Option<String>,
    /// What the audit trail and the logs call this delivery: the message id, or one the
    /// transport made up when there is none.
    pub audit_id: String,
    /// Trips this delivery made through the retry queue so far (`x-retry-count`).
    pub retries: i64,
}

/// Applies events, for the RabbitMQ consumer.
pub struct EventService {
    instances: Arc<InstanceUsecase>,
}

impl EventService {
    /// Events over `instances`.
    pub fn new(instances: Arc<InstanceUsecase>) -> Self {
        Self { instances }
    }

    /// Applies a batch in order, in one transaction, and settles each delivery by the
    /// delivery policy. While the database is unavailable the batch is tried again with
    /// backoff (never dead-lettered); when it fails otherwise its events are applied one
    /// by one, so one bad event cannot hold back the others. `None`: shutdown came first
    /// and nothing may be acknowledged.
    pub async fn apply(
        &self,
        batch: &[Inbound],
        retries: Retries,
        shutdown: &CancellationToken,
    ) -> Option<Vec<Disposition>> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let steps: Vec<Step> = loop {
            match self.handle(batch).await {
                Ok(attempts) => {
                    let settle = |(attempt, inbound): (Attempt, &Inbound)| {
                        policy(&attempt, inbound.retries, retries)
                    };
                    break attempts.into_iter().zip(batch).map(settle).collect();
                }
                Err(e) => match Attempt::failed(&e) {
                    Attempt::Unavailable => {
                        let delay = backoff.next_delay();
                        tracing::warn!(error = ?e, retry_in = ?delay, "database unavailable; batch kept for retry");
                        tokio::select! {
                            () = shutdown.cancelled() => return None,
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                    _ => {
                        tracing::error!(error = ?e, size = batch.len(), "batch failed; applying its events one by one");
                        break batch.iter().map(|_| Step::ApplyAgain).collect();
                    }
                },
            }
        };
        let mut dispositions = Vec::with_capacity(batch.len());
        for (step, inbound) in steps.into_iter().zip(batch) {
            dispositions.push(match step {
                Step::Settle(disposition) => disposition,
                Step::ApplyAgain => self.apply_alone(inbound, retries, shutdown).await?,
            });
        }
        Some(dispositions)
    }

    /// Applies one event on its own until the policy settles it. `None`: shutdown came
    /// first.
    async fn apply_alone(
        &self,
        inbound: &Inbound,
        retries: Retries,
        shutdown: &CancellationToken,
    ) -> Option<Disposition> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut failures = 0;
        loop {
            let step = match self.handle(std::slice::from_ref(inbound)).await {
                Ok(mut attempts) => policy(&attempts.remove(0), inbound.retries, retries),
                Err(e) => {
                    let attempt = Attempt::failed(&e);
                    let step = policy(&attempt, failures, retries);
                    if matches!(attempt, Attempt::Internal) {
                        failures += 1;
                    }
                    if matches!(step, Step::Settle(_)) {
                        tracing::error!(error = ?e, message_id = %inbound.audit_id, "event keeps failing; dead-lettering it");
                    }
                    step
                }
            };
            match step {
                Step::Settle(disposition) => return Some(disposition),
                Step::ApplyAgain => tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                },
            }
        }
    }

    /// Applies a batch in order, in one transaction.
    ///
    /// # Errors
    /// The whole batch failed and nothing was applied (`Unavailable`: retry later).
    async fn handle(&self, batch: &[Inbound]) -> Result<Vec<Attempt>, Error> {
        let envelopes: Vec<Envelope> = batch.iter().map(command::envelope).collect();
        let outcomes = self.instances.execute(&envelopes).await?;
        Ok(outcomes.into_iter().map(Attempt::from).collect())
    }
}
