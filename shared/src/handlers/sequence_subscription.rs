//! `sequence_subscription`: enroll contacts in a drip sequence ("subscribe 92
//! contacts"). Each contact ends `succeeded`, `blocked` (already enrolled,
//! opted out, on the do-not-contact list) or `failed` (no such contact), with
//! the reason recorded. Enrollments are unique per sequence and contact and
//! remember the job that made them, so a resumed or repeated run never
//! enrolls anyone twice and a resumed run reports the same result.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::{JobContext, JobError, JobHandler, Outcome, PayloadError};
use crate::db::DbError;
use crate::job::Progress;

pub struct SequenceSubscription;

/// Most contacts one job may enroll.
pub const MAX_CONTACTS: usize = 1000;
/// Contacts classified and enrolled per statement.
const BATCH: usize = 100;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribePayload {
    pub sequence_id: Uuid,
    pub contact_ids: Vec<Uuid>,
}

/// Why a contact was not enrolled.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Reason {
    pub contact_id: Uuid,
    pub reason: String,
}

/// Where a run stands; saved after every batch.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Tally {
    next: usize,
    succeeded: u64,
    blocked: u64,
    failed: u64,
    blocked_reasons: Vec<Reason>,
    failed_reasons: Vec<Reason>,
}

impl Tally {
    fn result(&self) -> serde_json::Value {
        json!({
            "succeeded": self.succeeded,
            "blocked": self.blocked,
            "failed": self.failed,
            "blocked_reasons": self.blocked_reasons,
            "failed_reasons": self.failed_reasons,
        })
    }
}

/// Classifies a batch and enrolls the eligible contacts in one statement.
/// `mine`: enrolled earlier by this same job (a resumed run).
const ENROLL: &str = "\
WITH input AS (SELECT cid FROM unnest($1::uuid[]) AS i(cid)),
classified AS (
    SELECT i.cid,
           CASE WHEN c.id IS NULL THEN 'not_found'
                WHEN e.contact_id IS NOT NULL AND e.job_id = $4 THEN 'mine'
                WHEN e.contact_id IS NOT NULL THEN 'already_enrolled'
                WHEN c.opted_out THEN 'opted_out'
                WHEN d.email IS NOT NULL THEN 'do_not_contact'
                ELSE 'ok' END AS verdict
    FROM input i
    LEFT JOIN contacts c ON c.id = i.cid AND c.workspace_id = $2
    LEFT JOIN do_not_contact d ON d.workspace_id = $2 AND d.email = lower(c.email)
    LEFT JOIN sequence_enrollments e ON e.sequence_id = $3 AND e.contact_id = i.cid),
enrolled AS (
    INSERT INTO sequence_enrollments (sequence_id, contact_id, workspace_id, job_id)
    SELECT $3, cid, $2, $4 FROM classified WHERE verdict = 'ok'
    ON CONFLICT DO NOTHING
    RETURNING contact_id)
SELECT cl.cid,
       CASE WHEN cl.verdict = 'mine' THEN 'succeeded'
            WHEN cl.verdict = 'ok' AND en.contact_id IS NOT NULL THEN 'succeeded'
            -- Another job enrolled it between the look and the insert.
            WHEN cl.verdict = 'ok' THEN 'already_enrolled'
            ELSE cl.verdict END
FROM classified cl LEFT JOIN enrolled en ON en.contact_id = cl.cid";

#[async_trait]
impl JobHandler for SequenceSubscription {
    type Payload = SubscribePayload;
    const TYPE: &'static str = "sequence_subscription";

    fn validate(&self, p: &SubscribePayload) -> Result<(), PayloadError> {
        if p.contact_ids.is_empty() || p.contact_ids.len() > MAX_CONTACTS {
            return Err(PayloadError::field(
                "contact_ids",
                format!(
                    "give 1 to {MAX_CONTACTS} contact ids, got {}",
                    p.contact_ids.len()
                ),
            ));
        }
        Ok(())
    }

    async fn run(&self, p: SubscribePayload, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let ws = ctx.workspace_id().0;
        let job = ctx.job_id().0;
        let mut ids = p.contact_ids.clone();
        let mut seen = std::collections::HashSet::new();
        ids.retain(|id| seen.insert(*id));
        {
            let db = ctx.db().get().await.map_err(DbError::from)?;
            let exists = db
                .query_opt(
                    "SELECT 1 FROM sequences WHERE id = $1 AND workspace_id = $2",
                    &[&p.sequence_id, &ws],
                )
                .await
                .map_err(DbError::from)?
                .is_some();
            if !exists {
                return Err(JobError::Permanent(format!(
                    "sequence {} does not exist in this workspace",
                    p.sequence_id
                )));
            }
        }
        let mut tally: Tally = ctx.checkpoint().unwrap_or_default();
        if tally.next == 0 {
            ctx.log(
                "info",
                format!(
                    "Enrolling {} contacts in sequence {}",
                    ids.len(),
                    p.sequence_id
                ),
                None,
            )
            .await?;
        }
        while tally.next < ids.len() {
            if ctx.cancelled().await? {
                ctx.log(
                    "info",
                    format!(
                        "Stopped on request after {} of {} contacts",
                        tally.next,
                        ids.len()
                    ),
                    None,
                )
                .await?;
                return Ok(Outcome::Cancelled(Some(tally.result())));
            }
            if ctx.should_hand_off() {
                return Ok(ctx.hand_off(&tally));
            }
            let batch = &ids[tally.next..(tally.next + BATCH).min(ids.len())];
            let rows = {
                let db = ctx.db().get().await.map_err(DbError::from)?;
                let stmt = db.prepare_cached(ENROLL).await.map_err(DbError::from)?;
                db.query(&stmt, &[&batch, &ws, &p.sequence_id, &job])
                    .await
                    .map_err(DbError::from)?
            };
            let verdicts: std::collections::HashMap<Uuid, String> =
                rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            // Keep the payload's order in the reasons.
            for id in batch {
                match verdicts.get(id).map(String::as_str) {
                    Some("succeeded") => tally.succeeded += 1,
                    Some("not_found") => {
                        tally.failed += 1;
                        tally.failed_reasons.push(Reason {
                            contact_id: *id,
                            reason: "contact not found in this workspace".into(),
                        });
                    }
                    Some(reason) => {
                        tally.blocked += 1;
                        tally.blocked_reasons.push(Reason {
                            contact_id: *id,
                            reason: reason.into(),
                        });
                    }
                    None => {
                        return Err(JobError::Retryable(format!(
                            "contact {id} was not classified"
                        )))
                    }
                }
            }
            tally.next += batch.len();
            ctx.save_checkpoint(&tally).await?;
            ctx.progress(Progress {
                total: Some(ids.len() as u64),
                processed: tally.succeeded + tally.blocked,
                failed: tally.failed,
                stage: Some("enrolling".into()),
                message: Some(format!("{} of {} contacts", tally.next, ids.len())),
                percentage: None,
            })
            .await?;
        }
        ctx.log(
            "info",
            format!(
                "Enrolled {} contacts; {} were blocked (already enrolled, opted out or on the do-not-contact list); {} failed",
                tally.succeeded, tally.blocked, tally.failed
            ),
            None,
        )
        .await?;
        Ok(Outcome::Completed(Some(tally.result())))
    }
}
