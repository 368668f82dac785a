-- Labels of instances (issue 16): a JSON object of string values, replaced as a whole.
-- The GIN index (jsonb_path_ops) serves `labels @> '{"k": "v"}'`, which is how a label
-- selector's equality and set requirements are looked up.
ALTER TABLE instances
    ADD COLUMN labels JSONB NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(labels) = 'object');
CREATE INDEX instances_labels_idx ON instances USING GIN (labels jsonb_path_ops);

-- The labels again, one row per label, kept with `labels` by every write: a selector's
-- first equality walks this primary key newest first from a page's position, reading
-- only the instances that carry the label (as the GPU filter reads instance_specs_gpu_idx),
-- where the GIN index could only hand over every match, unordered.
CREATE TABLE instance_labels (
    key         TEXT   NOT NULL,
    value       TEXT   NOT NULL,
    instance_id BIGINT NOT NULL REFERENCES instances (instance_id),
    PRIMARY KEY (key, value, instance_id)
);
CREATE INDEX instance_labels_instance_idx ON instance_labels (instance_id);

-- Kept by the database, whoever writes `labels`: a trigger fires only for an instance
-- inserted with labels or whose labels change, so other writes pay nothing.
CREATE FUNCTION instance_labels_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        DELETE FROM instance_labels WHERE instance_id = OLD.instance_id;
    END IF;
    INSERT INTO instance_labels (key, value, instance_id)
    SELECT e.key, e.value, NEW.instance_id FROM jsonb_each_text(NEW.labels) AS e;
    RETURN NULL;
END
$$;
CREATE TRIGGER instance_labels_on_insert AFTER INSERT ON instances
    FOR EACH ROW WHEN (NEW.labels <> '{}') EXECUTE FUNCTION instance_labels_sync();
CREATE TRIGGER instance_labels_on_update AFTER UPDATE OF labels ON instances
    FOR EACH ROW WHEN (OLD.labels IS DISTINCT FROM NEW.labels)
    EXECUTE FUNCTION instance_labels_sync();

-- The other list filters: GPU type and image on the spec, creation time on the instance,
-- each with the instance id so a newest-first keyset walk can read the index in order.
CREATE INDEX instance_specs_gpu_idx ON instance_specs (gpu, instance_id);
CREATE INDEX instance_specs_image_idx ON instance_specs (image, instance_id);
CREATE INDEX instances_created_at_idx ON instances (created_at, instance_id);

-- A label change is audited as SET_LABELS. (Every existing row passes the new check, so
-- it is not re-validated: NOT VALID skips the scan of the whole trail.)
ALTER TABLE audit_logs
    DROP CONSTRAINT audit_logs_action_check,
    ADD CONSTRAINT audit_logs_action_check CHECK (action IN
        ('CREATE', 'DELETE', 'START', 'STOP', 'CHANGE_SPEC', 'SET_LABELS', 'K8S_SYNC',
         'STATUS_CHANGE')) NOT VALID;
