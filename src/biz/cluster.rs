//! The cluster that runs instances, as the reconciler sees it: what an instance should
//! run (a [`Workload`]), what runs (an [`Observed`] workload), and the [`Cluster`] trait
//! a Kubernetes implementation in `data` provides.

use std::collections::BTreeMap;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{
    BoxError, Error,
    instance::{Endpoint, GpuType, Instance, InstanceId, Port},
};

/// The container settings `config_json` may carry (every key optional, others ignored):
///
/// ```json
/// {"env": {"NAME": "value"}, "command": ["/bin/app"], "args": ["--flag"],
///  "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerConfig {
    /// Environment variables (values given as strings, numbers or booleans).
    pub env: BTreeMap<String, String>,
    /// Replaces the image's entrypoint.
    pub command: Vec<String>,
    /// Replaces the image's arguments.
    pub args: Vec<String>,
    /// Ports exposed by the instance's Service.
    pub ports: Vec<Port>,
}

impl ContainerConfig {
    /// Reads the documented keys of `config_json`.
    ///
    /// # Errors
    /// `InvalidSpec` for `config_json`, naming the key that does not fit the schema.
    pub fn from_config(config: &serde_json::Value) -> Result<Self, Error> {
        let bad = |message: String| Error::InvalidSpec { field: "config_json", message };
        let mut out = ContainerConfig::default();
        if let Some(env) = config.get("env") {
            let env = env.as_object().ok_or_else(|| bad("env must be an object".into()))?;
            for (name, value) in env {
                if !is_env_name(name) {
                    return Err(bad(format!("env name {name:?} is not a valid variable name")));
                }
                let value = match value {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => number_text(n),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => return Err(bad(format!("env {name:?} must be a string"))),
                };
                out.env.insert(name.clone(), value);
            }
        }
        out.command = string_list(config, "command").map_err(bad)?;
        out.args = string_list(config, "args").map_err(bad)?;
        if let Some(ports) = config.get("ports") {
            let ports = ports.as_array().ok_or_else(|| bad("ports must be a list".into()))?;
            for (i, port) in ports.iter().enumerate() {
                out.ports.push(parse_port(i, port).map_err(bad)?);
            }
            let mut names: Vec<&str> = out.ports.iter().map(|p| p.name.as_str()).collect();
            names.sort_unstable();
            if names.windows(2).any(|w| w[0] == w[1]) {
                return Err(bad("ports must have distinct names".into()));
            }
        }
        Ok(out)
    }
}

/// A JSON number as an environment value: integral numbers without a fraction (the API
/// stores config numbers as doubles, so `4` may arrive as `4.0`).
fn number_text(n: &serde_json::Number) -> String {
    match n.as_f64() {
        #[allow(clippy::cast_possible_truncation)] // integral and below 2^53: exact
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 => {
            (f as i64).to_string()
        }
        _ => n.to_string(),
    }
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
}

fn string_list(config: &serde_json::Value, key: &str) -> Result<Vec<String>, String> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_owned).ok_or(format!("{key} must be a list of strings"))
            })
            .collect(),
        Some(_) => Err(format!("{key} must be a list of strings")),
    }
}

fn parse_port(i: usize, port: &serde_json::Value) -> Result<Port, String> {
    // Config numbers may arrive as doubles (`8080.0`).
    let number = port
        .get("port")
        .and_then(serde_json::Value::as_f64)
        .filter(|p| p.fract() == 0.0 && (1.0..=65535.0).contains(p))
        .ok_or(format!("ports[{i}].port must be an integer between 1 and 65535"))?;
    let protocol = match port.get("protocol").and_then(serde_json::Value::as_str) {
        None => "TCP".to_owned(),
        Some(p) if p.eq_ignore_ascii_case("tcp") => "TCP".to_owned(),
        Some(p) if p.eq_ignore_ascii_case("udp") => "UDP".to_owned(),
        Some(p) => return Err(format!("ports[{i}].protocol {p:?} must be TCP or UDP")),
    };
    let name = match port.get("name").and_then(serde_json::Value::as_str) {
        None => format!("p{}", number as i64),
        Some(n) => n.to_owned(),
    };
    // A Kubernetes port name: at most 15 lower-case letters, digits and '-'.
    let name_ok = !name.is_empty()
        && name.len() <= 15
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !name_ok {
        return Err(format!(
            "ports[{i}].name {name:?} must be 1-15 lower-case letters, digits or '-'"
        ));
    }
    #[allow(clippy::cast_possible_truncation)] // integral and within 1..=65535
    Ok(Port { name, port: number as i32, protocol })
}

/// What one instance should run.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// The instance.
    pub id: InstanceId,
    /// Its owner.
    pub owner: String,
    /// Image reference.
    pub image: String,
    /// CPU cores (requests = limits).
    pub cpu: i32,
    /// Memory in MiB (requests = limits).
    pub memory_mb: i32,
    /// GPU type; one device when not `None`.
    pub gpu: GpuType,
    /// Container settings from `config_json`.
    pub container: ContainerConfig,
    /// Digest of everything above: a running workload whose hash differs is replaced.
    pub spec_hash: String,
}

impl Workload {
    /// The workload of `instance`.
    ///
    /// # Errors
    /// `InvalidSpec` when `config_json` does not fit the container schema (the API and
    /// the planner refuse such specs, so only rows written by older versions can).
    pub fn of(instance: &Instance) -> Result<Self, Error> {
        let spec = &instance.spec;
        let container = ContainerConfig::from_config(&spec.config)?;
        let mut hasher = Sha256::new();
        hasher.update(spec.image.as_bytes());
        hasher.update(spec.cpu.to_be_bytes());
        hasher.update(spec.memory_mb.to_be_bytes());
        hasher.update(spec.gpu.code().to_be_bytes());
        hasher.update(serde_json::to_vec(&spec.config).unwrap_or_default());
        let digest = hasher.finalize();
        let spec_hash = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Ok(Workload {
            id: instance.id,
            owner: instance.user_id.clone(),
            image: spec.image.clone(),
            cpu: spec.cpu,
            memory_mb: spec.memory_mb,
            gpu: spec.gpu,
            container,
            spec_hash,
        })
    }
}

/// How a workload is doing, as the cluster reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, not running yet (scheduling, pulling the image).
    Pending,
    /// Running and ready.
    Running,
    /// Cannot run: the reason (image pull error, crash loop, unschedulable).
    Failed(String),
}

/// One workload found in the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The instance it belongs to.
    pub id: InstanceId,
    /// The spec hash it was applied with.
    pub spec_hash: String,
    /// How it is doing.
    pub phase: Phase,
    /// Where it can be reached (pod name and IP, service host and ports).
    pub endpoint: Endpoint,
    /// Being deleted (it has a deletion timestamp).
    pub terminating: bool,
    /// Still carries the service's finalizer: if it is terminating, someone else
    /// deleted it (the service removes its finalizer before it deletes).
    pub protected: bool,
    /// Its Service exists (every running instance has one, headless without ports).
    pub service_ok: bool,
}

/// Why a cluster call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The API server did not answer or answered 5xx/429; retry with backoff.
    #[error("cluster unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The API server refused the request (4xx); retrying the same request will not help.
    #[error("cluster refused the request: {0}")]
    Refused(String),
}

/// The cluster. Implementations own the mapping to Pods and Services.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// Creates or updates the workload of an instance (idempotent).
    ///
    /// # Errors
    /// `ClusterError` when the API server fails or refuses.
    async fn apply(&self, workload: &Workload) -> Result<(), ClusterError>;

    /// Removes the workload of an instance (releasing the service's finalizer first);
    /// whether nothing of it remains.
    ///
    /// # Errors
    /// `ClusterError` when the API server fails or refuses.
    async fn remove(&self, id: InstanceId) -> Result<bool, ClusterError>;

    /// The workload of one instance, if any exists.
    ///
    /// # Errors
    /// `ClusterError` when the API server fails.
    async fn observe(&self, id: InstanceId) -> Result<Option<Observed>, ClusterError>;

    /// Every workload the service manages.
    ///
    /// # Errors
    /// `ClusterError` when the API server fails.
    async fn list(&self) -> Result<Vec<Observed>, ClusterError>;

    /// Watches the managed workloads and sends the id of each one that changes; returns
    /// when the watch ends or fails (the caller restarts it). `alive` is sent `()` each
    /// time the watch is (re)established.
    ///
    /// # Errors
    /// `ClusterError` when the watch fails.
    async fn watch(
        &self,
        changed: mpsc::Sender<InstanceId>,
        alive: mpsc::Sender<()>,
    ) -> Result<(), ClusterError>;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn config_json_maps_to_the_container() {
        let config = json!({"env": {"A": "1", "N": 2, "F": 4.0, "B": true}, "command": ["/app"], "args": ["-v"],
                            "ports": [{"name": "http", "port": 8080}, {"port": 53, "protocol": "udp"}],
                            "other": {"kept": "but unused"}});
        let c = ContainerConfig::from_config(&config).unwrap();
        assert_eq!(c.env["N"], "2");
        assert_eq!(c.env["F"], "4");
        assert_eq!(c.env["B"], "true");
        assert_eq!(c.command, ["/app"]);
        assert_eq!(c.args, ["-v"]);
        assert_eq!(c.ports[1], Port { name: "p53".into(), port: 53, protocol: "UDP".into() });
    }

    #[test]
    fn config_json_that_does_not_fit_is_refused() {
        for config in [
            json!({"env": []}),
            json!({"env": {"1A": "x"}}),
            json!({"env": {"A": {"nested": 1}}}),
            json!({"command": "not a list"}),
            json!({"args": [1]}),
            json!({"ports": [{"port": 0}]}),
            json!({"ports": [{"port": 80, "protocol": "SCTP"}]}),
            json!({"ports": [{"port": 80, "name": "Bad_Name"}]}),
            json!({"ports": [{"port": 80, "name": "a"}, {"port": 81, "name": "a"}]}),
        ] {
            assert!(ContainerConfig::from_config(&config).is_err(), "{config}");
        }
    }
}
