-- The product's own data that the built-in job types work on: contacts, drip
-- sequences and enrollments, tags, and the do-not-contact list. Every row belongs
-- to a workspace and every statement of the handlers names it.

CREATE TABLE contacts (
    id               uuid PRIMARY KEY,
    workspace_id     uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    email            text,
    first_name       text,
    last_name        text,
    phone            text,
    company          text,
    title            text,
    estimated_value  numeric(14, 2),
    stage            text NOT NULL DEFAULT 'lead'
                     CHECK (stage IN ('lead', 'mql', 'sql', 'opportunity', 'customer')),
    last_activity_at timestamptz,
    opted_out        boolean NOT NULL DEFAULT false,
    score            integer,
    scored_at        timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX contacts_workspace_email ON contacts (workspace_id, lower(email))
    WHERE email IS NOT NULL;
CREATE INDEX contacts_workspace ON contacts (workspace_id, id);

CREATE TABLE sequences (
    id           uuid PRIMARY KEY,
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    name         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- One enrollment per contact and sequence, ever: re-running a job cannot enroll
-- anyone twice. `job_id` names the job that enrolled the contact, so a job that
-- resumes after a crash recognises its own enrollments.
CREATE TABLE sequence_enrollments (
    sequence_id  uuid NOT NULL REFERENCES sequences (id) ON DELETE CASCADE,
    contact_id   uuid NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    workspace_id uuid NOT NULL,
    job_id       uuid,
    enrolled_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sequence_id, contact_id)
);

CREATE TABLE contact_tags (
    contact_id   uuid NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    workspace_id uuid NOT NULL,
    tag          text NOT NULL CHECK (length(tag) BETWEEN 1 AND 100),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (contact_id, tag)
);
CREATE INDEX contact_tags_workspace_tag ON contact_tags (workspace_id, tag);

-- Addresses that must never be contacted (unsubscribes from elsewhere, legal holds).
CREATE TABLE do_not_contact (
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    email        text NOT NULL,
    reason       text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, email)
);
