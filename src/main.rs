//! The `resource` binary: parses the command line, loads the configuration, starts
//! telemetry, and wires data → repositories → use cases → services → servers by hand,
//! in that order.

use std::{process::ExitCode, sync::Arc, time::Duration};

use resource::{
    biz::{
        AuditUsecase, GreeterUsecase, HealthUsecase, InstanceUsecase, OutboxRelay, Probe,
        QuotaUsecase, WatchHub, WatchUsecase,
        explain::{ClusterEvidence, ExplainUsecase},
        reconcile::Reconciler,
        snowflake::Snowflake,
        watch::ChangeLog,
    },
    cli::{Cli, Command, EXIT_CONFIG, EXIT_FAILURE, EXIT_LEASE_LOST, EXIT_UNAVAILABLE},
    conf::{self, AuthMode},
    data::{
        AmqpStatusPublisher, Data, PgAuditRepo, PgChangeLog, PgInstanceRepo, PgOutboxRepo, PgProbe,
        PgQuotaRepo, PgReconcileRepo, Ticker,
        kube::KubeCluster,
        snowflake::{LeaseEnd, NodeIds},
    },
    publish::{self, PublishError},
    server::{Servers, Services, auth::Authenticator, metrics, mq::Consumer},
    service::{EventService, GreeterService, HealthService, ResourceService},
    shutdown::{self, Background},
    telemetry::Telemetry,
};

// mimalloc: the list path allocates per row and per field; glibc malloc showed up as
// ~15 % of the service's CPU in `make bench` profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::parse_args(std::env::args_os()) {
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
        Err(e) => return fail(EXIT_CONFIG, format!("invalid configuration: {e}")),
    };
    let telemetry = Telemetry::init(&conf.log);
    for key in &conf.unknown_keys {
        tracing::warn!(key = %key, "unknown configuration key ignored (misspelt?)");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(EXIT_FAILURE, format!("cannot start the async runtime: {e}")),
    };
    let code = runtime.block_on(async {
        match command {
            Command::Migrate => migrate(&conf).await,
            Command::Publish(args) => match publish::run(&conf.data.rabbitmq, &args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("resource publish: {e}");
                    let unavailable = matches!(e, PublishError::Broker(_));
                    ExitCode::from(if unavailable { EXIT_UNAVAILABLE } else { EXIT_CONFIG })
                }
            },
            Command::Serve => serve(conf).await,
            Command::Version => unreachable!("handled above"),
        }
    });
    telemetry.shutdown();
    code
}

/// Says why on stderr and exits with `code`.
fn fail(code: u8, why: String) -> ExitCode {
    eprintln!("resource: {why}");
    ExitCode::from(code)
}

/// Logs why and exits with `code`.
fn failed(code: u8, what: &str, error: &dyn std::fmt::Display) -> ExitCode {
    tracing::error!(error = %error, "{what}");
    ExitCode::from(code)
}

async fn migrate(conf: &conf::Bootstrap) -> ExitCode {
    let data = match Data::connect(&conf.data.database).await {
        Ok(data) => data,
        Err(e) => return failed(EXIT_UNAVAILABLE, "cannot reach the database", &e),
    };
    match data.migrate().await {
        Ok(()) => {
            tracing::info!("migrations applied");
            ExitCode::SUCCESS
        }
        Err(e) => failed(EXIT_FAILURE, "migration failed", &e),
    }
}

async fn serve(conf: conf::Bootstrap) -> ExitCode {
    if conf.auth.mode == AuthMode::None {
        tracing::warn!("auth.mode is none: every caller is trusted and sees every instance");
    }
    let auth = match Authenticator::from_conf(&conf.auth) {
        Ok(auth) => Arc::new(auth),
        Err(e) => return fail(EXIT_CONFIG, format!("invalid configuration: {e}")),
    };
    let metrics = metrics::install();
    let shutdown = shutdown::on_signal();

    // data
    let data = match Data::connect(&conf.data.database).await {
        Ok(data) => data,
        Err(e) => return failed(EXIT_UNAVAILABLE, "cannot reach the database", &e),
    };
    if conf.data.database.migrate
        && let Err(e) = data.migrate().await
    {
        return failed(EXIT_FAILURE, "migration failed", &e);
    }
    let node_ids = match NodeIds::take(&conf.snowflake, &data).await {
        Ok(node_ids) => Arc::new(node_ids),
        Err(e) => return failed(EXIT_UNAVAILABLE, "cannot lease a snowflake node id", &e),
    };
    let cluster = if conf.data.kubernetes.enabled {
        match KubeCluster::start(&conf.data.kubernetes).await {
            Ok((cluster, health)) => Some((Arc::new(cluster), health)),
            Err(e) => return failed(EXIT_UNAVAILABLE, "cannot reach the Kubernetes cluster", &e),
        }
    } else {
        None
    };

    // repositories: API requests and background work on pools of their own; every
    // commit that changes instances wakes the change log's ticker
    let changed = Arc::new(tokio::sync::Notify::new());
    let instances =
        Arc::new(PgInstanceRepo::new(data.requests().clone()).signalling(changed.clone()));
    let background_instances =
        PgInstanceRepo::new(data.background().clone()).signalling(changed.clone());
    let changes = Arc::new(PgChangeLog::new(data.requests().clone()));
    let bounds = match changes.bounds().await {
        Ok(bounds) => bounds,
        Err(e) => return failed(EXIT_UNAVAILABLE, "cannot read the change log", &e),
    };
    let claimer = uuid::Uuid::new_v4().to_string();
    let outbox = Arc::new(PgOutboxRepo::new(data.background().clone(), claimer));
    let audits = Arc::new(PgAuditRepo::new(data.requests().clone()));
    let publisher = Arc::new(AmqpStatusPublisher::new(conf.data.rabbitmq.clone()));
    let reconciles = Arc::new(PgReconcileRepo::new(data.background().clone()));
    let quotas = Arc::new(PgQuotaRepo::new(data.requests().clone()));

    // use cases
    let (limits, ids) = ((&conf.limits).into(), Arc::new(Snowflake::new(node_ids.node())));
    let (with_cluster, quota) = (cluster.is_some(), (&conf.quota).into());
    let instance_uc = Arc::new(
        InstanceUsecase::new(instances, limits, with_cluster, ids.clone()).with_quota(quota),
    );
    let background_uc = Arc::new(
        InstanceUsecase::new(Arc::new(background_instances.clone()), limits, with_cluster, ids)
            .with_quota(quota),
    );
    let quota_uc = Arc::new(QuotaUsecase::new(quotas, quota));
    let audit_uc = Arc::new(AuditUsecase::new(audits));
    let hub = WatchHub::new(bounds, shutdown.clone());
    let watch_uc = Arc::new(WatchUsecase::new(changes, hub.clone(), (&conf.watch).into()));
    let ticker =
        Ticker::new(data.background().clone(), data.own_pool(), hub, changed, conf.watch.retention);
    let relay = OutboxRelay::new(outbox, publisher);
    // An explanation waits for the cluster at most half a request's time, so that a
    // stalled cluster is said in the answer rather than answered 504 / DEADLINE_EXCEEDED.
    let explain_wait = (conf.server.http.timeout.min(conf.server.grpc.timeout) / 2)
        .min(conf.data.kubernetes.call_timeout);
    let evidence = cluster.as_ref().map(|(c, _)| c.clone() as Arc<dyn ClusterEvidence>);
    let explain_uc = Arc::new(ExplainUsecase::new(evidence, explain_wait));
    let reconciler = cluster.map(|(cluster, health)| {
        let owner = uuid::Uuid::new_v4().to_string();
        tracing::info!(namespace = %conf.data.kubernetes.namespace, owner, "reconciling instances with the cluster");
        let pacing = (&conf.data.kubernetes).into();
        let uc = background_uc.clone();
        Arc::new(Reconciler::new(uc, reconciles, cluster, health, pacing, owner))
    });

    // services
    let events = Arc::new(EventService::new(background_uc));
    let consumer =
        conf.data.rabbitmq.consume.then(|| Consumer::new(conf.data.rabbitmq.clone(), events));
    let mut probes: Vec<Arc<dyn Probe>> = vec![Arc::new(PgProbe::new(data.requests().clone()))];
    probes.extend(consumer.as_ref().map(|c| Arc::new(c.probe()) as Arc<dyn Probe>));
    probes.extend(reconciler.as_ref().map(|r| r.health() as Arc<dyn Probe>));
    let services = Services {
        resource: Arc::new(
            ResourceService::new(instance_uc, audit_uc, quota_uc.clone(), watch_uc)
                .with_explain(explain_uc),
        ),
        greeter: Arc::new(GreeterService::new(GreeterUsecase)),
        health: HealthService::new(Arc::new(HealthUsecase::new(probes, Duration::from_secs(1)))),
        auth,
        metrics: metrics.clone(),
    };

    // servers and background work, until SIGTERM (each loop stops at its next boundary)
    let servers = match Servers::bind(&conf.server, services).await {
        Ok(servers) => servers,
        Err(e) => return failed(EXIT_UNAVAILABLE, "cannot bind the listeners", &e),
    };
    let mut background = Background::default();
    background.spawn(metrics::upkeep(metrics, shutdown.clone()));
    background.spawn(ticker.run(shutdown.clone()));
    background.spawn(data.clone().keep_gauges(shutdown.clone()));
    background.spawn((*quota_uc).clone().keep_gauges(Duration::from_secs(5), shutdown.clone()));
    let window = conf.data.rabbitmq.dedup_window;
    background.spawn(background_instances.prune_processed_events(window, shutdown.clone()));
    background.spawn({
        let stop = shutdown.clone().cancelled_owned();
        async move { relay.run(stop).await }
    });
    if let Some(consumer) = consumer {
        background.spawn(consumer.run(shutdown.clone()));
    }
    if let Some(reconciler) = reconciler {
        background.spawn(reconciler.run(shutdown.clone()));
    }
    let leasing = tokio::spawn({
        let (node_ids, shutdown) = (node_ids.clone(), shutdown.clone());
        async move { node_ids.keep(&shutdown).await }
    });
    // In-flight requests finish after SIGTERM, within server.shutdown_timeout: an HTTP/2
    // connection that stays open (hyper#4170) cannot hold the process past it.
    let grace = conf.server.shutdown_timeout;
    let served = shutdown::with_grace(servers.serve(shutdown.clone().cancelled_owned()), &shutdown, grace)
        .await
        .unwrap_or_else(|| {
            tracing::warn!(timeout = ?grace, "connections still open at the shutdown deadline; closing them");
            Ok(())
        });
    shutdown.cancel();
    // Background work stops at the next batch boundary; bounded by the same deadline.
    let stopped = async {
        background.join().await;
        leasing.await.unwrap_or(LeaseEnd::Shutdown)
    };
    let lease_end = tokio::time::timeout(grace, stopped).await.unwrap_or_else(|_| {
        tracing::warn!("background work still running at the shutdown deadline; leaving it");
        LeaseEnd::Shutdown
    });
    node_ids.release(lease_end).await;
    match served {
        // Its orchestrator starts it again, with a node id of its own.
        Ok(()) if lease_end == LeaseEnd::Lost => ExitCode::from(EXIT_LEASE_LOST),
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => failed(EXIT_FAILURE, "server failed", &e),
    }
}
