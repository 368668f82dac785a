//! An in-process fake Kubernetes API server for tests and benchmarks.
//!
//! There is no cluster on developer or CI machines, so the `resource` service's Kubernetes
//! code is tested against this server through the real `kube` client and a kubeconfig,
//! exactly as it would reach a cluster. It depends on axum, tokio and serde_json only.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use fake_kube::{FakeKube, Kind, Options};
//! use kube::config::{KubeConfigOptions, Kubeconfig};
//!
//! let fake = FakeKube::start(Options::default()).await?;
//! let kubeconfig = Kubeconfig::from_yaml(&fake.kubeconfig_yaml("default"))?;
//! let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
//! let client = kube::Client::try_from(config)?;
//! // … run the code under test with `client`, then look behind its back:
//! assert!(fake.get(Kind::Pod, "default", "instance-42").is_some());
//! println!("{:?}", fake.requests());
//! fake.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # What it implements
//! - Discovery: `/version`, `/api`, `/api/v1`, `/apis` (no groups; other paths are 404).
//! - core/v1 `pods`, `services` and `namespaces`: get, list (label selectors, `limit` and
//!   `continue`), watch (`resourceVersion`, `sendInitialEvents`, `timeoutSeconds`, 410 Gone
//!   when the version is older than the kept history), create, replace (PUT), delete, and
//!   patch as apply, merge, strategic-merge (treated as merge) and JSON patch. `pods/status`
//!   may be read and patched. Cluster-wide lists and watches at `/api/v1/{pods,services}`.
//! - One global `resourceVersion` counter; a write carrying a stale `metadata.resourceVersion`
//!   is 409 `Conflict`. Errors are `Status` objects with the real reasons and codes; a create
//!   whose name is held by an object being deleted is 409 `AlreadyExists`, "object is being
//!   deleted: …".
//! - Finalizers and graceful deletion: a deleted object with finalizers keeps a
//!   `deletionTimestamp` until a patch empties them; a deleted pod keeps its name for
//!   [`Options::termination_delay`] (immediately with `gracePeriodSeconds: 0`).
//! - Namespace lifecycle: deleting a namespace (over HTTP or with
//!   [`FakeKube::delete_out_of_band`]) sets its `deletionTimestamp` and `status.phase:
//!   Terminating` and deletes every object in it as a client delete would (finalizers hold
//!   objects, pods terminate); the namespace is removed once it holds no objects (and has no
//!   finalizers of its own). Deleting it again is 409 `Conflict`, creating it again 409
//!   `AlreadyExists`. Creating in a terminating namespace (POST, or an apply that creates) is
//!   403 `Forbidden`; updates of what is still in it work. Creating in a missing namespace
//!   is 404 `NotFound`, `namespaces "x" not found`. Every step sends its watch events.
//! - Fault injection in front of the handlers, as a fault-injecting proxy
//!   ([`FakeKube::inject`]): a [`Fault`] matching verb, kind and object name answers a
//!   `Status` (with `Retry-After` if asked), hangs, or delays, for a number of requests or
//!   forever; watches included. Faulted requests are counted and logged like the others.
//!   Note that `kube` itself retries 429, 503 and 504 (honouring `Retry-After`).
//! - Watch disruption: [`FakeKube::end_watches`] ends every open watch (clients watch
//!   again), [`FakeKube::expire_history`] makes every version handed out so far 410 Gone.
//! - A request log: [`FakeKube::request_log`] has each request's arrival time, verb, kind,
//!   namespace and name, for rates and per-object counts; [`FakeKube::requests`] counts.
//! - Changes behind the client's back: [`FakeKube::create_out_of_band`],
//!   [`FakeKube::patch_out_of_band`] (a merge patch that may also change a pod's spec
//!   beyond images, and the status) and [`FakeKube::delete_out_of_band`].
//! - Pod spec immutability: any change but container images is 422 `Invalid`; so is a
//!   change of a Service's `spec.clusterIP` once set (also to or from `None`, headless).
//! - A kubelet: a pod is `Pending` when created, `Running` with a pod IP after
//!   [`Options::kubelet_delay`], or stuck in `ErrImagePull` / `ImagePullBackOff` when an image
//!   is failing, or `Unschedulable` when its `nodeSelector` is not met or it asks for more
//!   `nvidia.com/gpu` than the node has free ([`Options::node_gpus`]).
//! - core/v1 `events`, recorded as the scheduler and kubelet do: `Scheduled` or
//!   `FailedScheduling` when a pod is created, `Failed` (`Failed to pull image …`) and
//!   `BackOff` when its image fails, `Started` when its container runs; a repeat of the
//!   same reason and message for the same pod bumps `count` and `lastTimestamp`. Tests add
//!   their own with [`FakeKube::record_event`] (a `FailedMount`, say), and script a pod's
//!   status with [`FakeKube::patch_out_of_band`]. Lists honour `fieldSelector`
//!   (`involvedObject.name=p,involvedObject.kind=Pod`; `=`, `==`, `!=` on any field path).
//!
//! # What it simplifies
//! - Server-side apply has no managed fields: labels and annotations are merged, finalizers
//!   are a set union (remove one with a merge or JSON patch), every other top-level field the
//!   applied object names (`spec`, …) replaces the stored one, keeping server-defaulted
//!   fields (`spec.clusterIP`, `spec.clusterIPs`, `spec.type`, `spec.nodeName`) when absent;
//!   `status` is never applied. `force` is accepted and ignored: there are no conflicts
//!   between managers. Bodies must be JSON (kube sends JSON, also for apply).
//! - Only the fields the fake sets are defaulted (no `restartPolicy`, `dnsPolicy`, …).
//! - A watch filters each event by the object's labels at that moment (an object that
//!   stops matching produces no `DELETED`). `BOOKMARK` is sent only to end the initial
//!   events of a streaming list.
//! - `dryRun`, `propagationPolicy`, preconditions and a watch's `fieldSelector` are ignored.
//! - Events are core/v1 only (no `events.k8s.io`), kept until their namespace goes, and
//!   recorded only when a container's state changes (the kubelet's back-off repeats are not).
//!
//! # What it does not do
//! No authentication or authorisation, no TLS, no other API groups, no owner-reference
//! garbage collection, no admission beyond the namespace lifecycle checks, no protobuf, no
//! persistence. Namespaces have no `spec.finalizers` (`kubernetes`) and no
//! `NamespaceDeletionContentFailure`-style conditions; their content is deleted at once
//! rather than by a controller. Faults cannot reset connections or corrupt bodies, and
//! match no namespace or label. A fault's 410 on a watch is an `ERROR` event in a 200
//! stream, as the API server sends an expired version; every other fault code is the HTTP
//! status.

#![forbid(unsafe_code)]

mod fault;
mod http;
mod kubelet;
mod patch;
mod selector;
mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::task::JoinHandle;

pub use crate::fault::{Fault, FaultAction, FaultId};
use crate::store::{Change, Origin, Scope, Shared};

/// How the simulated kubelet and API server behave.
#[derive(Debug, Clone)]
pub struct Options {
    /// Time from a pod's creation to `Running` (and between image-pull retries).
    pub kubelet_delay: Duration,
    /// Time a deleted pod without finalizers keeps its name before it is gone.
    pub termination_delay: Duration,
    /// Image references whose pull fails (`ErrImagePull`, then `ImagePullBackOff`).
    pub failing_images: Vec<String>,
    /// Labels of the single node; `None` accepts every `nodeSelector`, `Some` only subsets.
    pub node_labels: Option<BTreeMap<String, String>>,
    /// Watch events kept for resuming watches; older versions answer 410 Gone.
    pub watch_history: usize,
    /// `nvidia.com/gpu` devices of the node; `None`: as many as pods ask for. A pod that
    /// asks for more than the pods scheduled before it left free is `Unschedulable`
    /// (`0/1 nodes are available: 1 Insufficient nvidia.com/gpu.`).
    pub node_gpus: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            kubelet_delay: Duration::from_millis(50),
            termination_delay: Duration::from_millis(50),
            failing_images: Vec::new(),
            node_labels: None,
            watch_history: 10_000,
            node_gpus: None,
        }
    }
}

/// The kinds the fake stores, all in core/v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pod,
    Service,
    Namespace,
    Event,
}

impl Kind {
    /// The resource name in URLs (`pods`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::Namespace => "namespaces",
            Kind::Event => "events",
        }
    }

    /// The `kind` field of an object (`Pod`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::Namespace => "Namespace",
            Kind::Event => "Event",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn is_namespaced(self) -> bool {
        self != Kind::Namespace
    }

    /// Every kind the fake stores.
    pub(crate) const ALL: [Kind; 4] = [Kind::Pod, Kind::Service, Kind::Namespace, Kind::Event];

    fn from_plural(plural: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.plural() == plural)
    }
}

/// What a request does, as counted in [`RequestCounts`], logged in [`RequestRecord`] and
/// matched by a [`Fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// `GET` of one object (or its status).
    Get,
    /// `GET` of a collection.
    List,
    /// `GET` of a collection with `watch=true`.
    Watch,
    /// `POST` to a collection.
    Create,
    /// `PUT` of one object (or its status).
    Update,
    /// `PATCH` of one object (or its status), including server-side apply.
    Patch,
    /// `DELETE` of one object.
    Delete,
    /// Discovery (`/version`, `/api`, `/apis`) and everything that is not an object verb.
    Other,
}

impl Verb {
    /// Whether the verb writes: create, update, patch or delete.
    pub fn is_write(self) -> bool {
        matches!(self, Verb::Create | Verb::Update | Verb::Patch | Verb::Delete)
    }

    /// The index of the verb's counter in the store (0 is the total).
    pub(crate) fn counter(self) -> usize {
        self as usize + 1
    }
}

/// One request the fake received, in [`FakeKube::request_log`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// When the request arrived.
    pub at: Instant,
    /// What it does.
    pub verb: Verb,
    /// The kind it addresses; `None` for discovery and unknown paths.
    pub kind: Option<Kind>,
    /// The namespace in the URL; empty for cluster-scoped objects and cluster-wide lists.
    pub namespace: String,
    /// The object name in the URL; empty for collections.
    pub name: String,
}

/// How many [`RequestRecord`]s [`FakeKube::request_log`] keeps; older ones are dropped.
pub const REQUEST_LOG_CAPACITY: usize = 200_000;

/// API requests served since start, by verb, to measure a client's request rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub total: u64,
    pub get: u64,
    pub list: u64,
    pub watch: u64,
    pub create: u64,
    pub update: u64,
    pub patch: u64,
    pub delete: u64,
    /// `/version`, `/api`, `/apis` and everything else that is not an object verb.
    pub other: u64,
}

impl RequestCounts {
    /// The requests served between `earlier` and `self`.
    pub fn since(&self, earlier: &RequestCounts) -> RequestCounts {
        RequestCounts {
            total: self.total.saturating_sub(earlier.total),
            get: self.get.saturating_sub(earlier.get),
            list: self.list.saturating_sub(earlier.list),
            watch: self.watch.saturating_sub(earlier.watch),
            create: self.create.saturating_sub(earlier.create),
            update: self.update.saturating_sub(earlier.update),
            patch: self.patch.saturating_sub(earlier.patch),
            delete: self.delete.saturating_sub(earlier.delete),
            other: self.other.saturating_sub(earlier.other),
        }
    }
}

/// A running fake API server; dropping it without [`FakeKube::shutdown`] leaves it serving
/// until the runtime ends.
pub struct FakeKube {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl FakeKube {
    /// Binds `127.0.0.1:0` and serves until [`FakeKube::shutdown`]; namespace `default` exists.
    ///
    /// # Errors
    /// When the listener cannot be bound.
    pub async fn start(opts: Options) -> std::io::Result<FakeKube> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Shared::new(opts);
        let server = tokio::spawn(http::serve(listener, shared.clone()));
        Ok(FakeKube { addr, shared, server })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig whose current context points at this server with `namespace` as default.
    ///
    /// The user carries a dummy bearer token so the client's auth layer runs as it would
    /// against a cluster; the fake does not check it.
    pub fn kubeconfig_yaml(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake-kube\n  cluster:\n    \
             server: {url}\nusers:\n- name: fake-kube\n  user:\n    token: fake-token\n\
             contexts:\n- name: fake-kube\n  context:\n    cluster: fake-kube\n    \
             user: fake-kube\n    namespace: {namespace:?}\ncurrent-context: fake-kube\n",
            url = self.url(),
        )
    }

    /// Writes [`FakeKube::kubeconfig_yaml`] to `path`.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_kubeconfig(&self, path: &Path, namespace: &str) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml(namespace))
    }

    /// The stored object, as the API would return it.
    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        self.shared.get(kind, ns, name)
    }

    /// Objects of `kind` in `ns` (every namespace when `ns` is empty), ordered by name.
    pub fn list(&self, kind: Kind, ns: &str) -> Vec<Value> {
        self.shared.list(kind, (!ns.is_empty()).then_some(ns))
    }

    /// Deletes as another client would (`kubectl delete`): finalizers and pod termination
    /// are respected. Returns whether the object existed.
    ///
    /// A namespace (`kind` [`Kind::Namespace`], `ns` empty) becomes `Terminating`, its
    /// objects are deleted and it is removed once it holds none, as on a cluster.
    pub fn delete_out_of_band(&self, kind: Kind, ns: &str, name: &str) -> bool {
        match self.shared.delete(kind, ns, name, None) {
            Ok(_) => true,
            Err(e) => e.code != 404,
        }
    }

    /// Applies a JSON merge patch as another client would (`kubectl edit`): the version is
    /// bumped and watchers get `MODIFIED` (a patch that changes nothing writes nothing).
    ///
    /// Unlike a client write, it may change a pod's spec beyond its images (to simulate a
    /// pod someone else created) and, when the patch has a `status`, the status too.
    /// Finalizers, deletion and the kubelet react as to any write.
    ///
    /// # Errors
    /// The API error (`"404 NotFound: pods \"p\" not found"`, a 409 conflict for a stale
    /// `metadata.resourceVersion` in the patch, …) as text.
    pub fn patch_out_of_band(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        merge_patch: Value,
    ) -> Result<Value, String> {
        let change = Change::Merge(merge_patch);
        let written = self.shared.update(kind, ns, name, Scope::Main, change, Origin::OutOfBand);
        written.map(|(object, _)| object).map_err(|e| e.to_string())
    }

    /// Creates `object` as another client would (a stray pod someone else started); the
    /// kubelet runs a pod like any other. `ns` is ignored for namespaces.
    ///
    /// # Errors
    /// The API error as text, e.g. `"409 AlreadyExists: pods \"p\" already exists"`.
    pub fn create_out_of_band(&self, kind: Kind, ns: &str, object: Value) -> Result<Value, String> {
        self.shared.create(kind, ns, object).map_err(|e| e.to_string())
    }

    /// Creates namespace `name` unless it exists.
    pub fn ensure_namespace(&self, name: &str) {
        self.shared.ensure_namespace(name);
    }

    /// Records an event about pod `pod` in `ns` as a kubelet or controller would
    /// (`kind_of_event` `Normal` or `Warning`): the same reason and message again bumps the
    /// event's `count`. Returns the event, or `None` when there is no such pod.
    pub fn record_event(
        &self,
        ns: &str,
        pod: &str,
        kind_of_event: &str,
        reason: &str,
        message: &str,
    ) -> Option<Value> {
        let mut st = self.shared.lock();
        let pod = st.objects.get(&(Kind::Pod, ns.to_string(), pod.to_string()))?.clone();
        Some(st.record_event(&pod, kind_of_event, reason, message))
    }

    /// Makes pulls of `image` fail (or succeed again); pods already backing off recover.
    pub fn set_image_failing(&self, image: &str, failing: bool) {
        self.shared.set_image_failing(image, failing);
    }

    /// Requests served so far.
    pub fn requests(&self) -> RequestCounts {
        self.shared.requests()
    }

    /// Every request received so far, oldest first (the newest
    /// [`REQUEST_LOG_CAPACITY`] when there were more), faulted ones included.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.shared.request_log()
    }

    /// Injects `fault` behind every fault injected before it: a request gets the action of
    /// the first fault that matches it and has uses left. The request is still counted and
    /// logged.
    pub fn inject(&self, fault: Fault) -> FaultId {
        self.shared.faults().insert(fault)
    }

    /// Removes an injected fault; requests already hanging or delayed by it stay so.
    pub fn remove_fault(&self, id: FaultId) {
        self.shared.faults().remove(id);
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        self.shared.faults().clear();
    }

    /// Ends every open watch stream now, as an API server restart or a load balancer
    /// would; clients watch again from their last version.
    pub fn end_watches(&self) {
        self.shared.end_watches();
    }

    /// Forgets the kept watch history, as a compaction does: a watch resuming from any
    /// version handed out so far is 410 Gone, and the next list reports a newer version
    /// to watch from. Open watches are not affected.
    pub fn expire_history(&self) {
        self.shared.expire_history();
    }

    /// Ends open watches, stops accepting and waits (at most 5 s) for requests in flight.
    pub async fn shutdown(self) {
        self.shared.close();
        let abort = self.server.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), self.server).await.is_err() {
            abort.abort();
        }
    }
}
