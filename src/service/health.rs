//! Readiness for `GET /readyz` and `grpc.health.v1`.

use std::sync::Arc;

use crate::biz::{HealthUsecase, ProbeStatus};

/// The outcome of one readiness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Every dependency answered.
    pub ready: bool,
    /// Each dependency's result.
    pub checks: Vec<ProbeStatus>,
}

/// Readiness, for the gRPC and HTTP servers alike.
#[derive(Clone)]
pub struct HealthService {
    health: Arc<HealthUsecase>,
}

impl HealthService {
    /// A health service over `health`.
    pub fn new(health: Arc<HealthUsecase>) -> Self {
        Self { health }
    }

    /// Checks every dependency now.
    pub async fn readiness(&self) -> Readiness {
        let checks = self.health.check().await;
        Readiness { ready: checks.iter().all(|c| c.ok), checks }
    }
}
