//! Child jobs: created by a running parent with its id and their index among
//! their siblings (so creating them again after a crash inserts nothing
//! new), read back in order by the parent and by the API, and the parents
//! their finish woke (V12's triggers keep the counts and wake the parent).

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;

use super::{NewJob, Store};
use crate::db::{Conn, DbError};
use crate::ids::JobId;
use crate::job::Job;
use crate::job_columns;

/// Inserts `children` of `parent`, the i-th with index `first + i`, as
/// `pending` (the caller sends their messages); children that exist are
/// left as they are. Returns how many were inserted.
pub async fn insert_children(
    db: &impl GenericClient,
    parent: JobId,
    first: i32,
    children: &[NewJob],
    now: DateTime<Utc>,
) -> Result<u64, DbError> {
    if children.is_empty() {
        return Ok(0);
    }
    let ids: Vec<_> = children.iter().map(|j| j.id.0).collect();
    let wss: Vec<_> = children.iter().map(|j| j.workspace_id.0).collect();
    let by: Vec<_> = children.iter().map(|j| j.created_by.map(|u| u.0)).collect();
    let types: Vec<_> = children.iter().map(|j| j.job_type.as_str()).collect();
    let queues: Vec<_> = children.iter().map(|j| j.queue.as_str()).collect();
    let prios: Vec<_> = children.iter().map(|j| j.priority).collect();
    let payloads: Vec<_> = children.iter().map(|j| &j.payload).collect();
    let maxes: Vec<_> = children.iter().map(|j| j.max_attempts).collect();
    let tags: Vec<String> = children.iter().map(|j| j.tags.join("\u{1f}")).collect();
    let indexes: Vec<i32> = (0..children.len() as i32).map(|i| first + i).collect();
    let stmt = db
        .prepare_cached(
            "INSERT INTO jobs (id, workspace_id, created_by, job_type, queue, priority, payload, \
               status, max_attempts, run_at, tags, created_at, updated_at, parent_id, child_index) \
             SELECT n.id, n.ws, n.by, n.ty, n.q, n.prio, n.payload, 'pending', n.maxa, $10, \
               CASE WHEN n.tags = '' THEN '{}'::text[] ELSE string_to_array(n.tags, chr(31)) END, \
               $10, $10, $11, n.idx \
             FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::int2[], \
               $7::jsonb[], $8::int4[], $9::text[], $12::int4[]) \
               AS n(id, ws, by, ty, q, prio, payload, maxa, tags, idx) \
             ORDER BY n.idx \
             ON CONFLICT (parent_id, child_index) WHERE parent_id IS NOT NULL DO NOTHING",
        )
        .await?;
    Ok(db
        .execute(
            &stmt,
            &[
                &ids, &wss, &by, &types, &queues, &prios, &payloads, &maxes, &tags, &now,
                &parent.0, &indexes,
            ],
        )
        .await?)
}

impl Store {
    /// Up to `limit` children of `parent` after index `after`, in order.
    pub async fn children(
        &self,
        parent: JobId,
        after: Option<i32>,
        limit: i64,
    ) -> Result<Vec<Job>, DbError> {
        let db = Conn::get(self.pool()).await?;
        let rows = db
            .query(
                concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE parent_id = $1 AND child_index > $2 \
                     ORDER BY child_index LIMIT $3"
                ),
                &[&parent.0, &after.unwrap_or(-1), &limit],
            )
            .await?;
        Ok(rows.iter().map(Job::from_row).collect::<Result<_, _>>()?)
    }

    /// Children of `parent` created but not sent yet (`pending` without a
    /// message), up to `limit`.
    pub async fn unsent_children(&self, parent: JobId, limit: i64) -> Result<Vec<Job>, DbError> {
        let db = Conn::get(self.pool()).await?;
        let rows = db
            .query(
                concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE parent_id = $1 AND status = 'pending' \
                       AND enqueued_at IS NULL ORDER BY child_index LIMIT $2"
                ),
                &[&parent.0, &limit],
            )
            .await?;
        Ok(rows.iter().map(Job::from_row).collect::<Result<_, _>>()?)
    }

    /// Of `parents`, those a child's finish woke and nobody has sent yet.
    pub async fn woken_parents(&self, parents: &[JobId]) -> Result<Vec<Job>, DbError> {
        if parents.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<_> = parents.iter().map(|p| p.0).collect();
        let db = Conn::get(self.pool()).await?;
        let rows = db
            .query(
                concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE id = ANY($1) AND status = 'pending' AND enqueued_at IS NULL"
                ),
                &[&ids],
            )
            .await?;
        Ok(rows.iter().map(Job::from_row).collect::<Result<_, _>>()?)
    }
}
