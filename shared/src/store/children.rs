//! Child jobs, created like any job ([`super::NewJob::child_of`]): read
//! back in order by their parent and by the API, and the parents their
//! finish woke (V12's triggers keep the counts and wake the parent).

use super::Store;
use crate::db::{Conn, DbError};
use crate::ids::JobId;
use crate::job::Job;
use crate::job_columns;

/// A parent's children by what its wait counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChildCounts {
    pub unfinished: i64,
    pub dead: i64,
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

    /// How many of `parent`'s children are unfinished, and how many dead:
    /// the counts its wait is released by (V12's `job_children`), so the
    /// parent decides on what woke it, never on rows it reads itself.
    pub async fn children_counts(&self, parent: JobId) -> Result<ChildCounts, DbError> {
        let db = Conn::get(self.pool()).await?;
        let row = db
            .query_opt(
                "SELECT unfinished, dead FROM job_children WHERE parent_id = $1",
                &[&parent.0],
            )
            .await?;
        Ok(row.map_or(ChildCounts::default(), |r| ChildCounts {
            unfinished: r.get::<_, i32>(0) as i64,
            dead: r.get::<_, i32>(1) as i64,
        }))
    }

    /// How many of `parent`'s children are `running`.
    pub async fn running_children(&self, parent: JobId) -> Result<i64, DbError> {
        let db = Conn::get(self.pool()).await?;
        let row = db
            .query_one(
                "SELECT count(*) FROM jobs WHERE parent_id = $1 AND status = 'running'",
                &[&parent.0],
            )
            .await?;
        Ok(row.get(0))
    }

    /// `parent`'s children that wait for a message (`pending`, never sent):
    /// those a retry of the parent brought back.
    pub async fn unsent_children(&self, parent: JobId) -> Result<Vec<Job>, DbError> {
        let db = Conn::get(self.pool()).await?;
        let rows = db
            .query(
                concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE parent_id = $1 AND status = 'pending' AND enqueued_at IS NULL \
                     ORDER BY child_index"
                ),
                &[&parent.0],
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
