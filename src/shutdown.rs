//! Shutdown as a future: a token cancelled on SIGTERM or SIGINT, work given a grace
//! period past it, and background tasks joined together.

use std::{future::Future, time::Duration};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A token cancelled when the process receives SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        signal().await;
        cancel.cancel();
    });
    token
}

/// Runs `work` to its end, or until `grace` after `shutdown` is cancelled (`None`).
pub async fn with_grace<T>(
    work: impl Future<Output = T>,
    shutdown: &CancellationToken,
    grace: Duration,
) -> Option<T> {
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        done = work => Some(done),
        () = deadline => None,
    }
}

/// Background loops that each stop at their next boundary once shutdown is cancelled.
#[derive(Default)]
pub struct Background {
    tasks: JoinSet<()>,
}

impl Background {
    /// Starts `work`.
    pub fn spawn(&mut self, work: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(work);
    }

    /// Waits for every task (bound it with a timeout: dropping this future aborts what
    /// still runs).
    pub async fn join(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
