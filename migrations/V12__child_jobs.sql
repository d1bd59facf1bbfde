-- Child jobs and the `waiting` state. A job (a `fan_out`, or any handler) creates
-- children, each with its `parent_id`, its index among its siblings (unique) and the
-- idempotency key `child:{parent}:{index}`, so a parent re-run after a crash that
-- creates its children again gets the same ones; and it waits for them without
-- holding a worker: `running → waiting`. The statement that finishes the last child
-- (or, when the parent asked to fail fast, a dead one) moves the parent
-- `waiting → pending` in the same transaction, and the finishing worker (or the
-- scheduler's outbox, if that send is lost) sends it a message.
--
-- The counts live in `job_children`, one row per parent, not on the parent's job row:
-- an update of a jobs row fires the jobs table's statement triggers (the workspace
-- counts, the watchers), and with the counts on the parent every group of finished
-- children paid for that and queued on the parent's row (10 000 children drained in
-- 5 s instead of 0.4). They are moved once per statement: the trigger that counts a
-- workspace's inserted jobs (V3, V6) adds a parent's new children, and the one that
-- keeps the workspaces' counts (V2, V7) subtracts what each statement finished, per
-- parent, then wakes the parents whose wait is over in a second statement. Every
-- path takes the workspace row before the counts row (no deadlock). A parent's
-- `running → waiting` writes the wait, then locks its counts row and reads it; a
-- child's finish locks the same row before its wake looks at the parent: whichever
-- comes second sees the other's commit, so no child can finish unseen between the
-- parent's look and its wait. No index involves `status`: the worker's updates stay
-- HOT.

ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('pending', 'queued', 'running', 'waiting', 'completed', 'cancelled', 'dead'));

ALTER TABLE jobs
    ADD COLUMN parent_id           uuid,
    ADD COLUMN child_index         integer CHECK (child_index >= 0),
    ADD COLUMN wait_kind           text CHECK (wait_kind IN ('children', 'time', 'token')),
    ADD COLUMN wait_until          timestamptz,
    ADD COLUMN wait_fail_fast      boolean NOT NULL DEFAULT false,
    ADD COLUMN wait_token          text,
    ADD CONSTRAINT jobs_child_has_index CHECK ((parent_id IS NULL) = (child_index IS NULL));

-- A parent's children in order, and the key that makes creating them idempotent.
CREATE UNIQUE INDEX jobs_children ON jobs (parent_id, child_index) WHERE parent_id IS NOT NULL;

-- Without foreign keys: a key checked per row was half of a batch insert's cost
-- (V6), and a cascading one would add a check per pruned job for each of these
-- tables; the jobs_count_deleted trigger deletes their rows with their jobs, once
-- per statement.
CREATE TABLE job_children (
    parent_id  uuid PRIMARY KEY,
    unfinished integer NOT NULL DEFAULT 0,
    dead       integer NOT NULL DEFAULT 0
);

-- A waiting job is unfinished: it counts against the workspace's `max_unfinished`.
-- And the parents of the children a statement finished (or a retry brought back)
-- have their counts moved by what the statement did, once per parent; a parent
-- whose wait is over (none left, or a dead one when it fails fast) goes
-- `waiting → pending`.
CREATE OR REPLACE FUNCTION jobs_count_running() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    woken_ids uuid[];
    left_counts integer[];
    dead_counts integer[];
BEGIN
    UPDATE workspaces w SET
        running = greatest(w.running + d.running, 0),
        unfinished = greatest(w.unfinished + d.unfinished, 0),
        slots_changed_at = CASE WHEN d.running <> 0 THEN now() ELSE w.slots_changed_at END
    FROM (
        SELECT n.workspace_id AS ws,
               sum((n.status = 'running')::int - (o.status = 'running')::int) AS running,
               sum((n.status IN ('pending', 'queued', 'running', 'waiting'))::int
                   - (o.status IN ('pending', 'queued', 'running', 'waiting'))::int) AS unfinished
        FROM changed_new n JOIN changed_old o ON o.id = n.id
        WHERE n.status <> o.status
        GROUP BY n.workspace_id
    ) d
    WHERE w.id = d.ws AND (d.running <> 0 OR d.unfinished <> 0);
    -- After the workspace row, as every statement that touches both takes them
    -- (an insert's count, a parent's wait): the same order, no deadlock.
    IF EXISTS (SELECT 1 FROM changed_new WHERE parent_id IS NOT NULL) THEN
        WITH moved AS (
            UPDATE job_children c SET
                unfinished = greatest(c.unfinished - d.fin, 0),
                dead = greatest(c.dead + d.dead, 0)
            FROM (
                SELECT n.parent_id AS pid,
                       sum(CASE WHEN n.status IN ('completed', 'cancelled', 'dead') THEN 1 ELSE -1 END)::int AS fin,
                       sum((n.status = 'dead')::int - (o.status = 'dead')::int)::int AS dead
                FROM changed_new n JOIN changed_old o ON o.id = n.id
                WHERE n.parent_id IS NOT NULL
                  AND (o.status IN ('completed', 'cancelled', 'dead'))
                      IS DISTINCT FROM (n.status IN ('completed', 'cancelled', 'dead'))
                GROUP BY n.parent_id
            ) d
            WHERE c.parent_id = d.pid
            RETURNING c.parent_id, c.unfinished, c.dead
        )
        SELECT array_agg(parent_id), array_agg(unfinished), array_agg(dead)
        INTO woken_ids, left_counts, dead_counts FROM moved
        WHERE unfinished = 0 OR dead > 0;
        -- A statement of its own, so it sees a wait committed while the
        -- update above waited for the counts' lock; and only for parents
        -- that may be done, since even an update of no row fires the jobs
        -- table's statement triggers.
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

-- The stats' counts of unfinished jobs (V9) count waiting ones too.
ALTER TABLE workspace_job_counts DROP CONSTRAINT workspace_job_counts_status_check;
ALTER TABLE workspace_job_counts ADD CONSTRAINT workspace_job_counts_status_check
    CHECK (status IN ('pending', 'queued', 'running', 'waiting'));

CREATE OR REPLACE FUNCTION jobs_queue_counts_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT ws, queue, status, sum(delta) AS n FROM (
            SELECT n.workspace_id AS ws, n.queue, n.status, 1 AS delta
            FROM changed_new n JOIN changed_old o ON o.id = n.id
            WHERE (n.status <> o.status OR n.queue <> o.queue)
              AND n.status IN ('pending', 'queued', 'running', 'waiting')
            UNION ALL
            SELECT o.workspace_id, o.queue, o.status, -1
            FROM changed_new n JOIN changed_old o ON o.id = n.id
            WHERE (n.status <> o.status OR n.queue <> o.queue)
              AND o.status IN ('pending', 'queued', 'running', 'waiting')
        ) x GROUP BY 1, 2, 3 HAVING sum(delta) <> 0 ORDER BY 1, 2, 3
    LOOP
        PERFORM workspace_job_counts_add(r.ws, r.queue, r.status, r.n);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION jobs_queue_counts_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT workspace_id AS ws, queue, status, count(*) AS n FROM deleted
        WHERE status IN ('pending', 'queued', 'running', 'waiting')
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    LOOP
        PERFORM workspace_job_counts_add(r.ws, r.queue, r.status, -r.n);
    END LOOP;
    RETURN NULL;
END
$$;

-- A parent that ends cancelled or dead takes its unfinished children with it: those
-- not started (or waiting) are cancelled at once, running ones are asked to stop, as
-- a cancel request does. Their own children follow by the same trigger.
CREATE FUNCTION jobs_cancel_children() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM job_children WHERE parent_id = NEW.id AND unfinished > 0) THEN
        RETURN NULL;
    END IF;
    UPDATE jobs SET
        status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
        finished_at = CASE WHEN status = 'running' THEN finished_at ELSE now() END,
        cancel_requested_at = coalesce(cancel_requested_at, now()),
        wait_kind = NULL, parked_at = NULL, updated_at = now()
    WHERE parent_id = NEW.id AND status IN ('pending', 'queued', 'running', 'waiting');
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_cancel_children AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.status IN ('cancelled', 'dead')
                       AND OLD.status NOT IN ('completed', 'cancelled', 'dead'))
    EXECUTE FUNCTION jobs_cancel_children();

-- Time and token waits: the scheduler finds the waits it must end (a time wait too
-- long for a queue's delay, a token past its timeout) by this index, which holds only
-- waiting rows (`wait_kind` is NULL otherwise, and the worker's usual updates do not
-- change it, so they stay HOT).
CREATE INDEX jobs_waits ON jobs (wait_until) WHERE wait_kind IS NOT NULL;

-- Wait tokens (human in the loop): a job creates one (unguessable, scoped to its
-- workspace), waits, and `POST …/tokens/{token}/complete` (once) or its timeout
-- ends the wait. Created once per job and name, so a re-run finds its token again.
CREATE TABLE wait_tokens (
    token        text PRIMARY KEY,
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    job_id       uuid NOT NULL,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at   timestamptz NOT NULL,
    timeout_at   timestamptz NOT NULL,
    completed_at timestamptz,
    data         jsonb,
    timed_out_at timestamptz,
    UNIQUE (job_id, name)
);
CREATE INDEX wait_tokens_open ON wait_tokens (timeout_at)
    WHERE completed_at IS NULL AND timed_out_at IS NULL;

-- Output streams: chunks a running job appends (AI output, per-item results), read
-- from a cursor (`id`) by `GET …/jobs/{id}/stream` as server-sent events. An append
-- notifies `offload_jobs` (V10) only when someone watches the job.
CREATE TABLE job_stream (
    id           bigserial PRIMARY KEY,
    job_id       uuid NOT NULL,
    workspace_id uuid NOT NULL,
    data         jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_stream_job ON job_stream (job_id, id);

-- Children counted as they are inserted (created with their messages, as any job),
-- in the trigger that already counts the workspace's inserted jobs once per statement.
CREATE OR REPLACE FUNCTION jobs_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    missing uuid;
BEGIN
    WITH d AS (
        SELECT workspace_id AS ws,
               count(*) FILTER (WHERE status IN ('pending', 'queued', 'running')) AS n
        FROM inserted GROUP BY workspace_id
    ), u AS (
        UPDATE workspaces w SET unfinished = w.unfinished + d.n
        FROM d WHERE w.id = d.ws
        RETURNING w.id
    )
    SELECT d.ws INTO missing FROM d WHERE d.ws NOT IN (SELECT id FROM u) LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'workspace % does not exist', missing
            USING ERRCODE = 'foreign_key_violation';
    END IF;
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

-- What belongs to deleted jobs (pruned, deleted by the API, or with their
-- workspace) goes with them: their children's counts, wait tokens and streams.
CREATE OR REPLACE FUNCTION jobs_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workspaces w SET
        unfinished = greatest(w.unfinished - d.unfinished, 0),
        running = greatest(w.running - d.running, 0)
    FROM (SELECT workspace_id AS ws,
                 count(*) FILTER (WHERE status IN ('pending', 'queued', 'running', 'waiting')) AS unfinished,
                 count(*) FILTER (WHERE status = 'running') AS running
          FROM deleted GROUP BY workspace_id) d
    WHERE w.id = d.ws AND (d.unfinished <> 0 OR d.running <> 0);
    DELETE FROM job_children WHERE parent_id IN (SELECT id FROM deleted);
    DELETE FROM wait_tokens WHERE job_id IN (SELECT id FROM deleted);
    DELETE FROM job_stream WHERE job_id IN (SELECT id FROM deleted);
    RETURN NULL;
END
$$;
