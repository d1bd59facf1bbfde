-- Workspace API keys: a web app's servers (a cron route, a webhook receiver) call
-- the API with `Authorization: Bearer ofk_…` instead of a user's token. The key is
-- 32 random bytes, so its SHA-256 is all that is kept: there is nothing to guess
-- and nothing to recover from a copy of the table. `prefix` (the key's first
-- characters) lets a person tell keys apart in a list. Revoking deletes the row.
CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    role         text NOT NULL CHECK (role IN ('member', 'admin')),
    secret_hash  bytea NOT NULL UNIQUE,
    prefix       text NOT NULL,
    created_by   uuid,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz
);

CREATE INDEX api_keys_workspace ON api_keys (workspace_id, created_at);
