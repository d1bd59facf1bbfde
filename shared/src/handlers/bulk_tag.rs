//! `bulk_tag` and `bulk_delete`: one change applied to many contacts of the
//! workspace, in batches, with progress, a checkpoint after every batch, and
//! a stop between batches when cancelled. Both are idempotent: tagging twice
//! or deleting what is gone changes nothing.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::{JobContext, JobError, JobHandler, Outcome, PayloadError};
use crate::db::DbError;
use crate::job::Progress;

/// Most contacts one bulk job may touch unless configured otherwise
/// (`OFFLOAD_MAX_BULK_CONTACTS`).
pub const DEFAULT_MAX_BULK: usize = 10_000;

fn default_batch() -> usize {
    500
}

fn check_ids(ids: &[Uuid], batch: usize, max: usize) -> Result<(), PayloadError> {
    if ids.is_empty() || ids.len() > max {
        return Err(PayloadError::field(
            "contact_ids",
            format!("give 1 to {max} contact ids, got {}", ids.len()),
        ));
    }
    if !(1..=1000).contains(&batch) {
        return Err(PayloadError::field("batch_size", "must be from 1 to 1000"));
    }
    Ok(())
}

/// Where a bulk run stands.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Done {
    next: usize,
    changed: u64,
}

/// `bulk_tag`, limited to `max_contacts` contacts per job.
#[derive(Clone, Copy, Debug)]
pub struct BulkTag {
    pub max_contacts: usize,
}

impl Default for BulkTag {
    fn default() -> Self {
        BulkTag {
            max_contacts: DEFAULT_MAX_BULK,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkTagPayload {
    pub contact_ids: Vec<Uuid>,
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub remove: Vec<String>,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

#[async_trait]
impl JobHandler for BulkTag {
    type Payload = BulkTagPayload;
    const TYPE: &'static str = "bulk_tag";

    fn validate(&self, p: &BulkTagPayload) -> Result<(), PayloadError> {
        check_ids(&p.contact_ids, p.batch_size, self.max_contacts)?;
        if p.add.is_empty() && p.remove.is_empty() {
            return Err(PayloadError::field("add", "give tags to add or to remove"));
        }
        for (field, tags) in [("add", &p.add), ("remove", &p.remove)] {
            if tags.len() > 50 {
                return Err(PayloadError::field(field, "at most 50 tags"));
            }
            if let Some(i) = tags.iter().position(|t| {
                t.trim().is_empty() || t.chars().count() > 100 || t.chars().any(char::is_control)
            }) {
                return Err(PayloadError::field(
                    &format!("{field}[{i}]"),
                    "a tag is 1 to 100 printable characters",
                ));
            }
        }
        Ok(())
    }

    async fn run(&self, p: BulkTagPayload, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let ws = ctx.workspace_id().0;
        let mut done: Done = ctx.checkpoint().unwrap_or_default();
        let total = p.contact_ids.len();
        while done.next < total {
            if ctx.cancelled().await? {
                ctx.log(
                    "info",
                    format!("Stopped on request after {} of {total} contacts", done.next),
                    None,
                )
                .await?;
                return Ok(Outcome::Cancelled(Some(
                    json!({ "processed": done.next, "changed": done.changed }),
                )));
            }
            if ctx.should_hand_off() {
                return Ok(ctx.hand_off(&done));
            }
            let batch = &p.contact_ids[done.next..(done.next + p.batch_size).min(total)];
            let db = ctx.db().get().await.map_err(DbError::from)?;
            if !p.add.is_empty() {
                let stmt = db
                    .prepare_cached(
                        "INSERT INTO contact_tags (contact_id, workspace_id, tag) \
                         SELECT c.id, c.workspace_id, t FROM contacts c, unnest($3::text[]) AS t \
                         WHERE c.id = ANY($1) AND c.workspace_id = $2 \
                         ON CONFLICT DO NOTHING",
                    )
                    .await
                    .map_err(DbError::from)?;
                done.changed += db
                    .execute(&stmt, &[&batch, &ws, &p.add])
                    .await
                    .map_err(DbError::from)?;
            }
            if !p.remove.is_empty() {
                let stmt = db
                    .prepare_cached(
                        "DELETE FROM contact_tags \
                         WHERE contact_id = ANY($1) AND workspace_id = $2 AND tag = ANY($3)",
                    )
                    .await
                    .map_err(DbError::from)?;
                done.changed += db
                    .execute(&stmt, &[&batch, &ws, &p.remove])
                    .await
                    .map_err(DbError::from)?;
            }
            drop(db);
            done.next += batch.len();
            ctx.save_checkpoint(&done).await?;
            ctx.progress(Progress {
                stage: Some("tagging".into()),
                message: Some(format!("{} of {total} contacts", done.next)),
                ..Progress::of(done.next as u64, total as u64)
            })
            .await?;
        }
        ctx.log(
            "info",
            format!("Tagged {total} contacts ({} tag changes)", done.changed),
            None,
        )
        .await?;
        Ok(Outcome::Completed(Some(
            json!({ "processed": total, "changed": done.changed }),
        )))
    }
}

/// `bulk_delete`, limited to `max_contacts` contacts per job.
#[derive(Clone, Copy, Debug)]
pub struct BulkDelete {
    pub max_contacts: usize,
}

impl Default for BulkDelete {
    fn default() -> Self {
        BulkDelete {
            max_contacts: DEFAULT_MAX_BULK,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkDeletePayload {
    pub contact_ids: Vec<Uuid>,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

#[async_trait]
impl JobHandler for BulkDelete {
    type Payload = BulkDeletePayload;
    const TYPE: &'static str = "bulk_delete";
    const ADMIN_ONLY: bool = true;

    fn validate(&self, p: &BulkDeletePayload) -> Result<(), PayloadError> {
        check_ids(&p.contact_ids, p.batch_size, self.max_contacts)
    }

    async fn run(&self, p: BulkDeletePayload, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let ws = ctx.workspace_id().0;
        let mut done: Done = ctx.checkpoint().unwrap_or_default();
        let total = p.contact_ids.len();
        while done.next < total {
            if ctx.cancelled().await? {
                return Ok(Outcome::Cancelled(Some(
                    json!({ "processed": done.next, "deleted": done.changed }),
                )));
            }
            if ctx.should_hand_off() {
                return Ok(ctx.hand_off(&done));
            }
            let batch = &p.contact_ids[done.next..(done.next + p.batch_size).min(total)];
            let db = ctx.db().get().await.map_err(DbError::from)?;
            let stmt = db
                .prepare_cached("DELETE FROM contacts WHERE id = ANY($1) AND workspace_id = $2")
                .await
                .map_err(DbError::from)?;
            done.changed += db
                .execute(&stmt, &[&batch, &ws])
                .await
                .map_err(DbError::from)?;
            drop(db);
            done.next += batch.len();
            ctx.save_checkpoint(&done).await?;
            ctx.progress(Progress {
                stage: Some("deleting".into()),
                ..Progress::of(done.next as u64, total as u64)
            })
            .await?;
        }
        ctx.log(
            "info",
            format!(
                "Deleted {} contacts ({} were already gone)",
                done.changed,
                total as u64 - done.changed
            ),
            None,
        )
        .await?;
        Ok(Outcome::Completed(Some(
            json!({ "processed": total, "deleted": done.changed }),
        )))
    }
}
