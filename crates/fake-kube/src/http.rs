//! The HTTP surface: routes, verbs, query parameters, `Status` errors and watch streams,
//! behind a front layer that counts, logs and injects faults.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request as HttpRequest, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::selector::{FieldSelector, Selector};
use crate::store::{ApiError, Change, Event, Origin, Scope, Shared, WatchStart, watch_line};
use crate::{FaultAction, Kind, RequestRecord, Verb};

/// The watch timeout when the client sets none (the real server picks 30 to 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// Serves until the fake is closed, then drains: open watches end at once.
pub(crate) async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let closed = shared.closed();
    let app = router(shared);
    // An accept loop error is not recoverable here; the handle's owner sees requests fail.
    let _ = axum::serve(listener, app).with_graceful_shutdown(closed).await;
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/version", discovery(version))
        .route("/api", discovery(api_versions))
        .route("/api/v1", discovery(api_resources))
        .route(
            "/apis",
            discovery(|| json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})),
        )
        .route("/api/v1/{*path}", any(object))
        .fallback(|| async {
            let message = "the server could not find the requested resource";
            ApiError::new(404, "NotFound", message).into_response()
        })
        .layer(middleware::from_fn_with_state(shared.clone(), front))
        .with_state(shared)
}

// === the front: counting, logging, faults ===

/// Counts and logs every request, then serves it or applies the first matching fault.
async fn front(State(shared): State<Arc<Shared>>, request: HttpRequest, next: Next) -> Response {
    let record = record_of(request.method(), request.uri());
    let (verb, kind) = (record.verb, record.kind);
    let name = record.name.clone();
    shared.record(record);
    let action = shared.faults().take(verb, kind, &name);
    match action {
        None => next.run(request).await,
        Some(FaultAction::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            next.run(request).await
        }
        Some(FaultAction::Hang) => {
            // Pending until the client drops the connection; a shutdown must not wait.
            shared.closed().await;
            ApiError::new(503, "ServiceUnavailable", "fake-kube is shutting down").into_response()
        }
        Some(FaultAction::Status { code, reason, message, retry_after }) => {
            let status = fault_status(code, &reason, &message, retry_after, kind, &name);
            fault_response(verb, status, retry_after)
        }
    }
}

/// What the request addresses, as the handlers will see it.
fn record_of(method: &Method, uri: &Uri) -> RequestRecord {
    let target = uri.path().strip_prefix("/api/v1/").and_then(target_of);
    let watch = Query::<Params>::try_from_uri(uri).is_ok_and(|q| is_true(&q.watch));
    let verb = target.as_ref().map_or(Verb::Other, |t| verb_of(t, method, watch));
    let (kind, namespace, name) = match target {
        Some(t) => (Some(t.kind), t.ns.unwrap_or_default(), t.name),
        None => (None, String::new(), String::new()),
    };
    RequestRecord { at: Instant::now(), verb, kind, namespace, name }
}

/// The `Status` an injected fault answers.
fn fault_status(
    code: u16,
    reason: &str,
    message: &str,
    retry_after: Option<u32>,
    kind: Option<Kind>,
    name: &str,
) -> Value {
    let mut status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    if let Some(kind) = kind {
        status["details"] = json!({"name": name, "kind": kind.plural()});
    }
    if let Some(seconds) = retry_after {
        status["details"]["retryAfterSeconds"] = json!(seconds);
    }
    status
}

/// Sends a fault's `Status`: on a watch, 410 as the `ERROR` event the API server sends for
/// an expired version; otherwise as the HTTP status, with `Retry-After` when asked.
fn fault_response(verb: Verb, status: Value, retry_after: Option<u32>) -> Response {
    if verb == Verb::Watch && status["code"] == 410 {
        let body = Body::from(watch_line("ERROR", &status));
        return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    }
    let code = status["code"].as_u64().and_then(|c| u16::try_from(c).ok());
    let code = code.and_then(|c| StatusCode::from_u16(c).ok());
    let mut response = json_response(code.unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &status);
    if let Some(seconds) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

// === discovery ===

/// A GET route answering a fixed discovery document (counted as `other` by the front).
fn discovery(doc: fn() -> Value) -> MethodRouter<Arc<Shared>> {
    get(move || async move { json_response(StatusCode::OK, &doc()) })
}

fn version() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.0", "gitCommit": "fake-kube",
        "gitTreeState": "clean", "buildDate": "2025-04-23T00:00:00Z", "goVersion": "go1.24.2",
        "compiler": "gc", "platform": "linux/amd64",
    })
}

fn api_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
}

fn api_resources() -> Value {
    let all = ["create", "delete", "get", "list", "patch", "update", "watch"];
    let resource = |name: &str, singular: &str, kind: Kind, verbs: &[&str], short: &str| {
        json!({"name": name, "singularName": singular, "namespaced": kind.is_namespaced(),
               "kind": kind.name(), "verbs": verbs, "shortNames": [short]})
    };
    let status = |name: &str, kind: Kind| {
        json!({"name": name, "singularName": "", "namespaced": true, "kind": kind.name(),
               "verbs": ["get", "patch", "update"]})
    };
    json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        resource("pods", "pod", Kind::Pod, &all, "po"),
        status("pods/status", Kind::Pod),
        resource("services", "service", Kind::Service, &all, "svc"),
        status("services/status", Kind::Service),
        resource("namespaces", "namespace", Kind::Namespace, &all, "ns"),
        resource("events", "event", Kind::Event, &all, "ev"),
    ]})
}

// === objects ===

/// What a request addresses: a collection (`name` empty) or one object, possibly its status.
struct Target {
    kind: Kind,
    /// `None` for cluster-scoped kinds and cluster-wide collections.
    ns: Option<String>,
    name: String,
    scope: Scope,
}

/// The query parameters the fake honours; the rest are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Params {
    watch: Option<String>,
    label_selector: Option<String>,
    field_selector: Option<String>,
    resource_version: Option<String>,
    timeout_seconds: Option<u64>,
    send_initial_events: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
    field_manager: Option<String>,
    grace_period_seconds: Option<i64>,
}

fn is_true(flag: &Option<String>) -> bool {
    matches!(flag.as_deref(), Some("true" | "1"))
}

struct Request {
    method: Method,
    params: Params,
    headers: HeaderMap,
    body: Bytes,
}

/// Parses the path below `/api/v1/` into what it addresses; `None` is a 404.
fn target_of(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.split('/').collect();
    let (ns, rest) = match parts.as_slice() {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let (plural, name, scope) = match rest {
        [plural] => (*plural, "", Scope::Main),
        [plural, name] => (*plural, *name, Scope::Main),
        [plural, name, "status"] => (*plural, *name, Scope::Status),
        _ => return None,
    };
    let kind = Kind::from_plural(plural)?;
    // Namespaced objects need a namespace; only their collections may be cluster-wide.
    let fits = kind.is_namespaced() == ns.is_some() || (ns.is_none() && name.is_empty());
    let scope_fits = scope == Scope::Main || kind.is_namespaced();
    (fits && scope_fits).then(|| Target { kind, ns, name: name.to_string(), scope })
}

async fn object(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<String>,
    method: Method,
    Query(params): Query<Params>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    dispatch(&shared, target_of(&path), Request { method, params, headers, body })
}

/// Serves the request (the front has counted it).
fn dispatch(shared: &Arc<Shared>, target: Option<Target>, req: Request) -> Response {
    let Some(target) = target else {
        return ApiError::new(404, "NotFound", "the server could not find the requested resource")
            .into_response();
    };
    let verb = verb_of(&target, &req.method, is_true(&req.params.watch));
    let result = match verb {
        Verb::Get => get_one(shared, &target),
        Verb::List => list(shared, &target, &req.params),
        Verb::Watch => {
            return watch(shared, &target, &req.params).unwrap_or_else(IntoResponse::into_response);
        }
        Verb::Create => create(shared, &target, &req),
        Verb::Update | Verb::Patch => update(shared, &target, &req, verb),
        Verb::Delete => delete(shared, &target, &req),
        Verb::Other => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{} is not supported here", req.method),
        )),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

fn verb_of(target: &Target, method: &Method, watch: bool) -> Verb {
    let collection = target.name.is_empty();
    let wide = target.ns.is_none() && target.kind.is_namespaced();
    match (method, collection) {
        (&Method::GET, true) if watch => Verb::Watch,
        (&Method::GET, true) => Verb::List,
        (&Method::GET, false) => Verb::Get,
        (&Method::POST, true) if !wide && target.scope == Scope::Main => Verb::Create,
        (&Method::PUT, false) => Verb::Update,
        (&Method::PATCH, false) => Verb::Patch,
        (&Method::DELETE, false) if target.scope == Scope::Main => Verb::Delete,
        _ => Verb::Other,
    }
}

fn ns_of(target: &Target) -> &str {
    target.ns.as_deref().unwrap_or_default()
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn get_one(shared: &Shared, t: &Target) -> Result<Response, ApiError> {
    let obj = shared
        .get(t.kind, ns_of(t), &t.name)
        .ok_or_else(|| ApiError::not_found(t.kind, &t.name))?;
    Ok(json_response(StatusCode::OK, &obj))
}

fn selector(params: &Params) -> Result<Selector, ApiError> {
    Selector::parse(params.label_selector.as_deref().unwrap_or_default())
        .map_err(ApiError::bad_request)
}

fn list(shared: &Shared, t: &Target, params: &Params) -> Result<Response, ApiError> {
    let limit = params.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
    let fields = FieldSelector::parse(params.field_selector.as_deref().unwrap_or_default())
        .map_err(ApiError::bad_request)?;
    let page = shared.list_page(
        t.kind,
        t.ns.as_deref(),
        &selector(params)?,
        &fields,
        limit,
        params.continue_token.as_deref(),
    )?;
    Ok(json_response(StatusCode::OK, &page))
}

fn body_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("the body is not JSON (fake-kube reads JSON only): {e}"))
    })
}

fn create(shared: &Arc<Shared>, t: &Target, req: &Request) -> Result<Response, ApiError> {
    let created = shared.create(t.kind, ns_of(t), body_json(&req.body)?)?;
    Ok(json_response(StatusCode::CREATED, &created))
}

fn update(
    shared: &Arc<Shared>,
    t: &Target,
    req: &Request,
    verb: Verb,
) -> Result<Response, ApiError> {
    let body = body_json(&req.body)?;
    let content_type =
        req.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let change = match (verb, content_type.split(';').next().unwrap_or_default().trim()) {
        (Verb::Update, _) => Change::Replace(body),
        (_, "application/apply-patch+yaml")
            if req.params.field_manager.as_deref().is_none_or(str::is_empty) =>
        {
            let message = "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch";
            return Err(ApiError::new(422, "Invalid", message));
        }
        (_, "application/apply-patch+yaml") => Change::Apply(body),
        (_, "application/merge-patch+json" | "application/strategic-merge-patch+json") => {
            Change::Merge(body)
        }
        (_, "application/json-patch+json") => Change::JsonPatch(body),
        (_, other) => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format: {other}"),
            ));
        }
    };
    let (obj, created) = shared.update(t.kind, ns_of(t), &t.name, t.scope, change, Origin::Api)?;
    let code = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(json_response(code, &obj))
}

fn delete(shared: &Arc<Shared>, t: &Target, req: &Request) -> Result<Response, ApiError> {
    let options = if req.body.is_empty() { Value::Null } else { body_json(&req.body)? };
    let grace = req.params.grace_period_seconds.or(options["gracePeriodSeconds"].as_i64());
    let obj = shared.delete(t.kind, ns_of(t), &t.name, grace)?;
    Ok(json_response(StatusCode::OK, &obj))
}

// === watch ===

/// Starts a newline-delimited JSON stream of watch events.
fn watch(shared: &Arc<Shared>, t: &Target, params: &Params) -> Result<Response, ApiError> {
    let start = match params.resource_version.as_deref() {
        _ if is_true(&params.send_initial_events) => WatchStart::InitialEvents,
        None | Some("" | "0") => WatchStart::Current,
        Some(rv) => WatchStart::After(
            rv.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        ),
    };
    let selector = selector(params)?;
    let (first, receiver, last_rv) = match shared.watch(t.kind, t.ns.as_deref(), &selector, start) {
        Ok(sub) => (sub.backlog, Some(sub.receiver), sub.last_rv),
        // As the real server: a too-old version is an ERROR event in a 200 response.
        Err(e) => (vec![watch_line("ERROR", &e.status())], None, 0),
    };
    let timeout = params.timeout_seconds.map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let live = Live { receiver, kind: t.kind, ns: t.ns.clone(), selector, last_rv };
    let stream = futures::stream::iter(first)
        .chain(futures::stream::unfold(live, next_event))
        .take_until(tokio::time::sleep(timeout))
        .take_until(shared.watches_ended())
        .take_until(shared.closed())
        .map(Ok::<_, std::convert::Infallible>);
    Ok(([(header::CONTENT_TYPE, "application/json")], Body::from_stream(stream)).into_response())
}

/// The live part of a watch: committed events this watch has not sent yet.
struct Live {
    /// `None` once the watch has ended with an error.
    receiver: Option<broadcast::Receiver<Arc<Event>>>,
    kind: Kind,
    ns: Option<String>,
    selector: Selector,
    last_rv: u64,
}

async fn next_event(mut live: Live) -> Option<(Bytes, Live)> {
    loop {
        match live.receiver.as_mut()?.recv().await {
            Ok(event)
                if event.rv > live.last_rv
                    && event.is_seen_by(live.kind, live.ns.as_deref(), &live.selector) =>
            {
                live.last_rv = event.rv;
                return Some((event.line.clone(), live));
            }
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => {
                // The client must relist, as after a compaction on a real cluster.
                live.receiver = None;
                let gone = ApiError::new(410, "Expired", "the watch fell behind the event history");
                return Some((watch_line("ERROR", &gone.status()), live));
            }
            Err(RecvError::Closed) => return None,
        }
    }
}

// === errors ===

impl ApiError {
    /// The `Status` object the API server sends for this error.
    pub(crate) fn status(&self) -> Value {
        let mut details = json!({"name": self.name});
        if let Some(kind) = self.kind {
            details["kind"] = json!(kind.plural());
        }
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "details": details, "code": self.code,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &self.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_below_api_v1_address_what_the_api_server_serves() {
        let cases = [
            ("namespaces", Some((Kind::Namespace, None, "", Scope::Main))),
            ("namespaces/a", Some((Kind::Namespace, None, "a", Scope::Main))),
            ("namespaces/a/pods", Some((Kind::Pod, Some("a"), "", Scope::Main))),
            ("namespaces/a/services/s", Some((Kind::Service, Some("a"), "s", Scope::Main))),
            ("namespaces/a/pods/p/status", Some((Kind::Pod, Some("a"), "p", Scope::Status))),
            ("pods", Some((Kind::Pod, None, "", Scope::Main))),
            ("pods/p", None),
            ("namespaces/a/status", None),
            ("namespaces/a/pods/p/log", None),
            ("namespaces/a/configmaps", None),
        ];

        for (path, expected) in cases {
            let got = target_of(path).map(|t| (t.kind, t.ns, t.name, t.scope));
            let expected =
                expected.map(|(k, ns, n, s)| (k, ns.map(String::from), n.to_string(), s));
            assert_eq!(got, expected, "{path}");
        }
    }
}
