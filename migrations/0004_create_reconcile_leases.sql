-- Which replica reconciles which instance right now. A lease is taken before an instance
-- is reconciled and given back after; an expired lease (a replica that died) can be
-- taken over.
CREATE TABLE reconcile_leases (
    instance_id BIGINT PRIMARY KEY,
    owner       TEXT NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);
