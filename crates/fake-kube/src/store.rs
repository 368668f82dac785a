//! The object store: every write, its resourceVersion and its watch event.
//!
//! One mutex guards objects, the version counter and the event history together, so an
//! event's version order is the order in which watchers receive it.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::body::Bytes;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use crate::fault::Faults;
use crate::selector::{FieldSelector, Selector};
use crate::{Kind, Options, REQUEST_LOG_CAPACITY, RequestCounts, RequestRecord, kubelet, patch};

/// Kind, namespace (empty for namespaces) and name.
pub(crate) type Key = (Kind, String, String);

/// Watch events a slow watcher may fall behind by before it is told 410 Gone.
const FANOUT_CAPACITY: usize = 1 << 16;

/// A committed change, already encoded as the line a watch sends.
pub(crate) struct Event {
    pub rv: u64,
    pub kind: Kind,
    pub ns: String,
    pub object: Value,
    pub line: Bytes,
}

impl Event {
    /// Whether a watch of `kind` in `ns` (all when `None`) with `selector` sends this event.
    pub(crate) fn is_seen_by(&self, kind: Kind, ns: Option<&str>, selector: &Selector) -> bool {
        self.kind == kind && ns.is_none_or(|ns| self.ns == ns) && selector.matches(&self.object)
    }
}

/// An API error, rendered as a `Status` object by the HTTP layer.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub kind: Option<Kind>,
    pub name: String,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError { code, reason, message: message.into(), kind: None, name: String::new() }
    }

    fn about(mut self, kind: Kind, name: &str) -> Self {
        self.kind = Some(kind);
        self.name = name.to_string();
        self
    }

    pub(crate) fn not_found(kind: Kind, name: &str) -> Self {
        let message = format!("{} \"{name}\" not found", kind.plural());
        ApiError::new(404, "NotFound", message).about(kind, name)
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }

    pub(crate) fn invalid(kind: Kind, name: &str, detail: &str) -> Self {
        let message = format!("{} \"{name}\" is invalid: {detail}", kind.name());
        ApiError::new(422, "Invalid", message).about(kind, name)
    }

    /// The namespace lifecycle admission's answer to a create in a terminating namespace.
    fn namespace_terminating(ns: &str, kind: Kind, name: &str) -> Self {
        let message = format!(
            "unable to create new content in namespace {ns} because it is being terminated"
        );
        ApiError::new(403, "Forbidden", message).about(kind, name)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

/// Where a watch starts.
pub(crate) enum WatchStart {
    /// Synthetic `ADDED` events for what exists now, then changes (no or `0` version).
    Current,
    /// As `Current`, then a `BOOKMARK` marking the end of the initial events.
    InitialEvents,
    /// Changes committed after this version.
    After(u64),
}

/// What a new watch sends first and where it continues.
pub(crate) struct Subscription {
    pub backlog: Vec<Bytes>,
    pub receiver: broadcast::Receiver<Arc<Event>>,
    pub last_rv: u64,
}

/// How an update computes the new object from the stored one.
pub(crate) enum Change {
    Replace(Value),
    Merge(Value),
    JsonPatch(Value),
    Apply(Value),
}

/// Who writes: a client through the API, or a test behind the client's back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Api,
    /// May change a pod's whole spec, and the status along with the main resource.
    OutOfBand,
}

/// A delete's outcome: the object as last written, and whether the kubelet must now
/// terminate it (a pod that got its `deletionTimestamp`).
struct Deletion {
    object: Value,
    kubelet_follow_up: bool,
}

/// Which part of the object a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    Main,
    Status,
}

pub(crate) struct State {
    pub opts: Options,
    pub objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    /// Highest version dropped from `history`: watches from before it are 410 Gone.
    expired_rv: u64,
    events: broadcast::Sender<Arc<Event>>,
    next_id: u64,
    pub next_pod_ip: u32,
}

/// Everything the HTTP handlers, the kubelet and the [`crate::FakeKube`] handle share.
pub(crate) struct Shared {
    state: Mutex<State>,
    closed: watch::Sender<bool>,
    /// Bumped by [`Shared::end_watches`]; every open watch ends when it changes.
    watch_epoch: watch::Sender<u64>,
    counts: [AtomicU64; 9],
    log: Mutex<VecDeque<RequestRecord>>,
    faults: Mutex<Faults>,
    /// Runs kubelet timers even when a write comes from outside the runtime.
    pub runtime: tokio::runtime::Handle,
}

/// Fields the server sets and a client's replacement of `spec` must not drop.
const SERVER_DEFAULTED: &[(Kind, &str)] = &[
    (Kind::Pod, "nodeName"),
    (Kind::Service, "clusterIP"),
    (Kind::Service, "clusterIPs"),
    (Kind::Service, "type"),
];

/// Metadata only the server writes; an update keeps the stored values.
const SERVER_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "resourceVersion",
];

pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub(crate) fn finalizers_empty(obj: &Value) -> bool {
    obj["metadata"]["finalizers"].as_array().is_none_or(Vec::is_empty)
}

pub(crate) fn is_deleting(obj: &Value) -> bool {
    obj["metadata"].get("deletionTimestamp").is_some_and(|t| !t.is_null())
}

pub(crate) fn uid(obj: &Value) -> String {
    obj["metadata"]["uid"].as_str().unwrap_or_default().to_string()
}

fn key(kind: Kind, ns: &str, name: &str) -> Key {
    let ns = if kind.is_namespaced() { ns } else { "" };
    (kind, ns.to_string(), name.to_string())
}

// === impl State ===

impl State {
    /// Stamps the next version on `obj`, stores or removes it, and publishes the event.
    pub(crate) fn commit(&mut self, key: Key, mut obj: Value, kind_of_event: &str) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let line = watch_line(kind_of_event, &obj);
        let (kind, ns) = (key.0, key.1.clone());
        let removed = kind_of_event == "DELETED";
        if removed {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key, obj.clone());
        }
        let event =
            Arc::new(Event { rv: self.rv, kind, ns: ns.clone(), object: obj.clone(), line });
        if self.history.len() >= self.opts.watch_history.max(1) {
            self.expired_rv = self.history.pop_front().map_or(self.expired_rv, |e| e.rv);
        }
        self.history.push_back(event.clone());
        // No receiver is not an error: nobody is watching.
        let _ = self.events.send(event);
        if removed && kind.is_namespaced() {
            self.purge_namespace_if_done(&ns);
        }
        obj
    }

    /// Removes a terminating namespace once it holds no objects and no finalizers.
    fn purge_namespace_if_done(&mut self, ns: &str) {
        let key = key(Kind::Namespace, "", ns);
        let Some(namespace) = self.objects.get(&key) else { return };
        if is_deleting(namespace) && finalizers_empty(namespace) && !self.holds_objects(ns) {
            let namespace = namespace.clone();
            self.commit(key, namespace, "DELETED");
        }
    }

    /// Whether any namespaced object (terminating ones included) is in `ns`.
    fn holds_objects(&self, ns: &str) -> bool {
        self.keys_in(ns).next().is_some()
    }

    /// The keys of every object in namespace `ns`, by kind then name.
    fn keys_in<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = &'a Key> + 'a {
        Kind::ALL.into_iter().filter(|k| k.is_namespaced()).flat_map(move |kind| {
            let first = (kind, ns.to_string(), String::new());
            self.objects
                .range(first..)
                .map(|(k, _)| k)
                .take_while(move |k| k.0 == kind && k.1 == ns)
        })
    }

    /// Rejects a create in namespace `ns` unless it exists and is not terminating.
    fn check_namespace_open(&self, ns: &str, kind: Kind, name: &str) -> Result<(), ApiError> {
        match self.objects.get(&key(Kind::Namespace, "", ns)) {
            None => Err(ApiError::not_found(Kind::Namespace, ns)),
            Some(namespace) if is_deleting(namespace) => {
                Err(ApiError::namespace_terminating(ns, kind, name))
            }
            Some(_) => Ok(()),
        }
    }

    /// Forgets the history and moves the version on, so every version handed out so far
    /// is older than the history (410 Gone) and the next list reports a newer one.
    fn expire_history(&mut self) {
        self.rv += 1;
        self.expired_rv = self.rv;
        self.history.clear();
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Stores a new object with the metadata and defaults the server assigns.
    fn create(&mut self, kind: Kind, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        check_shape(&obj)?;
        let name = self.name_for(kind, &obj)?;
        let given_ns = obj["metadata"]["namespace"].as_str().unwrap_or(ns);
        if kind.is_namespaced() && given_ns != ns {
            let msg = "the namespace of the provided object does not match the namespace sent on the request";
            return Err(ApiError::bad_request(msg));
        }
        if kind.is_namespaced() {
            self.check_namespace_open(ns, kind, &name)?;
        }
        let key = key(kind, ns, &name);
        if let Some(existing) = self.objects.get(&key) {
            return Err(already_exists(kind, &name, existing));
        }
        let id = self.next_id();
        obj["apiVersion"] = json!("v1");
        obj["kind"] = json!(kind.name());
        let meta = &mut obj["metadata"];
        for field in SERVER_METADATA {
            meta.as_object_mut().map(|m| m.remove(*field));
        }
        meta["name"] = json!(name);
        if kind.is_namespaced() {
            meta["namespace"] = json!(ns);
        }
        meta["uid"] = json!(format!("00000000-0000-4000-8000-{id:012x}"));
        meta["creationTimestamp"] = json!(now());
        meta["generation"] = json!(1);
        self.set_defaults(kind, &mut obj, id);
        let created = self.commit(key, obj, "ADDED");
        if kind == Kind::Pod {
            kubelet::record_scheduling(self, &created);
        }
        Ok(created)
    }

    /// Records an event about `pod` as its kubelet or the scheduler would: the same
    /// reason and message for the same pod again bumps `count` and `lastTimestamp`.
    pub(crate) fn record_event(
        &mut self,
        pod: &Value,
        kind_of_event: &str,
        reason: &str,
        message: &str,
    ) -> Value {
        let meta = &pod["metadata"];
        let (ns, name, pod_uid) = (
            meta["namespace"].as_str().unwrap_or_default().to_string(),
            meta["name"].as_str().unwrap_or_default().to_string(),
            uid(pod),
        );
        let at = now();
        // The pod's events are named `<pod>.<id>`: only those are looked at.
        let prefix = format!("{name}.");
        let existing = self
            .objects
            .range(key(Kind::Event, &ns, &prefix)..)
            .take_while(|(k, _)| k.0 == Kind::Event && k.1 == ns && k.2.starts_with(&prefix))
            .find(|(_, e)| {
                e["involvedObject"]["uid"] == pod_uid.as_str()
                    && e["reason"] == reason
                    && e["message"] == message
            })
            .map(|(k, e)| (k.clone(), e.clone()));
        if let Some((key, mut event)) = existing {
            event["count"] = json!(event["count"].as_i64().unwrap_or(1) + 1);
            event["lastTimestamp"] = json!(at);
            return self.commit(key, event, "MODIFIED");
        }
        let id = self.next_id();
        let event_name = format!("{name}.{id:016x}");
        let component = if reason.contains("Scheduling") || reason == "Scheduled" {
            "default-scheduler"
        } else {
            "kubelet"
        };
        let event = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": event_name, "namespace": ns, "creationTimestamp": at,
                         "uid": format!("00000000-0000-4000-9000-{id:012x}")},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": ns,
                               "name": name, "uid": pod_uid},
            "reason": reason,
            "message": message,
            "type": kind_of_event,
            "count": 1,
            "firstTimestamp": at,
            "lastTimestamp": at,
            "source": {"component": component},
            "reportingComponent": component,
        });
        self.commit(key(Kind::Event, &ns, &event_name), event, "ADDED")
    }

    fn name_for(&mut self, kind: Kind, obj: &Value) -> Result<String, ApiError> {
        let meta = &obj["metadata"];
        if let Some(name) = meta["name"].as_str().filter(|n| !n.is_empty()) {
            return Ok(name.to_string());
        }
        match meta["generateName"].as_str() {
            Some(prefix) => Ok(format!("{prefix}{:05x}", self.next_id())),
            None => Err(ApiError::invalid(
                kind,
                "",
                "metadata.name: Required value: name or generateName is required",
            )),
        }
    }

    fn set_defaults(&self, kind: Kind, obj: &mut Value, id: u64) {
        match kind {
            Kind::Pod => kubelet::set_initial_status(self, obj),
            Kind::Service => {
                let spec = &mut obj["spec"];
                if spec["type"].is_null() {
                    spec["type"] = json!("ClusterIP");
                }
                if spec["clusterIP"].as_str().is_none_or(str::is_empty) {
                    let ip = format!("10.96.{}.{}", (id >> 8) & 0xff, id & 0xff);
                    spec["clusterIP"] = json!(ip);
                    spec["clusterIPs"] = json!([ip]);
                }
                obj["status"] = json!({"loadBalancer": {}});
            }
            Kind::Namespace => obj["status"] = json!({"phase": "Active"}),
            Kind::Event => {}
        }
    }

    /// Deletes like the API server: objects with finalizers, and pods (which terminate for
    /// [`Options::termination_delay`] unless `grace` is 0), get a `deletionTimestamp` first.
    fn delete(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        grace: Option<i64>,
    ) -> Result<Deletion, ApiError> {
        let key = key(kind, ns, name);
        let mut obj =
            self.objects.get(&key).cloned().ok_or_else(|| ApiError::not_found(kind, name))?;
        if is_deleting(&obj) {
            return Ok(Deletion { object: obj, kubelet_follow_up: false });
        }
        let graceful = kind == Kind::Pod && grace != Some(0);
        if finalizers_empty(&obj) && !graceful {
            let object = self.commit(key, obj, "DELETED");
            return Ok(Deletion { object, kubelet_follow_up: false });
        }
        obj["metadata"]["deletionTimestamp"] = json!(now());
        obj["metadata"]["deletionGracePeriodSeconds"] =
            json!(if graceful { grace.unwrap_or(30) } else { 0 });
        let object = self.commit(key, obj, "MODIFIED");
        Ok(Deletion { object, kubelet_follow_up: kind == Kind::Pod })
    }

    /// Marks a namespace `Terminating` and deletes its objects as a client delete would;
    /// it is removed once it holds none (see [`State::purge_namespace_if_done`]).
    ///
    /// Returns the namespace as last written and the pods the kubelet must terminate.
    fn delete_namespace(&mut self, name: &str) -> Result<(Value, Vec<Value>), ApiError> {
        let key = key(Kind::Namespace, "", name);
        let mut namespace = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(Kind::Namespace, name))?;
        if is_deleting(&namespace) {
            let message = format!(
                "Operation cannot be fulfilled on namespaces \"{name}\": The system is ensuring \
                 all content is removed from this namespace.  Upon completion, this namespace \
                 will automatically be purged by the system."
            );
            return Err(ApiError::new(409, "Conflict", message).about(Kind::Namespace, name));
        }
        namespace["metadata"]["deletionTimestamp"] = json!(now());
        namespace["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        namespace["status"]["phase"] = json!("Terminating");
        let mut last = self.commit(key.clone(), namespace, "MODIFIED");
        let contents: Vec<Key> = self.keys_in(name).cloned().collect();
        let mut terminating = Vec::new();
        for (kind, ns, object) in contents {
            // Cannot fail: the key was just listed under the same lock.
            if let Ok(deletion) = self.delete(kind, &ns, &object, None) {
                terminating.extend(deletion.kubelet_follow_up.then_some(deletion.object));
            }
        }
        self.purge_namespace_if_done(name);
        if let Some(current) = self.objects.get(&key) {
            last = current.clone();
        }
        Ok((last, terminating))
    }
}

/// The conflict of a create whose name is taken, as the API server words it.
fn already_exists(kind: Kind, name: &str, existing: &Value) -> ApiError {
    let mut message = format!("{} \"{name}\" already exists", kind.plural());
    if is_deleting(existing) {
        message = format!("object is being deleted: {message}");
    }
    ApiError::new(409, "AlreadyExists", message).about(kind, name)
}

/// Encodes one watch event as the newline-terminated JSON line a watch sends.
pub(crate) fn watch_line(kind_of_event: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind_of_event, "object": object}).to_string().into_bytes();
    line.push(b'\n');
    Bytes::from(line)
}

/// Rebuilds `new` so that it changes only what a client may change in `scope`.
fn reconcile(kind: Kind, old: &Value, mut new: Value, scope: Scope) -> Value {
    if scope == Scope::Status {
        let mut out = old.clone();
        out["status"] = new["status"].take();
        return out;
    }
    new["apiVersion"] = old["apiVersion"].clone();
    new["kind"] = old["kind"].clone();
    if !new["metadata"].is_object() {
        new["metadata"] = json!({});
    }
    for field in SERVER_METADATA {
        match old["metadata"].get(*field) {
            Some(value) => new["metadata"][*field] = value.clone(),
            None => drop(new["metadata"].as_object_mut().map(|m| m.remove(*field))),
        }
    }
    match old.get("status") {
        Some(status) => new["status"] = status.clone(),
        None => drop(new.as_object_mut().map(|n| n.remove("status"))),
    }
    let defaulted = SERVER_DEFAULTED.iter().filter(|(k, _)| *k == kind && new["spec"].is_object());
    for (_, field) in defaulted.collect::<Vec<_>>() {
        if new["spec"].get(*field).is_none_or(Value::is_null) && old["spec"].get(*field).is_some() {
            new["spec"][*field] = old["spec"][*field].clone();
        }
    }
    new
}

/// Container images of a pod spec, in order; the only spec field a pod update may change.
pub(crate) fn images(spec: &Value) -> Vec<Value> {
    let list = |field: &str| spec[field].as_array().cloned().unwrap_or_default();
    list("initContainers").iter().chain(&list("containers")).map(|c| c["image"].clone()).collect()
}

fn without_images(spec: &Value) -> Value {
    let mut spec = spec.clone();
    for field in ["initContainers", "containers"] {
        for container in spec.get_mut(field).and_then(Value::as_array_mut).into_iter().flatten() {
            container.as_object_mut().map(|c| c.remove("image"));
        }
    }
    spec
}

/// Rejects the changes a real API server forbids, with its messages; a write behind the
/// client's back may change a pod's spec.
fn validate_update(
    kind: Kind,
    name: &str,
    old: &Value,
    new: &Value,
    origin: Origin,
) -> Result<(), ApiError> {
    if origin == Origin::Api && kind == Kind::Pod {
        validate_pod_update(name, old, new)?;
    }
    validate_service_update(kind, name, old, new)
}

fn validate_pod_update(name: &str, old: &Value, new: &Value) -> Result<(), ApiError> {
    if without_images(&old["spec"]) != without_images(&new["spec"]) {
        let detail = "spec: Forbidden: pod updates may not change fields other than \
                      `spec.containers[*].image`, `spec.initContainers[*].image`, \
                      `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to \
                      existing tolerations), `spec.terminationGracePeriodSeconds`";
        return Err(ApiError::invalid(Kind::Pod, name, detail));
    }
    Ok(())
}

fn validate_service_update(
    kind: Kind,
    name: &str,
    old: &Value,
    new: &Value,
) -> Result<(), ApiError> {
    let cluster_ip = |obj: &Value| obj["spec"]["clusterIP"].as_str().map(str::to_owned);
    if kind == Kind::Service
        && cluster_ip(old).is_some_and(|ip| !ip.is_empty())
        && cluster_ip(new) != cluster_ip(old)
    {
        let detail = format!(
            "spec.clusterIP: Invalid value: {:?}: field is immutable",
            cluster_ip(new).unwrap_or_default()
        );
        return Err(ApiError::invalid(kind, name, &detail));
    }
    Ok(())
}

fn check_version(kind: Kind, name: &str, old: &Value, new: &Value) -> Result<(), ApiError> {
    let given = new["metadata"]["resourceVersion"].as_str().filter(|v| !v.is_empty());
    match given {
        Some(v) if Some(v) != old["metadata"]["resourceVersion"].as_str() => {
            let message = format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                kind.plural()
            );
            Err(ApiError::new(409, "Conflict", message).about(kind, name))
        }
        _ => Ok(()),
    }
}

// === impl Shared ===

impl Shared {
    pub(crate) fn new(opts: Options) -> Arc<Shared> {
        let (events, _) = broadcast::channel(FANOUT_CAPACITY);
        let state = State {
            opts,
            objects: BTreeMap::new(),
            rv: 0,
            history: VecDeque::new(),
            expired_rv: 0,
            events,
            next_id: 0,
            next_pod_ip: 0,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            closed: watch::channel(false).0,
            watch_epoch: watch::channel(0).0,
            counts: Default::default(),
            log: Mutex::new(VecDeque::new()),
            faults: Mutex::new(Faults::default()),
            runtime: tokio::runtime::Handle::current(),
        });
        shared.ensure_namespace("default");
        shared
    }

    /// The state; a panic elsewhere while holding the lock leaves it usable for tests.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a received request under its verb and appends it to the bounded log.
    pub(crate) fn record(&self, record: RequestRecord) {
        self.counts[0].fetch_add(1, Ordering::Relaxed);
        self.counts[record.verb.counter()].fetch_add(1, Ordering::Relaxed);
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() >= REQUEST_LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(record);
    }

    pub(crate) fn request_log(&self) -> Vec<RequestRecord> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect()
    }

    /// The injected faults; a panic elsewhere while holding the lock leaves them usable.
    pub(crate) fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn end_watches(&self) {
        self.watch_epoch.send_modify(|epoch| *epoch += 1);
    }

    /// Resolves at the next [`Shared::end_watches`] after this call.
    pub(crate) fn watches_ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.watch_epoch.subscribe();
        async move {
            // An error means the fake is gone, which ends the watch too.
            let _ = rx.changed().await;
        }
    }

    pub(crate) fn expire_history(&self) {
        self.lock().expire_history();
    }

    pub(crate) fn requests(&self) -> RequestCounts {
        let c = |i: usize| self.counts[i].load(Ordering::Relaxed);
        RequestCounts {
            total: c(0),
            get: c(1),
            list: c(2),
            watch: c(3),
            create: c(4),
            update: c(5),
            patch: c(6),
            delete: c(7),
            other: c(8),
        }
    }

    pub(crate) fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Resolves once [`Shared::close`] has been called.
    pub(crate) fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.closed.subscribe();
        async move {
            let _ = rx.wait_for(|closed| *closed).await;
        }
    }

    pub(crate) fn ensure_namespace(&self, name: &str) {
        let mut st = self.lock();
        if !st.objects.contains_key(&key(Kind::Namespace, "", name)) {
            let ns = json!({"metadata": {"name": name}});
            // Cannot fail: the name is given and not taken.
            let _ = st.create(Kind::Namespace, "", ns);
        }
    }

    pub(crate) fn set_image_failing(&self, image: &str, failing: bool) {
        let images = &mut self.lock().opts.failing_images;
        images.retain(|i| i != image);
        if failing {
            images.push(image.to_string());
        }
    }

    pub(crate) fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        self.lock().objects.get(&key(kind, ns, name)).cloned()
    }

    pub(crate) fn list(&self, kind: Kind, ns: Option<&str>) -> Vec<Value> {
        let st = self.lock();
        st.objects.iter().filter(|(k, _)| in_scope(k, kind, ns)).map(|(_, v)| v.clone()).collect()
    }

    /// One page of a list, as a `…List` object.
    ///
    /// The continue token carries the list's version and the last key, so every page
    /// reports the first page's version and a watch from it misses nothing.
    pub(crate) fn list_page(
        &self,
        kind: Kind,
        ns: Option<&str>,
        selector: &Selector,
        fields: &FieldSelector,
        limit: usize,
        continue_token: Option<&str>,
    ) -> Result<Value, ApiError> {
        let st = self.lock();
        let (list_rv, after) = match continue_token.filter(|t| !t.is_empty()) {
            None => (st.rv, None),
            Some(token) => parse_continue(token)?,
        };
        let mut matching = st
            .objects
            .iter()
            .filter(|(k, v)| in_scope(k, kind, ns) && selector.matches(v) && fields.matches(v))
            .filter(|(k, _)| after.as_ref().is_none_or(|a| (&k.1, &k.2) > (&a.0, &a.1)));
        let items: Vec<Value> = matching.by_ref().take(limit).map(|(_, v)| v.clone()).collect();
        let mut meta = json!({"resourceVersion": list_rv.to_string()});
        if let (true, Some(last)) = (matching.next().is_some(), items.last()) {
            let (ns, name) = (last["metadata"]["namespace"].as_str(), &last["metadata"]["name"]);
            meta["continue"] =
                json!(format!("{list_rv}/{}/{}", ns.unwrap_or(""), name.as_str().unwrap_or("")));
        }
        Ok(
            json!({"apiVersion": "v1", "kind": format!("{}List", kind.name()), "metadata": meta, "items": items}),
        )
    }

    /// Registers a watch: the events it must send first and a receiver for the rest.
    ///
    /// # Errors
    /// 410 `Expired` when `start` is older than the kept history.
    pub(crate) fn watch(
        &self,
        kind: Kind,
        ns: Option<&str>,
        selector: &Selector,
        start: WatchStart,
    ) -> Result<Subscription, ApiError> {
        let st = self.lock();
        let receiver = st.events.subscribe();
        let matches = |k: &Key, v: &Value| in_scope(k, kind, ns) && selector.matches(v);
        let backlog = match start {
            WatchStart::After(rv) if rv < st.expired_rv => {
                let message = format!("too old resource version: {rv} ({})", st.expired_rv + 1);
                return Err(ApiError::new(410, "Expired", message));
            }
            WatchStart::After(rv) => st
                .history
                .iter()
                .filter(|e| e.rv > rv && e.is_seen_by(kind, ns, selector))
                .map(|e| e.line.clone())
                .collect(),
            WatchStart::Current | WatchStart::InitialEvents => {
                let mut lines: Vec<Bytes> = st
                    .objects
                    .iter()
                    .filter(|(k, v)| matches(k, v))
                    .map(|(_, v)| watch_line("ADDED", v))
                    .collect();
                if matches!(start, WatchStart::InitialEvents) {
                    lines.push(bookmark(kind, st.rv));
                }
                lines
            }
        };
        Ok(Subscription { backlog, receiver, last_rv: st.rv })
    }

    pub(crate) fn create(
        self: &Arc<Self>,
        kind: Kind,
        ns: &str,
        obj: Value,
    ) -> Result<Value, ApiError> {
        let created = self.lock().create(kind, ns, obj)?;
        if kind == Kind::Pod {
            kubelet::on_pod_written(self, None, &created);
        }
        Ok(created)
    }

    /// Patches or replaces a stored object; an apply creates a missing one.
    ///
    /// Returns the object and whether it was created.
    pub(crate) fn update(
        self: &Arc<Self>,
        kind: Kind,
        ns: &str,
        name: &str,
        scope: Scope,
        change: Change,
        origin: Origin,
    ) -> Result<(Value, bool), ApiError> {
        let mut st = self.lock();
        let key = key(kind, ns, name);
        let Some(old) = st.objects.get(&key).cloned() else {
            return match change {
                Change::Apply(mut body) if scope == Scope::Main && body.is_object() => {
                    body["metadata"]["name"] = json!(name);
                    drop(body.as_object_mut().map(|b| b.remove("status")));
                    let created = st.create(kind, ns, body)?;
                    drop(st);
                    if kind == Kind::Pod {
                        kubelet::on_pod_written(self, None, &created);
                    }
                    Ok((created, true))
                }
                _ => Err(ApiError::not_found(kind, name)),
            };
        };
        let candidate = match change {
            Change::Replace(body) => body,
            Change::Merge(patch) => {
                let mut doc = old.clone();
                patch::merge(&mut doc, &patch);
                doc
            }
            Change::JsonPatch(ops) => patch::json_patch(old.clone(), &ops).map_err(|e| {
                ApiError::new(422, "Invalid", format!("the JSON patch failed: {e}"))
            })?,
            // Applying to `/status` sets the status, which the main resource never applies.
            Change::Apply(body) if scope == Scope::Status => json!({"status": body["status"]}),
            Change::Apply(body) => patch::apply(&old, &body),
        };
        check_shape(&candidate)?;
        check_version(kind, name, &old, &candidate)?;
        let status = candidate.get("status").filter(|_| origin == Origin::OutOfBand).cloned();
        let mut new = reconcile(kind, &old, candidate, scope);
        if let Some(status) = status {
            new["status"] = status;
        }
        validate_update(kind, name, &old, &new, origin)?;
        if new == old {
            // As on a cluster: a no-op write bumps no version and sends no event.
            return Ok((old, false));
        }
        if new["spec"] != old["spec"] {
            new["metadata"]["generation"] =
                json!(old["metadata"]["generation"].as_i64().unwrap_or(0) + 1);
        }
        let finished = is_deleting(&new)
            && finalizers_empty(&new)
            && (kind != Kind::Namespace || !st.holds_objects(name));
        if finished && kind != Kind::Pod {
            return Ok((st.commit(key, new, "DELETED"), false));
        }
        let written = st.commit(key, new, "MODIFIED");
        drop(st);
        if kind == Kind::Pod {
            kubelet::on_pod_written(self, Some(&old), &written);
        }
        Ok((written, false))
    }

    /// Deletes like the API server (see [`State::delete`]); a namespace terminates first
    /// (see [`State::delete_namespace`]).
    pub(crate) fn delete(
        self: &Arc<Self>,
        kind: Kind,
        ns: &str,
        name: &str,
        grace: Option<i64>,
    ) -> Result<Value, ApiError> {
        let mut st = self.lock();
        let (written, terminating) = if kind == Kind::Namespace {
            st.delete_namespace(name)?
        } else {
            let deletion = st.delete(kind, ns, name, grace)?;
            let terminating = deletion.kubelet_follow_up.then(|| deletion.object.clone());
            (deletion.object, terminating.into_iter().collect())
        };
        drop(st);
        for pod in &terminating {
            kubelet::on_pod_written(self, None, pod);
        }
        Ok(written)
    }
}

/// Rejects bodies the store could not index into: an object whose `metadata`, `spec`
/// and `status` are objects when present.
fn check_shape(obj: &Value) -> Result<(), ApiError> {
    let part_ok = |field: &str| obj.get(field).is_none_or(|v| v.is_object() || v.is_null());
    if obj.is_object() && ["metadata", "spec", "status"].into_iter().all(part_ok) {
        return Ok(());
    }
    Err(ApiError::bad_request(
        "the object must be a JSON object with object metadata, spec and status",
    ))
}

fn in_scope(key: &Key, kind: Kind, ns: Option<&str>) -> bool {
    key.0 == kind && ns.is_none_or(|ns| key.1 == ns)
}

fn parse_continue(token: &str) -> Result<(u64, Option<(String, String)>), ApiError> {
    let mut parts = token.splitn(3, '/');
    let invalid = || ApiError::bad_request(format!("invalid continue token {token:?}"));
    let rv = parts.next().and_then(|rv| rv.parse().ok()).ok_or_else(invalid)?;
    let (ns, name) = (parts.next().ok_or_else(invalid)?, parts.next().ok_or_else(invalid)?);
    Ok((rv, Some((ns.to_string(), name.to_string()))))
}

/// The `BOOKMARK` that ends the initial events of a streaming list.
fn bookmark(kind: Kind, rv: u64) -> Bytes {
    let object = json!({
        "apiVersion": "v1",
        "kind": kind.name(),
        "metadata": {"resourceVersion": rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}},
    });
    watch_line("BOOKMARK", &object)
}
