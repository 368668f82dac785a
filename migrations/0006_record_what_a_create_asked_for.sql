-- Idempotent creates are keyed on the original request (#11): a processed create key
-- records a digest of what that create asked for (owner, name, whole spec), so a retry
-- with the same body is recognised whatever happened to the instance since, and another
-- body with the same request_id is refused. NULL for events and for keys recorded before.
ALTER TABLE processed_events ADD COLUMN request_fingerprint BYTEA
    CHECK (octet_length(request_fingerprint) = 16);
