//! `InstanceRepo` on PostgreSQL: `instances` joined with `instance_specs`.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection, Postgres, QueryBuilder, types::Json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Db, map_sqlx};
use crate::biz::{
    Changes, EventKey, GpuType, Instance, InstanceId, InstanceRepo, InstanceSpec, InstanceStatus,
    ListQuery, Processed, RepoError, Snapshot,
    instance::{Endpoint, Labels, ListFilter, Port, SelectorOp},
    quota::Scope,
};

/// The columns of an instance with its spec; a macro so queries can `concat!` onto it.
macro_rules! select_instances {
    () => {
        "SELECT i.instance_id, i.user_id, i.name, i.status, i.status_reason, \
     i.pod_name, i.pod_ip, i.service_host, i.ports, i.created_at, i.updated_at, i.deleted_at, \
     i.version, i.labels, s.cpu, s.memory, s.gpu, s.image, s.config_json \
     FROM instances i JOIN instance_specs s ON s.instance_id = i.instance_id"
    };
}

/// Instances in PostgreSQL.
#[derive(Clone)]
pub struct PgInstanceRepo {
    db: Db,
    changed: Arc<Notify>,
}

impl PgInstanceRepo {
    /// A repository over `db`.
    pub fn new(db: Db) -> Self {
        Self { db, changed: Arc::default() }
    }

    /// Wakes `changed` after each commit that changed instances (the change log's
    /// ticker).
    #[must_use]
    pub fn signalling(mut self, changed: Arc<Notify>) -> Self {
        self.changed = changed;
        self
    }

    /// Forgets processed event keys older than the de-duplication `window`, hourly,
    /// until `shutdown`.
    pub async fn prune_processed_events(self, window: Duration, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let before = Utc::now() - chrono::Duration::from_std(window).unwrap_or_default();
            let pruned = self
                .db
                .run("prune processed keys", async |conn| {
                    sqlx::query("DELETE FROM processed_events WHERE processed_at < $1")
                        .bind(before)
                        .execute(conn)
                        .await
                        .map_err(map_sqlx)
                })
                .await;
            match pruned.map(|done| done.rows_affected()) {
                Ok(0) => {}
                Ok(n) => tracing::info!(pruned = n, "forgot old processed event keys"),
                Err(e) => tracing::warn!(error = %e, "pruning processed event keys failed"),
            }
        }
    }
}

/// An instance as stored: a row of `instances` joined with `instance_specs`, and the
/// change log's `state`.
#[derive(sqlx::FromRow, serde::Serialize, serde::Deserialize)]
pub(super) struct InstanceRow {
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
    labels: Json<Labels>,
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

impl From<&Instance> for InstanceRow {
    fn from(i: &Instance) -> Self {
        InstanceRow {
            instance_id: i.id.get(),
            user_id: i.user_id.clone(),
            name: i.name.clone(),
            status: i.status.as_str().to_owned(),
            status_reason: i.status_reason.clone(),
            pod_name: i.endpoint.pod_name.clone(),
            pod_ip: i.endpoint.pod_ip.clone(),
            service_host: i.endpoint.service_host.clone(),
            ports: Json(
                i.endpoint
                    .ports
                    .iter()
                    .map(|p| PortRow {
                        name: p.name.clone(),
                        port: p.port,
                        protocol: p.protocol.clone(),
                    })
                    .collect(),
            ),
            created_at: i.created_at,
            updated_at: i.updated_at,
            deleted_at: i.deleted_at,
            version: i.version,
            labels: Json(i.labels.clone()),
            cpu: i.spec.cpu,
            memory: i.spec.memory_mb,
            gpu: i.spec.gpu.code(),
            image: i.spec.image.clone(),
            config_json: i.spec.config.clone(),
        }
    }
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
            labels: row.labels.0,
        })
    }
}

#[async_trait]
impl InstanceRepo for PgInstanceRepo {
    async fn get(&self, id: InstanceId) -> Result<Instance, RepoError> {
        let row: InstanceRow = self
            .db
            .run("get an instance", async |conn| {
                sqlx::query_as(concat!(select_instances!(), " WHERE i.instance_id = $1"))
                    .bind(id.get())
                    .fetch_one(conn)
                    .await
                    .map_err(map_sqlx)
            })
            .await?;
        row.try_into()
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<Instance>, RepoError> {
        let mut qb = list_statement(query);
        let rows: Vec<InstanceRow> = self
            .db
            .run("list instances", async |conn| {
                qb.build_query_as().fetch_all(conn).await.map_err(map_sqlx)
            })
            .await?;
        rows.into_iter().map(Instance::try_from).collect()
    }

    async fn processed(&self, key: EventKey) -> Result<Option<Processed>, RepoError> {
        let row: Option<(i64, Option<Vec<u8>>)> = self
            .db
            .run("look up a processed key", async |conn| {
                sqlx::query_as(
                    "SELECT instance_id, request_fingerprint FROM processed_events \
                     WHERE event_key = $1",
                )
                .bind(key_uuid(&key))
                .fetch_optional(conn)
                .await
                .map_err(map_sqlx)
            })
            .await?;
        Ok(row.map(|(instance_id, fingerprint)| Processed {
            instance_id,
            fingerprint: fingerprint.and_then(|f| <[u8; 16]>::try_from(f).ok()),
        }))
    }

    async fn transact(
        &self,
        ids: &[InstanceId],
        keys: &[EventKey],
        owners: &[String],
        work: &mut (dyn FnMut(Snapshot) -> Changes + Send),
    ) -> Result<(), RepoError> {
        self.db
            .run("apply a unit of work", async |conn| {
                let mut tx = conn.begin().await.map_err(map_sqlx)?;
                // NOTE: every read and write of a unit of work is a primary-key lookup of
                // a few hundred keys. A generic plan cached while the tables were small
                // keeps hash joins over them as they grow, which made ingest slow down as
                // it went; so this transaction plans each statement for its own
                // arguments. (Seq scans are off for the whole pool: `Data::connect`.)
                sqlx::query("SELECT set_config('plan_cache_mode', 'force_custom_plan', true)")
                    .execute(&mut *tx)
                    .await
                    .map_err(map_sqlx)?;
                let snapshot = load(&mut tx, ids, keys, owners).await?;
                let changes = work(snapshot);
                if !changes.is_empty() {
                    write(&mut tx, &changes).await?;
                }
                tx.commit().await.map_err(map_sqlx)?;
                Ok(!changes.inserts.is_empty() || !changes.updates.is_empty())
            })
            .await
            .map(|changed| {
                if changed {
                    self.changed.notify_one();
                }
            })
    }
}

/// The statement of one list page. Only the filters present appear in the SQL, so each
/// combination gets its own cached prepared statement and a plan that uses the matching
/// index; every filter decides as [`ListFilter::matches`] does.
pub(crate) fn list_statement(query: &ListQuery) -> QueryBuilder<Postgres> {
    let f = &query.filter;
    let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(select_instances!());
    qb.push(" WHERE ");
    match f.status {
        Some(status) => qb.push("i.status = ").push_bind(status.as_str()),
        None => qb.push("i.deleted_at IS NULL"),
    };
    if let Some(before) = query.before {
        // The bound is repeated on the spec table so the join walks its index from
        // the page's position instead of from the newest row.
        qb.push(" AND i.instance_id < ").push_bind(before.get());
        qb.push(" AND s.instance_id < ").push_bind(before.get());
    }
    if let Some(user_id) = &f.user_id {
        qb.push(" AND i.user_id = ").push_bind(user_id.as_str());
    }
    if let Some(name) = &f.name {
        qb.push(" AND i.name = ").push_bind(name.as_str());
    }
    push_label_filter(&mut qb, f, query.before);
    if let Some(gpu) = f.gpu {
        // instance_specs (gpu, instance_id): walked newest first from the page's position.
        qb.push(" AND s.gpu = ").push_bind(gpu.code());
    }
    if let Some(image) = &f.image {
        // instance_specs (image, instance_id), likewise.
        qb.push(" AND s.image = ").push_bind(image.as_str());
    }
    // instances (created_at, instance_id); the planner also weighs walking the primary
    // key and checking the time on the rows, when the window holds most of them.
    if let Some(after) = f.created_after {
        qb.push(" AND i.created_at > ").push_bind(after);
    }
    if let Some(before) = f.created_before {
        qb.push(" AND i.created_at < ").push_bind(before);
    }
    // NOTE: LIMIT is a literal, not a parameter: with `LIMIT $n` PostgreSQL's generic
    // plan assumes a large result, loses to the custom plan, and so re-plans on every
    // execution. The limit is a validated integer, so this is injection-free.
    qb.push(" ORDER BY i.instance_id DESC LIMIT ").push(query.limit);
    qb
}

/// The label selector as predicates on `i.labels`. Equality and `in` requirements are
/// containment (`labels @> '{"k": "v"}'`), which the GIN index (jsonb_path_ops) serves;
/// `!=`, `notin` and the existence tests are checked on the rows found.
fn push_label_filter(
    qb: &mut QueryBuilder<Postgres>,
    f: &ListFilter,
    before: Option<crate::biz::InstanceId>,
) {
    let Some(selector) = &f.labels else { return };
    let contains = |key: &str, value: &str| serde_json::json!({ key: value });
    // The first equality is looked up in instance_labels, whose primary key (key, value,
    // instance_id) is walked newest first from the page's position: a page reads only
    // instances with that label, however few carry it.
    let first = selector.requirements.iter().position(|r| matches!(r.op, SelectorOp::Equals(_)));
    if let Some(r) = first.map(|n| &selector.requirements[n])
        && let SelectorOp::Equals(v) = &r.op
    {
        qb.push(
            " AND i.instance_id IN (SELECT l.instance_id FROM instance_labels l WHERE l.key = ",
        )
        .push_bind(r.key.clone())
        .push(" AND l.value = ")
        .push_bind(v.clone());
        if let Some(before) = before {
            qb.push(" AND l.instance_id < ").push_bind(before.get());
        }
        qb.push(")");
    }
    // Equalities on distinct keys are one containment: one index probe.
    let mut equal = serde_json::Map::new();
    for (n, r) in selector.requirements.iter().enumerate() {
        if Some(n) == first {
            continue;
        }
        match &r.op {
            SelectorOp::Equals(v) if !equal.contains_key(&r.key) => {
                equal.insert(r.key.clone(), v.clone().into());
            }
            SelectorOp::Equals(v) => {
                qb.push(" AND i.labels @> ").push_bind(contains(&r.key, v));
            }
            SelectorOp::NotEquals(v) => {
                qb.push(" AND NOT i.labels @> ").push_bind(contains(&r.key, v));
            }
            SelectorOp::In(set) | SelectorOp::NotIn(set) => {
                let negated = matches!(r.op, SelectorOp::NotIn(_));
                qb.push(if negated { " AND NOT (" } else { " AND (" });
                for (n, v) in set.iter().enumerate() {
                    if n > 0 {
                        qb.push(" OR ");
                    }
                    qb.push("i.labels @> ").push_bind(contains(&r.key, v));
                }
                qb.push(")");
            }
            SelectorOp::Exists => {
                qb.push(" AND i.labels ? ").push_bind(r.key.clone());
            }
            SelectorOp::DoesNotExist => {
                qb.push(" AND NOT i.labels ? ").push_bind(r.key.clone());
            }
        }
    }
    if !equal.is_empty() {
        qb.push(" AND i.labels @> ").push_bind(serde_json::Value::Object(equal));
    }
}

fn key_uuid(key: &EventKey) -> Uuid {
    Uuid::from_bytes(key.0)
}

/// Reads what a unit of work decides on, locking the instances in id order (so two
/// batches over the same instances cannot deadlock).
///
/// Both joined rows are locked, not only the instance: under READ COMMITTED a statement
/// that waited for a row lock re-reads the newest version of the rows it locks, but keeps
/// its start-of-statement snapshot of every other joined row. Locking `instances` alone
/// returned, after a concurrent spec change committed, the new instance row with the old
/// spec, and the next write put the old spec back (a lost update).
async fn load(
    conn: &mut PgConnection,
    ids: &[InstanceId],
    keys: &[EventKey],
    owners: &[String],
) -> Result<Snapshot, RepoError> {
    let mut seen = HashMap::new();
    if !keys.is_empty() {
        let uuids: Vec<Uuid> = keys.iter().map(key_uuid).collect();
        let found: Vec<(Uuid, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT p.event_key, p.request_fingerprint FROM UNNEST($1::uuid[]) AS k(event_key) \
             JOIN processed_events p ON p.event_key = k.event_key",
        )
        .bind(&uuids)
        .fetch_all(&mut *conn)
        .await
        .map_err(map_sqlx)?;
        seen.extend(found.into_iter().map(|(key, fingerprint)| {
            (EventKey(*key.as_bytes()), fingerprint.and_then(|f| <[u8; 16]>::try_from(f).ok()))
        }));
    }
    let mut instances = HashMap::new();
    if !ids.is_empty() {
        let raw: Vec<i64> = ids.iter().map(|id| id.get()).collect();
        let rows: Vec<InstanceRow> = sqlx::query_as(concat!(
            select_instances!(),
            " JOIN UNNEST($1::bigint[]) AS k(instance_id) ON k.instance_id = i.instance_id \
             ORDER BY i.instance_id FOR UPDATE OF i, s"
        ))
        .bind(&raw)
        .fetch_all(&mut *conn)
        .await
        .map_err(map_sqlx)?;
        for row in rows {
            let instance = Instance::try_from(row)?;
            instances.insert(instance.id, instance);
        }
    }
    // The counters are read without a lock: the write re-checks them under one.
    let mut scopes: Vec<Scope> = owners.iter().map(|o| Scope::User(o.clone())).collect();
    scopes.extend(instances.values().map(|i| Scope::User(i.user_id.clone())));
    let quota = if scopes.is_empty() {
        HashMap::new()
    } else {
        scopes.extend(Scope::gpus());
        super::quota::held(&mut *conn, &scopes).await?
    };
    Ok(Snapshot { seen, instances, quota })
}

/// Column arrays of instances, for one `UNNEST` statement per table.
#[derive(Default)]
struct InstanceColumns {
    id: Vec<i64>,
    user_id: Vec<String>,
    name: Vec<String>,
    status: Vec<&'static str>,
    status_reason: Vec<String>,
    pod_name: Vec<String>,
    pod_ip: Vec<String>,
    service_host: Vec<String>,
    ports: Vec<serde_json::Value>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
    deleted_at: Vec<Option<DateTime<Utc>>>,
    version: Vec<i64>,
    labels: Vec<serde_json::Value>,
    cpu: Vec<i32>,
    memory: Vec<i32>,
    gpu: Vec<i32>,
    image: Vec<String>,
    config: Vec<serde_json::Value>,
}

impl InstanceColumns {
    fn push(&mut self, i: &Instance) {
        let ports: Vec<PortRow> = i
            .endpoint
            .ports
            .iter()
            .map(|p| PortRow { name: p.name.clone(), port: p.port, protocol: p.protocol.clone() })
            .collect();
        self.id.push(i.id.get());
        self.user_id.push(i.user_id.clone());
        self.name.push(i.name.clone());
        self.status.push(i.status.as_str());
        self.status_reason.push(i.status_reason.clone());
        self.pod_name.push(i.endpoint.pod_name.clone());
        self.pod_ip.push(i.endpoint.pod_ip.clone());
        self.service_host.push(i.endpoint.service_host.clone());
        self.ports.push(serde_json::to_value(ports).unwrap_or_default());
        self.created_at.push(i.created_at);
        self.updated_at.push(i.updated_at);
        self.deleted_at.push(i.deleted_at);
        self.version.push(i.version);
        self.labels.push(serde_json::json!(i.labels));
        self.cpu.push(i.spec.cpu);
        self.memory.push(i.spec.memory_mb);
        self.gpu.push(i.spec.gpu.code());
        self.image.push(i.spec.image.clone());
        self.config.push(i.spec.config.clone());
    }
}

/// Appends every version of an instance a unit of work made to the change log
/// (`migrations/0012`), in the order made. After the instances' writes, so each `seq` is
/// taken under the instance's row lock and one instance's changes keep their version
/// order.
async fn log_changes(conn: &mut PgConnection, changes: &Changes) -> Result<(), RepoError> {
    let (mut ids, mut versions, mut states) = (Vec::new(), Vec::new(), Vec::new());
    for i in &changes.versions {
        ids.push(i.id.get());
        versions.push(i.version);
        states.push(Json(InstanceRow::from(i)));
    }
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO instance_changes (instance_id, version, state) \
         SELECT i, v, s FROM UNNEST($1::bigint[], $2::bigint[], $3::jsonb[]) \
         WITH ORDINALITY AS u(i, v, s, n) ORDER BY n",
    )
    .bind(&ids)
    .bind(&versions)
    .bind(&states)
    .execute(conn)
    .await
    .map_err(map_sqlx)?;
    Ok(())
}

/// Writes a unit of work's changes: a constant number of statements whatever its size.
async fn write(conn: &mut PgConnection, changes: &Changes) -> Result<(), RepoError> {
    if !changes.inserts.is_empty() {
        let mut c = InstanceColumns::default();
        changes.inserts.iter().for_each(|i| c.push(i));
        sqlx::query(
            "INSERT INTO instances (instance_id, user_id, name, status, status_reason, pod_name, \
             pod_ip, service_host, ports, created_at, updated_at, deleted_at, version, labels) \
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::text[], $7::text[], $8::text[], $9::jsonb[], $10::timestamptz[], \
             $11::timestamptz[], $12::timestamptz[], $13::bigint[], $14::jsonb[])",
        )
        .bind(&c.id)
        .bind(&c.user_id)
        .bind(&c.name)
        .bind(&c.status)
        .bind(&c.status_reason)
        .bind(&c.pod_name)
        .bind(&c.pod_ip)
        .bind(&c.service_host)
        .bind(&c.ports)
        .bind(&c.created_at)
        .bind(&c.updated_at)
        .bind(&c.deleted_at)
        .bind(&c.version)
        .bind(&c.labels)
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx)?;
        sqlx::query(
            "INSERT INTO instance_specs (instance_id, cpu, memory, gpu, image, config_json) \
             SELECT * FROM UNNEST($1::bigint[], $2::int[], $3::int[], $4::int[], $5::text[], \
             $6::jsonb[])",
        )
        .bind(&c.id)
        .bind(&c.cpu)
        .bind(&c.memory)
        .bind(&c.gpu)
        .bind(&c.image)
        .bind(&c.config)
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx)?;
    }
    if !changes.updates.is_empty() {
        let mut c = InstanceColumns::default();
        let mut expected = Vec::with_capacity(changes.updates.len());
        for update in &changes.updates {
            c.push(&update.instance);
            expected.push(update.loaded_version);
        }
        let updated = sqlx::query(
            "UPDATE instances i SET user_id = u.user_id, name = u.name, status = u.status, \
             status_reason = u.status_reason, pod_name = u.pod_name, pod_ip = u.pod_ip, \
             service_host = u.service_host, ports = u.ports, updated_at = u.updated_at, \
             deleted_at = u.deleted_at, version = u.version, labels = u.labels \
             FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::text[], $7::text[], $8::text[], $9::jsonb[], $10::timestamptz[], \
             $11::timestamptz[], $12::bigint[], $13::bigint[], $14::jsonb[]) \
             AS u(instance_id, user_id, name, status, status_reason, pod_name, pod_ip, \
             service_host, ports, updated_at, deleted_at, version, expected_version, labels) \
             WHERE i.instance_id = u.instance_id AND i.version = u.expected_version",
        )
        .bind(&c.id)
        .bind(&c.user_id)
        .bind(&c.name)
        .bind(&c.status)
        .bind(&c.status_reason)
        .bind(&c.pod_name)
        .bind(&c.pod_ip)
        .bind(&c.service_host)
        .bind(&c.ports)
        .bind(&c.updated_at)
        .bind(&c.deleted_at)
        .bind(&c.version)
        .bind(&expected)
        .bind(&c.labels)
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx)?;
        if updated.rows_affected() != changes.updates.len() as u64 {
            // Optimistic check: someone changed a row since it was loaded.
            return Err(RepoError::Conflict);
        }
        // Specs are written only where they changed: a status move does not rewrite one.
        let mut s = InstanceColumns::default();
        changes.updates.iter().filter(|u| u.spec_changed).for_each(|u| s.push(&u.instance));
        if !s.id.is_empty() {
            sqlx::query(
                "UPDATE instance_specs s SET cpu = u.cpu, memory = u.memory, gpu = u.gpu, \
                 image = u.image, config_json = u.config_json \
                 FROM UNNEST($1::bigint[], $2::int[], $3::int[], $4::int[], $5::text[], \
                 $6::jsonb[]) AS u(instance_id, cpu, memory, gpu, image, config_json) \
                 WHERE s.instance_id = u.instance_id",
            )
            .bind(&s.id)
            .bind(&s.cpu)
            .bind(&s.memory)
            .bind(&s.gpu)
            .bind(&s.image)
            .bind(&s.config)
            .execute(&mut *conn)
            .await
            .map_err(map_sqlx)?;
        }
    }
    log_changes(&mut *conn, changes).await?;
    if !changes.audit.is_empty() {
        let a = &changes.audit;
        sqlx::query(
            "INSERT INTO audit_logs (instance_id, actor, source, action, outcome, reason, \
             request_id, before, after, created_at) \
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::text[], $7::text[], $8::jsonb[], $9::jsonb[], $10::timestamptz[])",
        )
        .bind(a.iter().map(|e| e.instance_id).collect::<Vec<_>>())
        .bind(a.iter().map(|e| e.actor.id.clone()).collect::<Vec<_>>())
        .bind(a.iter().map(|e| e.actor.source.as_str()).collect::<Vec<_>>())
        .bind(a.iter().map(|e| e.action.as_str()).collect::<Vec<_>>())
        .bind(a.iter().map(|e| e.outcome.as_str()).collect::<Vec<_>>())
        .bind(a.iter().map(|e| e.reason.clone()).collect::<Vec<_>>())
        .bind(a.iter().map(|e| e.request_id.clone()).collect::<Vec<_>>())
        .bind(a.iter().map(|e| e.before.clone()).collect::<Vec<_>>())
        .bind(a.iter().map(|e| e.after.clone()).collect::<Vec<_>>())
        .bind(a.iter().map(|e| e.at).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx)?;
    }
    if !changes.outbox.is_empty() {
        let o = &changes.outbox;
        sqlx::query(
            "INSERT INTO status_outbox (instance_id, user_id, status, reason, endpoint, version, \
             changed_at) \
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::bigint[], $7::timestamptz[])",
        )
        .bind(o.iter().map(|c| c.instance_id.get()).collect::<Vec<_>>())
        .bind(o.iter().map(|c| c.user_id.clone()).collect::<Vec<_>>())
        .bind(o.iter().map(|c| c.status.as_str()).collect::<Vec<_>>())
        .bind(o.iter().map(|c| c.reason.clone()).collect::<Vec<_>>())
        .bind(o.iter().map(|c| c.endpoint.clone()).collect::<Vec<_>>())
        .bind(o.iter().map(|c| c.version).collect::<Vec<_>>())
        .bind(o.iter().map(|c| c.at).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx)?;
    }
    if !changes.seen.is_empty() {
        sqlx::query(
            "INSERT INTO processed_events (event_key, instance_id, request_fingerprint) \
             SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::bytea[])",
        )
        .bind(changes.seen.iter().map(|s| key_uuid(&s.key)).collect::<Vec<_>>())
        .bind(changes.seen.iter().map(|s| s.instance_id).collect::<Vec<_>>())
        .bind(changes.seen.iter().map(|s| s.fingerprint.map(|f| f.to_vec())).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx)?;
    }
    if !changes.sync_requests.is_empty() {
        super::reconcile::request_syncs(&mut *conn, &changes.sync_requests).await?;
    }
    // Last: the counters are the rows every create of a GPU type shares, so their locks
    // are held only for this statement and the commit.
    if !changes.usage.is_empty() {
        super::quota::add_usage(conn, &changes.usage).await?;
    }
    Ok(())
}
