//! REST transport (axum): turns HTTP requests into the same `pb` requests the gRPC server
//! builds, calls the same service methods and maps errors once, through `status`.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State},
    http::{HeaderName, Method, StatusCode, header, request::Parts},
    middleware::{self, Next},
    response::{
        IntoResponse, Response,
        sse::{Event, Sse},
    },
    routing::{any, get, patch, put},
};
use futures::StreamExt;
use serde::Deserialize;
use tower::ServiceBuilder;
use tower_http::{
    LatencyUnit,
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer},
};
use tracing::Level;

use super::{
    auth::Authenticator,
    status::{ApiError, HttpError},
};
use crate::{
    biz::{self, ErrorKind},
    conf,
    pb::{helloworld::v1 as hello, resource::v1 as pb},
    service::{
        self, Caller, GreeterService, HealthService, ResourceAction, ResourceService, Source,
    },
};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The instance API.
    pub resource: Arc<ResourceService>,
    /// The greeter.
    pub greeter: Arc<GreeterService>,
    /// Readiness.
    pub health: HealthService,
    /// Who callers are.
    pub auth: Arc<Authenticator>,
    /// Renders `GET /metrics`.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

/// The REST API with its middleware: request ids, tracing, per-request timeout and the
/// body size limit from `conf`.
pub fn router(state: AppState, conf: &conf::HttpServer) -> Router {
    let limits = Limits {
        timeout: conf.timeout,
        body_timeout: conf.body_timeout,
        max_body_bytes: conf.max_body_bytes,
    };
    let openapi = Bytes::from(
        super::openapi::document(state.resource.limits(), state.auth.required()).to_string(),
    );
    Router::new()
        .route("/helloworld/{name}", get(say_hello))
        .route("/v1/resources", get(list_resources).post(create_resource))
        .route("/v1/resources:watch", get(watch_resources))
        .route("/v1/resources/{instance_id}", any(instance_route))
        .route("/v1/resources/{instance_id}/spec", patch(update_resource_spec))
        .route("/v1/resources/{instance_id}/audit-logs", get(list_audit_logs))
        .route("/v1/resources/{instance_id}/labels", put(set_resource_labels))
        .route("/v1/quotas/{user_id}", get(get_quota).put(set_quota))
        .route("/v1/capacity", get(get_capacity))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(|State(app): State<AppState>| super::metrics::render(app.metrics)))
        .route(
            "/openapi.json",
            get(move || async move { ([(header::CONTENT_TYPE, "application/json")], openapi) }),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Router::layer wraps each route, so the middleware sees the matched route.
        .layer(middleware::from_fn(super::metrics::track_http))
        .layer(DefaultBodyLimit::max(conf.max_body_bytes))
        .layer(middleware::from_fn_with_state(limits, enforce_limits))
        .layer(
            ServiceBuilder::new()
                .layer(super::edge::SanitizeRequestIdLayer)
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|req: &Request| {
                            let request_id = req
                                .headers()
                                .get(REQUEST_ID)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("");
                            tracing::info_span!(
                                "http",
                                method = %req.method(),
                                path = %clipped(req.uri().path()),
                                request_id = %request_id,
                            )
                        })
                        .on_response(
                            DefaultOnResponse::new()
                                .level(Level::INFO)
                                .latency_unit(LatencyUnit::Micros),
                        )
                        // Failures are logged once, with their cause, by `status`.
                        .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID)),
        )
        .with_state(state)
}

#[derive(Clone, Copy)]
struct Limits {
    timeout: Duration,
    body_timeout: Duration,
    max_body_bytes: usize,
}

/// Reads the whole body first, within `body_timeout` (408 when the client is too slow)
/// and `max_body_bytes` (413, refused at once when declared larger); then answers 504
/// when the handler outlives `server.http.timeout`, which starts after the body.
async fn enforce_limits(State(limits): State<Limits>, req: Request, next: Next) -> Response {
    let too_large = || {
        HttpError(ApiError::new(
            ErrorKind::PayloadTooLarge,
            "PAYLOAD_TOO_LARGE",
            format!("request body exceeds {} bytes", limits.max_body_bytes),
        ))
        .into_response()
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limits.max_body_bytes as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, limits.max_body_bytes);
    let body = match tokio::time::timeout(limits.body_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            if e.into_inner().is::<http_body_util::LengthLimitError>() {
                return too_large();
            }
            // The client went away mid-body: nobody reads the answer.
            return HttpError::from(biz::Error::invalid("body", "the request body was cut short"))
                .into_response();
        }
        Err(_) => {
            return HttpError(ApiError::new(
                ErrorKind::RequestTimeout,
                "REQUEST_TIMEOUT",
                format!("the request body did not arrive within {:?}", limits.body_timeout),
            ))
            .into_response();
        }
    };
    let req = Request::from_parts(parts, axum::body::Body::from(body));
    match tokio::time::timeout(limits.timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            let timeout_ms = u64::try_from(limits.timeout.as_millis()).unwrap_or(u64::MAX);
            HttpError::from(biz::Error::Timeout { timeout_ms }).into_response()
        }
    }
}

/// `Query<T>` whose rejection is an `INVALID_ARGUMENT` error body.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|rejection| biz::Error::invalid("query", rejection.body_text()).into())
    }
}

/// A JSON body (whatever its content type), whose rejection is an error body:
/// 413 `PAYLOAD_TOO_LARGE` past the limit, 400 `INVALID_ARGUMENT` when malformed.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, HttpError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                HttpError(ApiError::new(
                    ErrorKind::PayloadTooLarge,
                    "PAYLOAD_TOO_LARGE",
                    "request body exceeds the limit",
                ))
            } else {
                HttpError::from(biz::Error::invalid("body", rejection.body_text()))
            }
        })?;
        decode_json(&bytes).map(ApiJson).map_err(invalid_body)
    }
}

/// A body that does not decode, said in the client's terms. pbjson's numbers go through
/// an untagged serde enum whose error names serde's internals: a number that is not an
/// integer, or out of range, where one is expected.
fn invalid_body(e: serde_json::Error) -> HttpError {
    let message = e.to_string().replace(
        "data did not match any variant of untagged enum Content",
        "a number out of range or with a fraction where an integer is expected",
    );
    HttpError::from(biz::Error::invalid("body", format!("invalid JSON: {message}")))
}

/// Decodes a proto3 JSON body. The proto3 JSON mapping accepts an integer written as
/// `1.0` or `1e2` (Go's protojson, which the service replaces, does); pbjson does not,
/// so a body it refuses is retried with such numbers rewritten as integers.
fn decode_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    match serde_json::from_slice(bytes) {
        Ok(value) => Ok(value),
        Err(err) => from_json_value(serde_json::from_slice(bytes)?).map_err(|_| err),
    }
}

/// [`decode_json`] from an already parsed body.
fn from_json_value<T: serde::de::DeserializeOwned>(
    mut value: serde_json::Value,
) -> Result<T, serde_json::Error> {
    normalize(&mut value, false);
    // Integers and floats are one number type in JSON: this changes no value, only its
    // spelling (within ±2^53, where every integer is an exact float; pbjson refuses
    // larger integers in free JSON).
    T::deserialize(service::integral_numbers(value))
}

/// What pbjson's reading of the proto3 JSON mapping lacks: fields set to `null` are unset (pbjson refuses `null` for a scalar), and in free JSON (`config_json`, a
/// `google.protobuf.Struct`, whose numbers are doubles) an integer beyond ±2^53 is read
/// as the double it becomes, as Go's protojson does (pbjson refuses it). In free JSON
/// `null` is a value and is kept.
fn normalize(value: &mut serde_json::Value, free: bool) {
    use serde_json::Value as J;
    match value {
        J::Object(fields) => {
            if !free {
                fields.retain(|_, v| !v.is_null());
            }
            for (name, v) in fields.iter_mut() {
                normalize(v, free || FREE_JSON_FIELDS.contains(&name.as_str()));
            }
        }
        J::Array(items) => items.iter_mut().for_each(|v| normalize(v, free)),
        J::Number(n) if free && !n.is_f64() => {
            const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
            if let Some(f) = n.as_f64().filter(|f| f.abs() >= EXACT)
                && let Some(double) = serde_json::Number::from_f64(f)
            {
                *n = double;
            }
        }
        _ => {}
    }
}

/// Fields of the API messages that hold free JSON, in both spellings.
const FREE_JSON_FIELDS: &[&str] = &["config_json", "configJson"];

/// A response body in the proto3 JSON mapping, written as Go's protojson writes it: a
/// double that holds an integer has no fraction (`config_json`'s `8080`, not `8080.0`:
/// `google.protobuf.Struct` carries every number as a double).
pub struct ProtoJson<T>(pub T);

impl<T: serde::Serialize> IntoResponse for ProtoJson<T> {
    fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(256);
        let mut serializer = serde_json::Serializer::with_formatter(&mut body, IntegralDoubles);
        match self.0.serialize(&mut serializer) {
            Ok(()) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(e) => HttpError::from(biz::Error::internal(format!("encoding a response: {e}")))
                .into_response(),
        }
    }
}

/// Compact JSON, doubles that hold an integer written as that integer.
struct IntegralDoubles;

impl serde_json::ser::Formatter for IntegralDoubles {
    fn write_f64<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        value: f64,
    ) -> std::io::Result<()> {
        if value.fract() == 0.0 && value.abs() < 9_007_199_254_740_992.0 {
            #[allow(clippy::cast_possible_truncation)] // integral and below 2^53: exact
            let integer = value as i64;
            write!(writer, "{integer}")
        } else {
            serde_json::ser::CompactFormatter.write_f64(writer, value)
        }
    }
}

/// The authenticated caller of an HTTP request (`authorization: Bearer …`).
pub struct HttpCaller(pub Caller);

impl FromRequestParts<AppState> for HttpCaller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, HttpError> {
        let authorization = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let principal = app.auth.authenticate(authorization)?;
        let request_id =
            parts.headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or_default();
        Ok(HttpCaller(Caller {
            user_id: principal.user_id,
            admin: principal.admin,
            source: Source::Http,
            request_id: request_id.to_owned(),
        }))
    }
}

/// One path segment as text, whose rejection (`%FF`: not UTF-8) is the JSON 400.
pub struct Segment(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Segment {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(segment)| Segment(segment))
            .map_err(|r| HttpError::from(biz::Error::invalid("path", r.body_text())))
    }
}

/// The `instance_id` path segment, parsed with a clear error.
pub struct InstanceIdPath(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for InstanceIdPath {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        let Segment(raw) = Segment::from_request_parts(parts, state).await?;
        parse_instance_id(&raw).map(InstanceIdPath)
    }
}

async fn say_hello(State(app): State<AppState>, Segment(name): Segment) -> Json<hello::HelloReply> {
    Json(app.greeter.say_hello(hello::HelloRequest { name }))
}

/// Query parameters of `GET /v1/resources`; unknown ones are ignored.
#[derive(Debug, Default, Deserialize)]
struct ListParams {
    page_size: Option<String>,
    page_token: Option<String>,
    user_id: Option<String>,
    status: Option<String>,
    name: Option<String>,
    label_selector: Option<String>,
    gpu_model: Option<String>,
    image: Option<String>,
    created_after: Option<String>,
    created_before: Option<String>,
}

impl TryFrom<ListParams> for pb::ListResourcesRequest {
    type Error = biz::Error;

    fn try_from(p: ListParams) -> Result<Self, biz::Error> {
        let page_size = parse_page_size(p.page_size.as_deref())?;
        let status = match p.status.as_deref() {
            // The enum's zero value means "no status filter", as on gRPC.
            None | Some("") | Some("STATUS_UNSPECIFIED") => pb::Status::Unspecified,
            Some(raw) => service::status_named(raw)?,
        };
        Ok(pb::ListResourcesRequest {
            page_size,
            page_token: p.page_token.unwrap_or_default(),
            user_id: p.user_id.unwrap_or_default(),
            status: status as i32,
            name: p.name.unwrap_or_default(),
            label_selector: p.label_selector.unwrap_or_default(),
            gpu_model: p.gpu_model.unwrap_or_default(),
            image: p.image.unwrap_or_default(),
            created_after: parse_time("created_after", p.created_after.as_deref())?,
            created_before: parse_time("created_before", p.created_before.as_deref())?,
        })
    }
}

/// A time from a query string (RFC 3339, as the proto3 JSON mapping spells a
/// `Timestamp`); absent or empty means unset.
fn parse_time(
    field: &'static str,
    raw: Option<&str>,
) -> Result<Option<pbjson_types::Timestamp>, biz::Error> {
    match raw.map(str::trim) {
        None | Some("") => Ok(None),
        Some(raw) => chrono::DateTime::parse_from_rfc3339(raw)
            .map(|t| {
                Some(pbjson_types::Timestamp {
                    seconds: t.timestamp(),
                    nanos: t.timestamp_subsec_nanos() as i32,
                })
            })
            .map_err(|_| {
                biz::Error::invalid(
                    field,
                    format!("expected an RFC 3339 time such as 2026-01-02T03:04:05Z, got {raw:?}"),
                )
            }),
    }
}

/// `page_size` from a query string: absent or empty means 0 (the default).
fn parse_page_size(raw: Option<&str>) -> Result<i32, biz::Error> {
    match raw.map(str::trim) {
        None | Some("") => Ok(0),
        Some(raw) => raw.parse::<i32>().map_err(|_| {
            biz::Error::invalid("page_size", format!("expected an integer, got {raw:?}"))
        }),
    }
}

async fn list_resources(
    State(app): State<AppState>,
    HttpCaller(caller): HttpCaller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<ProtoJson<pb::ListResourcesReply>, HttpError> {
    let req = pb::ListResourcesRequest::try_from(params)?;
    Ok(ProtoJson(app.resource.list_resources(&caller, req).await?))
}

/// Query parameters of `GET /v1/resources:watch`; unknown ones are ignored.
#[derive(Debug, Default, Deserialize)]
struct WatchParams {
    resume_token: Option<String>,
    /// The filters, spelled as `GET /v1/resources` spells them.
    #[serde(flatten)]
    filters: ListParams,
}

impl WatchParams {
    /// The request; an EventSource that reconnects sends the last event's id (its
    /// resume token) as `Last-Event-ID`, used when the query names no token.
    fn into_request(
        self,
        last_event_id: Option<&str>,
    ) -> Result<pb::WatchResourcesRequest, biz::Error> {
        let resume_token = self
            .resume_token
            .filter(|t| !t.is_empty())
            .or_else(|| last_event_id.map(str::to_owned))
            .unwrap_or_default();
        let f = pb::ListResourcesRequest::try_from(self.filters)?;
        Ok(pb::WatchResourcesRequest {
            resume_token,
            user_id: f.user_id,
            status: f.status,
            name: f.name,
            label_selector: f.label_selector,
            gpu_model: f.gpu_model,
            image: f.image,
            created_after: f.created_after,
            created_before: f.created_before,
        })
    }
}

/// `GET /v1/resources:watch`: Server-Sent Events. Each change is a `message` event whose
/// `data` is a `WatchResourcesResponse` as JSON and whose `id` is its resume token; a
/// silence is broken by a `heartbeat` event of the same shape without `resource`; a
/// failure ends the stream with an `error` event carrying the error body.
async fn watch_resources(
    State(app): State<AppState>,
    HttpCaller(caller): HttpCaller,
    headers: axum::http::HeaderMap,
    ApiQuery(params): ApiQuery<WatchParams>,
) -> Result<Response, HttpError> {
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let req = params.into_request(last_event_id)?;
    let watch = app.resource.watch_resources(&caller, req).await?;
    let first = sse_event(&watch.start(), "heartbeat");
    let rest = futures::stream::unfold(Some(watch), |watch| async move {
        let mut watch = watch?;
        match watch.next().await {
            Ok(response) => {
                let kind = if response.resource.is_some() { "message" } else { "heartbeat" };
                Some((sse_event(&response, kind), Some(watch)))
            }
            Err(e) => {
                let data = super::status::error_json(e);
                Some((Event::default().event("error").data(data), None))
            }
        }
    });
    let events =
        futures::stream::once(async { first }).chain(rest).map(Ok::<_, std::convert::Infallible>);
    Ok(Sse::new(events).into_response())
}

fn sse_event(response: &pb::WatchResourcesResponse, kind: &'static str) -> Event {
    let mut body = Vec::with_capacity(512);
    let mut serializer = serde_json::Serializer::with_formatter(&mut body, IntegralDoubles);
    let event = Event::default().event(kind).id(response.resume_token.clone());
    match serde::Serialize::serialize(response, &mut serializer) {
        Ok(()) => event.data(String::from_utf8_lossy(&body)),
        Err(e) => event.event("error").data(super::status::error_json(biz::Error::internal(
            format!("encoding a response: {e}"),
        ))),
    }
}

/// `/v1/resources/{instance_id}` (GET, DELETE) and its custom methods
/// `{instance_id}:start` and `{instance_id}:stop` (POST) and `{instance_id}:explain`
/// (GET). axum allows one parameter per
/// path segment and no suffix after it, so one route takes the segment and dispatches
/// here, answering 405 with the `Allow` header of the resource that was addressed.
async fn instance_route(
    State(app): State<AppState>,
    HttpCaller(caller): HttpCaller,
    method: Method,
    Segment(segment): Segment,
) -> Response {
    let result = match segment.split_once(':') {
        None => match method {
            Method::GET | Method::HEAD => get_resource(&app, &caller, &segment).await,
            Method::DELETE => act(&app, &caller, ResourceAction::Delete, &segment).await,
            _ => return not_allowed(&method, &segment, "GET, HEAD, DELETE"),
        },
        Some((raw_id, "explain")) => {
            return match method {
                Method::GET | Method::HEAD => {
                    explain_resource(&app, &caller, raw_id).await.map(ProtoJson).into_response()
                }
                _ => not_allowed(&method, &segment, "GET, HEAD"),
            };
        }
        Some((raw_id, verb)) => {
            let action = match verb {
                "start" => ResourceAction::Start,
                "stop" => ResourceAction::Stop,
                other => {
                    return HttpError(ApiError::new(
                        ErrorKind::NotFound,
                        "NOT_FOUND",
                        format!("unknown custom method {other:?}; use :start, :stop or :explain"),
                    ))
                    .into_response();
                }
            };
            if method != Method::POST {
                return not_allowed(&method, &segment, "POST");
            }
            act(&app, &caller, action, raw_id).await
        }
    };
    result.map(ProtoJson).into_response()
}

fn parse_instance_id(raw: &str) -> Result<i64, HttpError> {
    raw.parse::<i64>().map_err(|_| {
        biz::Error::invalid("instance_id", format!("expected a positive integer, got {raw:?}"))
            .into()
    })
}

async fn get_resource(
    app: &AppState,
    caller: &Caller,
    raw_id: &str,
) -> Result<pb::Resource, HttpError> {
    let req = pb::GetResourceRequest { instance_id: parse_instance_id(raw_id)? };
    Ok(app.resource.get_resource(caller, req).await?)
}

async fn explain_resource(
    app: &AppState,
    caller: &Caller,
    raw_id: &str,
) -> Result<pb::Explanation, HttpError> {
    let req = pb::ExplainResourceRequest { instance_id: parse_instance_id(raw_id)? };
    Ok(app.resource.explain_resource(caller, req).await?)
}

async fn act(
    app: &AppState,
    caller: &Caller,
    action: ResourceAction,
    raw_id: &str,
) -> Result<pb::Resource, HttpError> {
    let req = pb::ResourceActionRequest { instance_id: parse_instance_id(raw_id)? };
    Ok(app.resource.act_on_resource(caller, action, req).await?)
}

fn not_allowed(method: &Method, segment: &str, allow: &'static str) -> Response {
    let error = HttpError(ApiError::new(
        ErrorKind::MethodNotAllowed,
        "METHOD_NOT_ALLOWED",
        format!("{method} is not allowed on /v1/resources/{segment}; allowed: {allow}"),
    ));
    ([(header::ALLOW, allow)], error).into_response()
}

async fn create_resource(
    State(app): State<AppState>,
    HttpCaller(caller): HttpCaller,
    ApiJson(req): ApiJson<pb::CreateResourceRequest>,
) -> Result<ProtoJson<pb::Resource>, HttpError> {
    Ok(ProtoJson(app.resource.create_resource(&caller, req).await?))
}

/// Query parameters of `PATCH /v1/resources/{instance_id}/spec`.
#[derive(Debug, Default, Deserialize)]
struct UpdateParams {
    /// Comma-separated field paths, as grpc-gateway clients send a field mask.
    update_mask: Option<String>,
}

/// A partial update: the fields present (and not `null`) in the body change, the others
/// keep their values — the body's fields are the update mask of `UpdateResourceSpec`,
/// unless an `update_mask` query parameter names them (as grpc-gateway clients do).
async fn update_resource_spec(
    State(app): State<AppState>,
    HttpCaller(caller): HttpCaller,
    InstanceIdPath(instance_id): InstanceIdPath,
    ApiQuery(params): ApiQuery<UpdateParams>,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<ProtoJson<pb::Resource>, HttpError> {
    let serde_json::Value::Object(fields) = &body else {
        return Err(biz::Error::invalid(
            "body",
            "must be a JSON object: the spec fields to change",
        )
        .into());
    };
    let paths: Vec<String> = match params.update_mask.as_deref().map(str::trim) {
        Some(mask) if !mask.is_empty() => mask.split(',').map(str::to_owned).collect(),
        // Unknown fields are ignored, as everywhere.
        _ => fields
            .iter()
            .filter(|(name, value)| !value.is_null() && SPEC_FIELDS.contains(&name.as_str()))
            .map(|(name, _)| name.clone())
            .collect(),
    };
    let spec: pb::ResourceSpec = from_json_value(body).map_err(invalid_body)?;
    let req = pb::UpdateResourceSpecRequest {
        instance_id,
        spec: Some(spec),
        // No path means "the populated fields": an empty body changes nothing.
        update_mask: Some(pbjson_types::FieldMask { paths }),
    };
    Ok(ProtoJson(app.resource.update_resource_spec(&caller, req).await?))
}

/// The settable fields of a spec, in both JSON spellings.
const SPEC_FIELDS: &[&str] = &["cpu", "memory", "gpu", "image", "config_json", "configJson"];

/// Query parameters of `GET /v1/resources/{instance_id}/audit-logs`.
#[derive(Debug, Default, Deserialize)]
struct AuditParams {
    page_size: Option<String>,
    page_token: Option<String>,
}

async fn list_audit_logs(
    State(app): State<AppState>,
    HttpCaller(caller): HttpCaller,
    InstanceIdPath(instance_id): InstanceIdPath,
    ApiQuery(params): ApiQuery<AuditParams>,
) -> Result<ProtoJson<pb::ListAuditLogsReply>, HttpError> {
    let page_size = parse_page_size(params.page_size.as_deref())?;
    let req = pb::ListAuditLogsRequest {
        instance_id,
        page_size,
        page_token: params.page_token.unwrap_or_default(),
    };
    Ok(ProtoJson(app.resource.list_audit_logs(&caller, req).await?))
}

/// `PUT /v1/resources/{instance_id}/labels`: the body is the labels, a JSON object of
/// strings (`{"team": "a"}`), as the binding's `body: "labels"` says; it replaces them
/// all (`{}` removes them).
async fn set_resource_labels(
    State(app): State<AppState>,
    HttpCaller(caller): HttpCaller,
    InstanceIdPath(instance_id): InstanceIdPath,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<ProtoJson<pb::Resource>, HttpError> {
    let serde_json::Value::Object(fields) = body else {
        return Err(biz::Error::invalid(
            "body",
            "must be a JSON object of labels: {\"key\": \"value\", …}",
        )
        .into());
    };
    let mut labels = std::collections::BTreeMap::new();
    for (key, value) in fields {
        let serde_json::Value::String(value) = value else {
            return Err(biz::Error::InvalidLabels {
                message: format!("the value of label {key:?} must be a string"),
                key: Some(key),
            }
            .into());
        };
        labels.insert(key, value);
    }
    let req = pb::SetResourceLabelsRequest { instance_id, labels };
    Ok(ProtoJson(app.resource.set_resource_labels(&caller, req).await?))
}

async fn get_quota(
    State(app): State<AppState>,
    HttpCaller(caller): HttpCaller,
    Segment(user_id): Segment,
) -> Result<ProtoJson<pb::Quota>, HttpError> {
    let req = pb::GetQuotaRequest { user_id };
    Ok(ProtoJson(app.resource.get_quota(&caller, req).await?))
}

/// The body is the owner's own limits (`{"instances": 10, "gpus": 2}`), as the binding's
/// `body: "limits"` says; a limit left out keeps the default. Since the body replaces
/// them all, a field that is no limit (a misspelt `instance`) is refused rather than
/// ignored: ignored, it would silently remove the owner's limits.
async fn set_quota(
    State(app): State<AppState>,
    HttpCaller(caller): HttpCaller,
    Segment(user_id): Segment,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<ProtoJson<pb::Quota>, HttpError> {
    const LIMITS: [&str; 5] = ["instances", "cpu", "memory_mb", "memoryMb", "gpus"];
    if let Some(unknown) =
        body.as_object().and_then(|o| o.keys().find(|k| !LIMITS.contains(&k.as_str())))
    {
        return Err(HttpError::from(biz::Error::invalid(
            "body",
            format!("{unknown:?} is not a limit; expected instances, cpu, memory_mb or gpus"),
        )));
    }
    let limits: pb::QuotaLimits = from_json_value(body).map_err(invalid_body)?;
    let req = pb::SetQuotaRequest { user_id, limits: Some(limits) };
    Ok(ProtoJson(app.resource.set_quota(&caller, req).await?))
}

async fn get_capacity(
    State(app): State<AppState>,
    HttpCaller(caller): HttpCaller,
) -> Result<ProtoJson<pb::Capacity>, HttpError> {
    Ok(ProtoJson(app.resource.get_capacity(&caller, pb::GetCapacityRequest {}).await?))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(app): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let readiness = app.health.readiness().await;
    let checks: serde_json::Map<String, serde_json::Value> = readiness
        .checks
        .iter()
        .map(|c| (c.name.to_owned(), (if c.ok { "ok" } else { "unavailable" }).into()))
        .collect();
    let (status, word) = if readiness.ready {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    (status, Json(serde_json::json!({ "status": word, "checks": checks })))
}

async fn not_found(req: Request) -> HttpError {
    HttpError(ApiError::new(
        ErrorKind::NotFound,
        "NOT_FOUND",
        format!("no route for {} {}", req.method(), clipped(req.uri().path())),
    ))
}

/// Longest part of a request path echoed in an error or a log line.
const PATH_SHOWN: usize = 256;

/// A request path as shown to clients and logs: at most `PATH_SHOWN` bytes, marked when
/// cut (a client may send 60 KB of path).
fn clipped(path: &str) -> std::borrow::Cow<'_, str> {
    if path.len() <= PATH_SHOWN {
        return path.into();
    }
    let mut end = PATH_SHOWN;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &path[..end], path.len()).into()
}

async fn method_not_allowed(req: Request) -> HttpError {
    HttpError(ApiError::new(
        ErrorKind::MethodNotAllowed,
        "METHOD_NOT_ALLOWED",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn integers_beyond_2_53_in_config_json_are_the_doubles_they_become() {
        let body = json!({"name": "n", "spec": {"cpu": 1, "config_json":
            {"id": 386_394_403_163_340_800_u64, "neg": -9_007_199_254_740_993_i64, "small": 7}}});
        let req: pb::CreateResourceRequest = from_json_value(body).unwrap();
        let config = serde_json::to_value(req.spec.unwrap().config_json.unwrap()).unwrap();
        assert_eq!(config["id"], json!(386_394_403_163_340_800_f64));
        assert_eq!(config["neg"], json!(-9_007_199_254_740_992_f64));
        assert_eq!(config["small"].as_f64(), Some(7.0));
    }

    #[test]
    fn null_fields_are_unset_but_null_values_in_free_json_are_kept() {
        let body = json!({"name": "n", "user_id": null,
                          "spec": {"cpu": 2.0, "memory": null, "image": "nginx",
                                   "config_json": {"a": null, "b": [null, {"c": null}]}}});
        let req: pb::CreateResourceRequest = from_json_value(body).unwrap();
        assert_eq!(req.user_id, "");
        let spec = req.spec.unwrap();
        assert_eq!((spec.cpu, spec.memory), (2, 0));
        let config = serde_json::to_value(spec.config_json.unwrap()).unwrap();
        assert_eq!(config, json!({"a": null, "b": [null, {"c": null}]}));
    }
}
