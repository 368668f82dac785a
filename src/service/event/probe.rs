//! The `broker` readiness probe: whether the event consumer holds a connection, as the
//! consumer last reported it.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use async_trait::async_trait;

use crate::biz::{Probe, RepoError};

/// Readiness of the broker as the event consumer sees it; clones share one state.
#[derive(Debug, Clone, Default)]
pub struct BrokerProbe {
    connected: Arc<AtomicBool>,
}

impl BrokerProbe {
    /// Records whether the consumer is connected now.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }
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
