-- The change log WatchResources reads (issue 16): one row per committed change of an
-- instance, with the instance as it was after it.
--
-- A sequence does not commit in order: a transaction that took seq 10 can commit after
-- the one that took seq 11, and a reader that had moved past 11 would skip 10. So a row's
-- place in the log is not its `seq` but the tick that first saw it committed. A ticker
-- (one statement under the `watch_clock` row lock, so ticks are serial across replicas)
-- stamps every committed, unstamped row with the next tick; a row that commits late is
-- simply stamped by a later tick. Positions are (tick, seq): a watcher that has read
-- through a position has seen every row stamped before it, and no row is ever stamped
-- below a tick already handed out. `seq` is taken after the instance's row lock, so
-- within a tick one instance's changes keep their version order.
CREATE TABLE instance_changes (
    seq         BIGSERIAL   PRIMARY KEY,
    tick        BIGINT,
    instance_id BIGINT      NOT NULL,
    version     BIGINT      NOT NULL,
    state       JSONB       NOT NULL,
    changed_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- What the next tick stamps, oldest first.
CREATE INDEX instance_changes_unstamped_idx ON instance_changes (seq) WHERE tick IS NULL;
-- What a watcher reads after its position.
CREATE INDEX instance_changes_position_idx ON instance_changes (tick, seq) WHERE tick IS NOT NULL;

-- The last tick handed out, and the horizon: every change at or before
-- (horizon_tick, horizon_seq) has been pruned. `epoch` names this log, drawn once: a
-- resume token carries it, so a position in another deployment's log (or in a log the
-- database was since restored over or recreated) is refused, not taken for one here.
CREATE TABLE watch_clock (
    id           BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    epoch        BIGINT  NOT NULL DEFAULT floor(random() * 9007199254740991)::bigint,
    tick         BIGINT  NOT NULL DEFAULT 0,
    horizon_tick BIGINT  NOT NULL DEFAULT 0,
    horizon_seq  BIGINT  NOT NULL DEFAULT 0
);
INSERT INTO watch_clock DEFAULT VALUES;

-- When each tick was handed out: retention is measured from it.
CREATE TABLE watch_ticks (
    tick      BIGINT      PRIMARY KEY,
    ticked_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX watch_ticks_ticked_at_idx ON watch_ticks (ticked_at);
