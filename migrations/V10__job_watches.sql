-- Long-polls (`GET …/jobs/{id}?wait=N`) wait on a notification instead of reading
-- the job ten times a second each. A waiting request registers the job here; a
-- statement that changes a watched job sends its id on `offload_jobs` (at most 150
-- ids per notification, the payload's limit being 8 000 bytes). A statement that
-- changes no watched job sends nothing: with nobody waiting, the worker's writes
-- pay one look at an empty table. Unlogged: watches are worth nothing after a
-- crash; `until` lets anyone drop what a crashed API left behind.

CREATE UNLOGGED TABLE job_watches (
    job_id  uuid NOT NULL,
    watcher uuid NOT NULL,
    until   timestamptz NOT NULL,
    PRIMARY KEY (job_id, watcher)
);

CREATE FUNCTION jobs_notify_watchers() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM job_watches) THEN
        RETURN NULL;
    END IF;
    FOR r IN
        SELECT string_agg(id::text, ',') AS ids FROM (
            SELECT DISTINCT n.id, dense_rank() OVER (ORDER BY n.id) / 150 AS chunk
            FROM changed_new n JOIN job_watches w ON w.job_id = n.id
            WHERE w.until > now()
        ) x GROUP BY chunk
    LOOP
        PERFORM pg_notify('offload_jobs', r.ids);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify_watchers AFTER UPDATE ON jobs
    REFERENCING NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_notify_watchers();
