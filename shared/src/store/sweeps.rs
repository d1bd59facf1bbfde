//! The scheduler's sweeps over all workspaces: expired leases, messages
//! that reached the dead-letter queue, finished jobs past their retention.
//! Each works in bounded batches and skips rows another transaction holds.

use chrono::{DateTime, Utc};

use super::Store;
use crate::db::{Conn, DbError};
use crate::ids::JobId;
use crate::job::{Job, JobStatus};
use crate::job_columns;

/// What the lease rescuer did.
#[derive(Clone, Debug, Default)]
pub struct Rescued {
    /// Jobs put back to `pending`, to be sent a fresh message.
    pub requeued: Vec<Job>,
    pub dead: u64,
    /// Jobs whose cancel was requested before their worker died.
    pub cancelled: u64,
}

impl Store {
    /// Rescues up to `limit` `running` jobs whose lease expired: back to
    /// `pending` (the outbox sends them a fresh message) when attempts
    /// remain, else `dead`; `cancelled` when a cancel was requested. The row is re-checked under its lock, so a job
    /// its worker finished or renewed in the meantime is left alone.
    pub async fn rescue_expired(&self, now: DateTime<Utc>, limit: i64) -> Result<Rescued, DbError> {
        let db = Conn::get(&self.pool).await?;
        let rows = db
            .query(
                concat!(
                "UPDATE jobs SET \
                   status = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled' \
                     WHEN attempts < max_attempts THEN 'pending' ELSE 'dead' END, \
                   error_message = CASE WHEN cancel_requested_at IS NOT NULL \
                     THEN 'lease expired after a cancel request: the worker stopped heartbeating' \
                     WHEN attempts < max_attempts \
                     THEN 'lease expired: the worker stopped heartbeating; retrying' \
                     ELSE 'lease expired on the last attempt: the worker stopped heartbeating' END, \
                   error_kind = CASE WHEN cancel_requested_at IS NULL AND attempts < max_attempts \
                     THEN 'retryable' ELSE 'permanent' END, \
                   finished_at = CASE WHEN cancel_requested_at IS NULL AND attempts < max_attempts \
                     THEN NULL ELSE $1 END, \
                   run_at = CASE WHEN attempts < max_attempts THEN $1 ELSE run_at END, \
                   enqueued_at = NULL, lease_expires_at = NULL, updated_at = $1 \
                 WHERE id = ANY(ARRAY( \
                     SELECT id FROM jobs WHERE status = 'running' AND lease_expires_at < $1 \
                     LIMIT $2 FOR UPDATE SKIP LOCKED)) \
                   AND status = 'running' AND lease_expires_at < $1 \
                 RETURNING ",
                    job_columns!()
                ),
                &[&now, &limit],
            )
            .await?;
        let jobs: Vec<Job> = rows.iter().map(Job::from_row).collect::<Result<_, _>>()?;
        let (requeued, ended): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|j| j.status == JobStatus::Pending);
        Ok(Rescued {
            requeued,
            dead: ended.iter().filter(|j| j.status == JobStatus::Dead).count() as u64,
            cancelled: ended
                .iter()
                .filter(|j| j.status == JobStatus::Cancelled)
                .count() as u64,
        })
    }

    /// `non-terminal → dead` for jobs whose message reached the dead-letter
    /// queue. Returns the ids changed.
    pub async fn bury_dead_lettered(
        &self,
        ids: &[JobId],
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<JobId>, DbError> {
        let db = Conn::get(&self.pool).await?;
        let ids: Vec<_> = ids.iter().map(|i| i.0).collect();
        let rows = db
            .query(
                "UPDATE jobs SET status = 'dead', error_message = $2, error_kind = 'permanent', \
                   finished_at = $3, updated_at = $3, lease_expires_at = NULL, parked_at = NULL \
                 WHERE id = ANY($1) AND status IN ('pending', 'queued', 'running') \
                 RETURNING id",
                &[&ids, &crate::db::storable_message(reason), &now],
            )
            .await?;
        Ok(rows.iter().map(|r| JobId(r.get(0))).collect())
    }

    /// Drops long-poll registrations past their time (an API process that
    /// died while requests waited).
    pub async fn drop_expired_watches(&self) -> Result<u64, DbError> {
        let db = Conn::get(&self.pool).await?;
        let jobs = db
            .execute("DELETE FROM job_watches WHERE until < now()", &[])
            .await?;
        // A crashed process's tag watches too: while any row is left, every
        // update of jobs looks for tagged jobs.
        let tags = db
            .execute("DELETE FROM job_tag_watches WHERE until < now()", &[])
            .await?;
        Ok(jobs + tags)
    }

    /// Folds up to `limit` rows of the stats log into the per-minute
    /// rollups (V11), and says how many it folded. Since V18 the statements
    /// that finish jobs write the rollups themselves; the log holds only
    /// what workers of the release before wrote during a deploy. Each row is deleted as
    /// it is folded, so concurrent folds count it once; the rollups are
    /// written in key order, so they cannot deadlock.
    pub async fn fold_stats(&self, limit: i64) -> Result<u64, DbError> {
        let db = Conn::get(&self.pool).await?;
        let row = db
            .query_one(
                "WITH moved AS ( \
                   DELETE FROM job_stats_log WHERE ctid = ANY(ARRAY( \
                     SELECT ctid FROM job_stats_log LIMIT $1)) \
                   RETURNING workspace_id, minute, job_type, status, wait_bucket, run_bucket), \
                 counted AS ( \
                   INSERT INTO job_stats_minutes AS s \
                     (workspace_id, minute, job_type, completed, dead, cancelled) \
                   SELECT workspace_id, minute, job_type, \
                          count(*) FILTER (WHERE status = 'completed'), \
                          count(*) FILTER (WHERE status = 'dead'), \
                          count(*) FILTER (WHERE status = 'cancelled') \
                   FROM moved GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 \
                   ON CONFLICT (workspace_id, minute, job_type) DO UPDATE \
                   SET completed = s.completed + excluded.completed, \
                       dead = s.dead + excluded.dead, \
                       cancelled = s.cancelled + excluded.cancelled), \
                 timed AS ( \
                   INSERT INTO job_latency_minutes AS l (workspace_id, kind, minute, bucket, n) \
                   SELECT workspace_id, kind, minute, bucket, count(*) FROM ( \
                     SELECT workspace_id, 'wait' AS kind, minute, wait_bucket AS bucket \
                     FROM moved WHERE wait_bucket IS NOT NULL \
                     UNION ALL \
                     SELECT workspace_id, 'run', minute, run_bucket \
                     FROM moved WHERE run_bucket IS NOT NULL) t \
                   GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4 \
                   ON CONFLICT (workspace_id, kind, minute, bucket) DO UPDATE \
                   SET n = l.n + excluded.n) \
                 SELECT count(*) FROM moved",
                &[&limit],
            )
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Records every workspace's waiting and running jobs for the minute
    /// `now` falls in (from the kept counts; a second sample in the same
    /// minute replaces the first).
    pub async fn sample_depth(&self, now: DateTime<Utc>) -> Result<u64, DbError> {
        let db = Conn::get(&self.pool).await?;
        db.execute(
            "INSERT INTO workspace_depth_minutes (workspace_id, minute, waiting, running) \
             SELECT workspace_id, date_trunc('minute', $1::timestamptz), \
                    coalesce(sum(n) FILTER (WHERE status IN ('pending', 'queued')), 0), \
                    coalesce(sum(n) FILTER (WHERE status = 'running'), 0) \
             FROM workspace_job_counts GROUP BY workspace_id HAVING sum(n) > 0 \
             ORDER BY workspace_id \
             ON CONFLICT (workspace_id, minute) DO UPDATE \
             SET waiting = excluded.waiting, running = excluded.running",
            &[&now],
        )
        .await
    }

    /// Deletes the stats route's per-minute rollups and depth samples (V11)
    /// older than `before`: the route reads a day at most.
    pub async fn prune_stats(&self, before: DateTime<Utc>) -> Result<u64, DbError> {
        let db = Conn::get(&self.pool).await?;
        let mut deleted = 0;
        for table in [
            "job_stats_minutes",
            "job_latency_minutes",
            "workspace_depth_minutes",
        ] {
            deleted += db
                .execute(
                    &format!("DELETE FROM {table} WHERE minute < $1"),
                    &[&before],
                )
                .await?;
        }
        Ok(deleted)
    }

    /// Deletes up to `limit` finished jobs (and, by cascade, their logs)
    /// that finished before `before`. A child goes only once its parent is
    /// gone: a parent reads its children's results when it resumes, and a
    /// retry of it re-runs only those that did not complete, so they are
    /// kept while it exists (retention counts from the parent's end, which
    /// comes after every child's). A parent retried while this runs is not
    /// deleted: the DELETE re-checks `finished_at` on the row it waited for.
    pub async fn prune(&self, before: DateTime<Utc>, limit: i64) -> Result<u64, DbError> {
        let db = Conn::get(&self.pool).await?;
        db.execute(
            "DELETE FROM jobs WHERE id = ANY(ARRAY( \
                   SELECT id FROM jobs j WHERE status IN ('completed', 'cancelled', 'dead') \
                     AND finished_at < $1 \
                     AND (parent_id IS NULL \
                          OR NOT EXISTS (SELECT 1 FROM jobs p WHERE p.id = j.parent_id)) \
                   LIMIT $2 FOR UPDATE SKIP LOCKED)) \
               AND status IN ('completed', 'cancelled', 'dead') AND finished_at < $1",
            &[&before, &limit],
        )
        .await
    }

    /// How long the oldest due job still waiting to start (pending, queued
    /// or parked) has been due; zero when none waits. One scan of `jobs`
    /// (no index on `status`, which every transition updates), once per
    /// scheduler run.
    pub async fn oldest_waiting(&self, now: DateTime<Utc>) -> Result<chrono::Duration, DbError> {
        let db = Conn::get(&self.pool).await?;
        let row = db
            .query_one(
                "SELECT min(run_at) FROM jobs \
                 WHERE status IN ('pending', 'queued') AND run_at <= $1",
                &[&now],
            )
            .await?;
        let oldest: Option<DateTime<Utc>> = row.get(0);
        Ok(oldest
            .map(|t| now - t)
            .unwrap_or_else(chrono::Duration::zero))
    }
}
