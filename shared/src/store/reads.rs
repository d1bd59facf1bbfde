//! What the API reads of a workspace's jobs (one job, pages, logs) and the
//! changes a person asks for: cancel, re-run, delete. Every statement names
//! the workspace, so another workspace's id reads as absent.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::Store;
use crate::db::{Conn, DbError};
use crate::ids::{JobId, WorkspaceId};
use crate::job::{Job, JobStatus};
use crate::job_columns;

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

impl Store {
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

    /// [`Store::get`] for readers who may hold no membership (a browser
    /// token): nothing of a workspace being deleted.
    pub async fn get_open(
        &self,
        workspace: WorkspaceId,
        id: JobId,
    ) -> Result<Option<Job>, DbError> {
        let db = Conn::get(&self.pool).await?;
        let row = db
            .query_opt(
                concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE id = $1 AND workspace_id = $2 AND EXISTS \
                     (SELECT 1 FROM workspaces w WHERE w.id = $2 AND w.deleting_at IS NULL)"
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

    /// The jobs of `ids` that exist, in no particular order: one read for
    /// every job a notification names.
    pub async fn get_many(&self, ids: &[JobId]) -> Result<Vec<Job>, DbError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<uuid::Uuid> = ids.iter().map(|i| i.0).collect();
        let db = Conn::get(&self.pool).await?;
        let rows = db
            .query(
                concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = ANY($1)"),
                &[&raw],
            )
            .await?;
        Ok(rows.iter().map(Job::from_row).collect::<Result<_, _>>()?)
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

    /// Deletes a finished job of the workspace. `Ok(false)` when it does not
    /// exist, is not finished, or is a child whose parent still exists (its
    /// parent reads its result, and a retry of the parent keeps it): the
    /// caller tells them apart.
    pub async fn delete_finished(
        &self,
        workspace: WorkspaceId,
        id: JobId,
    ) -> Result<bool, DbError> {
        let db = Conn::get(&self.pool).await?;
        let n = db
            .execute(
                "DELETE FROM jobs WHERE id = $1 AND workspace_id = $2 \
                 AND status IN ('completed', 'cancelled', 'dead') \
                 AND (parent_id IS NULL \
                      OR NOT EXISTS (SELECT 1 FROM jobs p WHERE p.id = jobs.parent_id))",
                &[&id.0, &workspace.0],
            )
            .await?;
        Ok(n == 1)
    }

    /// Cancels a job: one that has not started (`pending`, `queued`) or is
    /// `waiting` is `cancelled` at once (and its unfinished children with it,
    /// by V12's trigger); a `running` one gets `cancel_requested_at`, which
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
                       parked_at = NULL, wait_kind = NULL \
                     WHERE id = $1 AND workspace_id = $2 \
                       AND status IN ('pending', 'queued', 'running', 'waiting') \
                     RETURNING ",
                    job_columns!()
                ),
                &[&id.0, &workspace.0, &now],
            )
            .await?;
        Ok(row.as_ref().map(Job::from_row).transpose()?)
    }

    /// `dead|cancelled → pending` for a manual re-run: attempts, errors,
    /// result, progress and checkpoint start afresh, and so do its dead or
    /// cancelled children (a parent re-run finds them to wait for again);
    /// its completed children keep their results and are not run again. The
    /// wait tokens of the jobs re-run are retired: a re-run waits on a fresh
    /// one, and the old one answers 409. The re-run children are left
    /// `pending` for [`Store::unsent_children`]. A parent with a child still
    /// `running` (asked to stop when the parent died) is not retried: that
    /// child could end after this statement looked, cancelled, and the
    /// re-run would count it as done; [`Store::running_children`] tells the
    /// caller why. `None` when no such finished-but-failed job exists in
    /// the workspace, or one of its children still runs.
    pub async fn manual_retry(
        &self,
        workspace: WorkspaceId,
        id: JobId,
        now: DateTime<Utc>,
    ) -> Result<Option<Job>, DbError> {
        /// The columns a re-run starts afresh, due at `$3`.
        macro_rules! afresh {
            () => {
                "status = 'pending', attempts = 0, run_at = $3, \
                 error_message = NULL, error_kind = NULL, result = NULL, progress = NULL, \
                 checkpoint = NULL, cancel_requested_at = NULL, started_at = NULL, \
                 finished_at = NULL, enqueued_at = NULL, worker_id = NULL, \
                 heartbeat_at = NULL, lease_expires_at = NULL, parked_at = NULL, \
                 wait_kind = NULL, busy_snoozes = 0, updated_at = $3"
            };
        }
        let db = Conn::get(&self.pool).await?;
        // Finished children are never written again by anyone else, so the
        // statement's snapshot of them is the truth; a running one refuses.
        let row = db
            .query_opt(
                concat!(
                    "WITH parent AS (UPDATE jobs SET ",
                    afresh!(),
                    " WHERE id = $1 AND workspace_id = $2 AND status IN ('dead', 'cancelled') \
                       AND NOT EXISTS (SELECT 1 FROM jobs c \
                         WHERE c.parent_id = $1 AND c.status = 'running') \
                     RETURNING ",
                    job_columns!(),
                    "), children AS (UPDATE jobs SET ",
                    afresh!(),
                    " WHERE parent_id IN (SELECT id FROM parent) \
                       AND status IN ('dead', 'cancelled') RETURNING id), \
                     retired AS (DELETE FROM wait_tokens \
                       WHERE job_id IN (SELECT id FROM parent UNION ALL SELECT id FROM children) \
                       RETURNING token, workspace_id, job_id), \
                     kept AS (INSERT INTO retired_wait_tokens (token, workspace_id, job_id, retired_at) \
                       SELECT token, workspace_id, job_id, $3 FROM retired) \
                     SELECT * FROM parent"
                ),
                &[&id.0, &workspace.0, &now],
            )
            .await?;
        Ok(row.as_ref().map(Job::from_row).transpose()?)
    }
}
