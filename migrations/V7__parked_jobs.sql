-- Jobs waiting for a concurrency slot of their workspace stay in the database
-- ("parked"), not in the queue. A claim that finds its workspace at its limit
-- parks the job (status stays `queued`, its message is acknowledged); when a job of
-- the workspace leaves `running`, the transaction that records it takes the next
-- parked jobs, highest priority first, and runs them or sends them a message.
-- Before this, such messages went back to the queue every few seconds, so a
-- limited workspace drained about `limit` jobs per delay whatever its jobs cost,
-- and its blocked messages kept the shared worker busy.
--
-- Parking and taking hold the workspace's row lock (the claim locks it; the
-- running-count trigger locks it when a job leaves `running`), so a job is never
-- parked just after the last slot-holder looked for parked jobs and found none.

ALTER TABLE jobs ADD COLUMN parked_at timestamptz;

-- The next parked jobs of a workspace, in the order they run. Only parked rows are
-- in it, and only the two updates that set and clear `parked_at` touch it: every
-- other update of a job stays HOT.
CREATE INDEX jobs_parked ON jobs (workspace_id, priority DESC, created_at, id)
    WHERE parked_at IS NOT NULL;

-- When a workspace's running count last changed: the scheduler releases parked
-- jobs of a workspace with free slots only when nothing has moved for a while (a
-- leak: a slot freed by a path that takes no parked job, such as a rescue).
ALTER TABLE workspaces ADD COLUMN slots_changed_at timestamptz NOT NULL DEFAULT now();

CREATE OR REPLACE FUNCTION jobs_count_running() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workspaces w SET
        running = greatest(w.running + d.running, 0),
        unfinished = greatest(w.unfinished + d.unfinished, 0),
        slots_changed_at = CASE WHEN d.running <> 0 THEN now() ELSE w.slots_changed_at END
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
