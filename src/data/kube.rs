//! `Cluster` on Kubernetes (kube + k8s-openapi): each instance that should run is a Pod
//! `inst-<id>` and a Service of the same name — headless when the instance declares no
//! ports, so its DNS name resolves to the Pod — server-side applied with field manager
//! `resource` into one namespace.
//!
//! Pods carry the service's finalizer, so a Pod deleted by someone else stays visible
//! (terminating, still protected) until the reconciler has seen and recorded it (delete
//! events can be missed by a watch: kube-rs/kube#290). The service removes its finalizer
//! before it deletes a Pod itself.

use std::{
    collections::{BTreeMap, HashSet},
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
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher,
};
use tokio::sync::mpsc;

use crate::biz::{
    BoxError,
    cluster::{Cluster, ClusterError, Observed, Phase, Workload},
    instance::{Endpoint, GpuType, InstanceId, Port},
};

const FIELD_MANAGER: &str = "resource";
const FINALIZER: &str = "resource.io/instance-protection";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const INSTANCE_LABEL: &str = "resource.io/instance-id";
const OWNER_LABEL: &str = "resource.io/owner";
const OWNER_ANNOTATION: &str = "resource.io/owner";
const SPEC_HASH: &str = "resource.io/spec-hash";
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
    /// Node selector per GPU type.
    pub gpu_node_selectors: BTreeMap<GpuType, BTreeMap<String, String>>,
    /// A watch is ended and re-established after this long, so a watch that hangs
    /// silently (kube-rs/kube#1615) is replaced and readiness sees the watch alive.
    pub watch_restart: Duration,
}

/// The cluster, through the API server.
#[derive(Clone)]
pub struct KubeCluster {
    pods: Api<Pod>,
    services: Api<Service>,
    settings: KubeSettings,
}

/// A client from `kubeconfig` (empty: the in-cluster service account).
///
/// # Errors
/// The kubeconfig cannot be read or names no usable cluster.
pub async fn client(kubeconfig: &str) -> Result<Client, BoxError> {
    let config = if kubeconfig.is_empty() {
        kube::Config::incluster()?
    } else {
        let file = Kubeconfig::read_from(kubeconfig)?;
        kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?
    };
    Ok(Client::try_from(config)?)
}

impl KubeCluster {
    /// The cluster behind `client`; creates `settings.namespace` when it is missing.
    ///
    /// # Errors
    /// The API server does not answer, or the namespace is missing and cannot be created.
    pub async fn connect(client: Client, settings: KubeSettings) -> Result<Self, BoxError> {
        let namespaces: Api<Namespace> = Api::all(client.clone());
        if namespaces.get_opt(&settings.namespace).await?.is_none() {
            let namespace = Namespace {
                metadata: ObjectMeta {
                    name: Some(settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            };
            namespaces.create(&PostParams::default(), &namespace).await.map_err(|e| {
                format!("namespace {:?} is missing and cannot be created: {e}", settings.namespace)
            })?;
            tracing::info!(namespace = %settings.namespace, "created the instances namespace");
        }
        Ok(Self {
            pods: Api::namespaced(client.clone(), &settings.namespace),
            services: Api::namespaced(client, &settings.namespace),
            settings,
        })
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
                annotations: Some(BTreeMap::from([
                    (SPEC_HASH.to_owned(), w.spec_hash.clone()),
                    (OWNER_ANNOTATION.to_owned(), w.owner.clone()),
                ])),
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

    /// What `pod` says about its instance; `service_exists` is whether its Service exists
    /// (looked up by the caller).
    fn observed(&self, pod: &Pod, service_exists: bool) -> Option<Observed> {
        let meta = &pod.metadata;
        let id = meta.labels.as_ref()?.get(INSTANCE_LABEL)?.parse::<i64>().ok()?;
        let id = InstanceId::try_from(id).ok()?;
        let name = meta.name.clone().unwrap_or_default();
        let ports = container_ports(pod);
        let endpoint = Endpoint {
            pod_name: name.clone(),
            pod_ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
            service_host: self.service_host(&name),
            ports,
        };
        Some(Observed {
            id,
            spec_hash: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(SPEC_HASH).cloned())
                .unwrap_or_default(),
            phase: phase(pod),
            terminating: meta.deletion_timestamp.is_some(),
            protected: meta.finalizers.as_ref().is_some_and(|f| f.iter().any(|f| f == FINALIZER)),
            service_ok: service_exists,
            endpoint,
        })
    }

    /// Deletes the Service `name`, if there is one.
    async fn delete_service(&self, name: &str) -> Result<(), ClusterError> {
        match self.services.delete(name, &DeleteParams::default()).await {
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
        match self.pods.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(cluster_error(e)),
        }
    }
}

fn object_name(id: InstanceId) -> String {
    format!("inst-{}", id.get())
}

fn labels(w: &Workload) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.to_owned(), FIELD_MANAGER.to_owned()),
        (INSTANCE_LABEL.to_owned(), w.id.get().to_string()),
        (OWNER_LABEL.to_owned(), label_value(&w.owner)),
    ])
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

/// The phase of a Pod, with the reason when it cannot run.
fn phase(pod: &Pod) -> Phase {
    let Some(status) = &pod.status else { return Phase::Pending };
    let waiting = status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .find(|w| w.reason.as_deref().is_some_and(|r| FAILING_REASONS.contains(&r)));
    if let Some(w) = waiting {
        let reason = w.reason.clone().unwrap_or_default();
        return Phase::Failed(match &w.message {
            Some(message) => format!("{reason}: {message}"),
            None => reason,
        });
    }
    let unschedulable = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    });
    if let Some(c) = unschedulable {
        return Phase::Failed(format!("Unschedulable: {}", c.message.clone().unwrap_or_default()));
    }
    match status.phase.as_deref() {
        Some("Running") => Phase::Running,
        Some("Failed") => Phase::Failed(format!(
            "pod failed: {}",
            status.reason.clone().or_else(|| status.message.clone()).unwrap_or_default()
        )),
        Some("Succeeded") => Phase::Failed("the container exited".into()),
        _ => Phase::Pending,
    }
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// 4xx (but 408 and 429) are refusals; anything else may pass on a retry.
fn cluster_error(e: kube::Error) -> ClusterError {
    match status_code(&e) {
        Some(code) if (400..500).contains(&code) && code != 408 && code != 429 => {
            ClusterError::Refused(e.to_string())
        }
        _ => ClusterError::Unavailable(Box::new(e)),
    }
}

#[async_trait]
impl Cluster for KubeCluster {
    async fn apply(&self, workload: &Workload) -> Result<(), ClusterError> {
        let name = object_name(workload.id);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.pods
            .patch(&name, &params, &Patch::Apply(&self.pod(workload)))
            .await
            .map_err(cluster_error)?;
        let service = self.service(workload);
        match self.services.patch(&name, &params, &Patch::Apply(&service)).await {
            Ok(_) => Ok(()),
            // A Service's clusterIP is immutable: one that must become headless, or stop
            // being so, is replaced.
            Err(e) if status_code(&e) == Some(422) => {
                tracing::info!(service = %name, error = %e, "replacing a Service that cannot be updated in place");
                self.delete_service(&name).await?;
                self.services
                    .patch(&name, &params, &Patch::Apply(&service))
                    .await
                    .map(|_| ())
                    .map_err(cluster_error)
            }
            Err(e) => Err(cluster_error(e)),
        }
    }

    async fn remove(&self, id: InstanceId) -> Result<bool, ClusterError> {
        let name = object_name(id);
        self.delete_service(&name).await?;
        let Some(pod) = self.pods.get_opt(&name).await.map_err(cluster_error)? else {
            return Ok(true);
        };
        self.release(&pod).await?;
        if pod.metadata.deletion_timestamp.is_none() {
            match self.pods.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(e) if status_code(&e) == Some(404) => return Ok(true),
                Err(e) => return Err(cluster_error(e)),
            }
        }
        Ok(self.pods.get_opt(&name).await.map_err(cluster_error)?.is_none())
    }

    async fn observe(&self, id: InstanceId) -> Result<Option<Observed>, ClusterError> {
        let name = object_name(id);
        let Some(pod) = self.pods.get_opt(&name).await.map_err(cluster_error)? else {
            return Ok(None);
        };
        let service_exists = self.services.get_opt(&name).await.map_err(cluster_error)?.is_some();
        Ok(self.observed(&pod, service_exists))
    }

    async fn list(&self) -> Result<Vec<Observed>, ClusterError> {
        let params =
            kube::api::ListParams::default().labels(&format!("{MANAGED_BY}={FIELD_MANAGER}"));
        let pods = self.pods.list(&params).await.map_err(cluster_error)?;
        let services: HashSet<String> = self
            .services
            .list(&params)
            .await
            .map_err(cluster_error)?
            .items
            .into_iter()
            .filter_map(|s| s.metadata.name)
            .collect();
        Ok(pods
            .items
            .iter()
            .filter_map(|p| {
                let name = p.metadata.name.as_deref().unwrap_or_default();
                self.observed(p, services.contains(name))
            })
            .collect())
    }

    async fn watch(
        &self,
        changed: mpsc::Sender<InstanceId>,
        alive: mpsc::Sender<()>,
    ) -> Result<(), ClusterError> {
        let config = watcher::Config::default().labels(&format!("{MANAGED_BY}={FIELD_MANAGER}"));
        let mut events = std::pin::pin!(watcher(self.pods.clone(), config));
        let until = tokio::time::sleep(self.settings.watch_restart);
        tokio::pin!(until);
        loop {
            let event = tokio::select! {
                () = &mut until => return Ok(()),
                event = events.next() => event,
            };
            let pod = match event {
                None => return Ok(()),
                Some(Err(e)) => return Err(ClusterError::Unavailable(Box::new(e))),
                Some(Ok(watcher::Event::InitDone)) => {
                    let _ = alive.send(()).await;
                    continue;
                }
                Some(Ok(watcher::Event::Init)) => continue,
                Some(Ok(
                    watcher::Event::Apply(pod)
                    | watcher::Event::Delete(pod)
                    | watcher::Event::InitApply(pod),
                )) => pod,
            };
            if let Some(observed) = self.observed(&pod, true)
                && changed.send(observed.id).await.is_err()
            {
                return Ok(());
            }
        }
    }
}
