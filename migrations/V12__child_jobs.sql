-- Child jobs and the `waiting` state. A job (a `fan_out`, or any handler) creates
-- children, each with its `parent_id` and its index among its siblings (unique, so a
-- parent re-run after a crash that creates its children again gets the same ones), and
-- waits for them without holding a worker: `running → waiting`. The parent row counts
-- its unfinished and its dead children; the statement that finishes the last child
-- (or, when the parent asked to fail fast, a dead one) moves the parent
-- `waiting → pending` in the same transaction, and the finishing worker (or the
-- scheduler's outbox, if that send is lost) sends it a message.
--
-- The counters are kept by row triggers whose WHEN clause only matches children, so
-- jobs without a parent pay nothing. The counter is a column of the parent's own row:
-- the parent's `running → waiting` and a child's finish both update that row, so
-- whichever comes second sees the other's write (no child can finish unseen between
-- the parent's look and its wait). No index involves `status`: the worker's updates
-- stay HOT.

ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('pending', 'queued', 'running', 'waiting', 'completed', 'cancelled', 'dead'));

ALTER TABLE jobs
    ADD COLUMN parent_id           uuid,
    ADD COLUMN child_index         integer CHECK (child_index >= 0),
    ADD COLUMN children_unfinished integer NOT NULL DEFAULT 0,
    ADD COLUMN children_dead       integer NOT NULL DEFAULT 0,
    ADD COLUMN wait_kind           text CHECK (wait_kind IN ('children', 'time', 'token')),
    ADD COLUMN wait_until          timestamptz,
    ADD COLUMN wait_fail_fast      boolean NOT NULL DEFAULT false,
    ADD COLUMN wait_token          text,
    ADD CONSTRAINT jobs_child_has_index CHECK ((parent_id IS NULL) = (child_index IS NULL));

-- A parent's children in order, and the key that makes creating them idempotent.
CREATE UNIQUE INDEX jobs_children ON jobs (parent_id, child_index) WHERE parent_id IS NOT NULL;

CREATE FUNCTION jobs_child_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE jobs SET children_unfinished = children_unfinished + 1 WHERE id = NEW.parent_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_child_added AFTER INSERT ON jobs
    FOR EACH ROW WHEN (NEW.parent_id IS NOT NULL
                       AND NEW.status IN ('pending', 'queued', 'running', 'waiting'))
    EXECUTE FUNCTION jobs_child_added();

-- A child finished (+1 finished) or came back by a manual retry (-1); the parent
-- wakes when the wait it chose is over.
CREATE FUNCTION jobs_child_moved() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    finished integer := CASE WHEN NEW.status IN ('completed', 'cancelled', 'dead') THEN 1 ELSE -1 END;
    dead integer := (NEW.status = 'dead')::int - (OLD.status = 'dead')::int;
    wake boolean;
BEGIN
    UPDATE jobs SET
        children_unfinished = greatest(children_unfinished - finished, 0),
        children_dead = greatest(children_dead + dead, 0)
    WHERE id = NEW.parent_id
    RETURNING status = 'waiting' AND wait_kind = 'children'
              AND (children_unfinished = 0 OR (wait_fail_fast AND children_dead > 0))
    INTO wake;
    IF wake THEN
        UPDATE jobs SET status = 'pending', wait_kind = NULL, wait_fail_fast = false,
            run_at = now(), enqueued_at = NULL, updated_at = now()
        WHERE id = NEW.parent_id;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_child_moved AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.parent_id IS NOT NULL
                       AND (OLD.status IN ('completed', 'cancelled', 'dead'))
                           IS DISTINCT FROM (NEW.status IN ('completed', 'cancelled', 'dead')))
    EXECUTE FUNCTION jobs_child_moved();

-- A waiting job is unfinished: it counts against the workspace's `max_unfinished`.
CREATE OR REPLACE FUNCTION jobs_count_running() RETURNS trigger LANGUAGE plpgsql AS $$
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
                       AND OLD.status NOT IN ('completed', 'cancelled', 'dead')
                       AND NEW.children_unfinished > 0)
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
    job_id       uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
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
    job_id       uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    workspace_id uuid NOT NULL,
    data         jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_stream_job ON job_stream (job_id, id);
