-- The append-only audit trail (SPEC section 3): the database itself refuses to change
-- or remove an entry, whoever asks.
CREATE TABLE audit_logs (
    id          BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id BIGINT      NOT NULL,
    actor       TEXT        NOT NULL,
    source      TEXT        NOT NULL CHECK (source IN ('grpc', 'http', 'mq', 'reconciler')),
    action      TEXT        NOT NULL CHECK (action IN
                    ('CREATE', 'DELETE', 'START', 'STOP', 'CHANGE_SPEC', 'K8S_SYNC', 'STATUS_CHANGE')),
    outcome     TEXT        NOT NULL CHECK (outcome IN ('ok', 'rejected', 'failed', 'ignored')),
    reason      TEXT        NOT NULL DEFAULT '',
    -- Request id (API) or message id (MQ) that caused the entry.
    request_id  TEXT        NOT NULL DEFAULT '',
    before      JSONB,
    after       JSONB,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- An instance's trail, newest first.
CREATE INDEX audit_logs_instance_idx ON audit_logs (instance_id, id);

CREATE FUNCTION audit_logs_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_logs is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_logs_append_only
    BEFORE UPDATE OR DELETE ON audit_logs
    FOR EACH ROW EXECUTE FUNCTION audit_logs_refuse_change();

CREATE TRIGGER audit_logs_no_truncate
    BEFORE TRUNCATE ON audit_logs
    FOR EACH STATEMENT EXECUTE FUNCTION audit_logs_refuse_change();
