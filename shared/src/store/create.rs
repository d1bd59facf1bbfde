//! Creating jobs: the insert (with the Postgres queue's messages in the
//! same statement), idempotency keys, and the `pending → queued` mark once
//! a job's message is out (and back, when a message is lost).

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;

use super::{NewJob, Store};
use crate::db::{Conn, DbError};
use crate::ids::{JobId, WorkspaceId};
use crate::job::{Job, JobStatus};
use crate::job_columns;

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

/// Postgres-queue messages to write with the jobs they carry.
#[derive(Debug, Default)]
pub struct MessageRows {
    pub queues: Vec<&'static str>,
    pub bodies: Vec<String>,
    pub delays_ms: Vec<f64>,
}

/// The insert of new jobs ($1..$15, one array per column), skipping those
/// whose key exists: the idempotency key, or for children (`children`) the
/// parent and index. A child's own idempotency key (kept for the release
/// before, which finds children by it) is written only where no job holds
/// it already: a key taken before the API reserved the prefix must not fail
/// the insert, which arbitrates on the parent and index alone.
macro_rules! insert_jobs_sql {
    () => {
        insert_jobs_sql!(
            "n.ikey",
            "ON CONFLICT (workspace_id, idempotency_key) WHERE idempotency_key IS NOT NULL \
             DO NOTHING "
        )
    };
    (children) => {
        insert_jobs_sql!(
            "CASE WHEN NOT EXISTS (SELECT 1 FROM jobs t \
               WHERE t.workspace_id = n.ws AND t.idempotency_key = n.ikey) THEN n.ikey END",
            "ON CONFLICT (parent_id, child_index) WHERE parent_id IS NOT NULL DO NOTHING "
        )
    };
    ($key:literal, $conflict:literal) => {
        concat!(
            "INSERT INTO jobs (id, workspace_id, created_by, job_type, queue, priority, \
               payload, status, max_attempts, run_at, idempotency_key, tags, created_at, \
               updated_at, enqueued_at, parent_id, child_index) \
             SELECT n.id, n.ws, n.by, n.ty, n.q, n.prio, n.payload, n.status, n.maxa, \
               n.run_at, ",
            $key,
            ", CASE WHEN n.tags = '' THEN '{}'::text[] ELSE string_to_array(n.tags, chr(31)) END, \
               $13::timestamptz, $13::timestamptz, \
               CASE WHEN n.status = 'queued' THEN $13::timestamptz END, n.parent, n.idx \
             FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], \
               $6::int2[], $7::jsonb[], $8::text[], $9::int4[], $10::timestamptz[], \
               $11::text[], $12::text[], $14::uuid[], $15::int4[]) \
               AS n(id, ws, by, ty, q, prio, payload, status, maxa, run_at, ikey, tags, parent, idx) ",
            $conflict,
            "RETURNING "
        )
    };
}

const INSERT_JOBS: &str = concat!(insert_jobs_sql!(), "id");
const INSERT_CHILDREN: &str = concat!(insert_jobs_sql!(children), "id");

macro_rules! with_messages {
    () => {
        "WITH msgs AS (INSERT INTO queue_messages (queue, body, vt) \
           SELECT m.q, m.b, now() + m.d * interval '1 millisecond' \
           FROM unnest($16::text[], $17::text[], $18::float8[]) AS m(q, b, d)) "
    };
}

/// [`INSERT_JOBS`] with the Postgres queue's messages ($16..$18) written by
/// the same statement. A message whose job loses an idempotency race names
/// a job that does not exist; the worker acknowledges such messages.
const INSERT_JOBS_WITH_MESSAGES: &str = concat!(with_messages!(), insert_jobs_sql!(), "id");
const INSERT_CHILDREN_WITH_MESSAGES: &str =
    concat!(with_messages!(), insert_jobs_sql!(children), "id");

impl Store {
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
        let parents: Vec<Option<uuid::Uuid>> =
            jobs.iter().map(|j| j.parent.map(|p| p.0 .0)).collect();
        let indexes: Vec<Option<i32>> = jobs.iter().map(|j| j.parent.map(|p| p.1)).collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 15] = [
            &ids, &wss, &by, &types, &queues, &prios, &payloads, &statuses, &maxes, &run_ats,
            &keys, &tags, &now, &parents, &indexes,
        ];
        // One insert is of one parent's children or of no children: a
        // child's key is its place among its siblings.
        let children = jobs[0].parent.map(|p| p.0);
        if jobs.iter().any(|j| j.parent.map(|p| p.0) != children) {
            return Err(DbError::Inconsistent(
                "one insert holds the children of one parent, or no children".into(),
            ));
        }
        let rows = match messages {
            None => {
                let sql = if children.is_some() {
                    INSERT_CHILDREN
                } else {
                    INSERT_JOBS
                };
                let stmt = db.prepare_cached(sql).await?;
                db.query(&stmt, &params).await?
            }
            Some(m) => {
                let sql = if children.is_some() {
                    INSERT_CHILDREN_WITH_MESSAGES
                } else {
                    INSERT_JOBS_WITH_MESSAGES
                };
                let stmt = db.prepare_cached(sql).await?;
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
        // Children that exist already, by their index, read in one statement.
        let mut siblings: std::collections::HashMap<i32, Job> = match children {
            Some(parent) if inserted.len() < jobs.len() => {
                let indexes: Vec<i32> = jobs
                    .iter()
                    .filter(|j| !inserted.contains(&j.id.0))
                    .filter_map(|j| j.parent.map(|p| p.1))
                    .collect();
                let stmt = db
                    .prepare_cached(concat!(
                        "SELECT ",
                        job_columns!(),
                        " FROM jobs WHERE parent_id = $1 AND child_index = ANY($2)"
                    ))
                    .await?;
                let rows = db.query(&stmt, &[&parent.0, &indexes]).await?;
                let mut found = std::collections::HashMap::new();
                for r in &rows {
                    let job = Job::from_row(r)?;
                    found.insert(job.child_index.unwrap_or(-1), job);
                }
                found
            }
            _ => std::collections::HashMap::new(),
        };
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
                let existing = match j.parent {
                    Some((_, index)) => siblings.remove(&index),
                    None => self.by_idempotency_key(db, j.workspace_id, key).await?,
                };
                let existing = existing.ok_or_else(|| {
                    DbError::Inconsistent(format!("job {} was neither inserted nor found", j.id))
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
    /// returns the jobs the others name. Each key is looked up by itself
    /// (a join with the list, both columns of the unique index in its
    /// condition): with `idempotency_key = ANY($2)` and statistics taken
    /// while the workspace was small, the planner read every keyed job of
    /// the workspace and tested each against the list (190 ms for 1 000
    /// keys among 21 000 jobs).
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
                "UPDATE jobs SET idempotency_key = NULL FROM unnest($2::text[]) AS k(key) \
                 WHERE workspace_id = $1 AND idempotency_key = k.key AND created_at < $3",
            )
            .await?;
        db.execute(&expire, &[&workspace.0, &keys, &before]).await?;
        let stmt = db
            .prepare_cached(concat!(
                "SELECT ",
                job_columns!(),
                " FROM unnest($2::text[]) AS k(key) \
                   JOIN jobs ON workspace_id = $1 AND idempotency_key = k.key"
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
}
