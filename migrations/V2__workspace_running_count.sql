-- Fairness: each workspace may run at most N jobs at once (DESIGN.md "Fairness").
-- Counting running jobs at claim time would scan a workspace's whole history, and an
-- index on status would cost the worker its HOT updates, so the count is kept on the
-- workspace row by a statement-level trigger: one UPDATE per workspace per statement
-- that moves jobs in or out of `running`, in the same transaction, so it cannot drift.

ALTER TABLE workspaces ADD COLUMN running integer NOT NULL DEFAULT 0;

CREATE FUNCTION jobs_count_running() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workspaces w SET running = greatest(w.running + d.delta, 0)
    FROM (
        SELECT n.workspace_id AS ws,
               sum((n.status = 'running')::int - (o.status = 'running')::int) AS delta
        FROM changed_new n JOIN changed_old o ON o.id = n.id
        WHERE (n.status = 'running') <> (o.status = 'running')
        GROUP BY n.workspace_id
    ) d
    WHERE w.id = d.ws AND d.delta <> 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_count_running AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS changed_old NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_running();
