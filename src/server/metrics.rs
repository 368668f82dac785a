//! Prometheus metrics: the `metrics` facade everywhere, rendered by
//! `metrics-exporter-prometheus` at `GET /metrics` on the HTTP port.
//!
//! | metric | labels |
//! |---|---|
//! | `resource_http_requests_total`, `resource_http_request_duration_seconds` | route, method, status |
//! | `resource_grpc_requests_total`, `resource_grpc_request_duration_seconds` | method, code |
//! | `resource_events_consumed_total` | type, outcome (`acked`, `retried`, `dead_lettered`) |
//! | `resource_events_dead_lettered_total` | reason |
//! | `resource_outbox_backlog` | — |
//! | `resource_reconcile_operations_total` / `resource_reconcile_errors_total` | step / — |
//! | `resource_db_pool_connections` | pool (`requests`, `background`), state (`idle`, `in_use`) |
//! | `resource_db_pool_max_connections` | pool |
//! | `resource_db_stalled_total` | — (round trips dropped for missing their deadline) |
//!
//! Every label value comes from a closed set, whatever a client sends: standard HTTP
//! methods, matched route templates and the known RPCs, else `other` (or `unmatched`
//! for a route), so no client can grow the exposition.

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    extract::{MatchedPath, Request},
    middleware::Next,
    response::{IntoResponse, Response},
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets (seconds): 0.5 ms to 5 s.
const BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once) and returns the handle that renders it.
///
/// # Panics
/// Never in practice: the bucket list is a valid constant.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), BUCKETS)
                .expect("constant, non-empty buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (tests in one process): keep it.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Every 5 s until `shutdown`: drains histogram buffers, so rendering stays cheap, and
/// samples the process's resident memory.
pub async fn upkeep(handle: PrometheusHandle, shutdown: tokio_util::sync::CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        handle.run_upkeep();
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

/// `GET /metrics`.
pub async fn render(handle: PrometheusHandle) -> Response {
    let body = handle.render();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Counts and times every routed HTTP request by route template, method and status.
pub async fn track_http(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = http_method_label(req.method());
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("resource_http_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("resource_http_request_duration_seconds", "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The label of an HTTP method: a standard one, else `other`.
fn http_method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method as M;
    match *method {
        M::GET => "GET",
        M::HEAD => "HEAD",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::PATCH => "PATCH",
        M::OPTIONS => "OPTIONS",
        M::CONNECT => "CONNECT",
        M::TRACE => "TRACE",
        _ => "other",
    }
}

/// The label of a gRPC request path: one of the served RPCs, else `other`.
fn grpc_method_label(path: &str) -> String {
    if is_served(path) { path.to_owned() } else { "other".to_owned() }
}

/// Whether `path` names an RPC this server serves.
pub(super) fn is_served(path: &str) -> bool {
    static KNOWN: OnceLock<HashSet<String>> = OnceLock::new();
    let known = KNOWN.get_or_init(|| {
        let mut known: HashSet<String> = [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .map(str::to_owned)
        .into();
        // The descriptor set is compiled into the binary by build.rs.
        if let Ok(pool) = prost_reflect::DescriptorPool::decode(crate::pb::FILE_DESCRIPTOR_SET) {
            for service in pool.services() {
                for method in service.methods() {
                    known.insert(format!("/{}/{}", service.full_name(), method.name()));
                }
            }
        }
        known
    });
    known.contains(path)
}

/// A tower layer counting and timing gRPC calls by method and status code.
#[derive(Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<axum::http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let method = grpc_method_label(req.uri().path());
        let started = Instant::now();
        let call = self.inner.call(req);
        Box::pin(async move {
            let result = call.await;
            // An error is sent "trailers-only": its code is in the headers. A success
            // carries its code in the trailers, which are not seen here: 0 (OK).
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|c| c.parse::<u8>().ok())
                    .filter(|c| *c <= 16)
                    .unwrap_or(0),
                Err(_) => 2,
            }
            .to_string();
            metrics::counter!("resource_grpc_requests_total", "method" => method.clone(), "code" => code)
                .increment(1);
            metrics::histogram!("resource_grpc_request_duration_seconds", "method" => method)
                .record(started.elapsed().as_secs_f64());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_closed_sets() {
        assert_eq!(http_method_label(&axum::http::Method::PATCH), "PATCH");
        let made_up = axum::http::Method::from_bytes(b"FROBNICATE").unwrap();
        assert_eq!(http_method_label(&made_up), "other");
        let list = "/resource.v1.resourceService/ListResources";
        assert_eq!(grpc_method_label(list), list);
        assert_eq!(
            grpc_method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        assert_eq!(grpc_method_label("/resource.v1.resourceService/Nope"), "other");
        assert_eq!(grpc_method_label("/x"), "other");
    }
}
