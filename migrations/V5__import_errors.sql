-- Rows a contact import could not take, kept until the import ends (and its
-- error report is written) so a job that resumes after a hand-off or a crash
-- still reports them all. Written in the same transaction as the batch.
CREATE TABLE import_errors (
    job_id  uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    row_num bigint NOT NULL,
    col     text NOT NULL,
    reason  text NOT NULL,
    PRIMARY KEY (job_id, row_num, col)
);
