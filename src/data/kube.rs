//! `Cluster` on Kubernetes (kube + k8s-openapi): each instance that should run is a Pod
//! `inst-<id>` and a Service of the same name — headless when the instance declares no
//! ports, so its DNS name resolves to the Pod — server-side applied with field manager
//! `resource` into one namespace.
//!
//! Pods carry the service's finalizer, so a Pod deleted by someone else stays visible
//! (terminating, still protected) until the reconciler has seen and recorded it (delete
//! events can be missed by a watch: kube-rs/kube#290). The service removes its finalizer
//! before it deletes a Pod itself.
//!
//! Reads come from a cache of the namespace's Pods and Services kept by two watches
//! (kube-runtime reflector stores), so at rest the service makes no request per
//! instance. Every call is bounded by `call_timeout`, writes are spaced to at most
//! `api_qps` per second, and kube's own retry layer is off: the reconciler owns retries.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Debug,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{
        Container, ContainerPort, EnvVar, Namespace, Pod, PodSpec, ResourceRequirements, Service,
        ServicePort, ServiceSpec,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector::{ObjectRef, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    biz::{
        Backoff, BoxError,
        cluster::{
            Cluster, ClusterError, ClusterHealth, Drift, NamespaceState, Observed, Phase, Stray,
            Workload,
        },
        instance::{Endpoint, GpuType, InstanceId, Port, pod_label_key},
    },
    conf,
};

const FIELD_MANAGER: &str = "resource";
const FINALIZER: &str = "resource.io/instance-protection";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const INSTANCE_LABEL: &str = "resource.io/instance-id";
const OWNER_LABEL: &str = "resource.io/owner";
const OWNER_ANNOTATION: &str = "resource.io/owner";
const SPEC_HASH: &str = "resource.io/spec-hash";
/// The digest of the instance labels a workload was applied with (issue 16).
const LABELS_HASH: &str = "resource.io/labels-hash";
const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Container waiting reasons that mean the workload cannot run as asked.
const FAILING_REASONS: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Settings of the Kubernetes implementation.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// Where instances run.
    pub namespace: String,
    /// Whether the namespace is created (again) when it is missing.
    pub create_namespace: bool,
    /// Node selector per GPU type.
    pub gpu_node_selectors: BTreeMap<GpuType, BTreeMap<String, String>>,
    /// Most writes (apply, patch, delete) per second.
    pub api_qps: u32,
    /// Bound of every call but watches.
    pub call_timeout: Duration,
    /// The API server ends each watch after this long; it is resumed where it stopped.
    pub watch_timeout: Duration,
    /// Longest wait before a failed watch is established again.
    pub backoff_max: Duration,
}

impl From<&conf::Kubernetes> for KubeSettings {
    fn from(conf: &conf::Kubernetes) -> Self {
        // Keys that name no GPU type were refused when the configuration was loaded.
        let gpu_node_selectors = conf
            .gpu_node_selectors
            .iter()
            .filter_map(|(code, selector)| {
                Some((GpuType::from_code(code.parse().ok()?)?, selector.clone()))
            })
            .collect();
        Self {
            namespace: conf.namespace.clone(),
            create_namespace: conf.create_namespace,
            gpu_node_selectors,
            api_qps: conf.api_qps,
            call_timeout: conf.call_timeout,
            watch_timeout: conf.watch_restart,
            backoff_max: conf.backoff_max,
        }
    }
}

/// Kinds the cache watches, as readiness names them.
pub const WATCHED: [&str; 2] = ["pods", "services"];

/// How long past a watch's server-side end the client waits for bytes before it calls
/// the watch hung.
const WATCH_READ_MARGIN: Duration = Duration::from_secs(5);

/// The cluster, through the API server.
pub struct KubeCluster {
    pods: Api<Pod>,
    services: Api<Service>,
    namespaces: Api<Namespace>,
    pod_cache: Store<Pod>,
    service_cache: Store<Service>,
    writers: Mutex<Option<(Writer<Pod>, Writer<Service>)>>,
    settings: KubeSettings,
    limiter: RateLimiter,
    health: Arc<ClusterHealth>,
}

/// A client from `kubeconfig` (empty: the in-cluster service account), without kube's
/// retry layer (the reconciler retries per instance, honouring `Retry-After`).
///
/// # Errors
/// The kubeconfig cannot be read or names no usable cluster.
///
/// Every response must keep coming within `read_timeout` (a watch that hangs is then
/// noticed; set it above the watches' server-side timeout, which ends quiet ones).
pub async fn client(kubeconfig: &str, read_timeout: Duration) -> Result<Client, BoxError> {
    let mut config = if kubeconfig.is_empty() {
        kube::Config::incluster()?
    } else {
        let file = Kubeconfig::read_from(kubeconfig)?;
        kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?
    };
    config.default_retry = false;
    config.read_timeout = Some(read_timeout);
    config.reset_reader_on_write = true;
    Ok(Client::try_from(config)?)
}

/// At most `qps` writes in any second, counted when each is sent: writes are spaced
/// `1/qps` apart, and a sliding window of the last `qps` send times holds back a write
/// that would make `qps + 1` within a window (tasks woken late after a busy moment
/// would otherwise send at once).
struct RateLimiter {
    qps: usize,
    spacing: Duration,
    state: Mutex<(std::collections::VecDeque<Instant>, Instant)>,
}

/// The window, with slack for the time between sending and the server's clock.
const RATE_WINDOW: Duration = Duration::from_millis(1_080);

// === impl RateLimiter ===

impl RateLimiter {
    fn new(qps: u32) -> Self {
        let spacing = Duration::from_secs(1) / qps.max(1);
        let qps = usize::try_from(qps.max(1)).unwrap_or(usize::MAX);
        let sent = std::collections::VecDeque::with_capacity(qps);
        Self { qps, spacing, state: Mutex::new((sent, Instant::now())) }
    }

    async fn acquire(&self) {
        loop {
            let wait_until = {
                let mut state =
                    self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let (sent, next) = &mut *state;
                let now = Instant::now();
                while sent.front().is_some_and(|at| now.duration_since(*at) >= RATE_WINDOW) {
                    sent.pop_front();
                }
                if sent.len() < self.qps && now >= *next {
                    sent.push_back(now);
                    // From the slot, not from now: a late wake-up (timer granularity, a
                    // busy runtime) shorter than the spacing is made up, without bursts.
                    *next =
                        (*next + self.spacing).max(now.checked_sub(self.spacing).unwrap_or(now));
                    return;
                }
                let window_free = if sent.len() < self.qps { now } else { sent[0] + RATE_WINDOW };
                window_free.max(*next)
            };
            tokio::time::sleep_until(wait_until).await;
        }
    }
}

// === impl KubeCluster ===

impl KubeCluster {
    /// The cluster behind `client`, reporting to `health`. The namespace is checked (and
    /// created when missing and allowed) by the reconciler.
    pub fn new(client: Client, settings: KubeSettings, health: Arc<ClusterHealth>) -> Self {
        let (pod_writer, service_writer) = (Writer::default(), Writer::default());
        Self {
            pods: Api::namespaced(client.clone(), &settings.namespace),
            services: Api::namespaced(client.clone(), &settings.namespace),
            namespaces: Api::all(client),
            pod_cache: pod_writer.as_reader(),
            service_cache: service_writer.as_reader(),
            writers: Mutex::new(Some((pod_writer, service_writer))),
            limiter: RateLimiter::new(settings.api_qps),
            settings,
            health,
        }
    }

    /// The cluster `conf` names, with the health its calls and watches report to, once
    /// its API server has answered.
    ///
    /// # Errors
    /// The kubeconfig is unusable, or the API server does not answer or refuses.
    pub async fn start(conf: &conf::Kubernetes) -> Result<(Self, Arc<ClusterHealth>), BoxError> {
        let client = client(&conf.kubeconfig, conf.watch_restart + WATCH_READ_MARGIN).await?;
        let health =
            Arc::new(ClusterHealth::new(&WATCHED, conf.watch_restart + 2 * WATCH_READ_MARGIN));
        let cluster = Self::new(client, conf.into(), health.clone());
        cluster.connect().await?;
        Ok((cluster, health))
    }

    /// Checks that the API server answers (start-up: a wrong kubeconfig fails fast).
    ///
    /// # Errors
    /// The API server does not answer or refuses.
    pub async fn connect(&self) -> Result<(), BoxError> {
        // A Pod list needs only the namespaced Role (and answers for a missing namespace).
        let one = kube::api::ListParams::default().limit(1);
        let name = &self.settings.namespace;
        self.call(false, self.pods.list(&one)).await?.map_err(|e| -> BoxError {
            format!("cannot list the Pods of namespace {name:?}: {e}").into()
        })?;
        Ok(())
    }

    /// Runs a call within `call_timeout`, recording in health whether the cluster
    /// answered. The outer error is the timeout.
    async fn call<T>(
        &self,
        write: bool,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<Result<T, kube::Error>, ClusterError> {
        match tokio::time::timeout(self.settings.call_timeout, call).await {
            Ok(result) => {
                match &result {
                    Err(e) if is_outage(e) => self.health.call_failed(write, &said(e)),
                    _ => self.health.call_succeeded(write),
                }
                Ok(result)
            }
            Err(_) => {
                let message = format!(
                    "the API server did not answer within {} ms",
                    self.settings.call_timeout.as_millis()
                );
                self.health.call_failed(write, &message);
                Err(ClusterError::unavailable(message))
            }
        }
    }

    /// A write: waits for its turn under `api_qps`, then calls.
    async fn write<T>(
        &self,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<Result<T, kube::Error>, ClusterError> {
        self.limiter.acquire().await;
        metrics::counter!("resource_kube_writes_total").increment(1);
        self.call(true, call).await
    }

    fn pod_cached(&self, name: &str) -> Option<Arc<Pod>> {
        self.pod_cache.get(&ObjectRef::new(name).within(&self.settings.namespace))
    }

    fn service_cached(&self, name: &str) -> Option<Arc<Service>> {
        self.service_cache.get(&ObjectRef::new(name).within(&self.settings.namespace))
    }

    fn service_host(&self, name: &str) -> String {
        format!("{name}.{}.svc.cluster.local", self.settings.namespace)
    }

    fn pod(&self, w: &Workload) -> Pod {
        let name = object_name(w.id);
        let mut limits = BTreeMap::from([
            ("cpu".to_owned(), Quantity(w.cpu.to_string())),
            ("memory".to_owned(), Quantity(format!("{}Mi", w.memory_mb))),
        ]);
        if w.gpu != GpuType::None {
            limits.insert(GPU_RESOURCE.to_owned(), Quantity("1".into()));
        }
        let node_selector = self.settings.gpu_node_selectors.get(&w.gpu).cloned();
        let c = &w.container;
        let container = Container {
            name: "main".into(),
            image: Some(w.image.clone()),
            command: (!c.command.is_empty()).then(|| c.command.clone()),
            args: (!c.args.is_empty()).then(|| c.args.clone()),
            env: (!c.env.is_empty()).then(|| {
                c.env
                    .iter()
                    .map(|(name, value)| EnvVar {
                        name: name.clone(),
                        value: Some(value.clone()),
                        ..EnvVar::default()
                    })
                    .collect()
            }),
            ports: (!c.ports.is_empty()).then(|| {
                c.ports
                    .iter()
                    .map(|p| ContainerPort {
                        name: Some(p.name.clone()),
                        container_port: p.port,
                        protocol: Some(p.protocol.clone()),
                        ..ContainerPort::default()
                    })
                    .collect()
            }),
            resources: Some(ResourceRequirements {
                requests: Some(limits.clone()),
                limits: Some(limits),
                ..ResourceRequirements::default()
            }),
            ..Container::default()
        };
        Pod {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(self.settings.namespace.clone()),
                labels: Some(labels(w)),
                annotations: Some(annotations(w)),
                finalizers: Some(vec![FINALIZER.to_owned()]),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![container],
                node_selector,
                restart_policy: Some("Always".into()),
                ..PodSpec::default()
            }),
            status: None,
        }
    }

    fn service(&self, w: &Workload) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(object_name(w.id)),
                namespace: Some(self.settings.namespace.clone()),
                labels: Some(labels(w)),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                selector: Some(BTreeMap::from([(
                    INSTANCE_LABEL.to_owned(),
                    w.id.get().to_string(),
                )])),
                ports: (!w.container.ports.is_empty()).then(|| {
                    w.container
                        .ports
                        .iter()
                        .map(|p| ServicePort {
                            name: Some(p.name.clone()),
                            port: p.port,
                            target_port: Some(IntOrString::Int(p.port)),
                            protocol: Some(p.protocol.clone()),
                            ..ServicePort::default()
                        })
                        .collect()
                }),
                // Without ports, headless: the name resolves to the Pod's own address.
                cluster_ip: w.container.ports.is_empty().then(|| "None".to_owned()),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    /// What `pod` says about its instance, compared with `want`.
    fn observed(&self, pod: &Pod, want: Option<&Workload>) -> Option<Observed> {
        let meta = &pod.metadata;
        let name = meta.name.clone().unwrap_or_default();
        // The name says whose it is; a label changed by hand is drift, not another owner.
        let id = owner_of(meta)?;
        let ports = container_ports(pod);
        let endpoint = Endpoint {
            pod_name: name.clone(),
            pod_ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
            service_host: self.service_host(&name),
            ports,
        };
        let finalizers = meta.finalizers.clone().unwrap_or_default();
        let protected = finalizers.iter().any(|f| f == FINALIZER);
        let terminating = meta.deletion_timestamp.is_some();
        let drift = match want {
            Some(want) if !terminating => self.drift(pod, want),
            _ => Vec::new(),
        };
        Some(Observed {
            id,
            spec_hash: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(SPEC_HASH).cloned())
                .unwrap_or_default(),
            labels_hash: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(LABELS_HASH).cloned())
                .unwrap_or_default(),
            phase: phase(pod),
            terminating,
            protected,
            foreign_finalizers: finalizers.into_iter().filter(|f| f != FINALIZER).collect(),
            drift,
            endpoint,
        })
    }

    /// How the live Pod and Service differ from what `want` renders to, in what matters.
    fn drift(&self, live: &Pod, want: &Workload) -> Vec<Drift> {
        let mut drift = Vec::new();
        let expected = self.pod(want);
        let main = |pod: &Pod| pod.spec.as_ref().and_then(|s| s.containers.first().cloned());
        let (Some(live_main), Some(want_main)) = (main(live), main(&expected)) else {
            return vec![Drift::Pod("containers")];
        };
        if live_main.image != want_main.image {
            drift.push(Drift::Image { live: live_main.image.clone().unwrap_or_default() });
        }
        if !same_resources(live_main.resources.as_ref(), want_main.resources.as_ref()) {
            drift.push(Drift::Pod("resources"));
        }
        let selector =
            |pod: &Pod| pod.spec.as_ref().and_then(|s| s.node_selector.clone()).unwrap_or_default();
        if selector(live) != selector(&expected) {
            drift.push(Drift::Pod("node selector"));
        }
        if container_ports(live) != container_ports(&expected) {
            drift.push(Drift::Pod("ports"));
        }
        let env = |c: &Container| {
            c.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone())).collect::<Vec<_>>()
        };
        if live_main.command != want_main.command
            || live_main.args != want_main.args
            || env(&live_main) != env(&want_main)
        {
            drift.push(Drift::Pod("command, arguments or environment"));
        }
        if !contains_all(live.metadata.labels.as_ref(), expected.metadata.labels.as_ref())
            || !contains_all(
                live.metadata.annotations.as_ref(),
                expected.metadata.annotations.as_ref(),
            )
        {
            drift.push(Drift::Metadata);
        }
        if !live.finalizers().iter().any(|f| f == FINALIZER) {
            drift.push(Drift::Finalizer);
        }
        if let Some(what) = self.service_drift(want) {
            drift.push(Drift::Service(what));
        }
        drift
    }

    /// How the Service of `want` differs from what it should be, if it does.
    fn service_drift(&self, want: &Workload) -> Option<String> {
        let Some(live) = self.service_cached(&object_name(want.id)) else {
            return Some("is missing".into());
        };
        let expected = self.service(want);
        let (live_spec, want_spec) = (live.spec.clone().unwrap_or_default(), expected.spec?);
        let headless = |s: &ServiceSpec| s.cluster_ip.as_deref() == Some("None");
        let ports = |s: &ServiceSpec| {
            s.ports
                .iter()
                .flatten()
                .map(|p| {
                    let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                    (p.name.clone(), p.port, p.target_port.clone(), protocol)
                })
                .collect::<Vec<_>>()
        };
        if live_spec.selector != want_spec.selector {
            Some("selects other Pods".into())
        } else if headless(&live_spec) != headless(&want_spec)
            || ports(&live_spec) != ports(&want_spec)
        {
            Some("has other ports".into())
        } else if !contains_all(live.metadata.labels.as_ref(), expected.metadata.labels.as_ref()) {
            Some("has other labels".into())
        } else {
            None
        }
    }

    /// Deletes the Service `name`, if the cache knows one.
    async fn delete_service(&self, name: &str) -> Result<(), ClusterError> {
        if self.service_cached(name).is_none() {
            return Ok(());
        }
        match self.write(self.services.delete(name, &DeleteParams::default())).await? {
            Ok(_) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(cluster_error(e)),
        }
    }

    /// Removes the service's finalizer from a Pod that still carries it.
    async fn release(&self, pod: &Pod) -> Result<(), ClusterError> {
        let Some(finalizers) = &pod.metadata.finalizers else { return Ok(()) };
        if !finalizers.iter().any(|f| f == FINALIZER) {
            return Ok(());
        }
        let rest: Vec<&String> = finalizers.iter().filter(|f| *f != FINALIZER).collect();
        // The resourceVersion makes this a compare-and-swap: another writer's finalizer
        // is never dropped.
        let patch = serde_json::json!({
            "metadata": { "finalizers": rest, "resourceVersion": pod.metadata.resource_version },
        });
        let name = pod.metadata.name.clone().unwrap_or_default();
        let params = PatchParams::default();
        match self.write(self.pods.patch(&name, &params, &Patch::Merge(&patch))).await? {
            Ok(_) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(cluster_error(e)),
        }
    }

    /// Removes the finalizer of `pod` and deletes it unless it is being deleted.
    async fn remove_pod(&self, pod: &Pod) -> Result<(), ClusterError> {
        self.release(pod).await?;
        if pod.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        match self.write(self.pods.delete(&name, &DeleteParams::default())).await? {
            Ok(_) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(cluster_error(e)),
        }
    }

    /// Applies one object; a namespace that is gone or going is named as such.
    async fn apply_one<K>(&self, api: &Api<K>, name: &str, object: &K) -> Result<(), kube::Error>
    where
        K: Resource + Clone + DeserializeOwned + Debug + serde::Serialize,
    {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match self.write(api.patch(name, &params, &Patch::Apply(object))).await {
            Ok(result) => result.map(|_| ()),
            Err(timeout) => Err(kube::Error::Service(timeout.to_string().into())),
        }
    }

    /// Keeps one kind's cache in step until `shutdown`; re-lists after any failure.
    async fn keep_cache<K>(
        &self,
        kind: &'static str,
        api: Api<K>,
        mut writer: Writer<K>,
        changed: mpsc::Sender<InstanceId>,
        shutdown: CancellationToken,
    ) where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        let backoff = Backoff::new(Duration::from_millis(200), self.settings.backoff_max);
        let timeout =
            u32::try_from(self.settings.watch_timeout.as_secs()).unwrap_or(290).clamp(1, 3600);
        let mut attempt = 0u32;
        loop {
            let config = watcher::Config::default().timeout(timeout);
            let mut events = std::pin::pin!(watcher(api.clone(), config));
            // What the cache held before a (re)list, to tell which objects changed.
            let mut before: HashMap<String, String> = HashMap::new();
            let mut relisted: Vec<InstanceId> = Vec::new();
            let mut listed_at: Option<Instant> = None;
            let failure = loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => return,
                    event = events.next() => event,
                };
                let event = match event {
                    None => break None,
                    Some(Err(e)) => break Some(e),
                    Some(Ok(event)) => event,
                };
                let mut news = None;
                match &event {
                    watcher::Event::Init => {
                        before = writer
                            .as_reader()
                            .state()
                            .iter()
                            .map(|o| (o.name_any(), o.resource_version().unwrap_or_default()))
                            .collect();
                    }
                    watcher::Event::InitApply(object) => {
                        let (name, version) = (object.name_any(), object.resource_version());
                        if before.remove(&name) != version {
                            relisted.extend(owner_of(object.meta()));
                        }
                    }
                    watcher::Event::InitDone => {}
                    watcher::Event::Apply(object) | watcher::Event::Delete(object) => {
                        news = owner_of(object.meta());
                    }
                }
                writer.apply_watcher_event(&event);
                if matches!(event, watcher::Event::InitDone) {
                    self.health.watch_established(kind);
                    listed_at = Some(Instant::now());
                    // Objects gone while the watch was down, and those changed meanwhile.
                    relisted.extend(before.drain().filter_map(|(name, _)| id_of_name(&name)));
                    for id in relisted.drain(..) {
                        if changed.send(id).await.is_err() {
                            return;
                        }
                    }
                }
                if let Some(id) = news
                    && changed.send(id).await.is_err()
                {
                    return;
                }
            };
            match failure {
                Some(e) => {
                    tracing::warn!(kind, error = %e, "cluster watch failed; listing again");
                    self.health.watch_failed(kind, timed_out(&e), &e.to_string());
                    // A watch that ran a while starts its backoff afresh.
                    let lasted = listed_at.is_some_and(|at| at.elapsed() > Duration::from_secs(30));
                    attempt = if lasted { 1 } else { attempt + 1 };
                }
                None => attempt = 0,
            }
            let delay = if attempt == 0 { Duration::ZERO } else { backoff.delay(attempt) };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// The instance an object's labels name.
fn instance_of(meta: &ObjectMeta) -> Option<InstanceId> {
    let id = meta.labels.as_ref()?.get(INSTANCE_LABEL)?.parse::<i64>().ok()?;
    InstanceId::try_from(id).ok()
}

/// The instance an object belongs to: the one its name says, else its label's.
fn owner_of(meta: &ObjectMeta) -> Option<InstanceId> {
    meta.name.as_deref().and_then(id_of_name).or_else(|| instance_of(meta))
}

/// The instance an object name `inst-<id>` names.
fn id_of_name(name: &str) -> Option<InstanceId> {
    InstanceId::try_from(name.strip_prefix("inst-")?.parse::<i64>().ok()?).ok()
}

fn contains_all(
    live: Option<&BTreeMap<String, String>>,
    want: Option<&BTreeMap<String, String>>,
) -> bool {
    let live = live.cloned().unwrap_or_default();
    want.into_iter().flatten().all(|(k, v)| live.get(k) == Some(v))
}

/// Requests and limits equal as quantities (the API server may write `1Gi` for `1024Mi`).
fn same_resources(
    live: Option<&ResourceRequirements>,
    want: Option<&ResourceRequirements>,
) -> bool {
    let amounts = |map: Option<&BTreeMap<String, Quantity>>| -> BTreeMap<String, Option<f64>> {
        map.into_iter().flatten().map(|(k, q)| (k.clone(), quantity(&q.0))).collect()
    };
    let (live, want) = (live.cloned().unwrap_or_default(), want.cloned().unwrap_or_default());
    amounts(live.limits.as_ref()) == amounts(want.limits.as_ref())
        && amounts(live.requests.as_ref()) == amounts(want.requests.as_ref())
}

/// A Kubernetes quantity (`500m`, `2`, `1Gi`, `1e3`) as a number.
fn quantity(text: &str) -> Option<f64> {
    let text = text.trim();
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Pi", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Ei", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    for (suffix, factor) in suffixes {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    text.parse::<f64>().ok()
}

fn object_name(id: InstanceId) -> String {
    format!("inst-{}", id.get())
}

/// The labels of an instance's Pod and Service: ours, then the instance's own under
/// `labels.resource.io/` (`team` → `labels.resource.io/team`; a prefixed
/// `example.com/team` → `example.com.labels.resource.io/team`), which cannot collide
/// with ours (user keys under `resource.io` are refused).
fn labels(w: &Workload) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (MANAGED_BY.to_owned(), FIELD_MANAGER.to_owned()),
        (INSTANCE_LABEL.to_owned(), w.id.get().to_string()),
        (OWNER_LABEL.to_owned(), label_value(&w.owner)),
    ]);
    labels.extend(w.labels.iter().map(|(k, v)| (pod_label_key(k), v.clone())));
    labels
}

/// The annotations of an instance's Pod: its spec hash, its owner, and the digest of
/// its labels when it has any (so Pods applied before labels existed stay as they are).
fn annotations(w: &Workload) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::from([
        (SPEC_HASH.to_owned(), w.spec_hash.clone()),
        (OWNER_ANNOTATION.to_owned(), w.owner.clone()),
    ]);
    if !w.labels_hash.is_empty() {
        annotations.insert(LABELS_HASH.to_owned(), w.labels_hash.clone());
    }
    annotations
}

/// A label value (at most 63 of `[A-Za-z0-9._-]`, alphanumeric at both ends) for an
/// owner id; other ids are kept in the owner annotation and labelled by a digest.
fn label_value(owner: &str) -> String {
    let fits = !owner.is_empty()
        && owner.len() <= 63
        && owner.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && owner.starts_with(|c: char| c.is_ascii_alphanumeric())
        && owner.ends_with(|c: char| c.is_ascii_alphanumeric());
    if fits {
        return owner.to_owned();
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(owner.as_bytes());
    format!("sha256-{}", digest.iter().take(16).map(|b| format!("{b:02x}")).collect::<String>())
}

fn container_ports(pod: &Pod) -> Vec<Port> {
    let containers = pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
    containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .map(|p| Port {
            name: p.name.clone().unwrap_or_default(),
            port: p.container_port,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
        })
        .collect()
}

/// Container waiting reasons that are the normal course of starting.
const STARTING_REASONS: &[&str] = &["ContainerCreating", "PodInitializing"];

/// The phase of a Pod, with the reason when it cannot run or waits for long.
fn phase(pod: &Pod) -> Phase {
    let Some(status) = &pod.status else { return Phase::Pending(None) };
    let containers = status.container_statuses.iter().flatten();
    let waiting: Vec<_> =
        containers.clone().filter_map(|c| c.state.as_ref()?.waiting.as_ref()).collect();
    let said = |reason: Option<&String>, message: Option<&String>| match (reason, message) {
        (Some(r), Some(m)) if !m.is_empty() => format!("{r}: {m}"),
        (Some(r), _) => r.clone(),
        (None, Some(m)) => m.clone(),
        (None, None) => String::new(),
    };
    if let Some(w) =
        waiting.iter().find(|w| w.reason.as_deref().is_some_and(|r| FAILING_REASONS.contains(&r)))
    {
        return Phase::Failed(said(w.reason.as_ref(), w.message.as_ref()));
    }
    let unscheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False");
    if let Some(c) = unscheduled {
        let text = said(c.reason.as_ref(), c.message.as_ref());
        return if c.reason.as_deref() == Some("Unschedulable") {
            Phase::Failed(text)
        } else {
            Phase::Pending(Some(format!("not scheduled: {text}")))
        };
    }
    let exited = containers
        .filter_map(|c| {
            c.state
                .as_ref()?
                .terminated
                .clone()
                .or_else(|| c.last_state.as_ref()?.terminated.clone())
        })
        .next()
        .map(|t| {
            let reason = said(t.reason.as_ref(), t.message.as_ref());
            let reason = if reason.is_empty() { "exited".to_owned() } else { reason };
            format!("container {reason} (exit code {})", t.exit_code)
        });
    match status.phase.as_deref() {
        Some("Running") => Phase::Running,
        Some("Failed") => {
            let pod_said = said(status.reason.as_ref(), status.message.as_ref());
            Phase::Failed(match (pod_said.is_empty(), exited) {
                (false, Some(exited)) => format!("pod failed: {pod_said}; {exited}"),
                (false, None) => format!("pod failed: {pod_said}"),
                (true, Some(exited)) => format!("pod failed: {exited}"),
                (true, None) => "pod failed (the cluster gave no reason)".to_owned(),
            })
        }
        Some("Succeeded") => Phase::Failed(exited.unwrap_or_else(|| "the container exited".into())),
        _ => Phase::Pending(
            waiting
                .iter()
                .find(|w| !w.reason.as_deref().is_some_and(|r| STARTING_REASONS.contains(&r)))
                .map(|w| said(w.reason.as_ref(), w.message.as_ref()))
                .filter(|s| !s.is_empty()),
        ),
    }
}

/// Whether an error, or one it was caused by, is a timeout (a call that hung).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            || c.to_string().contains("timed out")
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// An error as a user reads it: the server's message and code, not a debug dump.
fn said(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        other => other.to_string(),
    }
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Whether an error says the cluster cannot serve us (no answer, 5xx, 429, 401, 403),
/// as opposed to refusing one request.
fn is_outage(e: &kube::Error) -> bool {
    match status_code(e) {
        Some(code) => code >= 500 || matches!(code, 401 | 403 | 429),
        None => true,
    }
}

/// 4xx (but 408 and 429) are refusals; anything else may pass on a retry. A missing or
/// terminating namespace is named as such.
fn cluster_error(e: kube::Error) -> ClusterError {
    if let kube::Error::Api(status) = &e {
        let details = status.details.as_ref();
        let namespace_gone = status.code == 404 && details.is_some_and(|d| d.kind == "namespaces");
        let namespace_going = status.code == 403 && status.message.contains("is being terminated");
        if namespace_gone || namespace_going {
            return ClusterError::NamespaceMissing(status.message.clone());
        }
        let retry_after = details
            .map(|d| d.retry_after_seconds)
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(u64::from(s)));
        let code = status.code;
        if (400..500).contains(&code) && code != 408 && code != 429 {
            return ClusterError::Refused(said(&e));
        }
        return ClusterError::Unavailable { source: said(&e).into(), retry_after };
    }
    ClusterError::unavailable(said(&e))
}

// === impl Cluster for KubeCluster ===

#[async_trait]
impl Cluster for KubeCluster {
    async fn apply(&self, workload: &Workload) -> Result<(), ClusterError> {
        let name = object_name(workload.id);
        self.apply_one(&self.pods, &name, &self.pod(workload)).await.map_err(cluster_error)?;
        let service = self.service(workload);
        match self.apply_one(&self.services, &name, &service).await {
            Ok(()) => Ok(()),
            // A Service's clusterIP is immutable: one that must become headless, or stop
            // being so, is replaced.
            Err(e) if status_code(&e) == Some(422) => {
                tracing::info!(service = %name, error = %e, "replacing a Service that cannot be updated in place");
                match self.write(self.services.delete(&name, &DeleteParams::default())).await? {
                    Ok(_) => {}
                    Err(e) if status_code(&e) == Some(404) => {}
                    Err(e) => return Err(cluster_error(e)),
                }
                self.apply_one(&self.services, &name, &service).await.map_err(cluster_error)
            }
            Err(e) => Err(cluster_error(e)),
        }
    }

    async fn remove(&self, id: InstanceId) -> Result<bool, ClusterError> {
        let name = object_name(id);
        self.delete_service(&name).await?;
        let Some(pod) = self.pod_cached(&name) else {
            return Ok(true);
        };
        self.remove_pod(&pod).await?;
        Ok(false)
    }

    async fn replace_pod(&self, id: InstanceId) -> Result<(), ClusterError> {
        match self.pod_cached(&object_name(id)) {
            Some(pod) => self.remove_pod(&pod).await,
            None => Ok(()),
        }
    }

    fn observe(&self, id: InstanceId, want: Option<&Workload>) -> Option<Observed> {
        let pod = self.pod_cached(&object_name(id))?;
        self.observed(&pod, want)
    }

    fn has_service(&self, id: InstanceId) -> bool {
        self.service_cached(&object_name(id)).is_some()
    }

    fn known(&self) -> Vec<InstanceId> {
        let pods = self
            .pod_cache
            .state()
            .iter()
            .filter_map(|p| id_of_name(&p.name_any()))
            .collect::<Vec<_>>();
        let services = self
            .service_cache
            .state()
            .iter()
            .filter_map(|s| id_of_name(&s.name_any()))
            .collect::<Vec<_>>();
        let mut ids: Vec<InstanceId> =
            pods.into_iter().chain(services).collect::<HashSet<_>>().into_iter().collect();
        ids.sort_unstable();
        ids
    }

    fn strays(&self) -> Vec<Stray> {
        let ours = |meta: &ObjectMeta| {
            meta.labels.as_ref().and_then(|l| l.get(MANAGED_BY)).is_some_and(|v| v == FIELD_MANAGER)
        };
        let stray =
            |kind: &'static str, meta: &ObjectMeta| {
                let name = meta.name.clone().unwrap_or_default();
                // Objects named `inst-<id>` belong to that instance whatever their labels say.
                let not_an_instances = id_of_name(&name).is_none();
                (ours(meta) && not_an_instances && meta.deletion_timestamp.is_none())
                    .then_some(Stray { kind, name, instance: instance_of(meta) })
            };
        let pods = self.pod_cache.state();
        let services = self.service_cache.state();
        pods.iter()
            .filter_map(|p| stray("Pod", &p.metadata))
            .chain(services.iter().filter_map(|s| stray("Service", &s.metadata)))
            .collect()
    }

    async fn remove_stray(&self, stray: &Stray) -> Result<(), ClusterError> {
        if stray.kind == "Pod" {
            let Some(pod) = self.pod_cached(&stray.name) else { return Ok(()) };
            return self.remove_pod(&pod).await;
        }
        self.delete_service(&stray.name).await
    }

    async fn ensure_namespace(&self) -> Result<NamespaceState, ClusterError> {
        let name = self.settings.namespace.clone();
        let found = match self.call(false, self.namespaces.get_opt(&name)).await? {
            // Not allowed to read namespaces (no ClusterRole): it answered, and the writes
            // into the namespace tell whether it exists.
            Err(e) if status_code(&e) == Some(403) && !self.settings.create_namespace => {
                self.health.call_succeeded(false);
                return Ok(NamespaceState::Exists);
            }
            found => found.map_err(cluster_error)?,
        };
        match found {
            Some(ns) if ns.metadata.deletion_timestamp.is_some() => {
                return Ok(NamespaceState::Terminating);
            }
            Some(_) => return Ok(NamespaceState::Exists),
            None if !self.settings.create_namespace => return Ok(NamespaceState::Missing),
            None => {}
        }
        let namespace = Namespace {
            metadata: ObjectMeta { name: Some(name.clone()), ..ObjectMeta::default() },
            ..Namespace::default()
        };
        match self.write(self.namespaces.create(&PostParams::default(), &namespace)).await? {
            Ok(_) => {
                tracing::info!(namespace = %name, "created the instances' namespace");
                Ok(NamespaceState::Created)
            }
            Err(e) if status_code(&e) == Some(409) => Ok(NamespaceState::Terminating),
            Err(e) => Err(cluster_error(e)),
        }
    }

    async fn watch(&self, changed: mpsc::Sender<InstanceId>, shutdown: CancellationToken) {
        let Some((pods, services)) =
            self.writers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
        else {
            tracing::error!("the cluster cache is already being kept");
            return;
        };
        tokio::join!(
            self.keep_cache("pods", self.pods.clone(), pods, changed.clone(), shutdown.clone()),
            self.keep_cache("services", self.services.clone(), services, changed, shutdown),
        );
    }
}

mod evidence;
#[cfg(test)]
mod tests;
