//! Readiness: whether every dependency the service needs answers.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;

use super::RepoError;

/// One dependency that readiness depends on.
#[async_trait]
pub trait Probe: Send + Sync {
    /// Stable name shown in the readiness report (`database`, `broker`, `kubernetes`).
    fn name(&self) -> &'static str;

    /// Checks the dependency once.
    ///
    /// # Errors
    /// Implementations MUST return `RepoError::Unavailable` when it does not answer.
    async fn check(&self) -> Result<(), RepoError>;
}

/// Result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeStatus {
    /// The probe's name.
    pub name: &'static str,
    /// Whether it answered in time.
    pub ok: bool,
}

/// Runs every probe with a bound.
pub struct HealthUsecase {
    probes: Vec<Arc<dyn Probe>>,
    timeout: Duration,
}

impl HealthUsecase {
    /// A readiness check over `probes`, each bounded by `timeout`.
    pub fn new(probes: Vec<Arc<dyn Probe>>, timeout: Duration) -> Self {
        Self { probes, timeout }
    }

    /// Runs all probes concurrently; ready when every one is ok.
    pub async fn check(&self) -> Vec<ProbeStatus> {
        let checks = self.probes.iter().map(|probe| async move {
            let ok = match tokio::time::timeout(self.timeout, probe.check()).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    tracing::warn!(probe = probe.name(), error = %e, "readiness probe failed");
                    false
                }
                Err(_) => {
                    tracing::warn!(probe = probe.name(), "readiness probe did not answer in time");
                    false
                }
            };
            ProbeStatus { name: probe.name(), ok }
        });
        futures::future::join_all(checks).await
    }
}
