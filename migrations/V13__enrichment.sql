-- Enrichment: accounts (the companies contacts work at) join the contacts schema;
-- each workspace configures its data providers (base URL, API key, which provider
-- field fills which of ours, calls per hour); every enrichment writes the new values
-- and a snapshot of what changed, one per record and job, so a job re-run after a
-- crash finds what it already wrote and does not write it twice.

CREATE TABLE accounts (
    id             uuid PRIMARY KEY,
    workspace_id   uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    name           text,
    domain         text,
    industry       text,
    employee_count integer CHECK (employee_count >= 0),
    revenue        numeric(18, 2),
    technologies   text[] NOT NULL DEFAULT '{}',
    social_links   jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(social_links) = 'object'),
    enriched_at    timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX accounts_workspace_domain ON accounts (workspace_id, lower(domain))
    WHERE domain IS NOT NULL;
CREATE INDEX accounts_workspace ON accounts (workspace_id, id);

ALTER TABLE contacts
    ADD COLUMN account_id   uuid REFERENCES accounts (id) ON DELETE SET NULL,
    ADD COLUMN linkedin_url text,
    ADD COLUMN enriched_at  timestamptz;
CREATE INDEX contacts_account ON contacts (account_id) WHERE account_id IS NOT NULL;

-- A workspace's data providers. `field_map` maps each field of ours the provider
-- fills to where its answer holds it (a dotted path, e.g. "person.title").
CREATE TABLE enrichment_providers (
    workspace_id   uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    name           text NOT NULL CHECK (name ~ '^[a-z0-9_-]{1,40}$'),
    base_url       text NOT NULL,
    api_key        text NOT NULL,
    field_map      jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(field_map) = 'object'),
    calls_per_hour integer NOT NULL DEFAULT 1000 CHECK (calls_per_hour > 0),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, name)
);

-- What each enrichment changed: the fields' values before and after.
CREATE TABLE enrichment_history (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    entity       text NOT NULL CHECK (entity IN ('account', 'contact')),
    entity_id    uuid NOT NULL,
    job_id       uuid NOT NULL,
    provider     text NOT NULL,
    before       jsonb NOT NULL,
    after        jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (job_id, entity_id)
);
CREATE INDEX enrichment_history_entity ON enrichment_history (workspace_id, entity_id, created_at);
