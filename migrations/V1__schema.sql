-- Offload's schema: tenants, jobs and their logs, rate-limit buckets, recurring
-- schedules, and the Postgres queue backend's message table.
--
-- The worker updates a job row several times per run (claim, heartbeat,
-- progress, completion). Those updates stay HOT (heap-only, no index writes)
-- only while no index covers a column they change, so `jobs` carries indexes
-- on columns that never change after insert (id, workspace, creation time,
-- idempotency key, tags) and nothing on status, run_at or lease times. The
-- scheduler's sweeps over those columns are sequential scans once a minute;
-- retention pruning keeps the table small enough for that.

CREATE TABLE workspaces (
    id                       uuid PRIMARY KEY,
    name                     text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    tier                     text NOT NULL DEFAULT 'standard'
                             CHECK (tier IN ('free', 'standard', 'enterprise', 'unlimited')),
    -- Per-workspace overrides of the tier's defaults; null means "the tier's".
    max_running              integer CHECK (max_running > 0),
    max_created_per_user_hour integer CHECK (max_created_per_user_hour > 0),
    max_unfinished           integer CHECK (max_unfinished > 0),
    created_at               timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE workspace_members (
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    user_id      uuid NOT NULL,
    role         text NOT NULL DEFAULT 'member' CHECK (role IN ('member', 'admin')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, user_id)
);

CREATE TABLE jobs (
    id                  uuid PRIMARY KEY,
    workspace_id        uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    created_by          uuid,
    job_type            text NOT NULL,
    queue               text NOT NULL DEFAULT 'default' CHECK (queue IN ('high', 'default', 'low')),
    priority            smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 10),
    payload             jsonb NOT NULL DEFAULT '{}',
    status              text NOT NULL
                        CHECK (status IN ('pending', 'queued', 'running', 'completed', 'cancelled', 'dead')),
    attempts            integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts        integer NOT NULL DEFAULT 5 CHECK (max_attempts BETWEEN 1 AND 100),
    run_at              timestamptz NOT NULL DEFAULT now(),
    idempotency_key     text,
    progress            jsonb,
    checkpoint          jsonb,
    result              jsonb,
    error_message       text,
    error_kind          text CHECK (error_kind IN ('retryable', 'permanent')),
    worker_id           text,
    heartbeat_at        timestamptz,
    lease_expires_at    timestamptz,
    enqueued_at         timestamptz,
    cancel_requested_at timestamptz,
    tags                text[] NOT NULL DEFAULT '{}',
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 60, autovacuum_vacuum_scale_factor = 0.05);

-- Listing a workspace's jobs newest first, with a stable (created_at, id) cursor.
CREATE INDEX jobs_workspace_created ON jobs (workspace_id, created_at DESC, id DESC);
-- Idempotency keys are unique per workspace.
CREATE UNIQUE INDEX jobs_workspace_idempotency ON jobs (workspace_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Tag filters (`tags @> ARRAY['campaign:123']`).
CREATE INDEX jobs_tags ON jobs USING gin (tags);

CREATE TABLE job_logs (
    id           bigserial PRIMARY KEY,
    job_id       uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    workspace_id uuid NOT NULL,
    attempt      integer NOT NULL,
    level        text NOT NULL CHECK (level IN ('debug', 'info', 'warn', 'error')),
    message      text NOT NULL,
    metadata     jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_logs_job ON job_logs (job_id, id);

-- Token buckets: external APIs (`apollo:<workspace>`) and job creation.
CREATE TABLE rate_limits (
    key            text PRIMARY KEY,
    tokens         double precision NOT NULL,
    capacity       double precision NOT NULL CHECK (capacity > 0),
    refill_per_sec double precision NOT NULL CHECK (refill_per_sec >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE schedules (
    id           uuid PRIMARY KEY,
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    name         text NOT NULL,
    cron         text NOT NULL,
    timezone     text NOT NULL DEFAULT 'UTC',
    job_type     text NOT NULL,
    payload      jsonb NOT NULL DEFAULT '{}',
    queue        text NOT NULL DEFAULT 'default' CHECK (queue IN ('high', 'default', 'low')),
    priority     smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 10),
    max_attempts integer NOT NULL DEFAULT 5 CHECK (max_attempts BETWEEN 1 AND 100),
    tags         text[] NOT NULL DEFAULT '{}',
    enabled      boolean NOT NULL DEFAULT true,
    next_run_at  timestamptz NOT NULL,
    last_run_at  timestamptz,
    created_by   uuid,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedules_due ON schedules (next_run_at) WHERE enabled;
CREATE INDEX schedules_workspace ON schedules (workspace_id, created_at);

-- The Postgres queue backend (the technique of pgmq): one row per message,
-- invisible until `vt`, received with FOR UPDATE SKIP LOCKED. Like `jobs`, it
-- has no index on the column every receive rewrites (`vt`), so receives stay HOT.
CREATE TABLE queue_messages (
    msg_id      bigserial PRIMARY KEY,
    queue       text NOT NULL,
    body        text NOT NULL,
    vt          timestamptz NOT NULL DEFAULT now(),
    read_ct     integer NOT NULL DEFAULT 0,
    enqueued_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50,
        autovacuum_vacuum_scale_factor = 0.01,
        autovacuum_vacuum_threshold = 1000,
        autovacuum_vacuum_cost_delay = 0);
CREATE INDEX queue_messages_queue ON queue_messages (queue, msg_id);

-- One wake-up per inserting statement (not per row): NOTIFY folds identical
-- payloads within a transaction, so a batch of 500 sends costs one signal.
CREATE FUNCTION queue_messages_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('offload_queue', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER queue_messages_notify AFTER INSERT ON queue_messages
    FOR EACH STATEMENT EXECUTE FUNCTION queue_messages_notify();
