-- Labels of instances (issue 16): a JSON object of string values, replaced as a whole.
-- The GIN index (jsonb_path_ops) serves `labels @> '{"k": "v"}'`, which is how a label
-- selector's equality and set requirements are looked up.
ALTER TABLE instances
    ADD COLUMN labels JSONB NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(labels) = 'object');
CREATE INDEX instances_labels_idx ON instances USING GIN (labels jsonb_path_ops);

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
