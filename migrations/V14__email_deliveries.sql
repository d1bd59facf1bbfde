-- Sequence steps and their e-mails. A step belongs to a sequence and holds the
-- templates of its e-mail (subject and HTML body with merge variables). Each
-- contact gets a step at most once: `email_deliveries` has one row per step and
-- contact, written `sending` before the provider is called and `sent` (or
-- `failed`) after. A row still `sending` when a job looks again means a crash
-- came between the two, after the provider may have accepted the e-mail: it
-- becomes `unknown` and is not sent again (at most once, never twice).

CREATE TABLE sequence_steps (
    id           uuid PRIMARY KEY,
    sequence_id  uuid NOT NULL REFERENCES sequences (id) ON DELETE CASCADE,
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    position     integer NOT NULL CHECK (position >= 1),
    from_address text NOT NULL,
    subject      text NOT NULL,
    body_html    text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (sequence_id, position)
);

CREATE TABLE email_deliveries (
    step_id             uuid NOT NULL REFERENCES sequence_steps (id) ON DELETE CASCADE,
    contact_id          uuid NOT NULL,
    workspace_id        uuid NOT NULL,
    job_id              uuid NOT NULL,
    status              text NOT NULL CHECK (status IN ('sending', 'sent', 'failed', 'unknown')),
    message_id          text NOT NULL,
    provider_message_id text,
    error               text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (step_id, contact_id)
);
CREATE INDEX email_deliveries_job ON email_deliveries (job_id);

-- When each sending domain first sent, for its warm-up ramp.
CREATE TABLE sending_domains (
    domain        text PRIMARY KEY,
    first_sent_at timestamptz NOT NULL DEFAULT now()
);
