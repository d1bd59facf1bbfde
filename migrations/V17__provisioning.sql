-- A web app provisions its tenants and users through the API (DESIGN.md "The API"):
-- a platform key creates workspaces (found again by the app's own `external_id`) and
-- adds members as the identity provider names them; a member is `(issuer, subject)`,
-- any string the token carries (`auth0|…`, `user_…`, a Firebase id, a UUID).
--
-- Existing members keep working with no step by hand: their subject is their old
-- UUID user id, their issuer '' ("any issuer this deployment accepts", which is what
-- they were), and `user_id` stays the member's id, so the `created_by` of their jobs
-- and schedules still names them. New members get a fresh `user_id`. Code of the
-- release before inserts members without a subject: a trigger fills it from the id.

ALTER TABLE workspace_members
    ADD COLUMN issuer  text NOT NULL DEFAULT '' CHECK (length(issuer) <= 255),
    ADD COLUMN subject text CHECK (length(subject) BETWEEN 1 AND 255);

UPDATE workspace_members SET subject = user_id::text WHERE subject IS NULL;

CREATE FUNCTION workspace_members_subject() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.subject := coalesce(NEW.subject, NEW.user_id::text);
    RETURN NEW;
END
$$;

CREATE TRIGGER workspace_members_subject BEFORE INSERT ON workspace_members
    FOR EACH ROW EXECUTE FUNCTION workspace_members_subject();

ALTER TABLE workspace_members ALTER COLUMN subject SET NOT NULL;

-- How a request finds its member: the token's subject in the path's workspace.
CREATE UNIQUE INDEX workspace_members_identity
    ON workspace_members (workspace_id, subject, issuer);

-- The app's own id for the tenant (its organisation id): provisioning by it is safe
-- to repeat. A workspace being deleted answers nobody; a job removes its rows.
ALTER TABLE workspaces
    ADD COLUMN external_id text CHECK (length(external_id) BETWEEN 1 AND 255),
    ADD COLUMN deleting_at timestamptz;

CREATE UNIQUE INDEX workspaces_external_id ON workspaces (external_id)
    WHERE external_id IS NOT NULL;

-- Platform keys (`ofp_…`): a web app's server provisions workspaces and members with
-- one. Kept as the SHA-256 of 32 random bytes, like API keys; they open no workspace's
-- jobs.
CREATE TABLE platform_keys (
    id           uuid PRIMARY KEY,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    secret_hash  bytea NOT NULL UNIQUE,
    prefix       text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz
);

-- The platform's own workspace: it holds the jobs that work on whole workspaces (the
-- removal of a deleted one), which cannot live in the workspace they remove. It has
-- no members, and no key opens it.
INSERT INTO workspaces (id, name, tier)
VALUES ('00000000-0000-0000-0000-000000000000', 'platform', 'unlimited')
ON CONFLICT (id) DO NOTHING;

-- Live progress pushed over WebSockets to subscribers of a tag, not of a job: a
-- statement that changes a job carrying a watched tag notifies as a watched job does.
CREATE UNLOGGED TABLE job_tag_watches (
    workspace_id uuid NOT NULL,
    tag          text NOT NULL,
    watcher      uuid NOT NULL,
    until        timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, tag, watcher)
);

-- Live progress in AWS, where no process holds a LISTEN connection: browsers connect to
-- the stack's API Gateway WebSocket API; the realtime function keeps each connection
-- (who it is: a member's identity, an API key, a browser token's grant) and what it
-- follows. A statement that changes a followed job queues its id in the outbox (a
-- stream chunk of a job followed with `stream`, the chunk's id too); the function that
-- made the change (worker, api, scheduler) sends the queue's jobs to their
-- subscribers. With no connection anywhere, the trigger's extra cost is one look at an
-- empty table.
CREATE TABLE realtime_connections (
    connection_id text PRIMARY KEY,
    bearer        jsonb NOT NULL,
    connected_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE realtime_subscriptions (
    connection_id text NOT NULL REFERENCES realtime_connections (connection_id) ON DELETE CASCADE,
    workspace_id  uuid NOT NULL,
    job_id        uuid,
    tag           text,
    stream        boolean NOT NULL DEFAULT false,
    CHECK ((job_id IS NULL) <> (tag IS NULL))
);
CREATE UNIQUE INDEX realtime_subscriptions_job ON realtime_subscriptions (job_id, connection_id)
    WHERE job_id IS NOT NULL;
CREATE UNIQUE INDEX realtime_subscriptions_tag ON realtime_subscriptions (workspace_id, tag, connection_id)
    WHERE tag IS NOT NULL;
CREATE INDEX realtime_subscriptions_connection ON realtime_subscriptions (connection_id);

CREATE UNLOGGED TABLE realtime_outbox (
    id       bigserial PRIMARY KEY,
    job_id   uuid NOT NULL,
    chunk_id bigint
);

CREATE OR REPLACE FUNCTION jobs_notify_watchers() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
    by_job boolean := EXISTS (SELECT 1 FROM job_watches);
    by_tag boolean := EXISTS (SELECT 1 FROM job_tag_watches);
BEGIN
    IF EXISTS (SELECT 1 FROM realtime_subscriptions) THEN
        INSERT INTO realtime_outbox (job_id)
        SELECT n.id FROM changed_new n
        WHERE EXISTS (SELECT 1 FROM realtime_subscriptions s WHERE s.job_id = n.id)
           OR EXISTS (SELECT 1 FROM realtime_subscriptions s
                      WHERE s.workspace_id = n.workspace_id AND s.tag = ANY (n.tags));
    END IF;
    IF NOT by_job AND NOT by_tag THEN
        RETURN NULL;
    END IF;
    FOR r IN
        SELECT string_agg(id::text, ',') AS ids FROM (
            SELECT id, dense_rank() OVER (ORDER BY id) / 150 AS chunk FROM (
                SELECT n.id FROM changed_new n JOIN job_watches w ON w.job_id = n.id
                WHERE by_job AND w.until > now()
                UNION
                SELECT n.id FROM changed_new n JOIN job_tag_watches t
                    ON t.workspace_id = n.workspace_id AND t.tag = ANY (n.tags)
                WHERE by_tag AND t.until > now()
            ) watched
        ) x GROUP BY chunk
    LOOP
        PERFORM pg_notify('offload_jobs', r.ids);
    END LOOP;
    RETURN NULL;
END
$$;
