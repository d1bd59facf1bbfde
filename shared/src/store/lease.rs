//! The worker's writes to jobs it holds: each names the lease (job, attempt,
//! worker id) in its `WHERE`, so a worker whose lease was rescued or taken
//! over changes nothing and learns so from the result. Each runs on the
//! caller's connection or transaction, so the worker can record a group of
//! outcomes, and refill the slots they free, in one commit.
//!
//! A cancel request wins at whichever transition comes next: a retry, a
//! snooze or a hand-off of a job whose cancel was requested ends it
//! `cancelled` instead, in the same statement (the worker's copy of the flag
//! may be a heartbeat old), and the statement says which happened.

use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::GenericClient;
use serde_json::Value;

use super::{Lease, Store};
use crate::db::{storable_json, storable_message, Conn, DbError};
use crate::ids::JobId;
use crate::job::{ErrorKind, JobStatus, Progress};

/// The lease guard of single-job writes: `$1` job, `$2` attempt, `$3` worker.
macro_rules! held {
    () => {
        " WHERE id = $1 AND status = 'running' AND attempts = $2 AND worker_id = $3"
    };
}

/// `status` becomes `cancelled` (finished now, `$now`) when a cancel was
/// requested, else `$to`.
macro_rules! unless_cancelled {
    ($to:literal, $now:literal) => {
        concat!(
            "status = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled' ELSE ",
            $to,
            " END, finished_at = CASE WHEN cancel_requested_at IS NOT NULL THEN ",
            $now,
            " ELSE finished_at END"
        )
    };
}

/// A snooze or hand-off gives its attempt back, unless the job ends
/// cancelled: then the attempt did run.
macro_rules! gave_back {
    () => {
        "(CASE WHEN cancel_requested_at IS NOT NULL THEN 0 ELSE 1 END)"
    };
}

/// Completes many jobs in one statement; each row names its own lease.
const COMPLETE: &str = "UPDATE jobs SET status = 'completed', result = u.res, \
       progress = coalesce(u.prog, jobs.progress), finished_at = $3, updated_at = $3, \
       lease_expires_at = NULL, error_message = NULL, error_kind = NULL \
     FROM unnest($1::uuid[], $2::int4[], $4::jsonb[], $5::jsonb[], $6::text[]) \
       AS u(uid, attempt, res, prog, wid) \
     WHERE id = u.uid AND status = 'running' AND attempts = u.attempt AND worker_id = u.wid \
     RETURNING id";

/// Prepares [`complete`]'s statement on the connection (see
/// [`super::slots::prepare_group`]).
pub(super) async fn prepare_complete(db: &impl GenericClient) -> Result<(), DbError> {
    db.prepare_cached(COMPLETE).await?;
    Ok(())
}

/// `running → completed` for many jobs at once; returns the ids whose lease
/// was still held (only those changed).
pub async fn complete(
    db: &impl GenericClient,
    done: &[(Lease, Option<Value>, Option<Progress>)],
    now: DateTime<Utc>,
) -> Result<Vec<JobId>, DbError> {
    if done.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<_> = done.iter().map(|d| d.0.job_id.0).collect();
    let attempts: Vec<_> = done.iter().map(|d| d.0.attempt).collect();
    let workers: Vec<_> = done.iter().map(|d| d.0.worker_id.as_str()).collect();
    let results: Vec<_> = done
        .iter()
        .map(|d| d.1.as_ref().map(|r| storable_json(r).into_owned()))
        .collect();
    let progress: Vec<Option<Value>> = done
        .iter()
        .map(|d| {
            d.2.as_ref().map(|p| {
                storable_json(&serde_json::to_value(p).unwrap_or(Value::Null)).into_owned()
            })
        })
        .collect();
    let stmt = db.prepare_cached(COMPLETE).await?;
    let rows = db
        .query(
            &stmt,
            &[&ids, &attempts, &now, &results, &progress, &workers],
        )
        .await?;
    Ok(rows.iter().map(|r| JobId(r.get(0))).collect())
}

/// The status a guarded single-job write left, `None` when the lease was lost.
async fn guarded(
    db: &impl GenericClient,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Option<JobStatus>, DbError> {
    let stmt = db.prepare_cached(sql).await?;
    let row = db.query_opt(&stmt, params).await?;
    Ok(row.map(|r| r.get::<_, &str>(0).parse().unwrap_or(JobStatus::Dead)))
}

/// `running → queued` after a retryable failure, due again at `run_at`
/// (`cancelled` when a cancel was requested). With `via_outbox` the job goes
/// to `pending` with no message instead, for delays longer than a queue can
/// hold a message invisible; the scheduler sends it when due.
pub async fn retry_later(
    db: &impl GenericClient,
    lease: &Lease,
    run_at: DateTime<Utc>,
    error: &str,
    via_outbox: bool,
    now: DateTime<Utc>,
) -> Result<Option<JobStatus>, DbError> {
    let status = if via_outbox {
        JobStatus::Pending
    } else {
        JobStatus::Queued
    };
    guarded(
        db,
        concat!(
            "UPDATE jobs SET ",
            unless_cancelled!("$4", "$7"),
            ", run_at = $5, error_message = $6, error_kind = 'retryable', \
             lease_expires_at = NULL, updated_at = $7, busy_snoozes = 0, \
             enqueued_at = CASE WHEN $4 = 'pending' THEN NULL ELSE enqueued_at END",
            held!(),
            " RETURNING status"
        ),
        &[
            &lease.job_id.0,
            &lease.attempt,
            &lease.worker_id,
            &status.as_str(),
            &run_at,
            &storable_message(error),
            &now,
        ],
    )
    .await
}

/// `running → queued`, due at `run_at`, giving the attempt back: the job was
/// not run (a rate limit was empty, or with `busy`, the database had no
/// connection to give: counted in `busy_snoozes`, which any other way of
/// coming back resets: another snooze, a retry, a hand-off, a wait).
/// `cancelled` when a cancel was requested.
pub async fn snooze(
    db: &impl GenericClient,
    lease: &Lease,
    run_at: DateTime<Utc>,
    busy: bool,
    now: DateTime<Utc>,
) -> Result<Option<JobStatus>, DbError> {
    guarded(
        db,
        concat!(
            "UPDATE jobs SET ",
            unless_cancelled!("'queued'", "$5"),
            ", attempts = attempts - ",
            gave_back!(),
            ", run_at = $4, lease_expires_at = NULL, updated_at = $5, \
             busy_snoozes = CASE WHEN $6 THEN busy_snoozes + 1 ELSE 0 END",
            held!(),
            " RETURNING status"
        ),
        &[
            &lease.job_id.0,
            &lease.attempt,
            &lease.worker_id,
            &run_at,
            &now,
            &busy,
        ],
    )
    .await
}

/// `running → pending` near the invocation deadline: the checkpoint is
/// saved, and the attempt is given back (a hand-off is not a failure), so a
/// job may need any number of invocations. The next claim is a new
/// `worker_id`, so the lease guard still tells the two apart. `cancelled`
/// when a cancel was requested (the checkpoint and progress are kept).
pub async fn hand_off(
    db: &impl GenericClient,
    lease: &Lease,
    checkpoint: &Value,
    progress: Option<&Progress>,
    now: DateTime<Utc>,
) -> Result<Option<JobStatus>, DbError> {
    let progress = progress.map(|p| serde_json::to_value(p).unwrap_or(Value::Null));
    guarded(
        db,
        concat!(
            "UPDATE jobs SET ",
            unless_cancelled!("'pending'", "$6"),
            ", attempts = attempts - ",
            gave_back!(),
            ", checkpoint = $4, \
             progress = coalesce($5, progress), run_at = $6, enqueued_at = NULL, \
             lease_expires_at = NULL, updated_at = $6, busy_snoozes = 0",
            held!(),
            " RETURNING status"
        ),
        &[
            &lease.job_id.0,
            &lease.attempt,
            &lease.worker_id,
            &*storable_json(checkpoint),
            &progress,
            &now,
        ],
    )
    .await
}

/// `running → waiting` until the job's children have finished (or, with
/// `fail_fast`, one of them is dead): the checkpoint is saved and the
/// attempt given back, as for a hand-off. When there is nothing left to
/// wait for (the children finished before the parent got here) the job
/// goes to `pending` instead, to run again at once; `cancelled` when a
/// cancel was requested.
pub async fn wait_for_children(
    db: &impl GenericClient,
    lease: &Lease,
    fail_fast: bool,
    checkpoint: &Value,
    progress: Option<&Progress>,
    now: DateTime<Utc>,
) -> Result<Option<JobStatus>, DbError> {
    let progress = progress.map(|p| serde_json::to_value(p).unwrap_or(Value::Null));
    let st = guarded(
        db,
        concat!(
            "UPDATE jobs SET ",
            unless_cancelled!("'waiting'", "$7"),
            ", wait_kind = CASE WHEN cancel_requested_at IS NULL THEN 'children' END, \
             wait_fail_fast = $4, attempts = attempts - ",
            gave_back!(),
            ", checkpoint = $5, progress = coalesce($6, progress), run_at = $7, \
             enqueued_at = NULL, lease_expires_at = NULL, updated_at = $7, busy_snoozes = 0",
            held!(),
            " RETURNING status"
        ),
        &[
            &lease.job_id.0,
            &lease.attempt,
            &lease.worker_id,
            &fail_fast,
            &*storable_json(checkpoint),
            &progress,
            &now,
        ],
    )
    .await?;
    if st != Some(JobStatus::Waiting) {
        return Ok(st);
    }
    // Then the counts, locked as a finishing child's statement locks them
    // (after the workspace row, which the update above took: the same order
    // as theirs). A finish committed before this look is counted here; one
    // committed after it finds the job waiting and wakes it (V12).
    let counts = db
        .query_opt(
            "SELECT unfinished, dead FROM job_children WHERE parent_id = $1 FOR UPDATE",
            &[&lease.job_id.0],
        )
        .await?;
    let (unfinished, dead): (i32, i32) = counts.map_or((0, 0), |r| (r.get(0), r.get(1)));
    if unfinished > 0 && !(fail_fast && dead > 0) {
        return Ok(st);
    }
    db.execute(
        "UPDATE jobs SET status = 'pending', wait_kind = NULL, updated_at = $2 \
         WHERE id = $1 AND status = 'waiting'",
        &[&lease.job_id.0, &now],
    )
    .await?;
    Ok(Some(JobStatus::Pending))
}

/// `running → waiting` until `until`, with the checkpoint saved and the
/// attempt given back; `run_at` is `until`, so the delayed message (or the
/// scheduler's, for waits beyond a queue's delay) finds it due then.
/// `cancelled` when a cancel was requested.
pub async fn wait_until(
    db: &impl GenericClient,
    lease: &Lease,
    until: DateTime<Utc>,
    checkpoint: &Value,
    progress: Option<&Progress>,
    now: DateTime<Utc>,
) -> Result<Option<JobStatus>, DbError> {
    let progress = progress.map(|p| serde_json::to_value(p).unwrap_or(Value::Null));
    guarded(
        db,
        concat!(
            "UPDATE jobs SET ",
            unless_cancelled!("'waiting'", "$7"),
            ", wait_kind = CASE WHEN cancel_requested_at IS NULL THEN 'time' END, \
             wait_until = CASE WHEN cancel_requested_at IS NULL THEN $4::timestamptz END, \
             attempts = attempts - ",
            gave_back!(),
            ", checkpoint = $5, progress = coalesce($6, progress), run_at = $4, \
             enqueued_at = NULL, lease_expires_at = NULL, updated_at = $7, busy_snoozes = 0",
            held!(),
            " RETURNING status"
        ),
        &[
            &lease.job_id.0,
            &lease.attempt,
            &lease.worker_id,
            &until,
            &*storable_json(checkpoint),
            &progress,
            &now,
        ],
    )
    .await
}

/// `running → waiting` for the job's wait token `token` until it is
/// completed or times out; `pending` at once when it already was (the
/// completion came while the job was still running), `cancelled` on a
/// cancel request. The token's row is locked first, as its completion
/// locks it, so a completion is never missed between the look and the
/// wait.
pub async fn wait_for_token(
    db: &impl GenericClient,
    lease: &Lease,
    token: &str,
    checkpoint: &Value,
    progress: Option<&Progress>,
    now: DateTime<Utc>,
) -> Result<Option<JobStatus>, DbError> {
    let row = db
        .query_opt(
            "SELECT timeout_at, completed_at IS NOT NULL OR timed_out_at IS NOT NULL \
               OR timeout_at <= $3 \
             FROM wait_tokens WHERE token = $1 AND job_id = $2 FOR UPDATE",
            &[&token, &lease.job_id.0, &now],
        )
        .await?;
    let Some(row) = row else {
        return Err(DbError::Inconsistent(format!(
            "job {} waits for a token it did not create",
            lease.job_id
        )));
    };
    let (timeout_at, over): (DateTime<Utc>, bool) = (row.get(0), row.get(1));
    let progress = progress.map(|p| serde_json::to_value(p).unwrap_or(Value::Null));
    guarded(
        db,
        concat!(
            "UPDATE jobs SET status = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled' \
               WHEN $4 THEN 'pending' ELSE 'waiting' END, \
             finished_at = CASE WHEN cancel_requested_at IS NOT NULL THEN $9 ELSE finished_at END, \
             wait_kind = CASE WHEN cancel_requested_at IS NULL AND NOT $4 THEN 'token' END, \
             wait_until = CASE WHEN cancel_requested_at IS NULL AND NOT $4 THEN $5::timestamptz END, \
             wait_token = CASE WHEN cancel_requested_at IS NULL AND NOT $4 THEN $6 END, \
             attempts = attempts - ",
            gave_back!(),
            ", checkpoint = $7, progress = coalesce($8, progress), \
             run_at = CASE WHEN $4 THEN $9 ELSE $5::timestamptz END, enqueued_at = NULL, \
             lease_expires_at = NULL, updated_at = $9, busy_snoozes = 0",
            held!(),
            " RETURNING status"
        ),
        &[
            &lease.job_id.0,
            &lease.attempt,
            &lease.worker_id,
            &over,
            &timeout_at,
            &token,
            &*storable_json(checkpoint),
            &progress,
            &now,
        ],
    )
    .await
}

/// `running → dead`: a permanent error, or the last attempt failed.
pub async fn bury(
    db: &impl GenericClient,
    lease: &Lease,
    error: &str,
    kind: ErrorKind,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    let st = guarded(
        db,
        concat!(
            "UPDATE jobs SET status = 'dead', error_message = $4, error_kind = $5, \
             finished_at = $6, updated_at = $6, lease_expires_at = NULL",
            held!(),
            " RETURNING status"
        ),
        &[
            &lease.job_id.0,
            &lease.attempt,
            &lease.worker_id,
            &storable_message(error),
            &kind.as_str(),
            &now,
        ],
    )
    .await?;
    Ok(st.is_some())
}

/// `running → cancelled` when the handler stopped on a cancel request,
/// keeping what it did so far in `result`.
pub async fn finish_cancelled(
    db: &impl GenericClient,
    lease: &Lease,
    partial: Option<Value>,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    let partial = partial.map(|p| storable_json(&p).into_owned());
    let st = guarded(
        db,
        concat!(
            "UPDATE jobs SET status = 'cancelled', result = $4, finished_at = $5, \
             updated_at = $5, lease_expires_at = NULL",
            held!(),
            " RETURNING status"
        ),
        &[
            &lease.job_id.0,
            &lease.attempt,
            &lease.worker_id,
            &partial,
            &now,
        ],
    )
    .await?;
    Ok(st.is_some())
}

/// Whether `lease` still holds its job, with the row locked (`FOR SHARE`)
/// until the caller's transaction ends: what a handler writes in that
/// transaction (its children) commits only if no rescue took the job
/// first, and a rescue waits for it. Lock order: the job row, then (through
/// the insert's count trigger) its workspace row, as a rescue takes them.
pub async fn lock_held(db: &impl GenericClient, lease: &Lease) -> Result<bool, DbError> {
    let stmt = db
        .prepare_cached(concat!("SELECT 1 FROM jobs", held!(), " FOR SHARE"))
        .await?;
    let row = db
        .query_opt(&stmt, &[&lease.job_id.0, &lease.attempt, &lease.worker_id])
        .await?;
    Ok(row.is_some())
}

/// Renews the leases still held and returns, for each, whether a cancel was
/// requested.
pub async fn heartbeat(
    db: &impl GenericClient,
    leases: &[Lease],
    now: DateTime<Utc>,
    lease: Duration,
) -> Result<Vec<(JobId, bool)>, DbError> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<_> = leases.iter().map(|l| l.job_id.0).collect();
    let attempts: Vec<_> = leases.iter().map(|l| l.attempt).collect();
    let workers: Vec<_> = leases.iter().map(|l| l.worker_id.as_str()).collect();
    let stmt = db
        .prepare_cached(
            "UPDATE jobs SET heartbeat_at = $3, lease_expires_at = $4 \
             FROM unnest($1::uuid[], $2::int4[], $5::text[]) AS u(uid, attempt, wid) \
             WHERE id = u.uid AND status = 'running' AND attempts = u.attempt \
               AND worker_id = u.wid \
             RETURNING id, cancel_requested_at IS NOT NULL",
        )
        .await?;
    let rows = db
        .query(&stmt, &[&ids, &attempts, &now, &(now + lease), &workers])
        .await?;
    Ok(rows.iter().map(|r| (JobId(r.get(0)), r.get(1))).collect())
}

/// The same transitions on a connection of the store's own, one statement
/// each (for tests and callers outside a group commit).
impl Store {
    pub async fn complete(
        &self,
        done: &[(Lease, Option<Value>, Option<Progress>)],
        now: DateTime<Utc>,
    ) -> Result<Vec<JobId>, DbError> {
        complete(&self.pool().get().await?, done, now).await
    }

    pub async fn retry_later(
        &self,
        lease: &Lease,
        run_at: DateTime<Utc>,
        error: &str,
        via_outbox: bool,
        now: DateTime<Utc>,
    ) -> Result<Option<JobStatus>, DbError> {
        retry_later(
            &self.pool().get().await?,
            lease,
            run_at,
            error,
            via_outbox,
            now,
        )
        .await
    }

    pub async fn snooze(
        &self,
        lease: &Lease,
        run_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Option<JobStatus>, DbError> {
        snooze(&self.pool().get().await?, lease, run_at, false, now).await
    }

    pub async fn hand_off(
        &self,
        lease: &Lease,
        checkpoint: &Value,
        progress: Option<&Progress>,
        now: DateTime<Utc>,
    ) -> Result<Option<JobStatus>, DbError> {
        hand_off(&self.pool().get().await?, lease, checkpoint, progress, now).await
    }

    pub async fn bury(
        &self,
        lease: &Lease,
        error: &str,
        kind: ErrorKind,
        now: DateTime<Utc>,
    ) -> Result<bool, DbError> {
        bury(&self.pool().get().await?, lease, error, kind, now).await
    }

    pub async fn finish_cancelled(
        &self,
        lease: &Lease,
        partial: Option<Value>,
        now: DateTime<Utc>,
    ) -> Result<bool, DbError> {
        finish_cancelled(&self.pool().get().await?, lease, partial, now).await
    }

    pub async fn heartbeat(
        &self,
        leases: &[Lease],
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<Vec<(JobId, bool)>, DbError> {
        heartbeat(&self.pool().get().await?, leases, now, lease).await
    }
}

impl Store {
    /// Saves a running job's checkpoint; `false` when the lease is lost.
    pub async fn save_checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &Value,
        now: DateTime<Utc>,
    ) -> Result<bool, DbError> {
        let db = Conn::get(&self.pool).await?;
        let n = db
            .execute(
                concat!("UPDATE jobs SET checkpoint = $4, updated_at = $5", held!()),
                &[
                    &lease.job_id.0,
                    &lease.attempt,
                    &lease.worker_id,
                    &*storable_json(checkpoint),
                    &now,
                ],
            )
            .await?;
        Ok(n == 1)
    }

    /// Writes a running job's progress. Returns `None` when the lease is
    /// lost, else whether a cancel was requested (so progress writes double
    /// as the cancel check).
    pub async fn set_progress(
        &self,
        lease: &Lease,
        progress: &Progress,
        now: DateTime<Utc>,
    ) -> Result<Option<bool>, DbError> {
        let db = Conn::get(&self.pool).await?;
        let value = serde_json::to_value(progress).unwrap_or(Value::Null);
        let value = storable_json(&value).into_owned();
        let row = db
            .query_opt(
                concat!(
                    "UPDATE jobs SET progress = $4, updated_at = $5",
                    held!(),
                    " RETURNING cancel_requested_at IS NOT NULL"
                ),
                &[
                    &lease.job_id.0,
                    &lease.attempt,
                    &lease.worker_id,
                    &value,
                    &now,
                ],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Whether a cancel was requested for a job this lease still holds
    /// (`None`: the lease is lost).
    pub async fn cancel_requested(&self, lease: &Lease) -> Result<Option<bool>, DbError> {
        let db = Conn::get(&self.pool).await?;
        let row = db
            .query_opt(
                concat!("SELECT cancel_requested_at IS NOT NULL FROM jobs", held!()),
                &[&lease.job_id.0, &lease.attempt, &lease.worker_id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }
}
