-- Instances and their specs (SPEC section 3).
CREATE TABLE instances (
    instance_id   BIGINT      PRIMARY KEY CHECK (instance_id > 0),
    user_id       TEXT        NOT NULL,
    name          TEXT        NOT NULL,
    status        TEXT        NOT NULL CHECK (status IN
                      ('CREATING', 'RUNNING', 'STOPPING', 'STOPPED', 'DELETING', 'DELETED', 'FAILED')),
    status_reason TEXT        NOT NULL DEFAULT '',
    pod_name      TEXT        NOT NULL DEFAULT '',
    pod_ip        TEXT        NOT NULL DEFAULT '',
    service_host  TEXT        NOT NULL DEFAULT '',
    -- [{"name": "http", "port": 8080, "protocol": "TCP"}, ...]
    ports         JSONB       NOT NULL DEFAULT '[]',
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at    TIMESTAMPTZ,
    -- Optimistic concurrency: every change bumps it.
    version       BIGINT      NOT NULL DEFAULT 1,
    CHECK ((status = 'DELETED') = (deleted_at IS NOT NULL))
);

-- Keyset pagination (newest first) under each filter: the filter column, then the key.
CREATE INDEX instances_user_id_idx ON instances (user_id, instance_id);
CREATE INDEX instances_status_idx  ON instances (status, instance_id);
CREATE INDEX instances_name_idx    ON instances (name, instance_id);

CREATE TABLE instance_specs (
    instance_id BIGINT  PRIMARY KEY REFERENCES instances (instance_id),
    cpu         INTEGER NOT NULL CHECK (cpu > 0),
    memory      INTEGER NOT NULL CHECK (memory > 0),    -- MB
    gpu         INTEGER NOT NULL DEFAULT 0 CHECK (gpu >= 0),
    image       TEXT    NOT NULL,
    config_json JSONB   NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(config_json) = 'object')
);
