-- Exactly-once effect for events (SPEC section 4) and the transactional outbox of
-- status changes (SPEC section 5).

-- Keys of events already applied: a redelivery or duplicate with the same key has no
-- effect. Rows older than data.rabbitmq.dedup_window are pruned.
CREATE TABLE processed_events (
    event_key    UUID        PRIMARY KEY,
    instance_id  BIGINT      NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX processed_events_processed_at_idx ON processed_events (processed_at);

-- Status changes committed with the change itself and published afterwards, at least
-- once. A row is claimed for a while by one publisher, deleted once the broker confirmed
-- it; an expired claim (a crashed publisher) is taken again.
CREATE TABLE status_outbox (
    id            BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id   BIGINT      NOT NULL,
    user_id       TEXT        NOT NULL,
    status        TEXT        NOT NULL,
    reason        TEXT        NOT NULL DEFAULT '',
    endpoint      TEXT        NOT NULL DEFAULT '',
    version       BIGINT      NOT NULL,
    changed_at    TIMESTAMPTZ NOT NULL,
    claimed_until TIMESTAMPTZ,
    attempts      INTEGER     NOT NULL DEFAULT 0
);
