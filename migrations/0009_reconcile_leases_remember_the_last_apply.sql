-- A lease remembers the last workload applied under it (#14): the instance version and
-- when. A replica whose watch cache has not yet seen that write (its own, or another
-- replica's a moment ago) waits for the cache instead of writing it again.
ALTER TABLE reconcile_leases
    ADD COLUMN applied_version BIGINT,
    ADD COLUMN applied_at      TIMESTAMPTZ;
