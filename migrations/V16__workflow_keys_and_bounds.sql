-- Workflows that a tenant cannot break, and a bound on waiting for connections.
--
-- Children are found by (parent_id, child_index) (V12's unique `jobs_children`, now the
-- conflict target of their insert), no longer by their idempotency key
-- `child:{parent}:{index}`: a key's expiry let a re-run meet the unique index instead of
-- finding its child. They still carry that key, so code of the release before, which
-- looks them up by it, finds them after a rollback. The API now refuses keys with the
-- `child:` prefix, which a member could take before a parent ran to have it adopt their
-- job; such keys already taken by jobs that are not children are freed here (no child
-- key is touched: a statement over every child row would lock rows workers are writing).
UPDATE jobs SET idempotency_key = NULL
WHERE idempotency_key LIKE 'child:%' AND parent_id IS NULL;

-- A retried job starts with fresh wait tokens: its old ones move here at the retry,
-- so completing one answers 409 ("an earlier run's token") instead of waking the new
-- run with an answer given to the old one. Deleted with their job.
CREATE TABLE retired_wait_tokens (
    token        text PRIMARY KEY,
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    job_id       uuid NOT NULL,
    retired_at   timestamptz NOT NULL
);
CREATE INDEX retired_wait_tokens_job ON retired_wait_tokens (job_id);

-- Snoozes in a row because the database had no connection to give: past the
-- worker's bound, the next one takes the retry path (an attempt spent, the error
-- on the job), so a database that stays at its limit cannot cycle a job forever
-- unseen. Reset by a retry and a hand-off. Not indexed: the worker's updates stay HOT.
ALTER TABLE jobs ADD COLUMN busy_snoozes integer NOT NULL DEFAULT 0;

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
    DELETE FROM retired_wait_tokens WHERE job_id IN (SELECT id FROM deleted);
    DELETE FROM job_stream WHERE job_id IN (SELECT id FROM deleted);
    RETURN NULL;
END
$$;
