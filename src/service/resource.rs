//! `resource.v1.resourceService`: message mapping over `InstanceUsecase`.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::page_token;
use crate::{
    biz::{
        Error, Instance, InstanceId, InstanceStatus, InstanceUsecase, ListFilter,
        instance::Endpoint,
    },
    pb::resource::v1 as pb,
};

/// The instance API, for the gRPC and HTTP servers alike.
#[derive(Clone)]
pub struct ResourceService {
    instances: Arc<InstanceUsecase>,
}

impl ResourceService {
    /// The API over `instances`.
    pub fn new(instances: Arc<InstanceUsecase>) -> Self {
        Self { instances }
    }

    /// `ListResources`.
    ///
    /// # Errors
    /// `InvalidPageSize`, `InvalidPageToken`, `InvalidArgument` (status), `Unavailable`.
    pub async fn list_resources(
        &self,
        req: pb::ListResourcesRequest,
    ) -> Result<pb::ListResourcesReply, Error> {
        let filter = ListFilter {
            user_id: non_empty(req.user_id),
            status: status_filter(req.status)?,
            name: non_empty(req.name),
        };
        let before = page_token::decode(&req.page_token, &filter)?;
        let page = self.instances.list(filter.clone(), i64::from(req.page_size), before).await?;
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
    pub async fn get_resource(&self, req: pb::GetResourceRequest) -> Result<pb::Resource, Error> {
        let id = InstanceId::try_from(req.instance_id)?;
        let instance = self.instances.get(id).await?;
        Ok(pb::Resource::from(instance))
    }
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
