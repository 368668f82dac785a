-- Quotas and GPU capacity (#15). What instances hold is counted, not queried: one row per
-- owner ('user:<id>') and per GPU type ('gpu:<code>'), changed in the unit of work that
-- changes an instance, so the limit can be checked under the row's lock across replicas.
-- An instance holds its share unless it is DELETED or FAILED.
CREATE TABLE quota_usage (
    scope     TEXT   PRIMARY KEY,
    instances BIGINT NOT NULL DEFAULT 0,
    cpu       BIGINT NOT NULL DEFAULT 0,
    memory_mb BIGINT NOT NULL DEFAULT 0,
    gpus      BIGINT NOT NULL DEFAULT 0
);

-- An owner's own limits, set by an admin; NULL keeps the configured default, 0 is
-- unlimited.
CREATE TABLE quota_overrides (
    user_id    TEXT        PRIMARY KEY,
    instances  BIGINT      CHECK (instances >= 0),
    cpu        BIGINT      CHECK (cpu >= 0),
    memory_mb  BIGINT      CHECK (memory_mb >= 0),
    gpus       BIGINT      CHECK (gpus >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The counters start from what the instances hold now. Writers wait for the count, so
-- none is missed; a replica of an older version still running after this migration
-- would not keep the counters (see the README's upgrade note).
LOCK TABLE instances, instance_specs IN SHARE MODE;

INSERT INTO quota_usage (scope, instances, cpu, memory_mb, gpus)
SELECT 'user:' || i.user_id, count(*), sum(s.cpu), sum(s.memory), count(*) FILTER (WHERE s.gpu <> 0)
FROM instances i JOIN instance_specs s ON s.instance_id = i.instance_id
WHERE i.status NOT IN ('DELETED', 'FAILED')
GROUP BY i.user_id;

INSERT INTO quota_usage (scope, instances)
SELECT 'gpu:' || s.gpu, count(*)
FROM instances i JOIN instance_specs s ON s.instance_id = i.instance_id
WHERE i.status NOT IN ('DELETED', 'FAILED') AND s.gpu <> 0
GROUP BY s.gpu;
