//! Configuration: serde structs mirroring the YAML tree of `configs/config.yaml`, and
//! `load(dir)`, which merges every `*.yaml` in a directory, applies `RESOURCE_…__…`
//! environment overrides and validates the result.
//!
//! Depends on nothing else in the crate but the `biz` settings some sections convert
//! into; each constructor receives only its sub-tree.

use std::collections::BTreeMap;
use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct Bootstrap {
    /// Listeners.
    pub server: Server,
    /// Backing services.
    pub data: Data,
    /// Caller authentication.
    pub auth: Auth,
    /// Bounds of instance specs.
    #[serde(default)]
    pub limits: Limits,
    /// What owners and the fleet may hold.
    #[serde(default)]
    pub quota: Quota,
    /// Instance id generation.
    #[serde(default)]
    pub snowflake: Snowflake,
    /// WatchResources streams.
    #[serde(default)]
    pub watch: Watch,
    /// Logging.
    #[serde(default)]
    pub log: Log,
    /// Keys present in the files or the environment that no setting reads (a misspelt
    /// key or section), as dotted paths; logged as warnings at start-up.
    #[serde(skip)]
    pub unknown_keys: Vec<String>,
}

/// Listeners of the two API transports.
#[derive(Debug, Clone, Deserialize)]
pub struct Server {
    /// REST (axum).
    pub http: HttpServer,
    /// gRPC (tonic).
    pub grpc: GrpcServer,
    /// On SIGTERM/SIGINT, in-flight requests and the batch being applied get this long;
    /// connections still open after it (long-lived HTTP/2 clients) are dropped.
    #[serde(default = "default_shutdown_timeout", deserialize_with = "de_duration")]
    pub shutdown_timeout: Duration,
    /// Bounds of the client connections of both listeners.
    #[serde(default)]
    pub connections: Connections,
}

/// How long and how many client connections may be held, per listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Connections {
    /// Most open connections per listener; more wait in the kernel's backlog.
    pub max: usize,
    /// A connection that sends nothing for this long after it opened is closed.
    #[serde(deserialize_with = "de_duration")]
    pub first_byte_timeout: Duration,
    /// HTTP/1: a request's headers must have arrived this long after the connection
    /// opened or the previous response went out (an idle keep-alive connection is closed
    /// after it too).
    #[serde(deserialize_with = "de_duration")]
    pub header_read_timeout: Duration,
    /// HTTP/2: an idle connection is pinged this often…
    #[serde(deserialize_with = "de_duration")]
    pub keepalive_interval: Duration,
    /// …and closed when a ping is not answered within this.
    #[serde(deserialize_with = "de_duration")]
    pub keepalive_timeout: Duration,
    /// HTTP/2: most streams (requests) open at once on one connection.
    pub max_streams: u32,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            max: 4096,
            first_byte_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_streams: 200,
        }
    }
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(20)
}

/// REST listener.
#[derive(Debug, Clone, Deserialize)]
pub struct HttpServer {
    /// Listen address; `:8000` means all interfaces, as in Go.
    #[serde(deserialize_with = "de_addr")]
    pub addr: SocketAddr,
    /// Longest a request may take before it is answered 504.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Largest accepted request body, in bytes.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// A request body must have arrived within this (else 408); `timeout` starts after.
    #[serde(default = "default_body_timeout", deserialize_with = "de_duration")]
    pub body_timeout: Duration,
}

fn default_body_timeout() -> Duration {
    Duration::from_secs(10)
}

/// gRPC listener.
#[derive(Debug, Clone, Deserialize)]
pub struct GrpcServer {
    /// Listen address; `:9000` means all interfaces, as in Go.
    #[serde(deserialize_with = "de_addr")]
    pub addr: SocketAddr,
    /// Longest a call may take (a shorter `grpc-timeout` from the client wins).
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// A client connection is closed (gracefully, after its calls) after this long, so
    /// long-lived clients spread over replicas as they come and go.
    #[serde(default = "default_max_connection_age", deserialize_with = "de_duration")]
    pub max_connection_age: Duration,
    /// Largest accepted request message, in bytes; larger ones are `RESOURCE_EXHAUSTED`.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
}

fn default_max_message_bytes() -> usize {
    4 << 20
}

fn default_max_connection_age() -> Duration {
    Duration::from_secs(300)
}

/// Backing services.
#[derive(Debug, Clone, Deserialize)]
pub struct Data {
    /// PostgreSQL, the source of truth.
    pub database: Database,
    /// RabbitMQ, for lifecycle events in and status events out.
    #[serde(default)]
    pub rabbitmq: RabbitMq,
    /// The cluster that runs instances.
    #[serde(default)]
    pub kubernetes: Kubernetes,
}

/// PostgreSQL connection pool.
#[derive(Debug, Clone, Deserialize)]
pub struct Database {
    /// `postgres` or `postgresql`.
    pub driver: String,
    /// Connection URL; may carry a password, so it is never logged.
    pub source: SecretString,
    /// Pool size.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Apply pending migrations when `serve` starts.
    #[serde(default = "default_true")]
    pub migrate: bool,
    /// Longest a request waits for a pooled connection before it is answered 503.
    #[serde(default = "default_acquire_timeout", deserialize_with = "de_duration")]
    pub acquire_timeout: Duration,
    /// Longest start-up waits for the database to answer before giving up.
    #[serde(default = "default_connect_timeout", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Bound of every round trip: the server cancels a statement running longer, and the
    /// service drops a connection that does not answer a unit of work within it.
    #[serde(default = "default_query_timeout", deserialize_with = "de_duration")]
    pub query_timeout: Duration,
    /// Size of the separate pool of background work (ingest, reconciler, outbox relay,
    /// pruning), so it never holds the connections of requests (`max_connections`).
    #[serde(default = "default_background_connections")]
    pub background_connections: u32,
}

fn default_query_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_background_connections() -> u32 {
    4
}

/// RabbitMQ topology and consumer settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RabbitMq {
    /// AMQP URL; may carry a password, so it is never logged.
    pub url: SecretString,
    /// Topic exchange producers publish to.
    pub exchange: String,
    /// Queue this service consumes.
    pub queue: String,
    /// Binding of `queue` to `exchange`.
    pub binding_key: String,
    /// Unacknowledged deliveries in flight per consumer.
    pub prefetch: u16,
    /// Routing key of the status events this service publishes; must not match `binding_key`.
    pub status_routing_key: String,
    /// Fanout exchange of rejected events.
    pub dead_letter_exchange: String,
    /// Queue of rejected events.
    pub dead_letter_queue: String,
    /// Queue holding events for instances not created yet, for `retry_delay`, before
    /// they return to `queue`.
    pub retry_queue: String,
    /// How long such an event waits before it is tried again.
    #[serde(deserialize_with = "de_duration")]
    pub retry_delay: Duration,
    /// How often such an event is tried again before it is dead-lettered.
    pub max_retries: u32,
    /// Durable queue bound to `status_routing_key`, so status events are kept until
    /// someone reads them (and an unroutable publish is never mistaken for a sent one).
    pub status_queue: String,
    /// Most status events `status_queue` keeps; beyond it the oldest are dropped.
    pub status_queue_max_length: u32,
    /// How long `status_queue` keeps a status event nobody read.
    #[serde(deserialize_with = "de_duration")]
    pub status_queue_ttl: Duration,
    /// Most deliveries applied in one database transaction.
    pub batch_size: usize,
    /// Bound on connecting and on every declaration (a broker that does not answer must
    /// not hang the service).
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Heartbeat interval asked of the broker (unless the URL sets `heartbeat=`): a
    /// silent link is given up after two missed heartbeats.
    #[serde(deserialize_with = "de_duration")]
    pub heartbeat: Duration,
    /// How long processed event keys are remembered for de-duplication.
    #[serde(deserialize_with = "de_duration")]
    pub dedup_window: Duration,
    /// Start the consumer with `serve` (false: API only).
    pub consume: bool,
}

impl Default for RabbitMq {
    fn default() -> Self {
        Self {
            url: SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f"),
            exchange: "resource.events".into(),
            queue: "resource.instance-events".into(),
            binding_key: "instance.*".into(),
            prefetch: 1000,
            status_routing_key: "instance.status.changed".into(),
            dead_letter_exchange: "resource.events.dlx".into(),
            dead_letter_queue: "resource.instance-events.dead".into(),
            retry_queue: "resource.instance-events.retry".into(),
            retry_delay: Duration::from_secs(2),
            max_retries: 5,
            status_queue: "resource.instance-status".into(),
            status_queue_max_length: 100_000,
            status_queue_ttl: Duration::from_secs(24 * 3600),
            batch_size: 500,
            connect_timeout: Duration::from_secs(5),
            heartbeat: Duration::from_secs(10),
            dedup_window: Duration::from_secs(7 * 24 * 3600),
            consume: true,
        }
    }
}

/// The cluster that runs instances.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Kubernetes {
    /// `false`: no cluster is contacted and status lives in the database only.
    pub enabled: bool,
    /// Kubeconfig file; empty means in-cluster configuration.
    pub kubeconfig: String,
    /// Namespace of the instances' Pods and Services.
    pub namespace: String,
    /// Node selector of each GPU type, by type code ("1" … "6").
    pub gpu_node_selectors: BTreeMap<String, BTreeMap<String, String>>,
    /// Instances reconciled at the same time.
    pub concurrency: usize,
    /// Most cluster writes (apply, delete) per second, per replica.
    pub api_qps: u32,
    /// How often instances waiting for the cluster are looked up.
    #[serde(deserialize_with = "de_duration")]
    pub poll_interval: Duration,
    /// How often every instance is compared with the cluster.
    #[serde(deserialize_with = "de_duration")]
    pub resync_interval: Duration,
    /// How long a replica holds an instance while reconciling it.
    #[serde(deserialize_with = "de_duration")]
    pub lease_ttl: Duration,
    /// The API server ends each watch after this long and it is resumed where it
    /// stopped; a watch that sends nothing for 5 s longer is hung, and is replaced.
    #[serde(deserialize_with = "de_duration")]
    pub watch_restart: Duration,
    /// Create the namespace when it is missing (at start-up, and again if it is deleted).
    pub create_namespace: bool,
    /// Bound of every cluster call but watches.
    #[serde(deserialize_with = "de_duration")]
    pub call_timeout: Duration,
    /// Longest wait between two tries of an instance whose reconcile fails.
    #[serde(deserialize_with = "de_duration")]
    pub backoff_max: Duration,
    /// How often the namespace is checked (and whether the API server answers at rest).
    #[serde(deserialize_with = "de_duration")]
    pub namespace_check: Duration,
}

impl Default for Kubernetes {
    fn default() -> Self {
        // The GPU table of SPEC §3, as the labels NVIDIA's GPU feature discovery sets.
        let gpu = |product: &str| {
            BTreeMap::from([("nvidia.com/gpu.product".to_owned(), product.to_owned())])
        };
        Self {
            enabled: false,
            kubeconfig: String::new(),
            namespace: "resource-instances".into(),
            gpu_node_selectors: BTreeMap::from([
                ("1".to_owned(), gpu("Tesla-V100")),
                ("2".to_owned(), gpu("Tesla-A100")),
                ("3".to_owned(), gpu("Tesla-H100")),
                ("4".to_owned(), gpu("Tesla-T4")),
                ("5".to_owned(), gpu("NVIDIA-GeForce-RTX-3090")),
                ("6".to_owned(), gpu("NVIDIA-GeForce-RTX-4060-Laptop-GPU")),
            ]),
            concurrency: 16,
            api_qps: 50,
            poll_interval: Duration::from_millis(500),
            resync_interval: Duration::from_secs(60),
            lease_ttl: Duration::from_secs(30),
            watch_restart: Duration::from_secs(15),
            create_namespace: true,
            call_timeout: Duration::from_secs(10),
            backoff_max: Duration::from_secs(30),
            namespace_check: Duration::from_secs(5),
        }
    }
}

/// Bounds of instance specs and names.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Most CPU cores per instance.
    pub max_cpu: i32,
    /// Most memory per instance, in MB.
    pub max_memory_mb: i32,
    /// Longest instance name, in characters.
    pub max_name_length: usize,
    /// Deepest nesting of `config_json` (the object itself is depth 1).
    pub max_config_depth: usize,
    /// Largest `config_json`, in bytes of compact JSON.
    pub max_config_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_cpu: 128,
            max_memory_mb: 1_048_576,
            max_name_length: 128,
            max_config_depth: 32,
            max_config_bytes: 64 * 1024,
        }
    }
}

/// What owners and the fleet may hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Quota {
    /// Limits of every owner without limits of their own; 0 or absent is unlimited.
    pub per_user: PerUserQuota,
    /// Most live instances per GPU type code (`"2": 100`), fleet-wide; an absent type is
    /// unlimited.
    pub gpu_capacity: BTreeMap<String, i64>,
}

/// Default limits of one owner; 0 is unlimited.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
pub struct PerUserQuota {
    /// Most live instances.
    pub instances: i64,
    /// Most CPU cores.
    pub cpu: i64,
    /// Most memory, MB.
    pub memory_mb: i64,
    /// Most GPUs.
    pub gpus: i64,
}

/// Caller authentication.
#[derive(Debug, Clone, Deserialize)]
pub struct Auth {
    /// Must be set explicitly.
    pub mode: AuthMode,
    /// Bearer token verification, for `mode: jwt`.
    #[serde(default)]
    pub jwt: Jwt,
}

/// How bearer JWTs are verified. The secret comes from `RESOURCE_AUTH__JWT__SECRET` or
/// `secret_file` (a mounted secret), never necessarily from the YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Jwt {
    /// `HS256` (shared secret) or `RS256` (public key).
    pub algorithm: String,
    /// The HS256 secret.
    pub secret: SecretString,
    /// A file holding the HS256 secret (wins over `secret`).
    pub secret_file: String,
    /// PEM file of the RS256 public key.
    pub public_key_file: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(deserialize_with = "de_duration")]
    pub leeway: Duration,
    /// Audiences this service answers to (a string or a list): a token's `aud` must
    /// contain one of them. Empty: `aud` is not checked.
    #[serde(deserialize_with = "de_string_list")]
    pub audience: Vec<String>,
    /// The issuer a token's `iss` must equal. Empty: `iss` is not checked.
    pub issuer: String,
    /// Where the caller's roles are in the token: a claim name or a dotted path
    /// (`realm_access.roles`, `https://example.com/roles`), holding a string or a list.
    pub roles_claim: String,
    /// The role that sees and acts on every instance.
    pub admin_role: String,
}

impl Default for Jwt {
    fn default() -> Self {
        Self {
            algorithm: "HS256".into(),
            secret: SecretString::from(String::new()),
            secret_file: String::new(),
            public_key_file: String::new(),
            leeway: Duration::from_secs(30),
            audience: Vec::new(),
            issuer: String::new(),
            roles_claim: "role".into(),
            admin_role: "admin".into(),
        }
    }
}

/// How callers authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No authentication: every caller is trusted. Logged as a warning at start-up.
    None,
    /// Bearer JWTs.
    Jwt,
}

/// WatchResources streams and the change log they read.
#[derive(Debug, Clone, Deserialize)]
pub struct Watch {
    /// How long the change log keeps a change: a resume token older than this is
    /// RESUME_TOKEN_EXPIRED.
    #[serde(default = "default_watch_retention", deserialize_with = "de_duration")]
    pub retention: Duration,
    /// How long a stream may stay silent before it carries a heartbeat (proxies close
    /// idle connections).
    #[serde(default = "default_watch_heartbeat", deserialize_with = "de_duration")]
    pub heartbeat: Duration,
    /// Most streams open at once on a replica; one more is SERVICE_UNAVAILABLE.
    #[serde(default = "default_max_watchers")]
    pub max_watchers: usize,
}

fn default_watch_retention() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_watch_heartbeat() -> Duration {
    Duration::from_secs(15)
}

fn default_max_watchers() -> usize {
    10_000
}

impl Default for Watch {
    fn default() -> Self {
        Self {
            retention: default_watch_retention(),
            heartbeat: default_watch_heartbeat(),
            max_watchers: default_max_watchers(),
        }
    }
}

impl From<&Watch> for crate::biz::WatchConf {
    fn from(conf: &Watch) -> Self {
        Self {
            retention: conf.retention,
            heartbeat: conf.heartbeat,
            max_watchers: conf.max_watchers,
        }
    }
}

/// Instance id generation.
#[derive(Debug, Clone, Deserialize)]
pub struct Snowflake {
    /// `auto` or a fixed node id.
    #[serde(default)]
    pub node_id: NodeId,
    /// How long a leased node id stays this replica's without renewal (it is renewed
    /// every third of it); a replica that cannot renew in time stops.
    #[serde(default = "default_lease_ttl", deserialize_with = "de_duration")]
    pub lease_ttl: Duration,
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(60)
}

impl Default for Snowflake {
    fn default() -> Self {
        Self { node_id: NodeId::Auto, lease_ttl: default_lease_ttl() }
    }
}

/// Snowflake node id: leased automatically or fixed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NodeId {
    /// Leased from PostgreSQL, unique per running replica.
    #[default]
    Auto,
    /// Fixed, 0..=1023.
    Fixed(u16),
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = StringOrInt::deserialize(d)?.0;
        if raw.eq_ignore_ascii_case("auto") {
            return Ok(NodeId::Auto);
        }
        match raw.parse::<u16>() {
            Ok(n) if n < 1024 => Ok(NodeId::Fixed(n)),
            _ => Err(serde::de::Error::custom(format!(
                "expected \"auto\" or a node id in 0..=1023, got {raw:?}"
            ))),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Log {
    /// `tracing` filter directives (overridden by `RUST_LOG`).
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
    /// OTLP/HTTP collector (e.g. `http://otel-collector:4318`) that receives the spans;
    /// empty: no trace export.
    pub otlp_endpoint: String,
}

impl Default for Log {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text, otlp_endpoint: String::new() }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Why the configuration could not be loaded; displayed as one line.
#[derive(Debug)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Loads `dir/*.yaml` (in name order, later files override earlier ones) and the
/// process environment's `RESOURCE_…` overrides.
///
/// # Errors
/// `ConfigError` naming the file or key at fault.
pub fn load(dir: &Path) -> Result<Bootstrap, ConfigError> {
    load_with_env(dir, std::env::vars().collect())
}

/// [`load`] with an explicit environment, so tests need not touch the process's.
///
/// # Errors
/// `ConfigError` naming the file or key at fault.
pub fn load_with_env(dir: &Path, env: HashMap<String, String>) -> Result<Bootstrap, ConfigError> {
    let files = yaml_files(dir)?;
    let mut builder = config::Config::builder();
    for file in &files {
        // Parse each file on its own first, so a syntax error names its file.
        config::Config::builder()
            .add_source(config::File::from(file.as_path()).format(config::FileFormat::Yaml))
            .build()
            .map_err(|e| ConfigError(format!("{}: {}", file.display(), one_line(&e))))?;
        builder =
            builder.add_source(config::File::from(file.as_path()).format(config::FileFormat::Yaml));
    }
    let env_source = config::Environment::with_prefix("RESOURCE")
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
        .source(Some(env.into_iter().collect()));
    let merged = builder
        .add_source(env_source)
        .build()
        .map_err(|e| ConfigError(format!("{}: {}", dir.display(), one_line(&e))))?;
    let mut unknown_keys = Vec::new();
    let mut conf: Bootstrap = serde_ignored::deserialize(merged, |path| {
        unknown_keys.push(path.to_string());
    })
    .map_err(|e| {
        ConfigError(format!(
            "{} (in {}/*.yaml or RESOURCE_* environment)",
            one_line(&e),
            dir.display()
        ))
    })?;
    unknown_keys.sort();
    conf.unknown_keys = unknown_keys;
    conf.validate().map_err(|e| ConfigError(format!("{e} (in {}/*.yaml)", dir.display())))?;
    Ok(conf)
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| ConfigError(format!("config directory {}: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ConfigError(format!("config directory {}: no *.yaml file", dir.display())));
    }
    Ok(files)
}

fn one_line(e: &dyn fmt::Display) -> String {
    e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Bootstrap {
    /// Checks the rules serde cannot express.
    ///
    /// # Errors
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let db = &self.data.database;
        if !matches!(db.driver.as_str(), "postgres" | "postgresql") {
            return Err(format!(
                "data.database.driver: expected \"postgres\" or \"postgresql\", got {:?}",
                db.driver
            ));
        }
        let source = db.source.expose_secret();
        if !(source.starts_with("postgres://") || source.starts_with("postgresql://")) {
            return Err("data.database.source: expected a postgres:// URL".into());
        }
        if db.max_connections == 0 || db.background_connections == 0 {
            return Err(
                "data.database.max_connections and background_connections: must be at least 1"
                    .into(),
            );
        }
        if db.query_timeout < Duration::from_millis(100) {
            return Err("data.database.query_timeout: must be at least 100ms".into());
        }
        // PostgreSQL's statement_timeout (this) and idle_in_transaction_session_timeout
        // (twice this) are 32-bit milliseconds.
        if db.query_timeout.as_millis() > u128::from(i32::MAX.unsigned_abs() / 2) {
            return Err("data.database.query_timeout: out of range (at most 298h)".into());
        }
        // Pruning computes now - dedup_window as a timestamp.
        if self.data.rabbitmq.dedup_window > Duration::from_secs(100 * 365 * 24 * 3600) {
            return Err("data.rabbitmq.dedup_window: out of range (at most 100 years)".into());
        }
        let c = &self.server.connections;
        if c.max == 0
            || c.max_streams == 0
            || [
                c.first_byte_timeout,
                c.header_read_timeout,
                c.keepalive_interval,
                c.keepalive_timeout,
            ]
            .iter()
            .any(Duration::is_zero)
            || self.server.http.body_timeout.is_zero()
        {
            return Err("server.connections (max, max_streams and every timeout) and \
                 server.http.body_timeout must be greater than zero"
                .into());
        }
        if self.server.http.timeout.is_zero() {
            return Err("server.http.timeout: must be greater than zero".into());
        }
        if self.server.grpc.timeout.is_zero() {
            return Err("server.grpc.timeout: must be greater than zero".into());
        }
        let mq = &self.data.rabbitmq;
        if topic_matches(&mq.binding_key, &mq.status_routing_key) {
            return Err(format!(
                "data.rabbitmq.status_routing_key: {:?} matches binding_key {:?}, so the service would consume its own status events",
                mq.status_routing_key, mq.binding_key
            ));
        }
        if mq.prefetch == 0 {
            return Err("data.rabbitmq.prefetch: must be at least 1".into());
        }
        if mq.status_queue_max_length == 0 || mq.status_queue_ttl.is_zero() {
            return Err("data.rabbitmq.status_queue_max_length and status_queue_ttl must be greater than zero".into());
        }
        if mq.batch_size == 0 {
            return Err("data.rabbitmq.batch_size: must be at least 1".into());
        }
        let names = [&mq.queue, &mq.dead_letter_queue, &mq.retry_queue, &mq.status_queue];
        for (i, a) in names.iter().enumerate() {
            if a.is_empty() || names[i + 1..].contains(a) {
                return Err(format!(
                    "data.rabbitmq: queue names must be set and distinct (queue, dead_letter_queue, retry_queue, status_queue), got {a:?} twice or empty"
                ));
            }
        }
        let l = &self.limits;
        if l.max_cpu < 1
            || l.max_memory_mb < 1
            || l.max_name_length < 1
            || l.max_config_depth < 1
            || l.max_config_bytes < 2
        {
            return Err("limits: max_cpu, max_memory_mb, max_name_length and max_config_depth must be at least 1, max_config_bytes at least 2 (\"{}\")".into());
        }
        let q = &self.quota.per_user;
        if [q.instances, q.cpu, q.memory_mb, q.gpus].iter().any(|v| *v < 0) {
            return Err(
                "quota.per_user: instances, cpu, memory_mb and gpus must be 0 (unlimited) or more"
                    .into(),
            );
        }
        for (code, capacity) in &self.quota.gpu_capacity {
            // The code exactly as written ("2", not "02"): two spellings of one type
            // would otherwise both be accepted, and one of them silently lost.
            if !matches!(code.as_str(), "1" | "2" | "3" | "4" | "5" | "6") {
                return Err(format!("quota.gpu_capacity: {code:?} is not a GPU type code (1-6)"));
            }
            if *capacity < 0 {
                return Err(format!(
                    "quota.gpu_capacity.{code}: must be 0 or more, got {capacity}"
                ));
            }
        }
        let k8s = &self.data.kubernetes;
        if k8s.enabled {
            if k8s.namespace.is_empty() {
                return Err("data.kubernetes.namespace must not be empty".into());
            }
            if k8s.concurrency == 0 || k8s.api_qps == 0 {
                return Err("data.kubernetes.concurrency and api_qps must be at least 1".into());
            }
            for code in k8s.gpu_node_selectors.keys() {
                if !matches!(code.parse::<i32>(), Ok(1..=6)) {
                    return Err(format!(
                        "data.kubernetes.gpu_node_selectors: {code:?} is not a GPU type code (1-6)"
                    ));
                }
            }
        }
        let w = &self.watch;
        if w.retention < Duration::from_secs(60) {
            return Err("watch.retention: must be at least 1m".into());
        }
        if w.heartbeat < Duration::from_millis(100) || w.heartbeat > Duration::from_secs(300) {
            return Err("watch.heartbeat: must be between 100ms and 5m".into());
        }
        if w.max_watchers == 0 {
            return Err("watch.max_watchers: must be at least 1".into());
        }
        if self.snowflake.lease_ttl < Duration::from_secs(3) {
            return Err("snowflake.lease_ttl: must be at least 3s".into());
        }
        if self.auth.mode == AuthMode::Jwt {
            let jwt = &self.auth.jwt;
            match jwt.algorithm.as_str() {
                "HS256" if jwt.secret.expose_secret().is_empty() && jwt.secret_file.is_empty() => {
                    return Err(
                        "auth.jwt: HS256 needs RESOURCE_AUTH__JWT__SECRET or auth.jwt.secret_file"
                            .into(),
                    );
                }
                "RS256" if jwt.public_key_file.is_empty() => {
                    return Err("auth.jwt: RS256 needs auth.jwt.public_key_file".into());
                }
                "HS256" | "RS256" => {}
                other => {
                    return Err(format!("auth.jwt.algorithm {other:?}: expected HS256 or RS256"));
                }
            }
            if jwt.roles_claim.is_empty() || jwt.roles_claim.split('.').any(str::is_empty) {
                return Err(format!(
                    "auth.jwt.roles_claim {:?}: expected a claim name or a dotted path such as realm_access.roles",
                    jwt.roles_claim
                ));
            }
            if jwt.admin_role.is_empty() {
                return Err("auth.jwt.admin_role must not be empty".into());
            }
        }
        Ok(())
    }
}

/// AMQP topic matching: `*` is one word, `#` zero or more.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match (p.first(), k.first()) {
            (None, None) => true,
            (Some(&"#"), _) => go(&p[1..], k) || (!k.is_empty() && go(p, &k[1..])),
            (Some(&"*"), Some(_)) => go(&p[1..], &k[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &k[1..]),
            _ => false,
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    go(&p, &k)
}

fn default_max_body_bytes() -> usize {
    1 << 20
}
fn default_max_connections() -> u32 {
    16
}
fn default_true() -> bool {
    true
}
fn default_acquire_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(30)
}

/// A scalar read as a string (env overrides may arrive parsed as numbers).
struct StringOrInt(String);

impl<'de> Deserialize<'de> for StringOrInt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = StringOrInt;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StringOrInt, E> {
                Ok(StringOrInt(v.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<StringOrInt, E> {
                Ok(StringOrInt(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<StringOrInt, E> {
                Ok(StringOrInt(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<StringOrInt, E> {
                Ok(StringOrInt(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// One string or a list of them (an environment override is one string).
fn de_string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(StringOrInt),
        Many(Vec<StringOrInt>),
    }
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one.0],
        OneOrMany::Many(many) => many.into_iter().map(|s| s.0).collect(),
    };
    Ok(items.into_iter().filter(|s| !s.is_empty()).collect())
}

fn de_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let raw = StringOrInt::deserialize(d)?.0;
    parse_addr(&raw).map_err(serde::de::Error::custom)
}

/// Parses `host:port`, accepting Go's `:port` for all interfaces.
pub fn parse_addr(raw: &str) -> Result<SocketAddr, String> {
    let full = if raw.starts_with(':') { format!("0.0.0.0{raw}") } else { raw.to_owned() };
    full.parse().map_err(|_| format!("expected an address like 0.0.0.0:8000, got {raw:?}"))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let raw = StringOrInt::deserialize(d)?.0;
    parse_duration(&raw).map_err(serde::de::Error::custom)
}

/// Parses a Go-style duration: `1s`, `500ms`, `0.2s`, `1m30s`, `2h`.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let bad = || format!("expected a duration like 1s, 500ms or 1m30s, got {raw:?}");
    let s = raw.trim();
    if s.is_empty() {
        return Err(bad());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| format!("duration {raw:?} is out of range"))
}

impl From<&Limits> for crate::biz::Limits {
    fn from(conf: &Limits) -> Self {
        Self {
            max_cpu: conf.max_cpu,
            max_memory_mb: conf.max_memory_mb,
            max_name_len: conf.max_name_length,
            max_config_depth: conf.max_config_depth,
            max_config_bytes: conf.max_config_bytes,
        }
    }
}

impl From<&Quota> for crate::biz::QuotaConf {
    /// Keys and values are checked by `Bootstrap::validate`; an invalid one is skipped.
    fn from(conf: &Quota) -> Self {
        use crate::biz::quota::{Amounts, QuotaLimits};
        let p = conf.per_user;
        let mut gpu_capacity = [None; crate::biz::GpuType::ALL.len()];
        for (code, capacity) in &conf.gpu_capacity {
            if let Some(slot) =
                code.parse::<usize>().ok().filter(|c| *c > 0).and_then(|c| gpu_capacity.get_mut(c))
            {
                *slot = Some(*capacity);
            }
        }
        Self {
            per_user: QuotaLimits::from_amounts(Amounts {
                instances: p.instances,
                cpu: p.cpu,
                memory_mb: p.memory_mb,
                gpus: p.gpus,
            }),
            gpu_capacity,
        }
    }
}

impl From<&Kubernetes> for crate::biz::reconcile::ReconcileConf {
    fn from(conf: &Kubernetes) -> Self {
        Self {
            concurrency: conf.concurrency,
            poll_interval: conf.poll_interval,
            resync_interval: conf.resync_interval,
            lease_ttl: conf.lease_ttl,
            backoff_max: conf.backoff_max,
            namespace_check: conf.namespace_check,
        }
    }
}

#[cfg(test)]
mod tests;
