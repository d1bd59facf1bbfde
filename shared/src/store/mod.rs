//! Every read and write of `jobs` and `job_logs`. Each state transition of
//! DESIGN.md "States" is one conditional UPDATE that names the state it
//! leaves (and, for a worker, the attempt and worker id it holds): a writer
//! that lost the race, or its lease, changes nothing and learns so from the
//! returned row count.

use chrono::{DateTime, SubsecRound, Utc};
use deadpool_postgres::GenericClient;
use deadpool_postgres::Pool;
use serde_json::Value;

use crate::db::{storable_json, storable_text, Conn, DbError};
use crate::ids::{JobId, UserId, WorkspaceId};
use crate::job::{Job, JobStatus, Progress, QueueName};
use crate::job_columns;

mod lease;
mod slots;

pub use lease::{bury, complete, finish_cancelled, hand_off, heartbeat, retry_later, snooze};
pub use slots::{lock_workspaces, prepare_group, refill, Claimed, ParkedWorkspace, Refill};

/// A job to insert, already validated.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub id: JobId,
    pub workspace_id: WorkspaceId,
    pub created_by: Option<UserId>,
    pub job_type: String,
    pub queue: QueueName,
    pub priority: i16,
    pub payload: Value,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub idempotency_key: Option<String>,
    pub tags: Vec<String>,
}

impl NewJob {
    /// The row [`Store::insert`] writes for this job, as a [`Job`]: times
    /// at the microsecond precision PostgreSQL keeps, tags as stored.
    fn as_inserted(&self, status: JobStatus, now: DateTime<Utc>) -> Job {
        let now = now.trunc_subsecs(6);
        Job {
            id: self.id,
            workspace_id: self.workspace_id,
            job_type: self.job_type.clone(),
            queue: self.queue,
            priority: self.priority,
            status,
            payload: self.payload.clone(),
            attempts: 0,
            max_attempts: self.max_attempts,
            run_at: self.run_at.trunc_subsecs(6),
            progress: Progress::default(),
            result: None,
            error_message: None,
            error_kind: None,
            tags: if self.tags.concat().is_empty() && self.tags.len() <= 1 {
                Vec::new()
            } else {
                self.tags.clone()
            },
            created_at: now,
            started_at: None,
            finished_at: None,
            updated_at: now,
            created_by: self.created_by,
            idempotency_key: self.idempotency_key.clone(),
            checkpoint: None,
            worker_id: None,
            lease_expires_at: None,
            enqueued_at: (status == JobStatus::Queued).then_some(now),
            cancel_requested_at: None,
        }
    }

    /// A job of `job_type` with the defaults of DESIGN.md (queue `default`,
    /// priority 0, 5 attempts, due now).
    pub fn new(workspace_id: WorkspaceId, job_type: &str, payload: Value) -> Self {
        NewJob {
            id: JobId::new(),
            workspace_id,
            created_by: None,
            job_type: job_type.into(),
            queue: QueueName::Default,
            priority: 0,
            payload,
            max_attempts: 5,
            run_at: Utc::now(),
            idempotency_key: None,
            tags: Vec::new(),
        }
    }
}

/// What a worker holds while it runs a job: every write it makes names all
/// three, so a worker whose lease was rescued (the row's attempt or worker id
/// moved on) writes nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub job_id: JobId,
    pub attempt: i32,
    pub worker_id: String,
}

/// `pending → queued` for jobs whose message the queue accepted, on the
/// caller's connection or transaction (the outbox marks inside the
/// transaction that locked the rows).
pub async fn mark_enqueued_on(
    db: &impl GenericClient,
    ids: &[JobId],
    now: DateTime<Utc>,
) -> Result<u64, DbError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let ids: Vec<_> = ids.iter().map(|i| i.0).collect();
    let stmt = db
        .prepare_cached(
            "UPDATE jobs SET status = 'queued', enqueued_at = $2, updated_at = $2 \
             WHERE id = ANY($1) AND status = 'pending'",
        )
        .await?;
    Ok(db.execute(&stmt, &[&ids, &now]).await?)
}

/// Filters and cursor of a job listing.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub job_type: Option<String>,
    pub tag: Option<String>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    /// Only jobs strictly older than this (created_at, id): the cursor.
    pub before: Option<(DateTime<Utc>, JobId)>,
    pub limit: i64,
}

/// One line of a job's execution log.
#[derive(Clone, Debug)]
pub struct LogLine {
    pub job_id: JobId,
    pub workspace_id: WorkspaceId,
    pub attempt: i32,
    pub level: &'static str,
    pub message: String,
    pub metadata: Option<Value>,
}

/// What the worker reads of a job whose message it could not claim.
#[derive(Clone, Debug)]
pub struct Peeked {
    pub id: JobId,
    pub status: JobStatus,
    pub run_at: DateTime<Utc>,
    pub cancel_requested: bool,
    pub lease_expires_at: Option<DateTime<Utc>>,
}

/// What the lease rescuer did.
#[derive(Clone, Debug, Default)]
pub struct Rescued {
    /// Jobs put back to `pending`, to be sent a fresh message.
    pub requeued: Vec<Job>,
    pub dead: u64,
    /// Jobs whose cancel was requested before their worker died.
    pub cancelled: u64,
}

/// Handle to the jobs tables. Cloning is shallow (the pool is shared).
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

/// Postgres-queue messages to write with the jobs they carry.
#[derive(Debug, Default)]
pub struct MessageRows {
    pub queues: Vec<&'static str>,
    pub bodies: Vec<String>,
    pub delays_ms: Vec<f64>,
}

/// The insert of new jobs ($1..$13, one array per column), skipping those
/// whose idempotency key exists.
macro_rules! insert_jobs_sql {
    () => {
        "INSERT INTO jobs (id, workspace_id, created_by, job_type, queue, priority, \
           payload, status, max_attempts, run_at, idempotency_key, tags, created_at, \
           updated_at, enqueued_at) \
         SELECT n.id, n.ws, n.by, n.ty, n.q, n.prio, n.payload, n.status, n.maxa, \
           n.run_at, n.ikey, \
           CASE WHEN n.tags = '' THEN '{}'::text[] ELSE string_to_array(n.tags, chr(31)) END, \
           $13::timestamptz, $13::timestamptz, \
           CASE WHEN n.status = 'queued' THEN $13::timestamptz END \
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], \
           $6::int2[], $7::jsonb[], $8::text[], $9::int4[], $10::timestamptz[], \
           $11::text[], $12::text[]) \
           AS n(id, ws, by, ty, q, prio, payload, status, maxa, run_at, ikey, tags) \
         ON CONFLICT (workspace_id, idempotency_key) WHERE idempotency_key IS NOT NULL \
           DO NOTHING \
         RETURNING "
    };
}

const INSERT_JOBS: &str = concat!(insert_jobs_sql!(), "id");

/// [`INSERT_JOBS`] with the Postgres queue's messages ($14..$16) written by
/// the same statement. A message whose job loses an idempotency race names
/// a job that does not exist; the worker acknowledges such messages.
const INSERT_JOBS_WITH_MESSAGES: &str = concat!(
    "WITH msgs AS (INSERT INTO queue_messages (queue, body, vt) \
       SELECT m.q, m.b, now() + m.d * interval '1 millisecond' \
       FROM unnest($14::text[], $15::text[], $16::float8[]) AS m(q, b, d)) ",
    insert_jobs_sql!(),
    "id"
);

impl Store {
    pub fn new(pool: Pool) -> Self {
        Store { pool }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Inserts jobs as `pending` in one statement. A job whose idempotency
    /// key already exists in its workspace is not inserted; the existing job
    /// is returned in its place with `false`.
    pub async fn insert(
        &self,
        db: &impl GenericClient,
        jobs: &[NewJob],
        now: DateTime<Utc>,
    ) -> Result<Vec<(Job, bool)>, DbError> {
        self.insert_as(db, jobs, &[], None, now).await
    }

    /// [`Store::insert`], with the jobs in `queued` inserted as `queued`
    /// and, with `messages`, the Postgres queue's messages for them written
    /// by the same statement (one round trip, one commit); the other jobs
    /// are inserted `pending`.
    pub async fn insert_as(
        &self,
        db: &impl GenericClient,
        jobs: &[NewJob],
        queued: &[JobId],
        messages: Option<&MessageRows>,
        now: DateTime<Utc>,
    ) -> Result<Vec<(Job, bool)>, DbError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<_> = jobs.iter().map(|j| j.id.0).collect();
        let wss: Vec<_> = jobs.iter().map(|j| j.workspace_id.0).collect();
        let by: Vec<_> = jobs.iter().map(|j| j.created_by.map(|u| u.0)).collect();
        let types: Vec<_> = jobs.iter().map(|j| j.job_type.as_str()).collect();
        let queues: Vec<_> = jobs.iter().map(|j| j.queue.as_str()).collect();
        let prios: Vec<_> = jobs.iter().map(|j| j.priority).collect();
        let payloads: Vec<_> = jobs.iter().map(|j| &j.payload).collect();
        let queued: std::collections::HashSet<JobId> = queued.iter().copied().collect();
        let statuses: Vec<_> = jobs
            .iter()
            .map(|j| {
                if queued.contains(&j.id) {
                    JobStatus::Queued.as_str()
                } else {
                    JobStatus::Pending.as_str()
                }
            })
            .collect();
        let maxes: Vec<_> = jobs.iter().map(|j| j.max_attempts).collect();
        let run_ats: Vec<_> = jobs.iter().map(|j| j.run_at).collect();
        let keys: Vec<_> = jobs.iter().map(|j| j.idempotency_key.as_deref()).collect();
        // Postgres has no arrays of arrays of varying length, so each job's
        // tags travel as one string joined by the unit separator.
        let tags: Vec<String> = jobs.iter().map(|j| j.tags.join("\u{1f}")).collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 13] = [
            &ids, &wss, &by, &types, &queues, &prios, &payloads, &statuses, &maxes, &run_ats,
            &keys, &tags, &now,
        ];
        let rows = match messages {
            None => {
                let stmt = db.prepare_cached(INSERT_JOBS).await?;
                db.query(&stmt, &params).await?
            }
            Some(m) => {
                let stmt = db.prepare_cached(INSERT_JOBS_WITH_MESSAGES).await?;
                let mut all: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params.to_vec();
                all.extend([
                    &m.queues as &(dyn tokio_postgres::types::ToSql + Sync),
                    &m.bodies,
                    &m.delays_ms,
                ]);
                db.query(&stmt, &all).await?
            }
        };
        // The statement returns only the ids it inserted (a job whose
        // idempotency key exists is not); each new job's row is exactly what
        // was sent, so it is built here instead of read back (for a batch of
        // 1000, reading back every column was a fifth of the insert's cost).
        let inserted: std::collections::HashSet<uuid::Uuid> =
            rows.iter().map(|r| r.get::<_, uuid::Uuid>(0)).collect();
        let mut out = Vec::with_capacity(jobs.len());
        for j in jobs {
            if inserted.contains(&j.id.0) {
                let status = if queued.contains(&j.id) {
                    JobStatus::Queued
                } else {
                    JobStatus::Pending
                };
                out.push((j.as_inserted(status, now), true));
            } else {
                let key = j.idempotency_key.as_deref().unwrap_or_default();
                let existing = self
                    .by_idempotency_key(db, j.workspace_id, key)
                    .await?
                    .ok_or_else(|| {
                        DbError::Inconsistent(format!(
                            "job {} was neither inserted nor found",
                            j.id
                        ))
                    })?;
                out.push((existing, false));
            }
        }
        Ok(out)
    }

    /// Forgets an idempotency key used before `before`, so the key can name
    /// a new job (keys expire after a configurable time).
    pub async fn expire_idempotency_key(
        &self,
        db: &impl GenericClient,
        workspace: WorkspaceId,
        key: &str,
        before: DateTime<Utc>,
    ) -> Result<u64, DbError> {
        let stmt = db
            .prepare_cached(
                "UPDATE jobs SET idempotency_key = NULL \
                 WHERE workspace_id = $1 AND idempotency_key = $2 AND created_at < $3",
            )
            .await?;
        Ok(db.execute(&stmt, &[&workspace.0, &key, &before]).await?)
    }

    /// [`Store::expire_idempotency_key`] and [`Store::by_idempotency_key`]
    /// for many keys at once: forgets those used before `before`, then
    /// returns the jobs the others name.
    pub async fn by_idempotency_keys(
        &self,
        db: &impl GenericClient,
        workspace: WorkspaceId,
        keys: &[&str],
        before: DateTime<Utc>,
    ) -> Result<Vec<Job>, DbError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let expire = db
            .prepare_cached(
                "UPDATE jobs SET idempotency_key = NULL \
                 WHERE workspace_id = $1 AND idempotency_key = ANY($2) AND created_at < $3",
            )
            .await?;
        db.execute(&expire, &[&workspace.0, &keys, &before]).await?;
        let stmt = db
            .prepare_cached(concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE workspace_id = $1 AND idempotency_key = ANY($2)"
            ))
            .await?;
        let rows = db.query(&stmt, &[&workspace.0, &keys]).await?;
        Ok(rows.iter().map(Job::from_row).collect::<Result<_, _>>()?)
    }

    /// The job created earlier with this idempotency key, if any.
    pub async fn by_idempotency_key(
        &self,
        db: &impl GenericClient,
        workspace: WorkspaceId,
        key: &str,
    ) -> Result<Option<Job>, DbError> {
        let stmt = db
            .prepare_cached(concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE workspace_id = $1 AND idempotency_key = $2"
            ))
            .await?;
        let row = db.query_opt(&stmt, &[&workspace.0, &key]).await?;
        Ok(row.as_ref().map(Job::from_row).transpose()?)
    }

    /// One job of one workspace; another workspace's id reads as absent.
    pub async fn get(&self, workspace: WorkspaceId, id: JobId) -> Result<Option<Job>, DbError> {
        let db = Conn::get(&self.pool).await?;
        let row = db
            .query_opt(
                concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE id = $1 AND workspace_id = $2"
                ),
                &[&id.0, &workspace.0],
            )
            .await?;
        Ok(row.as_ref().map(Job::from_row).transpose()?)
    }

    /// A job by id alone, for the worker and the scheduler, which act for
    /// every workspace.
    pub async fn get_any(&self, id: JobId) -> Result<Option<Job>, DbError> {
        let db = Conn::get(&self.pool).await?;
        let row = db
            .query_opt(
                concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = $1"),
                &[&id.0],
            )
            .await?;
        Ok(row.as_ref().map(Job::from_row).transpose()?)
    }

    /// A page of a workspace's jobs, newest first, after `filter.before`.
    pub async fn list(
        &self,
        workspace: WorkspaceId,
        filter: &ListFilter,
    ) -> Result<Vec<Job>, DbError> {
        let db = Conn::get(&self.pool).await?;
        let mut sql = String::from(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE workspace_id = $1"
        ));
        let mut params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> =
            vec![Box::new(workspace.0)];
        let mut push = |clause: &str, p: Box<dyn tokio_postgres::types::ToSql + Sync + Send>| {
            params.push(p);
            sql.push_str(&clause.replace('?', &format!("${}", params.len())));
        };
        if let Some(st) = filter.status {
            push(" AND status = ?", Box::new(st.as_str()));
        }
        if let Some(t) = &filter.job_type {
            push(" AND job_type = ?", Box::new(t.clone()));
        }
        if let Some(tag) = &filter.tag {
            push(
                " AND tags <> '{}' AND tags @> ARRAY[?::text]",
                Box::new(tag.clone()),
            );
        }
        if let Some(t) = filter.created_after {
            push(" AND created_at >= ?", Box::new(t));
        }
        if let Some(t) = filter.created_before {
            push(" AND created_at < ?", Box::new(t));
        }
        if let Some((t, id)) = filter.before {
            params.push(Box::new(t));
            params.push(Box::new(id.0));
            let n = params.len();
            sql.push_str(&format!(" AND (created_at, id) < (${}, ${n})", n - 1));
        }
        params.push(Box::new(filter.limit));
        sql.push_str(&format!(
            " ORDER BY created_at DESC, id DESC LIMIT ${}",
            params.len()
        ));
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| &**p as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let rows = db.query(&sql, &refs).await?;
        Ok(rows.iter().map(Job::from_row).collect::<Result<_, _>>()?)
    }

    /// Deletes a finished job of the workspace. `Ok(false)` when it does not
    /// exist or is not finished (the caller tells the two apart).
    pub async fn delete_finished(
        &self,
        workspace: WorkspaceId,
        id: JobId,
    ) -> Result<bool, DbError> {
        let db = Conn::get(&self.pool).await?;
        let n = db
            .execute(
                "DELETE FROM jobs WHERE id = $1 AND workspace_id = $2 \
                 AND status IN ('completed', 'cancelled', 'dead')",
                &[&id.0, &workspace.0],
            )
            .await?;
        Ok(n == 1)
    }

    /// `pending → queued` once the queue accepted the jobs' messages.
    pub async fn mark_enqueued(&self, ids: &[JobId], now: DateTime<Utc>) -> Result<u64, DbError> {
        let db = self.pool.get().await?;
        mark_enqueued_on(&db, ids, now).await
    }

    /// `queued → pending` for a job whose message was lost (the queue refused
    /// to delay it), so the scheduler's outbox sends it a new one.
    pub async fn to_outbox(&self, id: JobId, now: DateTime<Utc>) -> Result<bool, DbError> {
        let db = Conn::get(&self.pool).await?;
        let n = db
            .execute(
                "UPDATE jobs SET status = 'pending', enqueued_at = NULL, updated_at = $2 \
                 WHERE id = $1 AND status = 'queued'",
                &[&id.0, &now],
            )
            .await?;
        Ok(n == 1)
    }

    /// Status, due time and cancel flag of jobs, for deciding what to do
    /// with messages whose job could not be claimed.
    pub async fn peek(&self, ids: &[JobId]) -> Result<Vec<Peeked>, DbError> {
        let db = Conn::get(&self.pool).await?;
        let ids: Vec<_> = ids.iter().map(|i| i.0).collect();
        let rows = db
            .query(
                "SELECT id, status, run_at, cancel_requested_at IS NOT NULL, lease_expires_at \
                 FROM jobs WHERE id = ANY($1)",
                &[&ids],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Peeked {
                id: JobId(r.get(0)),
                status: r.get::<_, &str>(1).parse().unwrap_or(JobStatus::Dead),
                run_at: r.get(2),
                cancel_requested: r.get(3),
                lease_expires_at: r.get(4),
            })
            .collect())
    }

    /// Ends `cancelled` the jobs among `ids` whose cancel was requested and
    /// that nobody holds (waiting, or running under an expired lease): a
    /// cancel wins over starting them again. Returns the ids it ended.
    pub async fn end_cancel_requested(
        &self,
        ids: &[JobId],
        now: DateTime<Utc>,
    ) -> Result<Vec<JobId>, DbError> {
        let db = Conn::get(&self.pool).await?;
        let ids: Vec<_> = ids.iter().map(|i| i.0).collect();
        let rows = db
            .query(
                "UPDATE jobs SET status = 'cancelled', finished_at = $2, updated_at = $2, \
                   parked_at = NULL, lease_expires_at = NULL \
                 WHERE id = ANY($1) AND cancel_requested_at IS NOT NULL \
                   AND (status IN ('pending', 'queued') \
                        OR (status = 'running' AND lease_expires_at < $2)) \
                 RETURNING id",
                &[&ids, &now],
            )
            .await?;
        Ok(rows.iter().map(|r| JobId(r.get(0))).collect())
    }

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
                "UPDATE jobs SET checkpoint = $4, updated_at = $5 \
                 WHERE id = $1 AND status = 'running' AND attempts = $2 AND worker_id = $3",
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
                "UPDATE jobs SET progress = $4, updated_at = $5 \
                 WHERE id = $1 AND status = 'running' AND attempts = $2 AND worker_id = $3 \
                 RETURNING cancel_requested_at IS NOT NULL",
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
                "SELECT cancel_requested_at IS NOT NULL FROM jobs \
                 WHERE id = $1 AND status = 'running' AND attempts = $2 AND worker_id = $3",
                &[&lease.job_id.0, &lease.attempt, &lease.worker_id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Cancels a job: one that has not started (`pending`, `queued`) is
    /// `cancelled` at once; a `running` one gets `cancel_requested_at`, which
    /// its handler sees between steps. Returns the job as it now is, or
    /// `None` when no unfinished job of the workspace has that id.
    pub async fn request_cancel(
        &self,
        workspace: WorkspaceId,
        id: JobId,
        now: DateTime<Utc>,
    ) -> Result<Option<Job>, DbError> {
        let db = Conn::get(&self.pool).await?;
        let row = db
            .query_opt(
                concat!(
                    "UPDATE jobs SET \
                       status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END, \
                       finished_at = CASE WHEN status = 'running' THEN finished_at ELSE $3 END, \
                       cancel_requested_at = coalesce(cancel_requested_at, $3), updated_at = $3, \
                       parked_at = NULL \
                     WHERE id = $1 AND workspace_id = $2 \
                       AND status IN ('pending', 'queued', 'running') \
                     RETURNING ",
                    job_columns!()
                ),
                &[&id.0, &workspace.0, &now],
            )
            .await?;
        Ok(row.as_ref().map(Job::from_row).transpose()?)
    }

    /// `dead|cancelled → pending` for a manual re-run: attempts, errors,
    /// result, progress and checkpoint start afresh. `None` when no such
    /// finished-but-failed job exists in the workspace.
    pub async fn manual_retry(
        &self,
        workspace: WorkspaceId,
        id: JobId,
        now: DateTime<Utc>,
    ) -> Result<Option<Job>, DbError> {
        let db = Conn::get(&self.pool).await?;
        let row = db
            .query_opt(
                concat!(
                    "UPDATE jobs SET status = 'pending', attempts = 0, run_at = $3, \
                       error_message = NULL, error_kind = NULL, result = NULL, progress = NULL, \
                       checkpoint = NULL, cancel_requested_at = NULL, started_at = NULL, \
                       finished_at = NULL, enqueued_at = NULL, worker_id = NULL, \
                       heartbeat_at = NULL, lease_expires_at = NULL, parked_at = NULL, \
                       updated_at = $3 \
                     WHERE id = $1 AND workspace_id = $2 AND status IN ('dead', 'cancelled') \
                     RETURNING ",
                    job_columns!()
                ),
                &[&id.0, &workspace.0, &now],
            )
            .await?;
        Ok(row.as_ref().map(Job::from_row).transpose()?)
    }

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
                &[&ids, &reason, &now],
            )
            .await?;
        Ok(rows.iter().map(|r| JobId(r.get(0))).collect())
    }

    /// Appends log lines in one statement.
    pub async fn append_logs(&self, lines: &[LogLine], now: DateTime<Utc>) -> Result<(), DbError> {
        if lines.is_empty() {
            return Ok(());
        }
        append_logs(&self.pool.get().await?, lines, now).await
    }

    /// A job's log lines in order, after line `after` (a cursor), at most `limit`.
    pub async fn logs(
        &self,
        workspace: WorkspaceId,
        id: JobId,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, i32, String, String, Option<Value>, DateTime<Utc>)>, DbError> {
        let db = Conn::get(&self.pool).await?;
        let rows = db
            .query(
                "SELECT id, attempt, level, message, metadata, created_at FROM job_logs \
                 WHERE job_id = $1 AND workspace_id = $2 AND id > $3 ORDER BY id LIMIT $4",
                &[&id.0, &workspace.0, &after, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
            .collect())
    }

    /// Deletes up to `limit` finished jobs (and, by cascade, their logs)
    /// that finished before `before`.
    pub async fn prune(&self, before: DateTime<Utc>, limit: i64) -> Result<u64, DbError> {
        let db = Conn::get(&self.pool).await?;
        db.execute(
            "DELETE FROM jobs WHERE id = ANY(ARRAY( \
                   SELECT id FROM jobs WHERE status IN ('completed', 'cancelled', 'dead') \
                     AND finished_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED))",
            &[&before, &limit],
        )
        .await
    }
}

/// Appends log lines in one statement, on the caller's connection or transaction.
pub async fn append_logs(
    db: &impl GenericClient,
    lines: &[LogLine],
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    if lines.is_empty() {
        return Ok(());
    }
    let job_ids: Vec<_> = lines.iter().map(|l| l.job_id.0).collect();
    let wss: Vec<_> = lines.iter().map(|l| l.workspace_id.0).collect();
    let attempts: Vec<_> = lines.iter().map(|l| l.attempt).collect();
    let levels: Vec<_> = lines.iter().map(|l| l.level).collect();
    let messages: Vec<_> = lines.iter().map(|l| storable_text(&l.message)).collect();
    let metadata: Vec<_> = lines
        .iter()
        .map(|l| l.metadata.as_ref().map(|m| storable_json(m).into_owned()))
        .collect();
    let stmt = db
        .prepare_cached(
            "INSERT INTO job_logs (job_id, workspace_id, attempt, level, message, metadata, created_at) \
             SELECT u.*, $7 FROM unnest($1::uuid[], $2::uuid[], $3::int4[], $4::text[], $5::text[], \
               $6::jsonb[]) AS u",
        )
        .await?;
    db.execute(
        &stmt,
        &[
            &job_ids, &wss, &attempts, &levels, &messages, &metadata, &now,
        ],
    )
    .await?;
    Ok(())
}
