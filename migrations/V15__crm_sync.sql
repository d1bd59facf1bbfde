-- CRM sync: each workspace configures its CRMs (HubSpot's CRM v3 objects API:
-- base URL, private-app token, batch size and request rate); `sync_crm` jobs pull
-- records changed there into contacts and accounts and push ours there.
--
-- `crm_links` pairs a record of ours with the CRM's and holds the values both
-- sides last agreed on (`synced`, in the CRM's property names). A side has
-- changed when its values differ from `synced`, so neither a sync's own writes
-- (an echo) nor a change to a field that is not synced counts as a change; both
-- sides changed is a conflict. `crm_sync_cursors` holds, per workspace, CRM and
-- record type, where the last committed page of each direction ended; it moves
-- only in the transaction that commits a page. Conflicts left for a person are
-- `crm_conflicts` rows; their records are not synced until one is resolved.

CREATE TABLE crm_providers (
    workspace_id     uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    name             text NOT NULL CHECK (name ~ '^[a-z0-9_-]{1,40}$'),
    kind             text NOT NULL DEFAULT 'hubspot' CHECK (kind IN ('hubspot')),
    base_url         text NOT NULL,
    access_token     text NOT NULL,
    batch_size       integer NOT NULL DEFAULT 100 CHECK (batch_size BETWEEN 1 AND 100),
    requests_per_10s integer NOT NULL DEFAULT 100 CHECK (requests_per_10s BETWEEN 1 AND 10000),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, name)
);

CREATE TABLE crm_links (
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    provider     text NOT NULL,
    entity       text NOT NULL CHECK (entity IN ('contacts', 'accounts')),
    local_id     uuid NOT NULL,
    remote_id    text NOT NULL,
    synced       jsonb NOT NULL,
    synced_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, provider, entity, local_id),
    UNIQUE (workspace_id, provider, entity, remote_id)
);

CREATE TABLE crm_sync_cursors (
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    provider     text NOT NULL,
    entity       text NOT NULL CHECK (entity IN ('contacts', 'accounts')),
    -- The CRM's modification time the last pulled page reached.
    pulled_to    timestamptz,
    -- Our (updated_at, id) the last pushed page reached.
    pushed_to    timestamptz,
    pushed_id    uuid,
    -- Pages committed, each of which moved the cursor once.
    pages        bigint NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, provider, entity)
);

CREATE TABLE crm_conflicts (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id      uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    provider          text NOT NULL,
    entity            text NOT NULL CHECK (entity IN ('contacts', 'accounts')),
    local_id          uuid NOT NULL,
    remote_id         text NOT NULL,
    local             jsonb NOT NULL,
    remote            jsonb NOT NULL,
    local_updated_at  timestamptz,
    remote_updated_at timestamptz,
    job_id            uuid NOT NULL,
    status            text NOT NULL DEFAULT 'open'
                      CHECK (status IN ('open', 'kept_local', 'kept_remote')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    resolved_at       timestamptz
);
CREATE UNIQUE INDEX crm_conflicts_open ON crm_conflicts (workspace_id, provider, entity, local_id)
    WHERE status = 'open';
CREATE INDEX crm_conflicts_workspace ON crm_conflicts (workspace_id, id);

-- The push scan walks our records in (updated_at, id) order.
CREATE INDEX contacts_workspace_updated ON contacts (workspace_id, updated_at, id);
CREATE INDEX accounts_workspace_updated ON accounts (workspace_id, updated_at, id);
