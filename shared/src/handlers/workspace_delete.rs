//! `workspace_delete`: removes a deleted workspace's jobs, contacts, files
//! and finally the workspace itself, in batches, with progress. Payload
//! `{"workspace_id": uuid}`. Made by `DELETE /api/workspaces/{ws}` in the
//! platform's own workspace, the only one where the type runs; and only on
//! a workspace already marked deleted, so no tenant can aim it anywhere.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::{JobContext, JobError, JobHandler, Outcome};
use crate::db::DbError;
use crate::job::Progress;

/// Rows (or files) removed per statement: each batch is short, so a large
/// workspace is removed across hand-offs without long locks.
const BATCH: i64 = 2000;

pub struct WorkspaceDelete;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceDeletePayload {
    pub workspace_id: Uuid,
}

/// What is left to do, carried across hand-offs.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Done {
    total: u64,
    jobs: u64,
    contacts: u64,
    files: u64,
    counted: bool,
}

impl Done {
    fn progress(&self, stage: &str) -> Progress {
        Progress {
            stage: Some(stage.into()),
            message: Some(format!(
                "{} jobs, {} contacts and {} files removed",
                self.jobs, self.contacts, self.files
            )),
            ..Progress::of(self.jobs + self.contacts, self.total)
        }
    }
}

async fn execute(ctx: &JobContext, sql: &str, ws: &Uuid) -> Result<u64, JobError> {
    let db = ctx.db().get().await.map_err(DbError::from)?;
    Ok(db
        .execute(sql, &[ws, &BATCH])
        .await
        .map_err(DbError::from)?)
}

#[async_trait]
impl JobHandler for WorkspaceDelete {
    type Payload = WorkspaceDeletePayload;
    const TYPE: &'static str = "workspace_delete";
    const PLATFORM_ONLY: bool = true;

    async fn run(
        &self,
        p: WorkspaceDeletePayload,
        ctx: &mut JobContext,
    ) -> Result<Outcome, JobError> {
        let ws = p.workspace_id;
        let marked = {
            let db = ctx.db().get().await.map_err(DbError::from)?;
            db.query_opt(
                "SELECT deleting_at IS NOT NULL FROM workspaces WHERE id = $1",
                &[&ws],
            )
            .await
            .map_err(DbError::from)?
            .map(|r| r.get::<_, bool>(0))
        };
        let mut done: Done = ctx.checkpoint().unwrap_or_default();
        match marked {
            None => {
                return Ok(Outcome::Completed(Some(json!({
                    "workspace_id": ws, "jobs": done.jobs, "contacts": done.contacts,
                    "files": done.files, "already_removed": !done.counted,
                }))))
            }
            Some(false) => {
                return Err(JobError::Permanent(format!(
                    "workspace {ws} is not marked for deletion: delete it with \
                     DELETE /api/workspaces/{ws}"
                )))
            }
            Some(true) => {}
        }
        if !done.counted {
            let db = ctx.db().get().await.map_err(DbError::from)?;
            let row = db
                .query_one(
                    "SELECT (SELECT count(*) FROM jobs WHERE workspace_id = $1), \
                            (SELECT count(*) FROM contacts WHERE workspace_id = $1)",
                    &[&ws],
                )
                .await
                .map_err(DbError::from)?;
            done.total = (row.get::<_, i64>(0) + row.get::<_, i64>(1)) as u64;
            done.counted = true;
            ctx.save_checkpoint(&done).await?;
        }
        // Its work stops first: jobs not started are cancelled, running ones
        // asked to stop (they end at their next step), in batches.
        loop {
            if ctx.should_hand_off() {
                return Ok(ctx.hand_off(&done));
            }
            let n = execute(
                ctx,
                "UPDATE jobs SET \
                   status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END, \
                   finished_at = CASE WHEN status = 'running' THEN finished_at ELSE now() END, \
                   cancel_requested_at = now(), updated_at = now(), parked_at = NULL, \
                   wait_kind = NULL \
                 WHERE id IN (SELECT id FROM jobs WHERE workspace_id = $1 \
                   AND status IN ('pending', 'queued', 'running', 'waiting') \
                   AND cancel_requested_at IS NULL LIMIT $2)",
                &ws,
            )
            .await?;
            if n == 0 {
                break;
            }
        }
        // Then jobs (their logs, streams and children go with them),
        // contacts (their tags and enrolments go with them), and files.
        for (stage, sql) in [
            (
                "jobs",
                "DELETE FROM jobs WHERE id IN \
                 (SELECT id FROM jobs WHERE workspace_id = $1 LIMIT $2)",
            ),
            (
                "contacts",
                "DELETE FROM contacts WHERE id IN \
                 (SELECT id FROM contacts WHERE workspace_id = $1 LIMIT $2)",
            ),
        ] {
            loop {
                if ctx.should_hand_off() {
                    return Ok(ctx.hand_off(&done));
                }
                let n = execute(ctx, sql, &ws).await?;
                if n == 0 {
                    break;
                }
                if stage == "jobs" {
                    done.jobs += n;
                } else {
                    done.contacts += n;
                }
                ctx.save_checkpoint(&done).await?;
                ctx.progress(done.progress(stage)).await?;
            }
        }
        let prefix = crate::storage::workspace_prefix(crate::ids::WorkspaceId(ws));
        loop {
            if ctx.should_hand_off() {
                return Ok(ctx.hand_off(&done));
            }
            let n = ctx
                .storage()
                .delete_under(&prefix, BATCH as usize)
                .await
                .map_err(|e| JobError::Retryable(format!("removing the workspace's files: {e}")))?;
            if n == 0 {
                break;
            }
            done.files += n;
            ctx.save_checkpoint(&done).await?;
            ctx.progress(done.progress("files")).await?;
        }
        // The end in one transaction: the workspace's row locked first (a
        // job inserted since, such as a child of a job that was running,
        // counts itself on that row, so it waits and then finds no
        // workspace), the jobs made since the batches, then the row, with
        // what goes with it (members, keys, schedules, providers).
        {
            let mut db = ctx.db().get().await.map_err(DbError::from)?;
            let tx = db.transaction().await.map_err(DbError::from)?;
            tx.execute(
                "SELECT 1 FROM workspaces WHERE id = $1 AND deleting_at IS NOT NULL FOR UPDATE",
                &[&ws],
            )
            .await
            .map_err(DbError::from)?;
            done.jobs += tx
                .execute("DELETE FROM jobs WHERE workspace_id = $1", &[&ws])
                .await
                .map_err(DbError::from)?;
            tx.execute(
                "DELETE FROM workspaces WHERE id = $1 AND deleting_at IS NOT NULL",
                &[&ws],
            )
            .await
            .map_err(DbError::from)?;
            tx.commit().await.map_err(DbError::from)?;
        }
        ctx.progress(done.progress("removed")).await?;
        ctx.log(
            "info",
            format!(
                "Workspace {ws} removed: {} jobs, {} contacts, {} files",
                done.jobs, done.contacts, done.files
            ),
            None,
        )
        .await?;
        Ok(Outcome::Completed(Some(json!({
            "workspace_id": ws, "jobs": done.jobs, "contacts": done.contacts, "files": done.files,
        }))))
    }
}
