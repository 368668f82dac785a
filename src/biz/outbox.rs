//! The status outbox relay: status changes committed with the instance are published to
//! the broker afterwards, at least once, even across crashes.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;

use super::{Backoff, RepoError, StatusChange};

/// A status change waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// Outbox row id.
    pub id: i64,
    /// The change.
    pub change: StatusChange,
}

/// The outbox table.
#[async_trait]
pub trait OutboxRepo: Send + Sync {
    /// Claims up to `limit` unclaimed (or expired) rows for `lease`, oldest first.
    /// Rows claimed by another publisher are skipped, never waited for.
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn claim(&self, limit: u32, lease: Duration) -> Result<Vec<Pending>, RepoError>;

    /// Removes rows that were published.
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the store does not answer.
    async fn remove(&self, ids: &[i64]) -> Result<(), RepoError>;
}

/// Where status changes go.
#[async_trait]
pub trait StatusPublisher: Send + Sync {
    /// Publishes `batch` and returns the ids the broker confirmed as routed and stored.
    /// Implementations MUST NOT report a change as sent when the broker returned it as
    /// unroutable or did not confirm it.
    ///
    /// # Errors
    /// `RepoError::Unavailable` when the broker cannot be reached.
    async fn publish(&self, batch: &[Pending]) -> Result<Vec<i64>, RepoError>;
}

/// Moves the outbox to the broker until stopped.
pub struct OutboxRelay {
    repo: Arc<dyn OutboxRepo>,
    publisher: Arc<dyn StatusPublisher>,
    /// Rows per round.
    pub batch: u32,
    /// How long a claim holds before another publisher may take the rows.
    pub lease: Duration,
    /// Pause when the outbox is empty.
    pub idle: Duration,
}

impl OutboxRelay {
    /// A relay from `repo` to `publisher`.
    pub fn new(repo: Arc<dyn OutboxRepo>, publisher: Arc<dyn StatusPublisher>) -> Self {
        Self {
            repo,
            publisher,
            batch: 500,
            lease: Duration::from_secs(30),
            idle: Duration::from_millis(200),
        }
    }

    /// One round: claim, publish, remove what was confirmed. Returns how many were sent
    /// and whether the outbox may hold more.
    ///
    /// # Errors
    /// A dependency failed; the claimed rows are retried once their lease expires.
    pub async fn relay_once(&self) -> Result<(usize, bool), RepoError> {
        let pending = self.repo.claim(self.batch, self.lease).await?;
        if pending.is_empty() {
            return Ok((0, false));
        }
        let full = pending.len() == self.batch as usize;
        let sent = self.publisher.publish(&pending).await?;
        if !sent.is_empty() {
            self.repo.remove(&sent).await?;
        }
        if sent.len() < pending.len() {
            tracing::warn!(
                unsent = pending.len() - sent.len(),
                "status events not confirmed by the broker; retried after their lease"
            );
        }
        Ok((sent.len(), full && sent.len() == pending.len()))
    }

    /// Relays until `stop` resolves, backing off while a dependency is down.
    pub async fn run(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let pause = match self.relay_once().await {
                Ok((_, true)) => Duration::ZERO,
                Ok((_, false)) => {
                    backoff.reset();
                    self.idle
                }
                Err(e) => {
                    let pause = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?pause, "status outbox relay failed");
                    pause
                }
            };
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}
