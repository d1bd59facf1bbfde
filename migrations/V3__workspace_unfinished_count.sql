-- Creation limits: a workspace may hold at most N unfinished jobs (DESIGN.md "Tiers").
-- Like `running`, the count lives on the workspace row, kept by statement-level
-- triggers in the same transaction as the change, so the API checks it without
-- scanning the workspace's jobs.

ALTER TABLE workspaces ADD COLUMN unfinished integer NOT NULL DEFAULT 0;
-- Per-workspace overrides of the hourly creation limit across all its users.
ALTER TABLE workspaces ADD COLUMN max_created_per_hour integer CHECK (max_created_per_hour > 0);

UPDATE workspaces w SET unfinished = (
    SELECT count(*) FROM jobs j
    WHERE j.workspace_id = w.id AND j.status IN ('pending', 'queued', 'running'));

CREATE OR REPLACE FUNCTION jobs_count_running() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workspaces w SET
        running = greatest(w.running + d.running, 0),
        unfinished = greatest(w.unfinished + d.unfinished, 0)
    FROM (
        SELECT n.workspace_id AS ws,
               sum((n.status = 'running')::int - (o.status = 'running')::int) AS running,
               sum((n.status IN ('pending', 'queued', 'running'))::int
                   - (o.status IN ('pending', 'queued', 'running'))::int) AS unfinished
        FROM changed_new n JOIN changed_old o ON o.id = n.id
        WHERE n.status <> o.status
        GROUP BY n.workspace_id
    ) d
    WHERE w.id = d.ws AND (d.running <> 0 OR d.unfinished <> 0);
    RETURN NULL;
END
$$;

CREATE FUNCTION jobs_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workspaces w SET unfinished = w.unfinished + d.n
    FROM (SELECT workspace_id AS ws, count(*) AS n FROM inserted
          WHERE status IN ('pending', 'queued', 'running') GROUP BY workspace_id) d
    WHERE w.id = d.ws;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_count_inserted AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_inserted();

CREATE FUNCTION jobs_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workspaces w SET
        unfinished = greatest(w.unfinished - d.unfinished, 0),
        running = greatest(w.running - d.running, 0)
    FROM (SELECT workspace_id AS ws,
                 count(*) FILTER (WHERE status IN ('pending', 'queued', 'running')) AS unfinished,
                 count(*) FILTER (WHERE status = 'running') AS running
          FROM deleted GROUP BY workspace_id) d
    WHERE w.id = d.ws AND (d.unfinished <> 0 OR d.running <> 0);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_count_deleted AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_deleted();
