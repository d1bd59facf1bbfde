-- The bookkeeping of every write to `jobs` in one trigger per event that reads the
-- changed rows once, and the stats rollups written by the statement that finishes the
-- jobs (one upsert per workspace, minute and type) instead of a log row per job.
--
-- Measured on the drain (20 000 no-op jobs, 4 worker loops of 500 on 2 cores): the
-- stats log's row trigger cost 23 us a job, a fifth of what the database did; an
-- update's three statement triggers joined its old and new rows three times (the queue
-- counts twice), each over every row. And every claim and completion of a workspace
-- waits for the one before to commit, since each moves the workspace's counts: what
-- the triggers do after taking the workspace row is done one statement at a time.
--
-- Now `jobs_updated` joins old and new rows once and groups them at once, by workspace,
-- old and new queue and status, parent, type and, for jobs that finished, the minute
-- and the latency buckets: a batch of 500 completions of one type becomes a handful of
-- groups. That is done before any row is locked; from the groups it moves the
-- workspace's `running` and `unfinished` (V2, V3, V7), the per-queue counts (V9), the
-- per-minute rollups (V11) and the parents' children counts and wakes (V12), in that
-- order: the workspace row first, as every path takes it, then the other rows in key
-- order, so no two writers wait for each other in a circle (children's counts move
-- only when jobs finish or come back, which always moves the workspace's). A statement
-- that changed no status or queue (a heartbeat, progress) stops after the join.
-- `jobs_inserted` and `jobs_deleted` do the same for inserts and deletes.
--
-- The stats log (V11) is no longer written. It stays, read and folded as before, for
-- the rows the release before this one writes during a deploy.
--
-- Every count stays exact: each is changed in the same transaction as the rows it
-- counts, as before.

-- Rows of one statement with the same before and after, and `n` of them.
-- The triggers (and what they call) keep one plan per statement: with such an array
-- as a parameter, PostgreSQL would otherwise plan each statement again at every call,
-- since a plan made for the array at hand always looks cheaper than the general one.
CREATE TYPE job_change AS (
    workspace_id uuid,
    queue        text,
    status       text,
    old_queue    text,
    old_status   text,
    parent_id    uuid,
    job_type     text,
    minute       timestamptz,  -- for jobs this statement finished, the minute they did
    wait_bucket  smallint,     -- and their latency buckets (V11's latency_bucket)
    run_bucket   smallint,
    n            bigint
);

-- latency_bucket (V11) of the time from `a` to `b`. Written out rather than calling
-- latency_bucket: PostgreSQL inlines a SQL function whose arguments are columns, but
-- calls latency_bucket as a function (4 us a call) when its argument is an expression
-- it would have to compute three times.
CREATE FUNCTION latency_bucket_between(a timestamptz, b timestamptz) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN a IS NULL OR b IS NULL THEN NULL
                WHEN b - a < interval '1 millisecond' THEN 0
                ELSE least(1 + floor(ln((extract(epoch FROM b - a) * 1000)::float8) / ln(1.1)),
                           32000) END::smallint
$$;

-- Adds the groups of `changes` that finished (`minute` set) to the per-minute rollups,
-- in key order.
CREATE FUNCTION job_stats_add(changes job_change[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_stats_minutes AS s (workspace_id, minute, job_type, completed, dead, cancelled)
    SELECT workspace_id, minute, job_type,
           coalesce(sum(n) FILTER (WHERE status = 'completed'), 0),
           coalesce(sum(n) FILTER (WHERE status = 'dead'), 0),
           coalesce(sum(n) FILTER (WHERE status = 'cancelled'), 0)
    FROM unnest(changes) WHERE minute IS NOT NULL
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (workspace_id, minute, job_type) DO UPDATE
    SET completed = s.completed + excluded.completed,
        dead = s.dead + excluded.dead,
        cancelled = s.cancelled + excluded.cancelled;

    INSERT INTO job_latency_minutes AS l (workspace_id, kind, minute, bucket, n)
    SELECT c.workspace_id, k.kind, c.minute, k.bucket, sum(c.n)
    FROM unnest(changes) c
    CROSS JOIN LATERAL (VALUES ('wait', c.wait_bucket), ('run', c.run_bucket)) k(kind, bucket)
    WHERE c.minute IS NOT NULL AND k.bucket IS NOT NULL
    GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (workspace_id, kind, minute, bucket) DO UPDATE SET n = l.n + excluded.n;
END
$$;

-- Moves the per-queue counts by what `changes` did: +n for each group's new (queue,
-- status), -n for its old one, unfinished statuses only. One key at a time in key
-- order, gains and losses alike, so two statements never take the same rows in
-- opposite orders (a claim's queued → running beside a retry's running → queued).
CREATE FUNCTION job_counts_move(changes job_change[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT v.ws, v.q, v.st, sum(v.d) AS n
        FROM unnest(changes) c
        CROSS JOIN LATERAL (VALUES (c.workspace_id, c.queue, c.status, c.n),
                                   (c.workspace_id, c.old_queue, c.old_status, -c.n)) v(ws, q, st, d)
        WHERE v.st IN ('pending', 'queued', 'running', 'waiting')
        GROUP BY 1, 2, 3 HAVING sum(v.d) <> 0 ORDER BY 1, 2, 3
    LOOP
        IF r.n > 0 THEN
            INSERT INTO workspace_job_counts AS c (workspace_id, queue, status, n)
            VALUES (r.ws, r.q, r.st, r.n)
            ON CONFLICT (workspace_id, queue, status) DO UPDATE SET n = c.n + excluded.n;
        ELSE
            UPDATE workspace_job_counts SET n = greatest(n + r.n, 0)
            WHERE workspace_id = r.ws AND queue = r.q AND status = r.st;
        END IF;
    END LOOP;
END
$$;

-- Moves the workspaces' `running` and `unfinished` by what `changes` did.
CREATE FUNCTION workspace_counts_move(changes job_change[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workspaces w SET
        running = greatest(w.running + d.running, 0),
        unfinished = greatest(w.unfinished + d.unfinished, 0),
        slots_changed_at = CASE WHEN d.running <> 0 THEN now() ELSE w.slots_changed_at END
    FROM (
        SELECT workspace_id AS ws,
               sum(n * ((status IS NOT DISTINCT FROM 'running')::int
                        - (old_status IS NOT DISTINCT FROM 'running')::int)) AS running,
               sum(n * (coalesce(status IN ('pending', 'queued', 'running', 'waiting'), false)::int
                        - coalesce(old_status IN ('pending', 'queued', 'running', 'waiting'), false)::int))
                   AS unfinished
        FROM unnest(changes)
        GROUP BY workspace_id
    ) d
    WHERE w.id = d.ws AND (d.running <> 0 OR d.unfinished <> 0);
END
$$;

-- Applies `changes` to the counts they move, in the order every writer takes rows:
-- the workspaces first, then the per-queue counts and the rollups in key order.
CREATE FUNCTION job_changes_apply(changes job_change[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM workspace_counts_move(changes);
    PERFORM job_counts_move(changes);
    IF EXISTS (SELECT 1 FROM unnest(changes) WHERE minute IS NOT NULL) THEN
        PERFORM job_stats_add(changes);
    END IF;
END
$$;

CREATE FUNCTION jobs_updated() RETURNS trigger LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    changes job_change[];
    woken_ids uuid[];
    left_counts integer[];
    dead_counts integer[];
BEGIN
    SELECT array_agg(ROW(g.*)::job_change) INTO changes FROM (
        SELECT n.workspace_id, n.queue, n.status, o.queue, o.status, n.parent_id, n.job_type,
               CASE WHEN f.done THEN date_trunc('minute', n.finished_at) END,
               CASE WHEN f.done THEN latency_bucket_between(n.created_at, n.started_at) END,
               CASE WHEN f.done THEN latency_bucket_between(n.started_at, n.finished_at) END,
               count(*)
        FROM changed_new n JOIN changed_old o ON o.id = n.id
        CROSS JOIN LATERAL (SELECT n.status <> o.status AND n.finished_at IS NOT NULL
                                   AND n.status IN ('completed', 'dead', 'cancelled') AS done) f
        WHERE n.status <> o.status OR n.queue <> o.queue
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
    ) g;
    IF changes IS NULL THEN
        RETURN NULL;
    END IF;

    PERFORM job_changes_apply(changes);

    -- The parents of children this statement finished (or a retry brought back) have
    -- their counts moved once each; a parent whose wait is over (none left, or a dead
    -- one when it fails fast) goes `waiting → pending` (V12).
    IF EXISTS (SELECT 1 FROM unnest(changes) WHERE parent_id IS NOT NULL) THEN
        WITH moved AS (
            UPDATE job_children c SET
                unfinished = greatest(c.unfinished - d.fin, 0),
                dead = greatest(c.dead + d.dead, 0)
            FROM (
                SELECT parent_id AS pid,
                       sum(n * CASE WHEN status IN ('completed', 'cancelled', 'dead') THEN 1 ELSE -1 END)::int AS fin,
                       sum(n * ((status = 'dead')::int - (old_status = 'dead')::int))::int AS dead
                FROM unnest(changes)
                WHERE parent_id IS NOT NULL
                  AND (old_status IN ('completed', 'cancelled', 'dead'))
                      IS DISTINCT FROM (status IN ('completed', 'cancelled', 'dead'))
                GROUP BY parent_id
            ) d
            WHERE c.parent_id = d.pid
            RETURNING c.parent_id, c.unfinished, c.dead
        )
        SELECT array_agg(parent_id), array_agg(unfinished), array_agg(dead)
        INTO woken_ids, left_counts, dead_counts FROM moved
        WHERE unfinished = 0 OR dead > 0;
        -- A statement of its own, so it sees a wait committed while the update above
        -- waited for the counts' lock.
        IF woken_ids IS NOT NULL THEN
            UPDATE jobs p SET status = 'pending', wait_kind = NULL, run_at = now(),
                enqueued_at = NULL, updated_at = now()
            FROM unnest(woken_ids, left_counts, dead_counts) AS m(pid, un, dd)
            WHERE p.id = m.pid AND p.status = 'waiting' AND p.wait_kind = 'children'
              AND (m.un = 0 OR (p.wait_fail_fast AND m.dd > 0));
        END IF;
    END IF;

    RETURN NULL;
END
$$;

CREATE FUNCTION jobs_inserted() RETURNS trigger LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    missing uuid;
    changes job_change[];
BEGIN
    -- Rows inserted already finished (a copy from another system, a benchmark's
    -- history) count in the rollups like jobs that got there.
    SELECT array_agg(ROW(g.*)::job_change) INTO changes FROM (
        SELECT workspace_id, queue, status, NULL::text, NULL::text, NULL::uuid, job_type,
               CASE WHEN f.done THEN date_trunc('minute', finished_at) END,
               CASE WHEN f.done THEN latency_bucket_between(created_at, started_at) END,
               CASE WHEN f.done THEN latency_bucket_between(started_at, finished_at) END,
               count(*)
        FROM inserted
        CROSS JOIN LATERAL (SELECT finished_at IS NOT NULL
                                   AND status IN ('completed', 'dead', 'cancelled') AS done) f
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
    ) g;
    -- No foreign key (a check per row was half of a batch insert's cost, V6): the
    -- workspaces are checked once per statement.
    SELECT c.workspace_id INTO missing FROM unnest(changes) c
    WHERE NOT EXISTS (SELECT 1 FROM workspaces w WHERE w.id = c.workspace_id) LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'workspace % does not exist', missing
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    PERFORM job_changes_apply(changes);
    IF EXISTS (SELECT 1 FROM inserted WHERE parent_id IS NOT NULL) THEN
        INSERT INTO job_children AS c (parent_id, unfinished)
        SELECT parent_id, count(*)::int FROM inserted
        WHERE parent_id IS NOT NULL AND status IN ('pending', 'queued', 'running', 'waiting')
        GROUP BY parent_id ORDER BY parent_id
        ON CONFLICT (parent_id) DO UPDATE SET unfinished = c.unfinished + EXCLUDED.unfinished;
    END IF;
    RETURN NULL;
END
$$;

-- What belongs to deleted jobs (pruned, deleted by the API, or with their workspace)
-- goes with them: the counts, their children's counts, wait tokens and streams.
CREATE FUNCTION jobs_deleted() RETURNS trigger LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    changes job_change[];
BEGIN
    SELECT array_agg(ROW(g.*)::job_change) INTO changes FROM (
        SELECT workspace_id, NULL::text, NULL::text, queue, status, NULL::uuid, NULL::text,
               NULL::timestamptz, NULL::smallint, NULL::smallint, count(*)
        FROM deleted WHERE status IN ('pending', 'queued', 'running', 'waiting')
        GROUP BY 1, 2, 3, 4, 5
    ) g;
    IF changes IS NOT NULL THEN
        PERFORM job_changes_apply(changes);
    END IF;
    DELETE FROM job_children WHERE parent_id IN (SELECT id FROM deleted);
    DELETE FROM wait_tokens WHERE job_id IN (SELECT id FROM deleted);
    DELETE FROM retired_wait_tokens WHERE job_id IN (SELECT id FROM deleted);
    DELETE FROM job_stream WHERE job_id IN (SELECT id FROM deleted);
    RETURN NULL;
END
$$;

DROP TRIGGER jobs_count_running ON jobs;
DROP TRIGGER jobs_queue_counts_updated ON jobs;
DROP TRIGGER jobs_stats_log_updated ON jobs;
DROP TRIGGER jobs_count_inserted ON jobs;
DROP TRIGGER jobs_queue_counts_inserted ON jobs;
DROP TRIGGER jobs_stats_log_inserted ON jobs;
DROP TRIGGER jobs_count_deleted ON jobs;
DROP TRIGGER jobs_queue_counts_deleted ON jobs;
DROP FUNCTION jobs_count_running();
DROP FUNCTION jobs_queue_counts_updated();
DROP FUNCTION jobs_stats_log();
DROP FUNCTION jobs_count_inserted();
DROP FUNCTION jobs_queue_counts_inserted();
DROP FUNCTION jobs_count_deleted();
DROP FUNCTION jobs_queue_counts_deleted();
DROP FUNCTION workspace_job_counts_add(uuid, text, text, bigint);

CREATE TRIGGER jobs_updated AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS changed_old NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_updated();
CREATE TRIGGER jobs_inserted AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_inserted();
CREATE TRIGGER jobs_deleted AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_deleted();
