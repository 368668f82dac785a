-- INSTANCE_K8S_SYNC requests get a table of their own (#14): the reconciler used to read
-- them back from audit_logs, so one table was both the audit trail and a queue. Each
-- replica reads the rows past its own cursor; rows older than an hour are pruned by the
-- reconciler. A request pending at the upgrade needs no copy: every replica compares
-- every instance with the cluster when it starts.
CREATE TABLE sync_requests (
    id           BIGSERIAL PRIMARY KEY,
    -- NULL: every instance.
    instance_id  BIGINT CHECK (instance_id > 0),
    requested_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX sync_requests_requested_at_idx ON sync_requests (requested_at);
