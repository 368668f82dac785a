//! The `resource` binary: command line, configuration, logging, and the wiring of
//! data → repositories → use cases → services → servers, by hand, in that order.

use std::{
    ffi::OsString, io::IsTerminal, path::PathBuf, process::ExitCode, sync::Arc, time::Duration,
};

use clap::{Parser, Subcommand};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use resource::{
    biz::{
        AuditRepo, AuditUsecase, GreeterUsecase, HealthUsecase, InstanceRepo, InstanceUsecase,
        Limits, OutboxRelay, OutboxRepo, Probe, StatusPublisher, snowflake::Snowflake,
    },
    conf::{self, AuthMode, LogFormat, NodeId},
    data::{
        AmqpStatusPublisher, Data, Db, PgAuditRepo, PgInstanceRepo, PgOutboxRepo, PgProbe,
        PgReconcileRepo,
    },
    publish::PublishArgs,
    server::{Servers, Services, mq::Consumer},
    service::{EventService, GreeterService, HealthService, ResourceService},
};
use resource::{
    biz::{
        GpuType,
        cluster::ClusterHealth,
        reconcile::{ReconcileConf, Reconciler},
    },
    data::kube::{self, KubeCluster, KubeSettings},
    data::snowflake::{LeaseEnd, NodeLease},
    server::auth::Authenticator,
};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

// mimalloc: the list path allocates per row and per field; glibc malloc showed up as
// ~15 % of the service's CPU in `make bench` profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for bad usage or configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit status when a dependency cannot be reached at start-up (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;
/// Exit status when the snowflake node lease was lost: start again (EX_TEMPFAIL).
const EXIT_LEASE_LOST: u8 = 75;

/// Manages cloud compute instances over gRPC, REST and RabbitMQ events.
#[derive(Debug, Parser)]
#[command(name = "resource", version, about)]
struct Cli {
    /// Directory of *.yaml configuration files (also `-conf DIR`, as the Go service took).
    #[arg(
        short = 'c',
        long = "conf",
        value_name = "DIR",
        default_value = "./configs",
        global = true
    )]
    conf: PathBuf,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gRPC and REST servers (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Publish the seed's sample event, events from a JSON file, or generated events.
    Publish(PublishArgs),
    /// Print the version and exit.
    Version,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(go_style_args(std::env::args_os())) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(EXIT_CONFIG) } else { ExitCode::SUCCESS };
        }
    };
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Version = command {
        println!("resource {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let conf = match conf::load(&cli.conf) {
        Ok(conf) => conf,
        Err(e) => {
            eprintln!("resource: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let traces = init_tracing(&conf.log);
    for key in &conf.unknown_keys {
        tracing::warn!(key = %key, "unknown configuration key ignored (misspelt?)");
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("resource: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match command {
            Command::Migrate => migrate(&conf).await,
            Command::Publish(args) => publish(&conf, &args).await,
            Command::Serve => serve(conf).await,
            Command::Version => unreachable!("handled above"),
        }
    });
    if let Some(provider) = traces
        && let Err(e) = provider.shutdown()
    {
        eprintln!("resource: flushing traces failed: {e}");
    }
    code
}

/// Rewrites the Go flag spelling `-conf DIR` / `-conf=DIR` to `--conf`, so operators'
/// scripts and the old Dockerfile keep working.
fn go_style_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    args.map(|arg| match arg.to_str() {
        Some("-conf") => OsString::from("--conf"),
        Some(s) if s.starts_with("-conf=") => OsString::from(format!("-{s}")),
        _ => arg,
    })
    .collect()
}

/// Logs to stdout as text or JSON and, with `log.otlp_endpoint`, exports spans over
/// OTLP/HTTP; the returned provider is shut down (flushed) on exit.
fn init_tracing(conf: &conf::Log) -> Option<SdkTracerProvider> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&conf.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let provider =
        (!conf.otlp_endpoint.is_empty()).then(|| tracer_provider(&conf.otlp_endpoint)).flatten();
    let otel =
        provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("resource")));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    match conf.format {
        LogFormat::Json => registry.with(fmt::layer().json().flatten_event(true)).init(),
        // Colours for a terminal only: not in a container's log or a file.
        LogFormat::Text => {
            registry.with(fmt::layer().with_ansi(std::io::stdout().is_terminal())).init();
        }
    }
    if provider.is_some() {
        tracing::info!(endpoint = %conf.otlp_endpoint, "exporting traces over OTLP/HTTP");
    }
    provider
}

fn tracer_provider(endpoint: &str) -> Option<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build();
    match exporter {
        Ok(exporter) => Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(Resource::builder().with_service_name("resource").build())
                .build(),
        ),
        Err(e) => {
            eprintln!("resource: OTLP trace export disabled: {e}");
            None
        }
    }
}

async fn connect(conf: &conf::Bootstrap) -> Result<Data, ExitCode> {
    Data::connect(&conf.data.database).await.map_err(|e| {
        tracing::error!(error = %e, "cannot reach the database");
        ExitCode::from(EXIT_UNAVAILABLE)
    })
}

async fn migrate(conf: &conf::Bootstrap) -> ExitCode {
    let data = match connect(conf).await {
        Ok(data) => data,
        Err(code) => return code,
    };
    match data.migrate().await {
        Ok(()) => {
            tracing::info!("migrations applied");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "migration failed");
            ExitCode::FAILURE
        }
    }
}

async fn publish(conf: &conf::Bootstrap, args: &PublishArgs) -> ExitCode {
    let messages = match resource::publish::messages(args) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("resource publish: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let started = std::time::Instant::now();
    let quiet = args.quiet;
    let result = resource::publish::publish(&conf.data.rabbitmq, &messages, args.rate, |m| {
        if !quiet {
            let line = serde_json::json!({
                "routing_key": m.routing_key,
                "content_type": m.content_type,
                "event": m.event,
            });
            println!("{line}");
        }
    })
    .await;
    match result {
        Ok(n) => {
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "resource publish: {n} event(s) confirmed by the broker in {secs:.2} s ({:.0}/s) to exchange {}",
                n as f64 / secs.max(1e-9),
                conf.data.rabbitmq.exchange
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("resource publish: {e}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

async fn serve(conf: conf::Bootstrap) -> ExitCode {
    if conf.auth.mode == AuthMode::None {
        tracing::warn!("auth.mode is none: every caller is trusted and sees every instance");
    }
    let metrics_handle = resource::server::metrics::install();
    let auth = match Authenticator::from_conf(&conf.auth) {
        Ok(auth) => Arc::new(auth),
        Err(e) => {
            eprintln!("resource: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown_signal().await;
            shutdown.cancel();
        }
    });

    // data
    let data = match connect(&conf).await {
        Ok(data) => data,
        Err(code) => return code,
    };
    if conf.data.database.migrate
        && let Err(e) = data.migrate().await
    {
        tracing::error!(error = %e, "migration failed");
        return ExitCode::FAILURE;
    }

    // repositories: requests and background work on pools of their own
    let instances: Arc<dyn InstanceRepo> = Arc::new(PgInstanceRepo::new(data.requests().clone()));
    let background_instances: Arc<dyn InstanceRepo> =
        Arc::new(PgInstanceRepo::new(data.background().clone()));
    let outbox: Arc<dyn OutboxRepo> =
        Arc::new(PgOutboxRepo::new(data.background().clone(), uuid::Uuid::new_v4().to_string()));
    let audits: Arc<dyn AuditRepo> = Arc::new(PgAuditRepo::new(data.requests().clone()));
    let publisher: Arc<dyn StatusPublisher> =
        Arc::new(AmqpStatusPublisher::new(conf.data.rabbitmq.clone()));

    // use cases
    let limits = Limits {
        max_cpu: conf.limits.max_cpu,
        max_memory_mb: conf.limits.max_memory_mb,
        max_name_len: conf.limits.max_name_length,
        max_config_depth: conf.limits.max_config_depth,
        max_config_bytes: conf.limits.max_config_bytes,
    };
    let (node, lease) = match conf.snowflake.node_id {
        NodeId::Fixed(node) => (node, None),
        NodeId::Auto => {
            let owner = uuid::Uuid::new_v4().to_string();
            match NodeLease::acquire(data.lease_pool(), owner, conf.snowflake.lease_ttl).await {
                Ok(lease) => {
                    tracing::info!(node = lease.node(), "snowflake node id leased");
                    (lease.node(), Some(Arc::new(lease)))
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot lease a snowflake node id");
                    return ExitCode::from(EXIT_UNAVAILABLE);
                }
            }
        }
    };
    let ids = Arc::new(Snowflake::new(node));
    let cluster_enabled = conf.data.kubernetes.enabled;
    let instance_uc =
        Arc::new(InstanceUsecase::new(instances, limits, cluster_enabled, ids.clone()));
    let background_uc =
        Arc::new(InstanceUsecase::new(background_instances, limits, cluster_enabled, ids));
    let audit_uc = Arc::new(AuditUsecase::new(audits));
    let relay = OutboxRelay::new(outbox.clone(), publisher);

    // services
    let events = Arc::new(EventService::new(background_uc.clone()));
    let consumer =
        conf.data.rabbitmq.consume.then(|| Consumer::new(conf.data.rabbitmq.clone(), events));
    let mut probes: Vec<Arc<dyn Probe>> = vec![Arc::new(PgProbe::new(data.requests().clone()))];
    if let Some(consumer) = &consumer {
        probes.push(Arc::new(consumer.probe()));
    }
    let reconciler = if conf.data.kubernetes.enabled {
        match reconciler(&conf.data.kubernetes, background_uc, data.background().clone()).await {
            Ok(reconciler) => {
                probes.push(reconciler.health());
                Some(reconciler)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reach the Kubernetes cluster");
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        }
    } else {
        None
    };
    let health_uc = Arc::new(HealthUsecase::new(probes, Duration::from_secs(1)));
    let services = Services {
        resource: Arc::new(ResourceService::new(instance_uc, audit_uc)),
        greeter: Arc::new(GreeterService::new(GreeterUsecase)),
        health: HealthService::new(health_uc),
        auth,
        metrics: metrics_handle.clone(),
    };

    // servers and background work
    tokio::spawn(resource::server::metrics::upkeep(metrics_handle, shutdown.clone()));
    tokio::spawn(sample_gauges(data.clone(), shutdown.clone()));
    let servers = match Servers::bind(&conf.server, services).await {
        Ok(servers) => servers,
        Err(e) => {
            tracing::error!(error = %e, "cannot bind the listeners");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let consuming = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            if let Some(consumer) = consumer {
                consumer.run(shutdown).await;
            }
        }
    });
    let relaying = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown.cancelled_owned()).await }
    });
    let reconciling = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            if let Some(reconciler) = reconciler {
                reconciler.run(shutdown).await;
            }
        }
    });
    let leasing = tokio::spawn({
        let (lease, shutdown) = (lease.clone(), shutdown.clone());
        async move {
            match lease {
                Some(lease) => lease.keep(&shutdown).await,
                None => LeaseEnd::Shutdown,
            }
        }
    });
    let pruning = tokio::spawn(prune_processed_events(
        outbox,
        conf.data.rabbitmq.dedup_window,
        shutdown.clone(),
    ));
    // In-flight requests finish after SIGTERM, within server.shutdown_timeout: an HTTP/2
    // connection that stays open (hyper#4170) cannot hold the process past it.
    let deadline = {
        let (shutdown, timeout) = (shutdown.clone(), conf.server.shutdown_timeout);
        async move {
            shutdown.cancelled().await;
            tokio::time::sleep(timeout).await;
        }
    };
    let served = tokio::select! {
        served = servers.serve(shutdown.clone().cancelled_owned()) => served,
        () = deadline => {
            tracing::warn!(timeout = ?conf.server.shutdown_timeout, "connections still open at the shutdown deadline; closing them");
            Ok(())
        }
    };
    shutdown.cancel();
    // Background work stops at the next batch boundary; bounded by the same deadline.
    let background = async { tokio::join!(consuming, relaying, reconciling, pruning, leasing) };
    let lease_end = match tokio::time::timeout(conf.server.shutdown_timeout, background).await {
        Ok((.., leasing)) => leasing.unwrap_or(LeaseEnd::Shutdown),
        Err(_) => {
            tracing::warn!("background work still running at the shutdown deadline; leaving it");
            LeaseEnd::Shutdown
        }
    };
    if let Some(lease) = lease
        && lease_end == LeaseEnd::Shutdown
        && let Err(e) = lease.release().await
    {
        tracing::warn!(error = %e, "could not release the snowflake node id; it expires");
    }
    match served {
        // Its orchestrator starts it again, with a node id of its own.
        Ok(()) if lease_end == LeaseEnd::Lost => ExitCode::from(EXIT_LEASE_LOST),
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

/// How long past a watch's server-side end the client waits for bytes before it calls
/// the watch hung.
const WATCH_READ_MARGIN: Duration = Duration::from_secs(5);

/// The reconciler over the cluster `conf` names (the namespace is created if missing).
async fn reconciler(
    conf: &conf::Kubernetes,
    instances: Arc<InstanceUsecase>,
    db: Db,
) -> Result<Arc<Reconciler>, resource::biz::BoxError> {
    let client = kube::client(&conf.kubeconfig, conf.watch_restart + WATCH_READ_MARGIN).await?;
    let gpu_node_selectors = conf
        .gpu_node_selectors
        .iter()
        .filter_map(|(code, selector)| {
            let gpu = GpuType::from_code(code.parse().ok()?)?;
            Some((gpu, selector.clone()))
        })
        .collect();
    let settings = KubeSettings {
        namespace: conf.namespace.clone(),
        create_namespace: conf.create_namespace,
        gpu_node_selectors,
        api_qps: conf.api_qps,
        call_timeout: conf.call_timeout,
        watch_timeout: conf.watch_restart,
        backoff_max: conf.backoff_max,
    };
    let health =
        Arc::new(ClusterHealth::new(&kube::WATCHED, conf.watch_restart + 2 * WATCH_READ_MARGIN));
    let cluster = KubeCluster::new(client, settings, health.clone());
    cluster.connect().await?;
    let reconcile = ReconcileConf {
        concurrency: conf.concurrency,
        poll_interval: conf.poll_interval,
        resync_interval: conf.resync_interval,
        lease_ttl: conf.lease_ttl,
        backoff_max: conf.backoff_max,
        namespace_check: conf.namespace_check,
    };
    let owner = uuid::Uuid::new_v4().to_string();
    tracing::info!(namespace = %conf.namespace, owner, "reconciling instances with the cluster");
    Ok(Arc::new(Reconciler::new(
        instances,
        Arc::new(PgReconcileRepo::new(db)),
        Arc::new(cluster),
        health,
        reconcile,
        owner,
    )))
}

/// Samples the database pools and the outbox backlog into gauges every 5 s.
async fn sample_gauges(data: Data, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        data.sample_gauges().await;
        if let Some(rss) = resident_memory_bytes() {
            metrics::gauge!("process_resident_memory_bytes").set(rss);
        }
    }
}

/// Resident memory of this process (Linux `/proc/self/statm`, 4 KiB pages).
fn resident_memory_bytes() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0)
}

/// Forgets processed event keys older than the de-duplication window, hourly.
async fn prune_processed_events(
    outbox: Arc<dyn OutboxRepo>,
    window: Duration,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let before = chrono::Utc::now() - chrono::Duration::from_std(window).unwrap_or_default();
        match outbox.prune_processed_events(before).await {
            Ok(n) if n > 0 => tracing::info!(pruned = n, "forgot old processed event keys"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning processed event keys failed"),
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
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
