//! The service binary as a child process: its environment, start, readiness, log and stop.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
    time::Instant,
};

use crate::broker::MqNames;

/// Every line the process wrote to stdout or stderr, in arrival order.
pub type Logs = Arc<Mutex<Vec<String>>>;

/// How often waits look again.
const POLL: Duration = Duration::from_millis(20);

/// How many of the last log lines a failure message shows.
const LOG_TAIL: usize = 200;

/// An HTTP client whose every request is bounded: 5 s to connect, 30 s in all.
///
/// Idle pooled connections are dropped after 5 s, before the service closes them (after
/// `header_read_timeout`, 10 s), as a well-behaved client does: otherwise a request sent
/// just as the server closes fails with `IncompleteMessage`.
///
/// # Panics
/// When the TLS backend cannot be initialised.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client")
}

/// `http://` and the address in field `field` of a log line (`serving` names `http` and
/// `grpc`).
///
/// # Panics
/// When the line has no such field.
pub fn base_url(line: &Value, field: &str) -> String {
    let addr = line[field].as_str().unwrap_or_else(|| panic!("no {field:?} in {line}"));
    format!("http://{addr}")
}

/// The `RESOURCE_…` environment of one service process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    /// Database `database_url`, both listeners on ephemeral ports of 127.0.0.1, JSON logs.
    pub fn new(database_url: &str) -> Self {
        let mut env = Self::default();
        env.set("RESOURCE_DATA__DATABASE__SOURCE", database_url)
            .set("RESOURCE_SERVER__HTTP__ADDR", "127.0.0.1:0")
            .set("RESOURCE_SERVER__GRPC__ADDR", "127.0.0.1:0")
            .set("RESOURCE_LOG__FORMAT", "json");
        env
    }

    /// Adds the broker at `amqp_url` and the exchanges and queues `names`.
    #[must_use]
    pub fn with_broker(mut self, amqp_url: &str, names: &MqNames) -> Self {
        self.set("RESOURCE_DATA__RABBITMQ__URL", amqp_url);
        self.vars.extend(names.env());
        self
    }

    /// Sets `key` to `value`, replacing what it was.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.vars.insert(key.into(), value.into());
        self
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    /// Every variable, by name.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl<K: Into<String>, V: Into<String>> Extend<(K, V)> for Env {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.set(k, v);
        }
    }
}

/// One process of the service, killed when dropped.
#[derive(Debug)]
pub struct Service {
    /// What it logged so far (collected in the background).
    pub logs: Logs,
    child: Child,
}

impl Service {
    /// Starts `bin -conf conf_dir` with `env` on top of the caller's environment (without
    /// `RUST_LOG`, so that `RESOURCE_LOG__LEVEL` decides); collects stdout and stderr into
    /// [`Service::logs`], copying each line to stderr as `[resource] …` when `echo`.
    ///
    /// Must be called within a tokio runtime.
    ///
    /// # Panics
    /// When the binary cannot be started.
    pub fn spawn(bin: &Path, conf_dir: &Path, env: &Env, echo: bool) -> Self {
        let mut child = Command::new(bin)
            .arg("-conf")
            .arg(conf_dir)
            .envs(env.vars())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let logs = Logs::default();
        let stdout = child.stdout.take().expect("a piped stdout");
        let stderr = child.stderr.take().expect("a piped stderr");
        tokio::spawn(collect(stdout, logs.clone(), echo));
        tokio::spawn(collect(stderr, logs.clone(), echo));
        Self { logs, child }
    }

    /// The process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// The exit status, if it has exited.
    ///
    /// # Panics
    /// When the status cannot be read.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("the exit status")
    }

    /// Waits until each message of `messages` (the `message` field of a JSON log line) has
    /// been logged; returns those lines, the first of each, in the order of `messages`.
    ///
    /// # Panics
    /// When the process exits first, or `within` passes, showing the log.
    pub async fn wait_for_messages(&mut self, messages: &[&str], within: Duration) -> Vec<Value> {
        let mut seen: Vec<Option<Value>> = vec![None; messages.len()];
        let mut scanned = 0;
        let deadline = Instant::now() + within;
        loop {
            let exited = self.try_wait();
            // Lines written just before an exit may still be on their way.
            if exited.is_some() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let lines: Vec<String> = self.logs.lock().unwrap()[scanned..].to_vec();
            scanned += lines.len();
            for line in &lines {
                let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
                if let Some(i) = messages.iter().position(|m| v["message"] == *m) {
                    seen[i].get_or_insert(v);
                }
            }
            if seen.iter().all(Option::is_some) {
                return seen.into_iter().flatten().collect();
            }
            let missing: Vec<&str> =
                messages.iter().zip(&seen).filter(|(_, s)| s.is_none()).map(|(m, _)| *m).collect();
            if let Some(status) = exited {
                panic!(
                    "the service exited ({status}) before logging {missing:?}:\n{}",
                    self.tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the service did not log {missing:?} within {within:?}:\n{}",
                self.tail()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until a JSON log line from the `from`-th on (0: any line so far counts) for
    /// which `matches` holds, and returns the first.
    ///
    /// # Panics
    /// When the process exits first, or `within` passes, naming `what` and showing the log.
    pub async fn wait_for_line(
        &mut self,
        what: &str,
        from: usize,
        within: Duration,
        mut matches: impl FnMut(&Value) -> bool,
    ) -> Value {
        let mut scanned = from;
        let deadline = Instant::now() + within;
        loop {
            let exited = self.try_wait();
            if exited.is_some() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let lines: Vec<String> =
                self.logs.lock().unwrap().iter().skip(scanned).cloned().collect();
            scanned += lines.len();
            let found = lines
                .iter()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .find(|v| matches(v));
            if let Some(v) = found {
                return v;
            }
            if let Some(status) = exited {
                panic!("the service exited ({status}) before logging {what}:\n{}", self.tail());
            }
            assert!(
                Instant::now() < deadline,
                "the service did not log {what} within {within:?}:\n{}",
                self.tail()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `GET {http}/readyz` answers 200: the database answers and the consumer
    /// has declared its topology, so published events are routed.
    ///
    /// # Panics
    /// When the process exits first, or `within` passes, showing the log.
    pub async fn wait_ready(&mut self, client: &reqwest::Client, http: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            // Each try is bounded by the client's own timeout as well as by what is left.
            let left = deadline.saturating_duration_since(Instant::now());
            let probe = client.get(format!("{http}/readyz")).timeout(left.max(POLL)).send();
            if let Ok(response) = probe.await
                && response.status() == 200
            {
                return;
            }
            if let Some(status) = self.try_wait() {
                panic!("the service exited ({status}) before it was ready:\n{}", self.tail());
            }
            assert!(
                Instant::now() < deadline,
                "the service was not ready within {within:?}:\n{}",
                self.tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM and returns the exit status.
    ///
    /// # Panics
    /// When it is still running `grace` later: it is then killed with SIGKILL, and the
    /// panic shows its log.
    pub async fn terminate(&mut self, grace: Duration) -> ExitStatus {
        if let Some(pid) = self.child.id() {
            // NOTE: `kill(1)` rather than libc: this crate forbids unsafe code.
            let sent = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            assert!(sent.is_ok_and(|s| s.success()), "cannot send SIGTERM to {pid}");
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.expect("the exit status"),
            Err(_) => {
                self.kill().await;
                panic!(
                    "the service was still running {grace:?} after SIGTERM; killed it:\n{}",
                    self.tail()
                );
            }
        }
    }

    /// Kills the process with SIGKILL (no chance to clean up) and waits for it.
    ///
    /// # Panics
    /// When it has not exited 10 s after SIGKILL.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("gone within 10 s of SIGKILL")
            .expect("the exit status");
    }

    /// Waits up to `within` for the process to exit on its own.
    ///
    /// # Panics
    /// When the status cannot be read.
    pub async fn exited(&mut self, within: Duration) -> Option<ExitStatus> {
        let status = tokio::time::timeout(within, self.child.wait()).await.ok()?;
        Some(status.expect("the exit status"))
    }

    /// The last lines of the log, for a failure message.
    pub fn tail(&self) -> String {
        let logs = self.logs.lock().unwrap();
        let from = logs.len().saturating_sub(LOG_TAIL);
        logs[from..].join("\n")
    }
}

/// Appends each line of `reader` to `logs` until it ends, echoing it when `echo`.
async fn collect(reader: impl AsyncRead + Unpin, logs: Logs, echo: bool) {
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if echo {
            eprintln!("[resource] {line}");
        }
        logs.lock().unwrap().push(line);
    }
}
