//! Transports: the gRPC and REST servers over one service layer, started and stopped
//! together.
//!
//! Depends on `service`, `pb` and `conf`, and on `biz` for its error types, the limits
//! `openapi` publishes and the reconnect `Backoff`; never on use cases, repositories or
//! `data`.

pub mod auth;
pub mod codec;
pub mod conn;
pub mod edge;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod mq;
pub mod openapi;
pub mod status;

use std::{future::Future, net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::{
    LatencyUnit,
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer},
};
use tracing::Level;

use crate::{
    biz::BoxError,
    conf,
    pb::{self, helloworld::v1 as hello, resource::v1 as res},
    service::{GreeterService, HealthService, ResourceService},
};

/// The services the transports expose.
#[derive(Clone)]
pub struct Services {
    /// The instance API.
    pub resource: Arc<ResourceService>,
    /// The greeter.
    pub greeter: Arc<GreeterService>,
    /// Readiness.
    pub health: HealthService,
    /// Who callers are.
    pub auth: Arc<auth::Authenticator>,
    /// Renders `GET /metrics`.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

/// Both listeners, bound and ready to serve.
pub struct Servers {
    conf: conf::Server,
    services: Services,
    http: TcpListener,
    grpc: TcpListener,
}

impl Servers {
    /// Binds `server.http.addr` and `server.grpc.addr` (port 0 picks a free port).
    ///
    /// # Errors
    /// The address cannot be bound.
    pub async fn bind(conf: &conf::Server, services: Services) -> std::io::Result<Self> {
        let http = TcpListener::bind(conf.http.addr).await?;
        let grpc = TcpListener::bind(conf.grpc.addr).await?;
        Ok(Self { conf: conf.clone(), services, http, grpc })
    }

    /// Where the REST server listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr().expect("bound listener has an address")
    }

    /// Where the gRPC server listens.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().expect("bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests
    /// finish and returns.
    ///
    /// # Errors
    /// A server failed.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), BoxError> {
        let (http_addr, grpc_addr) = (self.http_addr(), self.grpc_addr());
        let token = CancellationToken::new();
        let on_shutdown = token.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: no new requests, finishing in-flight ones");
            on_shutdown.cancel();
        });

        let health_service = tonic_health::pb::health_server::HealthServer::new(
            grpc::HealthApi::new(self.services.health.clone(), token.clone()),
        );

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let request_id = axum::http::HeaderName::from_static("x-request-id");
        let limits = &self.conf.connections;
        let routes = tonic::service::Routes::new(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                hello::greeter_server::GreeterServer::new(grpc::GreeterApi::new(
                    self.services.greeter.clone(),
                ))
                .max_decoding_message_size(self.conf.grpc.max_message_bytes),
            )
            .add_service(
                res::resource_service_server::ResourceServiceServer::new(grpc::ResourceApi::new(
                    self.services.resource.clone(),
                    self.services.auth.clone(),
                    self.conf.grpc.timeout,
                ))
                .max_decoding_message_size(self.conf.grpc.max_message_bytes),
            )
            .prepare();
        let grpc_app = tower::ServiceBuilder::new()
            .layer(metrics::GrpcMetricsLayer)
            .layer(edge::GrpcRefusalsLayer { max_message_bytes: self.conf.grpc.max_message_bytes })
            .layer(edge::SanitizeRequestIdLayer)
            .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
            .layer(TraceLayer::new_for_grpc().make_span_with(|req: &axum::http::Request<_>| {
                let request_id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                tracing::info_span!("grpc", path = %req.uri().path(), request_id = %request_id)
            }).on_response(DefaultOnResponse::new().level(Level::INFO).latency_unit(LatencyUnit::Micros))
                .on_failure(DefaultOnFailure::new().level(Level::DEBUG)))
            .layer(PropagateRequestIdLayer::new(request_id))
            .layer(edge::UnknownMethodsLayer {
                max_message_bytes: self.conf.grpc.max_message_bytes,
                within: self.conf.grpc.timeout,
            })
            .service(routes);
        // A call accepted just before the GOAWAY still gets its whole deadline, and the
        // final GOAWAY a ping's round trip.
        let max_age = MaxAge {
            age: self.conf.grpc.max_connection_age,
            grace: self.conf.grpc.timeout + limits.keepalive_timeout,
        };
        let grpc =
            serve(self.grpc, grpc_app, Protocol::Grpc(max_age), limits.clone(), token.clone());

        let state = http::AppState {
            resource: self.services.resource.clone(),
            greeter: self.services.greeter.clone(),
            health: self.services.health.clone(),
            auth: self.services.auth.clone(),
            metrics: self.services.metrics.clone(),
        };
        let app = http::router(state, &self.conf.http);
        let app = tower::ServiceExt::map_request(
            app,
            |req: axum::http::Request<hyper::body::Incoming>| req.map(axum::body::Body::new),
        );
        let rest = serve(self.http, app, Protocol::Http, limits.clone(), token.clone());

        tracing::info!(http = %http_addr, grpc = %grpc_addr, "serving");
        let (grpc_result, http_result) = tokio::join!(grpc, rest);
        token.cancel();
        grpc_result?;
        http_result?;
        Ok(())
    }
}

/// How long a gRPC connection may live: at `age` (less up to a tenth, drawn per
/// connection, so connections opened together are not recycled together) it is told to
/// go (GOAWAY, and its watches end UNAVAILABLE so their clients reconnect, perhaps to
/// another replica), and `grace` later it is closed whatever it still runs.
#[derive(Debug, Clone, Copy)]
struct MaxAge {
    age: std::time::Duration,
    grace: std::time::Duration,
}

impl MaxAge {
    /// The age of the `n`th connection: `age` less a spread of up to a tenth of it.
    fn of_connection(&self, n: u64) -> std::time::Duration {
        // A multiplicative hash of the connection's number spreads them evenly.
        let spread = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as u32; // 0..1024
        self.age - self.age / 10 * spread / 1024
    }
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy)]
enum Protocol {
    /// HTTP/1 and HTTP/2 (prior knowledge), connections living as long as clients keep
    /// them.
    Http,
    /// HTTP/2 only, connections recycled at their maximum age.
    Grpc(MaxAge),
}

/// In each request's extensions: cancelled when the connection it came on is to close
/// (its maximum age, or the service stopping), so long-lived streams end in time.
#[derive(Debug, Clone)]
pub struct ConnectionClosing(pub CancellationToken);

/// Serves `service` on `listener` until `stop`, then lets open requests finish, with
/// hyper's timers set from `limits`.
async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    protocol: Protocol,
    limits: conf::Connections,
    stop: CancellationToken,
) -> std::io::Result<()>
where
    S: tower::Service<
            axum::http::Request<hyper::body::Incoming>,
            Response = axum::http::Response<B>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: axum::body::HttpBody + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    use hyper_util::{
        rt::{TokioExecutor, TokioIo, TokioTimer},
        server::conn::auto::Builder,
        service::TowerToHyperService,
    };
    use tower::ServiceExt;

    let guard = conn::Guard::new(&limits);
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .max_concurrent_streams(limits.max_streams);
    let max_age = match protocol {
        Protocol::Http => None,
        Protocol::Grpc(max_age) => {
            builder = builder.http2_only();
            Some(max_age)
        }
    };
    // Each connection holds a receiver; all are gone when every connection has closed.
    let (open_tx, open_rx) = tokio::sync::watch::channel(());
    let mut accepted_so_far = 0u64;
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = guard.accept(&listener) => match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before accept.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        accepted_so_far += 1;
        let age = max_age.map(|m| (m.of_connection(accepted_so_far), m.grace));
        let closing = CancellationToken::new();
        let tell = closing.clone();
        let service = TowerToHyperService::new(service.clone().map_request(
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectionClosing(tell.clone()));
                req
            },
        ));
        let (builder, stop, open) = (builder.clone(), stop.clone(), open_rx.clone());
        tokio::spawn(async move {
            // Not `serve_connection_with_upgrades`: it ignores `http2_only`.
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let aged = async {
                match age {
                    Some((age, _)) => tokio::time::sleep(age).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ended = conn.as_mut() => {
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "connection ended");
                    }
                }
                () = stop.cancelled() => {
                    closing.cancel();
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
                () = aged => {
                    closing.cancel();
                    conn.as_mut().graceful_shutdown();
                    let grace = age.map_or_else(Default::default, |(_, grace)| grace);
                    if tokio::time::timeout(grace, conn).await.is_err() {
                        tracing::debug!("closed a connection still busy after its maximum age");
                    }
                }
            }
            drop(open);
        });
    }
    drop(open_rx);
    drop(listener);
    open_tx.closed().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::MaxAge;

    #[test]
    fn connection_ages_spread_over_the_last_tenth() {
        let m = MaxAge { age: Duration::from_secs(300), grace: Duration::from_secs(30) };
        let ages: Vec<Duration> = (1..=1000).map(|n| m.of_connection(n)).collect();
        assert!(ages.iter().all(|a| *a <= m.age && *a >= Duration::from_secs(270)), "{ages:?}");
        let (min, max) = (ages.iter().min().unwrap(), ages.iter().max().unwrap());
        assert!(*max - *min > Duration::from_secs(25), "spread {min:?}..{max:?}");
        let early = ages.iter().filter(|a| **a < Duration::from_secs(285)).count();
        assert!((350..650).contains(&early), "{early} of 1000 in the earlier half");
    }
}
