//! `InstanceRepo` on PostgreSQL: `instances` joined with `instance_specs`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, QueryBuilder, types::Json};

use super::map_sqlx;
use crate::biz::{
    GpuType, Instance, InstanceId, InstanceRepo, InstanceSpec, InstanceStatus, ListQuery,
    RepoError,
    instance::{Endpoint, Port},
};

/// The columns of an instance with its spec; a macro so queries can `concat!` onto it.
macro_rules! select_instances {
    () => {
        "SELECT i.instance_id, i.user_id, i.name, i.status, i.status_reason, \
     i.pod_name, i.pod_ip, i.service_host, i.ports, i.created_at, i.updated_at, i.deleted_at, \
     i.version, s.cpu, s.memory, s.gpu, s.image, s.config_json \
     FROM instances i JOIN instance_specs s ON s.instance_id = i.instance_id"
    };
}

/// Instances in PostgreSQL.
#[derive(Clone)]
pub struct PgInstanceRepo {
    pool: PgPool,
}

impl PgInstanceRepo {
    /// A repository over `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[derive(sqlx::FromRow)]
struct InstanceRow {
    instance_id: i64,
    user_id: String,
    name: String,
    status: String,
    status_reason: String,
    pod_name: String,
    pod_ip: String,
    service_host: String,
    ports: Json<Vec<PortRow>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    deleted_at: Option<DateTime<Utc>>,
    version: i64,
    cpu: i32,
    memory: i32,
    gpu: i32,
    image: String,
    config_json: serde_json::Value,
}

#[derive(serde::Deserialize, serde::Serialize)]
struct PortRow {
    name: String,
    port: i32,
    protocol: String,
}

impl TryFrom<InstanceRow> for Instance {
    type Error = RepoError;

    fn try_from(row: InstanceRow) -> Result<Self, RepoError> {
        let corrupt = |what: String| RepoError::Internal(what.into());
        Ok(Instance {
            id: InstanceId::try_from(row.instance_id).map_err(|_| {
                corrupt(format!("stored instance_id {} is not positive", row.instance_id))
            })?,
            status: row
                .status
                .parse::<InstanceStatus>()
                .map_err(|_| corrupt(format!("stored status {:?} is unknown", row.status)))?,
            spec: InstanceSpec {
                cpu: row.cpu,
                memory_mb: row.memory,
                gpu: GpuType::from_code(row.gpu)
                    .ok_or_else(|| corrupt(format!("stored gpu code {} is unknown", row.gpu)))?,
                image: row.image,
                config: row.config_json,
            },
            endpoint: Endpoint {
                pod_name: row.pod_name,
                pod_ip: row.pod_ip,
                service_host: row.service_host,
                ports: row
                    .ports
                    .0
                    .into_iter()
                    .map(|p| Port { name: p.name, port: p.port, protocol: p.protocol })
                    .collect(),
            },
            user_id: row.user_id,
            name: row.name,
            status_reason: row.status_reason,
            created_at: row.created_at,
            updated_at: row.updated_at,
            deleted_at: row.deleted_at,
            version: row.version,
        })
    }
}

#[async_trait]
impl InstanceRepo for PgInstanceRepo {
    async fn get(&self, id: InstanceId) -> Result<Instance, RepoError> {
        let row: InstanceRow =
            sqlx::query_as(concat!(select_instances!(), " WHERE i.instance_id = $1"))
                .bind(id.get())
                .fetch_one(&self.pool)
                .await
                .map_err(map_sqlx)?;
        row.try_into()
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<Instance>, RepoError> {
        // Only the filters present appear in the SQL, so each combination gets its own
        // cached prepared statement and a plan that uses the matching index.
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(select_instances!());
        qb.push(" WHERE ");
        match query.filter.status {
            Some(status) => qb.push("i.status = ").push_bind(status.as_str()),
            None => qb.push("i.deleted_at IS NULL"),
        };
        if let Some(before) = query.before {
            // The bound is repeated on the spec table so the join walks its index from
            // the page's position instead of from the newest row.
            qb.push(" AND i.instance_id < ").push_bind(before.get());
            qb.push(" AND s.instance_id < ").push_bind(before.get());
        }
        if let Some(user_id) = &query.filter.user_id {
            qb.push(" AND i.user_id = ").push_bind(user_id.as_str());
        }
        if let Some(name) = &query.filter.name {
            qb.push(" AND i.name = ").push_bind(name.as_str());
        }
        // NOTE: LIMIT is a literal, not a parameter: with `LIMIT $n` PostgreSQL's generic
        // plan assumes a large result, loses to the custom plan, and so re-plans on every
        // execution. The limit is a validated integer, so this is injection-free.
        qb.push(" ORDER BY i.instance_id DESC LIMIT ").push(query.limit);
        let rows: Vec<InstanceRow> =
            qb.build_query_as().fetch_all(&self.pool).await.map_err(map_sqlx)?;
        rows.into_iter().map(Instance::try_from).collect()
    }
}
