//! `resource.v1.resourceService`: message mapping over `InstanceUsecase`, `AuditUsecase`,
//! `QuotaUsecase` and `ExplainUsecase`.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{page_token, resume_token};
use crate::biz::explain::ExplainUsecase;
use crate::{
    biz::{
        Actor, AuditRecord, AuditUsecase, Command, Error, GpuType, Instance, InstanceId,
        InstanceSpec, InstanceStatus, InstanceUsecase, ListFilter, NewInstance, QuotaUsecase,
        SpecPatch,
        access::{self, Access, ListScope},
        instance::Endpoint,
        instance::{LabelSelector, Labels},
        quota::{self, Amounts, QuotaOverride, UserQuota},
        watch::{Interest, Watch, WatchConf, WatchItem, WatchUsecase},
    },
    pb::resource::v1 as pb,
};

/// Which transport a caller came through (the audit trail records it).
pub use crate::biz::Source;

/// Who calls, from which transport, under which request id.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The caller's user id (the token's `sub`; `anonymous` without authentication).
    pub user_id: String,
    /// Sees and acts on every instance (`role: admin`, or no authentication).
    pub admin: bool,
    /// The transport.
    pub source: Source,
    /// The request id, for the audit trail.
    pub request_id: String,
}

impl Caller {
    fn actor(&self) -> Actor {
        Actor { id: self.user_id.clone(), source: self.source }
    }

    fn access(&self) -> Access {
        Access { user_id: self.user_id.clone(), admin: self.admin }
    }
}

/// The status a REST client names (`"RUNNING"`).
///
/// # Errors
/// `InvalidArgument` for a name that is no status.
pub fn status_named(raw: &str) -> Result<pb::Status, Error> {
    raw.parse::<InstanceStatus>().map(pb::Status::from)
}

/// A JSON request body with integral numbers written as integers (`1.0` is `1`): it
/// changes no value, only its spelling.
pub fn integral_numbers(value: serde_json::Value) -> serde_json::Value {
    crate::biz::instance::integral_numbers(value)
}

/// Whether `sub`, a verified token's subject, can name a caller.
pub fn is_user_id(sub: &str) -> bool {
    access::is_user_id(sub)
}

/// The instance API, for the gRPC and HTTP servers alike.
#[derive(Clone)]
pub struct ResourceService {
    instances: Arc<InstanceUsecase>,
    audits: Arc<AuditUsecase>,
    quotas: Arc<QuotaUsecase>,
    watches: Arc<WatchUsecase>,
    explains: Arc<ExplainUsecase>,
}

impl ResourceService {
    /// The API over `instances`, the audit trail, the quotas and the change log.
    pub fn new(
        instances: Arc<InstanceUsecase>,
        audits: Arc<AuditUsecase>,
        quotas: Arc<QuotaUsecase>,
        watches: Arc<WatchUsecase>,
    ) -> Self {
        let explains = Arc::new(ExplainUsecase::new(None, std::time::Duration::ZERO));
        Self { instances, audits, quotas, watches, explains }
    }

    /// Explains instances with `explains` (by default from the database only).
    #[must_use]
    pub fn with_explain(mut self, explains: Arc<ExplainUsecase>) -> Self {
        self.explains = explains;
        self
    }

    /// How watches behave (the transports send heartbeats at its pace).
    pub fn watch_conf(&self) -> WatchConf {
        self.watches.conf()
    }

    /// `WatchResources`: the watch, and the first response to send — a heartbeat with the
    /// starting position, so a client holds a resume token before any change.
    ///
    /// # Errors
    /// `InvalidArgument` (token, status, user id, name), `ResumeTokenExpired`,
    /// `Unavailable`.
    pub async fn watch_resources(
        &self,
        caller: &Caller,
        req: pb::WatchResourcesRequest,
    ) -> Result<ResourceWatch, Error> {
        let from = resume_token::decode(&req.resume_token)?;
        // The same filters as a list's, checked the same way.
        let filters = pb::ListResourcesRequest {
            user_id: req.user_id,
            status: req.status,
            name: req.name,
            label_selector: req.label_selector,
            gpu_model: req.gpu_model,
            image: req.image,
            created_after: req.created_after,
            created_before: req.created_before,
            ..pb::ListResourcesRequest::default()
        };
        let interest = match filter_of(caller, filters)? {
            Some(filter) => {
                filter.validate()?;
                Interest::Matching(filter)
            }
            None => Interest::Nothing,
        };
        let watch = self.watches.watch(interest, from).await?;
        Ok(ResourceWatch { watch })
    }

    /// The ranges requests are checked against (published in the OpenAPI document).
    pub fn limits(&self) -> &crate::biz::Limits {
        self.instances.limits()
    }

    /// `CreateResource`. The owner is `req.user_id`, or the caller when empty.
    ///
    /// # Errors
    /// `InvalidSpec`, `InvalidGpuType`, `InvalidArgument`, `RequestIdReused`, `Unavailable`.
    pub async fn create_resource(
        &self,
        caller: &Caller,
        req: pb::CreateResourceRequest,
    ) -> Result<pb::Resource, Error> {
        let spec = spec_from(req.spec)?;
        let user_id = caller.access().owner_of_new(non_empty(req.user_id))?;
        let new = NewInstance {
            user_id,
            name: req.name,
            spec,
            request_id: non_empty(req.request_id),
            labels: labels_from(req.labels),
        };
        let instance =
            self.instances.create(caller.actor(), caller.request_id.clone(), new).await?;
        Ok(pb::Resource::from(instance))
    }

    /// `DeleteResource`, `StartResource`, `StopResource`.
    ///
    /// # Errors
    /// `InvalidArgument` (id), `InstanceNotFound`, `IllegalTransition`, `Unavailable`.
    pub async fn act_on_resource(
        &self,
        caller: &Caller,
        action: ResourceAction,
        req: pb::ResourceActionRequest,
    ) -> Result<pb::Resource, Error> {
        let id = InstanceId::try_from(req.instance_id)?;
        self.visible(caller, id).await?;
        let command = match action {
            ResourceAction::Delete => Command::Delete { id },
            ResourceAction::Start => Command::Start { id },
            ResourceAction::Stop => Command::Stop { id },
        };
        let instance =
            self.instances.act(caller.actor(), caller.request_id.clone(), command).await?;
        Ok(pb::Resource::from(instance))
    }

    /// `UpdateResourceSpec`: the fields `update_mask` names, or the populated ones.
    ///
    /// # Errors
    /// `InvalidSpec`, `InvalidArgument` (mask), `InstanceNotFound`, `NotAllowed`,
    /// `Unavailable`.
    pub async fn update_resource_spec(
        &self,
        caller: &Caller,
        req: pb::UpdateResourceSpecRequest,
    ) -> Result<pb::Resource, Error> {
        let id = InstanceId::try_from(req.instance_id)?;
        let patch = spec_patch(req.spec.unwrap_or_default(), req.update_mask)?;
        self.visible(caller, id).await?;
        let command = Command::ChangeSpec { id, patch };
        let instance =
            self.instances.act(caller.actor(), caller.request_id.clone(), command).await?;
        Ok(pb::Resource::from(instance))
    }

    /// `SetResourceLabels`: replaces the labels as a whole.
    ///
    /// # Errors
    /// `InvalidArgument` (id), `InvalidLabels`, `InstanceNotFound`, `NotAllowed`
    /// (deleted), `Unavailable`.
    pub async fn set_resource_labels(
        &self,
        caller: &Caller,
        req: pb::SetResourceLabelsRequest,
    ) -> Result<pb::Resource, Error> {
        let id = InstanceId::try_from(req.instance_id)?;
        let labels = labels_from(req.labels);
        self.visible(caller, id).await?;
        // Checked by the planner, so a refusal is on the instance's audit trail.
        let command = Command::SetLabels { id, labels };
        let instance =
            self.instances.act(caller.actor(), caller.request_id.clone(), command).await?;
        Ok(pb::Resource::from(instance))
    }

    /// `ListAuditLogs`.
    ///
    /// # Errors
    /// `InvalidArgument`, `InvalidPageSize`, `InvalidPageToken`, `InstanceNotFound`,
    /// `Unavailable`.
    pub async fn list_audit_logs(
        &self,
        caller: &Caller,
        req: pb::ListAuditLogsRequest,
    ) -> Result<pb::ListAuditLogsReply, Error> {
        let id = InstanceId::try_from(req.instance_id)?;
        // The trail of an instance that never existed is a 404, not an empty page.
        self.visible(caller, id).await?;
        let before = page_token::decode_audit(&req.page_token, id)?;
        let (rows, next) = self.audits.list(id, i64::from(req.page_size), before).await?;
        Ok(pb::ListAuditLogsReply {
            entries: rows.into_iter().map(pb::AuditEntry::from).collect(),
            next_page_token: next
                .map(|last| page_token::encode_audit(last, id))
                .unwrap_or_default(),
        })
    }

    /// `ListResources`.
    ///
    /// # Errors
    /// `InvalidPageSize`, `InvalidPageToken`, `InvalidArgument` (status), `Unavailable`.
    pub async fn list_resources(
        &self,
        caller: &Caller,
        req: pb::ListResourcesRequest,
    ) -> Result<pb::ListResourcesReply, Error> {
        let (page_token, page_size) = (req.page_token.clone(), req.page_size);
        let Some(filter) = filter_of(caller, req)? else {
            return Ok(pb::ListResourcesReply::default());
        };
        let before = page_token::decode(&page_token, &filter)?;
        let page = self.instances.list(filter.clone(), i64::from(page_size), before).await?;
        Ok(pb::ListResourcesReply {
            resources: page.items.into_iter().map(pb::Resource::from).collect(),
            next_page_token: page
                .next
                .map(|id| page_token::encode(id, &filter))
                .unwrap_or_default(),
        })
    }

    /// `GetResource`.
    ///
    /// # Errors
    /// `InvalidArgument` (id), `InstanceNotFound`, `Unavailable`.
    pub async fn get_resource(
        &self,
        caller: &Caller,
        req: pb::GetResourceRequest,
    ) -> Result<pb::Resource, Error> {
        let id = InstanceId::try_from(req.instance_id)?;
        Ok(pb::Resource::from(self.visible(caller, id).await?))
    }

    /// `GetQuota`: a user reads their own quota, an admin anyone's.
    ///
    /// # Errors
    /// `InvalidArgument` (user id), `PermissionDenied`, `Unavailable`.
    pub async fn get_quota(
        &self,
        caller: &Caller,
        req: pb::GetQuotaRequest,
    ) -> Result<pb::Quota, Error> {
        let quota = self.quotas.get(&caller.access(), &req.user_id).await?;
        Ok(pb::Quota::from(quota))
    }

    /// `SetQuota`: replaces an owner's own limits (admin only); absent `limits` removes
    /// them.
    ///
    /// # Errors
    /// `InvalidArgument` (user id, a negative limit), `PermissionDenied`, `Unavailable`.
    pub async fn set_quota(
        &self,
        caller: &Caller,
        req: pb::SetQuotaRequest,
    ) -> Result<pb::Quota, Error> {
        let own = QuotaOverride::from(req.limits.unwrap_or_default());
        let quota = self.quotas.set(&caller.access(), &req.user_id, own).await?;
        Ok(pb::Quota::from(quota))
    }

    /// `GetCapacity`: every GPU type's capacity and use, for any caller.
    ///
    /// # Errors
    /// `Unavailable`.
    pub async fn get_capacity(
        &self,
        _caller: &Caller,
        _req: pb::GetCapacityRequest,
    ) -> Result<pb::Capacity, Error> {
        let gpus = self.quotas.capacity().await?;
        Ok(pb::Capacity { gpus: gpus.into_iter().map(pb::GpuCapacity::from).collect() })
    }

    /// The instance, if it exists for `caller`; another user's instance is
    /// `InstanceNotFound`, exactly as one that does not exist.
    async fn visible(&self, caller: &Caller, id: InstanceId) -> Result<Instance, Error> {
        let instance = self.instances.get(id).await?;
        if caller.access().sees(&instance) {
            Ok(instance)
        } else {
            Err(Error::InstanceNotFound { instance_id: id.get() })
        }
    }
}

/// The filters of a list (or a watch) as `caller` may see them; `None` when they name
/// another user's instances, which are not there for a user.
///
/// # Errors
/// `InvalidArgument` (status, times), `InvalidLabelSelector`, `InvalidGpuType`.
fn filter_of(caller: &Caller, req: pb::ListResourcesRequest) -> Result<Option<ListFilter>, Error> {
    let user_id = match caller.access().list_scope(non_empty(req.user_id)) {
        ListScope::Owner(owner) => owner,
        ListScope::Nothing => return Ok(None),
    };
    Ok(Some(ListFilter {
        user_id,
        status: status_filter(req.status)?,
        name: non_empty(req.name),
        labels: LabelSelector::parse(&req.label_selector)?,
        gpu: gpu_filter(&req.gpu_model)?,
        image: non_empty(req.image),
        created_after: req.created_after.map(|t| time_from("created_after", t)).transpose()?,
        created_before: req.created_before.map(|t| time_from("created_before", t)).transpose()?,
    }))
}

/// One open `WatchResources` stream, as messages.
pub struct ResourceWatch {
    watch: Watch,
}

impl ResourceWatch {
    /// The response that tells where the watch starts (a heartbeat).
    pub fn start(&self) -> pb::WatchResourcesResponse {
        pb::WatchResourcesResponse {
            resource: None,
            resume_token: resume_token::encode(self.watch.epoch(), self.watch.position()),
        }
    }

    /// The next response: a change, or a heartbeat after a silence.
    ///
    /// # Errors
    /// `ResumeTokenExpired`, `Unavailable`: the stream ends with it.
    pub async fn next(&mut self) -> Result<pb::WatchResourcesResponse, Error> {
        Ok(match self.watch.next().await? {
            WatchItem::Change(change) => pb::WatchResourcesResponse {
                resource: Some(pb::Resource::from(change.instance.clone())),
                resume_token: resume_token::encode(self.watch.epoch(), change.position),
            },
            WatchItem::Heartbeat(position) => pb::WatchResourcesResponse {
                resource: None,
                resume_token: resume_token::encode(self.watch.epoch(), position),
            },
        })
    }
}

mod explain;

/// The actions of `act_on_resource`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceAction {
    /// `DeleteResource`.
    Delete,
    /// `StartResource`.
    Start,
    /// `StopResource`.
    Stop,
}

/// A spec from the API (`gpu_model` is output only and ignored).
fn spec_from(spec: Option<pb::ResourceSpec>) -> Result<InstanceSpec, Error> {
    let s =
        spec.ok_or_else(|| Error::InvalidSpec { field: "spec", message: "is required".into() })?;
    Ok(InstanceSpec {
        cpu: s.cpu,
        memory_mb: s.memory,
        gpu: gpu_from(s.gpu)?,
        image: s.image,
        config: config_from(s.config_json)?,
    })
}

fn gpu_from(code: i32) -> Result<GpuType, Error> {
    GpuType::from_code(code).ok_or_else(|| Error::InvalidGpuType { value: code.to_string() })
}

/// `config_json` as stored: an object (empty when absent), integers as integers.
fn config_from(config: Option<pbjson_types::Struct>) -> Result<serde_json::Value, Error> {
    match config {
        Some(config) => serde_json::to_value(config)
            .map(integral_numbers)
            .map_err(|e| Error::InvalidSpec { field: "config_json", message: e.to_string() }),
        None => Ok(serde_json::Value::Object(serde_json::Map::new())),
    }
}

/// The fields of the spec an update changes: the ones `mask` names, or, without a mask,
/// the populated ones (AIP-134).
///
/// # Errors
/// `InvalidArgument` for a path that names no field of the spec; `InvalidGpuType`;
/// `InvalidSpec` for `config_json`.
pub fn spec_patch(
    spec: pb::ResourceSpec,
    mask: Option<pbjson_types::FieldMask>,
) -> Result<SpecPatch, Error> {
    let paths = match mask {
        Some(mask) if !mask.paths.is_empty() => mask.paths,
        _ => populated(&spec),
    };
    let mut patch = SpecPatch::default();
    for path in &paths {
        match path.trim().strip_prefix("spec.").unwrap_or(path.trim()) {
            "*" | "spec" => {
                let config = spec.config_json.clone();
                patch = SpecPatch::all(InstanceSpec {
                    cpu: spec.cpu,
                    memory_mb: spec.memory,
                    gpu: gpu_from(spec.gpu)?,
                    image: spec.image.clone(),
                    config: config_from(config)?,
                });
            }
            "cpu" => patch.cpu = Some(spec.cpu),
            "memory" => patch.memory_mb = Some(spec.memory),
            "gpu" => patch.gpu = Some(gpu_from(spec.gpu)?),
            "image" => patch.image = Some(spec.image.clone()),
            "config_json" | "configJson" => {
                patch.config = Some(config_from(spec.config_json.clone())?);
            }
            // Output only: a client may send back what it read.
            "gpu_model" | "gpuModel" => {}
            other => {
                return Err(Error::invalid(
                    "update_mask",
                    format!(
                        "{other:?} is not a field of the spec; expected cpu, memory, gpu, image, config_json or *"
                    ),
                ));
            }
        }
    }
    Ok(patch)
}

/// The fields of `spec` set to something other than their zero value.
fn populated(spec: &pb::ResourceSpec) -> Vec<String> {
    let set = [
        ("cpu", spec.cpu != 0),
        ("memory", spec.memory != 0),
        ("gpu", spec.gpu != 0),
        ("image", !spec.image.is_empty()),
        ("config_json", spec.config_json.is_some()),
    ];
    set.into_iter().filter(|(_, set)| *set).map(|(name, _)| name.to_owned()).collect()
}

impl From<pb::QuotaLimits> for QuotaOverride {
    fn from(l: pb::QuotaLimits) -> Self {
        QuotaOverride { instances: l.instances, cpu: l.cpu, memory_mb: l.memory_mb, gpus: l.gpus }
    }
}

impl From<QuotaOverride> for pb::QuotaLimits {
    fn from(o: QuotaOverride) -> Self {
        pb::QuotaLimits { instances: o.instances, cpu: o.cpu, memory_mb: o.memory_mb, gpus: o.gpus }
    }
}

impl From<Amounts> for pb::QuotaAmounts {
    fn from(a: Amounts) -> Self {
        pb::QuotaAmounts {
            instances: a.instances,
            cpu: a.cpu,
            memory_mb: a.memory_mb,
            gpus: a.gpus,
        }
    }
}

impl From<UserQuota> for pb::Quota {
    fn from(q: UserQuota) -> Self {
        pb::Quota {
            user_id: q.user_id,
            // 0 is unlimited on the wire, as in the configuration.
            limits: Some(pb::QuotaAmounts::from(q.limits.to_amounts())),
            usage: Some(pb::QuotaAmounts::from(q.usage)),
            own: Some(pb::QuotaLimits::from(q.own)),
        }
    }
}

impl From<quota::GpuCapacity> for pb::GpuCapacity {
    fn from(c: quota::GpuCapacity) -> Self {
        pb::GpuCapacity {
            gpu: c.gpu.code(),
            gpu_model: c.gpu.model().to_owned(),
            capacity: c.capacity,
            used: c.used,
            free: c.free(),
        }
    }
}

impl From<AuditRecord> for pb::AuditEntry {
    fn from(r: AuditRecord) -> Self {
        let e = r.entry;
        pb::AuditEntry {
            id: r.id,
            instance_id: e.instance_id,
            actor: e.actor.id,
            source: e.actor.source.as_str().to_owned(),
            action: e.action.as_str().to_owned(),
            outcome: e.outcome.as_str().to_owned(),
            reason: e.reason,
            request_id: e.request_id,
            before: e.before.as_ref().map(to_struct),
            after: e.after.as_ref().map(to_struct),
            created_at: Some(timestamp(e.at)),
        }
    }
}

/// Labels from the wire (validated by the use case).
fn labels_from(labels: impl IntoIterator<Item = (String, String)>) -> Labels {
    labels.into_iter().collect()
}

/// The `gpu_model` filter: a model name or code; empty means none.
fn gpu_filter(raw: &str) -> Result<Option<GpuType>, Error> {
    if raw.trim().is_empty() {
        return Ok(None);
    }
    GpuType::parse(raw).map(Some)
}

/// A timestamp from the wire.
fn time_from(field: &'static str, t: pbjson_types::Timestamp) -> Result<DateTime<Utc>, Error> {
    u32::try_from(t.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .ok_or_else(|| Error::invalid(field, "is not a valid timestamp"))
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn timestamp(t: DateTime<Utc>) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

impl From<Instance> for pb::Resource {
    fn from(i: Instance) -> Self {
        pb::Resource {
            instance_id: i.id.get(),
            status: pb::Status::from(i.status) as i32,
            spec: Some(pb::ResourceSpec {
                cpu: i.spec.cpu,
                memory: i.spec.memory_mb,
                gpu: i.spec.gpu.code(),
                gpu_model: i.spec.gpu.model().to_owned(),
                config_json: Some(to_struct(&i.spec.config)),
                image: i.spec.image,
            }),
            endpoint: Some(pb::Endpoint::from(i.endpoint)),
            user_id: i.user_id,
            name: i.name,
            status_reason: i.status_reason,
            created_at: Some(timestamp(i.created_at)),
            updated_at: Some(timestamp(i.updated_at)),
            deleted_at: i.deleted_at.map(timestamp),
            labels: i.labels.into_iter().collect(),
        }
    }
}

impl From<Endpoint> for pb::Endpoint {
    fn from(e: Endpoint) -> Self {
        pb::Endpoint {
            pod_name: e.pod_name,
            pod_ip: e.pod_ip,
            service_host: e.service_host,
            ports: e
                .ports
                .into_iter()
                .map(|p| pb::Port { name: p.name, port: p.port, protocol: p.protocol })
                .collect(),
        }
    }
}

/// A JSON object as a `google.protobuf.Struct` (the database guarantees an object).
fn to_struct(value: &serde_json::Value) -> pbjson_types::Struct {
    match value {
        serde_json::Value::Object(map) => pbjson_types::Struct {
            fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
        },
        _ => pbjson_types::Struct::default(),
    }
}

/// A JSON value as a `google.protobuf.Value`, without a serde round trip.
fn to_value(value: &serde_json::Value) -> pbjson_types::Value {
    use pbjson_types::value::Kind;
    use serde_json::Value as J;
    let kind = match value {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(items) => Kind::ListValue(pbjson_types::ListValue {
            values: items.iter().map(to_value).collect(),
        }),
        J::Object(_) => Kind::StructValue(to_struct(value)),
    };
    pbjson_types::Value { kind: Some(kind) }
}

impl From<InstanceStatus> for pb::Status {
    fn from(s: InstanceStatus) -> Self {
        match s {
            InstanceStatus::Creating => pb::Status::Creating,
            InstanceStatus::Running => pb::Status::Running,
            InstanceStatus::Stopping => pb::Status::Stopping,
            InstanceStatus::Stopped => pb::Status::Stopped,
            InstanceStatus::Deleting => pb::Status::Deleting,
            InstanceStatus::Deleted => pb::Status::Deleted,
            InstanceStatus::Failed => pb::Status::Failed,
        }
    }
}

/// The status filter of a list request: unspecified means none.
fn status_filter(raw: i32) -> Result<Option<InstanceStatus>, Error> {
    let status = match pb::Status::try_from(raw) {
        Ok(pb::Status::Unspecified) => return Ok(None),
        Ok(pb::Status::Creating) => InstanceStatus::Creating,
        Ok(pb::Status::Running) => InstanceStatus::Running,
        Ok(pb::Status::Stopping) => InstanceStatus::Stopping,
        Ok(pb::Status::Stopped) => InstanceStatus::Stopped,
        Ok(pb::Status::Deleting) => InstanceStatus::Deleting,
        Ok(pb::Status::Deleted) => InstanceStatus::Deleted,
        Ok(pb::Status::Failed) => InstanceStatus::Failed,
        Err(_) => return Err(Error::invalid("status", format!("unknown status {raw}"))),
    };
    Ok(Some(status))
}
