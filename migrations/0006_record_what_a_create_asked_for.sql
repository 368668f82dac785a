-- A processed key records a digest of what its command asked for (#11): for an API
-- create, the owner, name and whole spec, so a retry with the same body is recognised
-- whatever happened to the instance since, and another body with the same request_id is
-- refused; for an event, its content, so a message id reused for another event is
-- refused rather than taken for a redelivery. NULL for keys recorded before.
ALTER TABLE processed_events ADD COLUMN request_fingerprint BYTEA
    CHECK (octet_length(request_fingerprint) = 16);
