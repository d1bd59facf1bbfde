-- The stats route's finished counts, throughput and latency percentiles from
-- per-minute rollups instead of the jobs themselves: counting and sorting the jobs
-- of a window grew with the workspace's traffic (176 ms for a 24 h window over
-- 1 000 000 retained jobs), the rollups grow with the window's minutes only.
--
-- Every change is logged by a trigger in the same transaction as the change (below),
-- so the figures cannot drift from the jobs. A job counts in the minute it finished
-- (`completed`, `dead`, `cancelled`), with its wait (created to first start) and its
-- run (first start to finish). Durations go into logarithmic buckets 10 % wide, so a
-- percentile read from them is within 5 % of the exact one. Deleting jobs does not
-- touch the rollups: they are history, pruned by the scheduler after two days.

CREATE TABLE job_stats_minutes (
    workspace_id uuid NOT NULL,
    minute       timestamptz NOT NULL,
    job_type     text NOT NULL,
    completed    bigint NOT NULL DEFAULT 0,
    dead         bigint NOT NULL DEFAULT 0,
    cancelled    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, minute, job_type)
);

CREATE TABLE job_latency_minutes (
    workspace_id uuid NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('wait', 'run')),
    minute       timestamptz NOT NULL,
    bucket       smallint NOT NULL,
    n            bigint NOT NULL,
    PRIMARY KEY (workspace_id, kind, minute, bucket)
);

-- The scheduler's prune deletes by minute across workspaces; rows arrive in minute
-- order, so a BRIN index finds them at almost no cost to the writes.
CREATE INDEX job_stats_minutes_minute ON job_stats_minutes USING brin (minute);
CREATE INDEX job_latency_minutes_minute ON job_latency_minutes USING brin (minute);

-- Null for no duration (a job cancelled before it started); bucket 0 holds durations
-- under 1 ms; bucket b >= 1 holds [1.1^(b-1), 1.1^b) ms.
CREATE FUNCTION latency_bucket(ms double precision) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN ms IS NULL THEN NULL WHEN ms < 1 THEN 0
                ELSE least(1 + floor(ln(ms) / ln(1.1)), 32000) END::smallint
$$;

INSERT INTO job_stats_minutes (workspace_id, minute, job_type, completed, dead, cancelled)
SELECT workspace_id, date_trunc('minute', finished_at), job_type,
       count(*) FILTER (WHERE status = 'completed'),
       count(*) FILTER (WHERE status = 'dead'),
       count(*) FILTER (WHERE status = 'cancelled')
FROM jobs
WHERE status IN ('completed', 'dead', 'cancelled') AND finished_at >= now() - interval '2 days'
GROUP BY 1, 2, 3;

INSERT INTO job_latency_minutes (workspace_id, kind, minute, bucket, n)
SELECT workspace_id, kind, minute, bucket, count(*) FROM (
    SELECT workspace_id, 'wait' AS kind, date_trunc('minute', finished_at) AS minute,
           latency_bucket(extract(epoch FROM started_at - created_at) * 1000) AS bucket
    FROM jobs WHERE status IN ('completed', 'dead', 'cancelled')
      AND finished_at >= now() - interval '2 days' AND started_at IS NOT NULL
    UNION ALL
    SELECT workspace_id, 'run', date_trunc('minute', finished_at),
           latency_bucket(extract(epoch FROM finished_at - started_at) * 1000)
    FROM jobs WHERE status IN ('completed', 'dead', 'cancelled')
      AND finished_at >= now() - interval '2 days' AND started_at IS NOT NULL
) x GROUP BY 1, 2, 3, 4;

-- One row per job finishing, appended by row triggers whose WHEN clause leaves every
-- other write (claims, heartbeats, progress) without a call. Appending takes no lock
-- another writer waits for: upserting the rollups from a statement trigger made every
-- worker of a workspace queue on the same rows, and cost about 450 us per job. The
-- scheduler folds these rows into the rollups every minute; the stats route reads the
-- rollups and the rows not folded yet.
CREATE TABLE job_stats_log (
    workspace_id uuid NOT NULL,
    minute       timestamptz NOT NULL,
    job_type     text NOT NULL,
    status       text NOT NULL CHECK (status IN ('completed', 'dead', 'cancelled')),
    wait_bucket  smallint,
    run_bucket   smallint
);
CREATE INDEX job_stats_log_workspace_minute ON job_stats_log (workspace_id, minute);
-- Emptied by every fold: vacuumed after every 10 000 rows folded rather than after a
-- fifth of the table, so reads do not wade through the dead ones.
ALTER TABLE job_stats_log SET (autovacuum_vacuum_scale_factor = 0,
                               autovacuum_vacuum_threshold = 10000);

CREATE FUNCTION jobs_stats_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_stats_log (workspace_id, minute, job_type, status, wait_bucket, run_bucket)
    VALUES (NEW.workspace_id, date_trunc('minute', NEW.finished_at), NEW.job_type, NEW.status,
            latency_bucket(extract(epoch FROM NEW.started_at - NEW.created_at) * 1000),
            latency_bucket(extract(epoch FROM NEW.finished_at - NEW.started_at) * 1000));
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_stats_log_updated AFTER UPDATE ON jobs FOR EACH ROW
    WHEN (NEW.status IS DISTINCT FROM OLD.status
          AND NEW.status IN ('completed', 'dead', 'cancelled') AND NEW.finished_at IS NOT NULL)
    EXECUTE FUNCTION jobs_stats_log();

-- Jobs are created waiting; a row inserted already finished (a copy from another
-- system, a benchmark's history) counts like one that got there.
CREATE TRIGGER jobs_stats_log_inserted AFTER INSERT ON jobs FOR EACH ROW
    WHEN (NEW.status IN ('completed', 'dead', 'cancelled') AND NEW.finished_at IS NOT NULL)
    EXECUTE FUNCTION jobs_stats_log();

-- How many jobs waited and ran, sampled by the scheduler once a minute from the counts
-- V9 keeps (a workspace with none is left out): the dashboard's depth over the last hour.
CREATE TABLE workspace_depth_minutes (
    workspace_id uuid NOT NULL,
    minute       timestamptz NOT NULL,
    waiting      bigint NOT NULL,
    running      bigint NOT NULL,
    PRIMARY KEY (workspace_id, minute)
);
CREATE INDEX workspace_depth_minutes_minute ON workspace_depth_minutes USING brin (minute);

-- A deleted workspace takes its rollups with it.
CREATE OR REPLACE FUNCTION workspaces_delete_job_counts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM workspace_job_counts WHERE workspace_id = OLD.id;
    DELETE FROM job_stats_minutes WHERE workspace_id = OLD.id;
    DELETE FROM job_latency_minutes WHERE workspace_id = OLD.id;
    DELETE FROM job_stats_log WHERE workspace_id = OLD.id;
    DELETE FROM workspace_depth_minutes WHERE workspace_id = OLD.id;
    RETURN NULL;
END
$$;
