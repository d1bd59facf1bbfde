-- The stats route's counts of waiting and running jobs, by queue, without scanning
-- the workspace's history: counting them from `jobs` read every retained row of the
-- workspace (124 ms with 1 000 000 retained jobs), and an index on status would cost
-- the worker its HOT updates. Like `running` and `unfinished` on the workspace row,
-- the counts are kept by statement-level triggers in the same transaction as the
-- change, so they cannot drift. They fire after the jobs_count_* triggers (names
-- sort after them), so every statement locks the workspace row before these rows.
-- Finished jobs are not counted here: the route counts those within its window.

CREATE TABLE workspace_job_counts (
    workspace_id uuid NOT NULL,
    queue        text NOT NULL,
    status       text NOT NULL CHECK (status IN ('pending', 'queued', 'running')),
    n            bigint NOT NULL DEFAULT 0 CHECK (n >= 0),
    PRIMARY KEY (workspace_id, queue, status)
);

INSERT INTO workspace_job_counts (workspace_id, queue, status, n)
SELECT workspace_id, queue, status, count(*) FROM jobs
WHERE status IN ('pending', 'queued', 'running')
GROUP BY 1, 2, 3;

-- Adds `n` to one (workspace, queue, status). Each trigger calls it in key order,
-- so concurrent statements lock the rows in the same order.
CREATE FUNCTION workspace_job_counts_add(ws uuid, q text, st text, d bigint)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF d > 0 THEN
        INSERT INTO workspace_job_counts AS c (workspace_id, queue, status, n)
        VALUES (ws, q, st, d)
        ON CONFLICT (workspace_id, queue, status) DO UPDATE SET n = c.n + d;
    ELSE
        UPDATE workspace_job_counts SET n = greatest(n + d, 0)
        WHERE workspace_id = ws AND queue = q AND status = st;
    END IF;
END
$$;

CREATE FUNCTION jobs_queue_counts_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT ws, queue, status, sum(delta) AS n FROM (
            SELECT n.workspace_id AS ws, n.queue, n.status, 1 AS delta
            FROM changed_new n JOIN changed_old o ON o.id = n.id
            WHERE (n.status <> o.status OR n.queue <> o.queue)
              AND n.status IN ('pending', 'queued', 'running')
            UNION ALL
            SELECT o.workspace_id, o.queue, o.status, -1
            FROM changed_new n JOIN changed_old o ON o.id = n.id
            WHERE (n.status <> o.status OR n.queue <> o.queue)
              AND o.status IN ('pending', 'queued', 'running')
        ) x GROUP BY 1, 2, 3 HAVING sum(delta) <> 0 ORDER BY 1, 2, 3
    LOOP
        PERFORM workspace_job_counts_add(r.ws, r.queue, r.status, r.n);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_queue_counts_updated AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS changed_old NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_queue_counts_updated();

CREATE FUNCTION jobs_queue_counts_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT workspace_id AS ws, queue, status, count(*) AS n FROM inserted
        WHERE status IN ('pending', 'queued', 'running') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    LOOP
        PERFORM workspace_job_counts_add(r.ws, r.queue, r.status, r.n);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_queue_counts_inserted AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_queue_counts_inserted();

CREATE FUNCTION jobs_queue_counts_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT workspace_id AS ws, queue, status, count(*) AS n FROM deleted
        WHERE status IN ('pending', 'queued', 'running') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    LOOP
        PERFORM workspace_job_counts_add(r.ws, r.queue, r.status, -r.n);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_queue_counts_deleted AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_queue_counts_deleted();

-- A deleted workspace takes its counts with it.
CREATE FUNCTION workspaces_delete_job_counts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM workspace_job_counts WHERE workspace_id = OLD.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER workspaces_delete_job_counts AFTER DELETE ON workspaces
    FOR EACH ROW EXECUTE FUNCTION workspaces_delete_job_counts();
