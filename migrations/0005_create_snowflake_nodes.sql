-- Snowflake node ids leased by running replicas (snowflake.node_id: auto), so that no two
-- replicas generate ids with the same node id. A lease is renewed while the replica runs,
-- released when it stops, and can be taken over once expired (a replica that died).
CREATE TABLE snowflake_nodes (
    node_id    INTEGER PRIMARY KEY CHECK (node_id BETWEEN 0 AND 1023),
    owner      TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
