//! Readiness for `GET /readyz` and `grpc.health.v1`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use crate::biz::{HealthUsecase, ProbeStatus};

/// The outcome of one readiness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Every dependency answered.
    pub ready: bool,
    /// Each dependency's result.
    pub checks: Vec<ProbeStatus>,
}

/// How long one readiness result answers every caller: a flood of probes (from either
/// listener) checks the dependencies at most this often.
const FRESH_FOR: Duration = Duration::from_millis(500);

/// Readiness, for the gRPC and HTTP servers alike: one state both read.
#[derive(Clone)]
pub struct HealthService {
    health: Arc<HealthUsecase>,
    last: Arc<tokio::sync::Mutex<Option<(Instant, Readiness)>>>,
}

impl HealthService {
    /// A health service over `health`.
    pub fn new(health: Arc<HealthUsecase>) -> Self {
        Self { health, last: Arc::default() }
    }

    /// Whether every dependency answers, checked at most every half second: concurrent
    /// callers wait for the one check in flight.
    pub async fn readiness(&self) -> Readiness {
        let mut last = self.last.lock().await;
        if let Some((at, readiness)) = last.as_ref()
            && at.elapsed() < FRESH_FOR
        {
            return readiness.clone();
        }
        let checks = self.health.check().await;
        let readiness = Readiness { ready: checks.iter().all(|c| c.ok), checks };
        *last = Some((Instant::now(), readiness.clone()));
        readiness
    }
}
