//! gRPC transport (tonic): the greeter and `resource.v1.resourceService` over the service
//! layer, with per-call deadlines and errors mapped once, through `status`.

use std::{future::Future, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, metadata::MetadataMap};
use tonic_health::pb::{self as health, health_check_response::ServingStatus};

use super::{auth::Authenticator, status::to_status};
use crate::{
    biz,
    pb::{helloworld::v1 as hello, resource::v1 as pb},
    service::{Caller, GreeterService, HealthService, ResourceAction, ResourceService, Source},
};

/// `resource.v1.resourceService`.
pub struct ResourceApi {
    svc: Arc<ResourceService>,
    auth: Arc<Authenticator>,
    timeout: Duration,
}

impl ResourceApi {
    /// The gRPC face of `svc`; callers are authenticated by `auth`; every call is bounded
    /// by `timeout` (or the client's shorter `grpc-timeout`).
    pub fn new(svc: Arc<ResourceService>, auth: Arc<Authenticator>, timeout: Duration) -> Self {
        Self { svc, auth, timeout }
    }

    /// The authenticated caller of a request.
    fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let authorization = metadata.get("authorization").and_then(|v| v.to_str().ok());
        let principal = self.auth.authenticate(authorization).map_err(to_status)?;
        let request_id =
            metadata.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default();
        Ok(Caller {
            user_id: principal.user_id,
            admin: principal.admin,
            source: Source::Grpc,
            request_id: request_id.to_owned(),
        })
    }
}

/// The responses of one `WatchResources` call.
type WatchStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<pb::WatchResourcesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::resource_service_server::ResourceService for ResourceApi {
    type WatchResourcesStream = WatchStream;

    /// Opening the watch is bounded by the call's deadline; the stream then lasts until
    /// the client goes, the service stops or the connection reaches its maximum age
    /// (`server.grpc.max_connection_age`): the client watches again from its last token.
    async fn watch_resources(
        &self,
        req: Request<pb::WatchResourcesRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let (timeout, caller) =
            (deadline(self.timeout, req.metadata()), self.caller(req.metadata())?);
        let closing = req
            .extensions()
            .get::<super::ConnectionClosing>()
            .map_or_else(CancellationToken::new, |c| c.0.clone());
        let watch = within(timeout, self.svc.watch_resources(&caller, req.into_inner())).await?;
        let first = watch.start();
        let rest = futures::stream::unfold(Some(watch), move |watch| {
            let closing = closing.clone();
            async move {
                let mut watch = watch?;
                tokio::select! {
                    next = watch.next() => match next {
                        Ok(response) => Some((Ok(response), Some(watch))),
                        Err(e) => Some((Err(to_status(e)), None)),
                    },
                    () = closing.cancelled() => Some((Err(Status::unavailable(
                        "this connection is closing (server.grpc.max_connection_age, or the service \
                         stopping); watch again from the last resume_token",
                    )), None)),
                }
            }
        });
        Ok(Response::new(Box::pin(futures::stream::once(async { Ok(first) }).chain(rest))))
    }

    async fn list_resources(
        &self,
        req: Request<pb::ListResourcesRequest>,
    ) -> Result<Response<pb::ListResourcesReply>, Status> {
        let (timeout, caller) =
            (deadline(self.timeout, req.metadata()), self.caller(req.metadata())?);
        let reply = within(timeout, self.svc.list_resources(&caller, req.into_inner())).await?;
        Ok(Response::new(reply))
    }

    async fn get_resource(
        &self,
        req: Request<pb::GetResourceRequest>,
    ) -> Result<Response<pb::Resource>, Status> {
        let (timeout, caller) =
            (deadline(self.timeout, req.metadata()), self.caller(req.metadata())?);
        let reply = within(timeout, self.svc.get_resource(&caller, req.into_inner())).await?;
        Ok(Response::new(reply))
    }

    async fn create_resource(
        &self,
        req: Request<pb::CreateResourceRequest>,
    ) -> Result<Response<pb::Resource>, Status> {
        let (timeout, caller) =
            (deadline(self.timeout, req.metadata()), self.caller(req.metadata())?);
        let reply = within(timeout, self.svc.create_resource(&caller, req.into_inner())).await?;
        Ok(Response::new(reply))
    }

    async fn delete_resource(
        &self,
        req: Request<pb::ResourceActionRequest>,
    ) -> Result<Response<pb::Resource>, Status> {
        self.act(ResourceAction::Delete, req).await
    }

    async fn start_resource(
        &self,
        req: Request<pb::ResourceActionRequest>,
    ) -> Result<Response<pb::Resource>, Status> {
        self.act(ResourceAction::Start, req).await
    }

    async fn stop_resource(
        &self,
        req: Request<pb::ResourceActionRequest>,
    ) -> Result<Response<pb::Resource>, Status> {
        self.act(ResourceAction::Stop, req).await
    }

    async fn update_resource_spec(
        &self,
        req: Request<pb::UpdateResourceSpecRequest>,
    ) -> Result<Response<pb::Resource>, Status> {
        let (timeout, caller) =
            (deadline(self.timeout, req.metadata()), self.caller(req.metadata())?);
        let reply =
            within(timeout, self.svc.update_resource_spec(&caller, req.into_inner())).await?;
        Ok(Response::new(reply))
    }

    async fn set_resource_labels(
        &self,
        req: Request<pb::SetResourceLabelsRequest>,
    ) -> Result<Response<pb::Resource>, Status> {
        let (timeout, caller) =
            (deadline(self.timeout, req.metadata()), self.caller(req.metadata())?);
        let reply =
            within(timeout, self.svc.set_resource_labels(&caller, req.into_inner())).await?;
        Ok(Response::new(reply))
    }

    async fn list_audit_logs(
        &self,
        req: Request<pb::ListAuditLogsRequest>,
    ) -> Result<Response<pb::ListAuditLogsReply>, Status> {
        let (timeout, caller) =
            (deadline(self.timeout, req.metadata()), self.caller(req.metadata())?);
        let reply = within(timeout, self.svc.list_audit_logs(&caller, req.into_inner())).await?;
        Ok(Response::new(reply))
    }

    async fn get_quota(
        &self,
        req: Request<pb::GetQuotaRequest>,
    ) -> Result<Response<pb::Quota>, Status> {
        let (timeout, caller) =
            (deadline(self.timeout, req.metadata()), self.caller(req.metadata())?);
        let reply = within(timeout, self.svc.get_quota(&caller, req.into_inner())).await?;
        Ok(Response::new(reply))
    }

    async fn set_quota(
        &self,
        req: Request<pb::SetQuotaRequest>,
    ) -> Result<Response<pb::Quota>, Status> {
        let (timeout, caller) =
            (deadline(self.timeout, req.metadata()), self.caller(req.metadata())?);
        let reply = within(timeout, self.svc.set_quota(&caller, req.into_inner())).await?;
        Ok(Response::new(reply))
    }

    async fn get_capacity(
        &self,
        req: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::Capacity>, Status> {
        let (timeout, caller) =
            (deadline(self.timeout, req.metadata()), self.caller(req.metadata())?);
        let reply = within(timeout, self.svc.get_capacity(&caller, req.into_inner())).await?;
        Ok(Response::new(reply))
    }

    async fn explain_resource(
        &self,
        req: Request<pb::ExplainResourceRequest>,
    ) -> Result<Response<pb::Explanation>, Status> {
        let (timeout, caller) =
            (deadline(self.timeout, req.metadata()), self.caller(req.metadata())?);
        let reply = within(timeout, self.svc.explain_resource(&caller, req.into_inner())).await?;
        Ok(Response::new(reply))
    }
}

impl ResourceApi {
    async fn act(
        &self,
        action: ResourceAction,
        req: Request<pb::ResourceActionRequest>,
    ) -> Result<Response<pb::Resource>, Status> {
        let (timeout, caller) =
            (deadline(self.timeout, req.metadata()), self.caller(req.metadata())?);
        let reply =
            within(timeout, self.svc.act_on_resource(&caller, action, req.into_inner())).await?;
        Ok(Response::new(reply))
    }
}

/// `helloworld.v1.Greeter`.
pub struct GreeterApi {
    svc: Arc<GreeterService>,
}

impl GreeterApi {
    /// The gRPC face of `svc`.
    pub fn new(svc: Arc<GreeterService>) -> Self {
        Self { svc }
    }
}

#[tonic::async_trait]
impl hello::greeter_server::Greeter for GreeterApi {
    async fn say_hello(
        &self,
        req: Request<hello::HelloRequest>,
    ) -> Result<Response<hello::HelloReply>, Status> {
        Ok(Response::new(self.svc.say_hello(req.into_inner())))
    }
}

/// `grpc.health.v1.Health`, answered from the same readiness as `GET /readyz`, checked
/// at each call (so the two never disagree, from the first moment): the whole server
/// (`""`) and `resource.v1.resourceService`. `NOT_SERVING` once shutdown began.
pub struct HealthApi {
    health: HealthService,
    stopping: CancellationToken,
}

/// How often a `Watch` looks at readiness again.
const WATCH_EVERY: Duration = Duration::from_secs(1);

impl HealthApi {
    /// Health over `health`; `stopping` is cancelled when shutdown begins.
    pub fn new(health: HealthService, stopping: CancellationToken) -> Self {
        Self { health, stopping }
    }

    async fn status(&self, service: &str) -> Option<ServingStatus> {
        if !matches!(service, "" | "resource.v1.resourceService") {
            return None;
        }
        let serving = !self.stopping.is_cancelled() && self.health.readiness().await.ready;
        Some(if serving { ServingStatus::Serving } else { ServingStatus::NotServing })
    }
}

#[tonic::async_trait]
impl health::health_server::Health for HealthApi {
    async fn check(
        &self,
        req: Request<health::HealthCheckRequest>,
    ) -> Result<Response<health::HealthCheckResponse>, Status> {
        let service = req.into_inner().service;
        match self.status(&service).await {
            Some(status) => {
                Ok(Response::new(health::HealthCheckResponse { status: status as i32 }))
            }
            None => Err(Status::not_found(format!("unknown service {service:?}"))),
        }
    }

    type WatchStream = std::pin::Pin<
        Box<dyn Stream<Item = Result<health::HealthCheckResponse, Status>> + Send + 'static>,
    >;

    async fn watch(
        &self,
        req: Request<health::HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = req.into_inner().service;
        let this = HealthApi { health: self.health.clone(), stopping: self.stopping.clone() };
        // The current status at once, then each change.
        let changes = futures::stream::unfold((this, None), move |(this, last)| {
            let service = service.clone();
            async move {
                loop {
                    let status =
                        this.status(&service).await.unwrap_or(ServingStatus::ServiceUnknown);
                    if last != Some(status) {
                        let reply = health::HealthCheckResponse { status: status as i32 };
                        return Some((Ok(reply), (this, Some(status))));
                    }
                    tokio::time::sleep(WATCH_EVERY).await;
                }
            }
        });
        Ok(Response::new(Box::pin(changes)))
    }
}

/// Runs `call` within `timeout`, answering DEADLINE_EXCEEDED (reason `TIMEOUT`) after it.
async fn within<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, biz::Error>>,
) -> Result<T, Status> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(to_status),
        Err(_) => {
            let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            Err(to_status(biz::Error::Timeout { timeout_ms }))
        }
    }
}

/// The server's timeout, or the client's `grpc-timeout` when that is shorter.
fn deadline(server: Duration, metadata: &MetadataMap) -> Duration {
    metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(server, |client| client.min(server))
}

/// Parses the `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(raw: &str) -> Option<Duration> {
    if raw.len() < 2 || raw.len() > 9 {
        return None;
    }
    let (digits, unit) = raw.split_at(raw.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_the_shorter_deadline_wins() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);

        let mut md = MetadataMap::new();
        md.insert("grpc-timeout", "100m".parse().unwrap());
        assert_eq!(deadline(Duration::from_secs(1), &md), Duration::from_millis(100));
        md.insert("grpc-timeout", "5S".parse().unwrap());
        assert_eq!(deadline(Duration::from_secs(1), &md), Duration::from_secs(1));
    }
}
