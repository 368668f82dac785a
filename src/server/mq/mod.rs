//! RabbitMQ transport: consumes `INSTANCE_*` events in batches, applies each batch in one
//! transaction through `EventService`, then dead-letters, delays or acknowledges each
//! delivery as the service's delivery policy says. See README "Event ingestion" for the
//! guarantees.
//!
//! Designed against lapin's known traps: every connect and declare is bounded
//! (lapin#437, #470); the connection, channel and consumer are supervised and rebuilt
//! when they go quiet or die (lapin#389); a delivery is acknowledged once, on the channel
//! that delivered it, and a batch from a lost channel is never acknowledged on a new one
//! (lapin#322) — it is redelivered and de-duplicated instead.

mod batch;
mod decode;
mod reroute;
mod supervise;

use std::sync::Arc;

use crate::{
    conf,
    service::{BrokerProbe, EventService, Retries},
};

/// The event consumer; `run` it until shutdown.
pub struct Consumer {
    conf: conf::RabbitMq,
    events: Arc<EventService>,
    retries: Retries,
    probe: BrokerProbe,
}

impl Consumer {
    /// A consumer of `conf.queue` feeding `events`.
    pub fn new(conf: conf::RabbitMq, events: Arc<EventService>) -> Self {
        let retries = Retries { max: conf.max_retries, delay: conf.retry_delay };
        Self { conf, events, retries, probe: BrokerProbe::default() }
    }

    /// The readiness probe of this consumer's connection.
    pub fn probe(&self) -> BrokerProbe {
        self.probe.clone()
    }
}
