//! Wait tokens and the scheduler's end of long waits: a token is created
//! once per job and name, completed once (by the API) or timed out (by the
//! scheduler, which makes its job `dead`); time waits longer than a queue's
//! delay are handed to the outbox when they come within it.

use chrono::{DateTime, Duration, Utc};
use serde_json::Value;

use super::Store;
use crate::db::{storable_json, Conn, DbError};
use crate::ids::{JobId, WorkspaceId};
use crate::job::Job;
use crate::job_columns;

/// A token's state as its job sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenState {
    Open,
    Completed(Value),
    TimedOut,
}

/// What completing a token did.
#[derive(Debug)]
pub enum Completion {
    /// Completed now; the job, woken if it was waiting for it.
    Done {
        job_id: JobId,
        completed_at: DateTime<Utc>,
        woken: Option<Box<Job>>,
    },
    /// Completed before, or timed out: nothing changed.
    Closed { timed_out: bool },
    /// A token of an earlier run of a job that was retried since: the new
    /// run waits on a fresh one, so nothing changed.
    Retired { job_id: JobId },
    /// No token of that workspace.
    Unknown,
}

/// A new unguessable token: `wt_` and 32 random bytes in hex.
fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("wt_{hex}")
}

impl Store {
    /// The token of `job` named `name`, created (timing out at
    /// `timeout_at`) the first time: a re-run gets the same one.
    pub async fn token_for(
        &self,
        workspace: WorkspaceId,
        job: JobId,
        name: &str,
        timeout_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<String, DbError> {
        let db = Conn::get(self.pool()).await?;
        let row = db
            .query_one(
                "WITH new AS (INSERT INTO wait_tokens \
                   (token, workspace_id, job_id, name, created_at, timeout_at) \
                   VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (job_id, name) DO NOTHING \
                   RETURNING token) \
                 SELECT token FROM new UNION ALL \
                 SELECT token FROM wait_tokens WHERE job_id = $3 AND name = $4 LIMIT 1",
                &[&new_token(), &workspace.0, &job.0, &name, &now, &timeout_at],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Whether `token` of `job` is open, completed (with its data) or timed out.
    pub async fn token_state(
        &self,
        job: JobId,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<TokenState, DbError> {
        let db = Conn::get(self.pool()).await?;
        let row = db
            .query_opt(
                "SELECT completed_at IS NOT NULL, data, \
                   timed_out_at IS NOT NULL OR timeout_at <= $3 \
                 FROM wait_tokens WHERE token = $1 AND job_id = $2",
                &[&token, &job.0, &now],
            )
            .await?
            .ok_or_else(|| DbError::Inconsistent(format!("job {job} has no token {token}")))?;
        Ok(match (row.get::<_, bool>(0), row.get::<_, bool>(2)) {
            (true, _) => TokenState::Completed(row.get::<_, Option<Value>>(1).unwrap_or_default()),
            (false, true) => TokenState::TimedOut,
            (false, false) => TokenState::Open,
        })
    }

    /// Completes `token` of `workspace` with `data`, once, and wakes its
    /// job if it waits for that token (`waiting → pending`, in the same
    /// commit; the caller sends its message). A job waiting on another of
    /// its tokens stays waiting.
    pub async fn complete_token(
        &self,
        workspace: WorkspaceId,
        token: &str,
        data: &Value,
        now: DateTime<Utc>,
    ) -> Result<Completion, DbError> {
        let mut db = Conn::get(self.pool()).await?;
        let tx = db.0.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT job_id, completed_at IS NOT NULL, \
                   timed_out_at IS NOT NULL OR timeout_at <= $3 \
                 FROM wait_tokens WHERE token = $1 AND workspace_id = $2 FOR UPDATE",
                &[
                    &token,
                    &workspace.0 as &(dyn tokio_postgres::types::ToSql + Sync),
                    &now,
                ],
            )
            .await?;
        let Some(row) = row else {
            let retired = tx
                .query_opt(
                    "SELECT job_id FROM retired_wait_tokens WHERE token = $1 AND workspace_id = $2",
                    &[
                        &token,
                        &workspace.0 as &(dyn tokio_postgres::types::ToSql + Sync),
                    ],
                )
                .await?;
            return Ok(match retired {
                Some(r) => Completion::Retired {
                    job_id: JobId(r.get(0)),
                },
                None => Completion::Unknown,
            });
        };
        let job_id = JobId(row.get(0));
        let (completed, timed_out): (bool, bool) = (row.get(1), row.get(2));
        if completed || timed_out {
            return Ok(Completion::Closed {
                timed_out: timed_out && !completed,
            });
        }
        tx.execute(
            "UPDATE wait_tokens SET completed_at = $2, data = $3 WHERE token = $1",
            &[
                &token as &(dyn tokio_postgres::types::ToSql + Sync),
                &now,
                &*storable_json(data),
            ],
        )
        .await?;
        let woken = tx
            .query_opt(
                concat!(
                    "UPDATE jobs SET status = 'pending', wait_kind = NULL, wait_until = NULL, \
                       run_at = $2, enqueued_at = NULL, updated_at = $2 \
                     WHERE id = $1 AND status = 'waiting' AND wait_kind = 'token' \
                       AND wait_token = $3 \
                     RETURNING ",
                    job_columns!()
                ),
                &[
                    &job_id.0 as &(dyn tokio_postgres::types::ToSql + Sync),
                    &now,
                    &token,
                ],
            )
            .await?
            .as_ref()
            .map(Job::from_row)
            .transpose()?
            .map(Box::new);
        tx.commit().await?;
        Ok(Completion::Done {
            job_id,
            completed_at: now,
            woken,
        })
    }

    /// Ends the waits whose tokens timed out by `now`: the tokens are
    /// marked, and the jobs waiting on those very tokens made `dead` with a
    /// timeout error (another token of the job timing out ends nothing).
    /// Returns how many jobs ended.
    pub async fn expire_tokens(&self, now: DateTime<Utc>, limit: i64) -> Result<u64, DbError> {
        let db = Conn::get(self.pool()).await?;
        let n = db
            .execute(
                "WITH expired AS (UPDATE wait_tokens SET timed_out_at = $1 \
                   WHERE token = ANY(ARRAY( \
                     SELECT token FROM wait_tokens \
                     WHERE completed_at IS NULL AND timed_out_at IS NULL AND timeout_at <= $1 \
                     ORDER BY timeout_at LIMIT $2 FOR UPDATE SKIP LOCKED)) \
                   RETURNING job_id, name, token) \
                 UPDATE jobs SET status = 'dead', error_kind = 'permanent', \
                   error_message = 'timed out: wait token ' || e.name || ' was not completed in time', \
                   wait_kind = NULL, wait_until = NULL, finished_at = $1, updated_at = $1 \
                 FROM expired e \
                 WHERE jobs.id = e.job_id AND jobs.status = 'waiting' AND jobs.wait_kind = 'token' \
                   AND jobs.wait_token = e.token",
                &[&now, &limit],
            )
            .await?;
        Ok(n)
    }

    /// Time waits due within `horizon` that no message carries: written
    /// further ahead than a queue can delay one, or overdue by `lost`
    /// (their message was lost). Moved to `pending` (due at their time) for
    /// the outbox to send. Returns how many.
    pub async fn release_time_waits(
        &self,
        now: DateTime<Utc>,
        horizon: Duration,
        lost: Duration,
        limit: i64,
    ) -> Result<u64, DbError> {
        let db = Conn::get(self.pool()).await?;
        let n = db
            .execute(
                "UPDATE jobs SET status = 'pending', wait_kind = NULL, wait_until = NULL, \
                   enqueued_at = NULL, updated_at = $4 \
                 WHERE id = ANY(ARRAY( \
                   SELECT id FROM jobs WHERE wait_kind = 'time' AND wait_until <= $1 \
                     AND (wait_until > updated_at + make_interval(secs => $2) \
                          OR wait_until < $3) \
                   ORDER BY wait_until LIMIT $5 FOR UPDATE SKIP LOCKED)) \
                 AND status = 'waiting' AND wait_kind = 'time'",
                &[
                    &(now + horizon),
                    &(horizon.num_milliseconds() as f64 / 1000.0),
                    &(now - lost),
                    &now,
                    &limit,
                ],
            )
            .await?;
        Ok(n)
    }
}
