//! Exchange and queue names of a run's own, so that runs share a broker without meeting.

use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};

/// The service's exchanges and queues for one run, deleted by [`MqNames::remove`] or
/// when the value is dropped.
#[derive(Debug)]
pub struct MqNames {
    /// Where events are published (`data.rabbitmq.exchange`).
    pub exchange: String,
    /// The event queue the service consumes.
    pub queue: String,
    /// Where refused events go.
    pub dead_letter_exchange: String,
    /// The queue bound to the dead-letter exchange.
    pub dead_letter_queue: String,
    /// Where events wait before another try.
    pub retry_queue: String,
    /// Where the service publishes status changes.
    pub status_queue: String,
    amqp_url: String,
    removed: bool,
}

/// How long teardown waits for the broker, at most, per step.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(10);

impl MqNames {
    /// Names `{prefix}.{12 random hex digits}.…` on the broker at `amqp_url`.
    pub fn unique(prefix: &str, amqp_url: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self::with_suffix(prefix, &id[..12], amqp_url)
    }

    /// Names `{prefix}.{suffix}.…` on the broker at `amqp_url`.
    pub fn with_suffix(prefix: &str, suffix: &str, amqp_url: &str) -> Self {
        let name = |rest: &str| format!("{prefix}.{suffix}.{rest}");
        Self {
            exchange: name("events"),
            queue: name("instance-events"),
            dead_letter_exchange: name("events.dlx"),
            dead_letter_queue: name("instance-events.dead"),
            retry_queue: name("instance-events.retry"),
            status_queue: name("instance-status"),
            amqp_url: amqp_url.to_owned(),
            removed: false,
        }
    }

    /// The `RESOURCE_DATA__RABBITMQ__…` variables that give the service these names.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("EXCHANGE", &self.exchange),
            ("QUEUE", &self.queue),
            ("DEAD_LETTER_EXCHANGE", &self.dead_letter_exchange),
            ("DEAD_LETTER_QUEUE", &self.dead_letter_queue),
            ("RETRY_QUEUE", &self.retry_queue),
            ("STATUS_QUEUE", &self.status_queue),
        ]
        .into_iter()
        .map(|(k, v)| (format!("RESOURCE_DATA__RABBITMQ__{k}"), v.clone()))
        .collect()
    }

    /// Deletes the queues and exchanges (those that exist), each step bounded.
    pub async fn remove(mut self) {
        self.removed = true;
        delete(&self.amqp_url, self.queues(), self.exchanges()).await;
    }

    fn queues(&self) -> Vec<String> {
        [&self.queue, &self.dead_letter_queue, &self.retry_queue, &self.status_queue]
            .map(Clone::clone)
            .to_vec()
    }

    fn exchanges(&self) -> Vec<String> {
        [&self.exchange, &self.dead_letter_exchange].map(Clone::clone).to_vec()
    }
}

impl Drop for MqNames {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let (url, queues, exchanges) = (self.amqp_url.clone(), self.queues(), self.exchanges());
        // A drop may run inside a runtime or outside any: a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(delete(&url, queues, exchanges));
        })
        .join();
    }
}

/// Deletes `queues` and `exchanges` on the broker at `url`, ignoring what fails.
async fn delete(url: &str, queues: Vec<String>, exchanges: Vec<String>) {
    let connect = lapin::Connection::connect(url, Default::default());
    let Ok(Ok(conn)) = tokio::time::timeout(TEARDOWN_TIMEOUT, connect).await else { return };
    if let Ok(Ok(channel)) = tokio::time::timeout(TEARDOWN_TIMEOUT, conn.create_channel()).await {
        for q in &queues {
            let deleted = channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default());
            let _ = tokio::time::timeout(TEARDOWN_TIMEOUT, deleted).await;
        }
        for e in &exchanges {
            let deleted =
                channel.exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default());
            let _ = tokio::time::timeout(TEARDOWN_TIMEOUT, deleted).await;
        }
    }
    let _ = tokio::time::timeout(TEARDOWN_TIMEOUT, conn.close(200, "done".into())).await;
}
