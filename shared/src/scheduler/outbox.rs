//! The outbox: sends every `pending` job that is due (within the queues'
//! maximum delay) and has no message: created while the queue was down,
//! delayed beyond 15 minutes, rescued, handed off, released, or manually
//! retried. And the sweep for `queued` jobs whose message was lost.
//!
//! No row lock is held while the queue is called: the rows are taken by one
//! statement that moves their `updated_at` to now (so an overlapping run,
//! which only sends rows settled for `outbox_grace`, leaves them alone),
//! the messages are sent, and the sent ones are marked `queued` by another
//! statement. A queue that stalls holds up only this run, never the rows'
//! other writers (the API, the worker, a cancel).

use chrono::Duration;

use super::Scheduler;
use crate::db::{Conn, DbError};
use crate::enqueue;
use crate::job::Job;
use crate::job_columns;
use crate::queue::MAX_DELAY;

pub(super) async fn run(s: &Scheduler) -> Result<u64, DbError> {
    let now = s.clock.now();
    let horizon = now + Duration::from_std(MAX_DELAY).unwrap_or_default();
    let settled = now - Duration::from_std(s.config.outbox_grace).unwrap_or_default();
    let rows = Conn::get(s.store.pool())
        .await?
        .query(
            concat!(
                "UPDATE jobs SET updated_at = $4 WHERE id = ANY(ARRAY( \
                   SELECT id FROM jobs WHERE status = 'pending' AND run_at <= $1 \
                     AND updated_at <= $2 \
                   ORDER BY run_at LIMIT $3 FOR UPDATE SKIP LOCKED)) \
                 AND status = 'pending' \
                 RETURNING ",
                job_columns!()
            ),
            &[&horizon, &settled, &s.config.batch_limit, &now],
        )
        .await?;
    let jobs: Vec<Job> = rows.iter().map(Job::from_row).collect::<Result<_, _>>()?;
    if jobs.is_empty() {
        return Ok(0);
    }
    let refs: Vec<&Job> = jobs.iter().collect();
    // What the queue refuses stays pending and is tried again once settled.
    let sent = enqueue::send_jobs(&s.store, &*s.queue, &refs, now).await?;
    if let Some(e) = &sent.error {
        tracing::warn!(error = %e, unsent = sent.deferred.len(), "outbox: queue refused some messages");
    }
    Ok(sent.sent.len() as u64)
}

/// `queued → pending` for jobs due longer ago than `lost_message_after`
/// that nobody claimed, so [`run`] sends them a fresh message (parked jobs
/// have no message on purpose and are left alone). Returns how many.
pub(super) async fn resend_lost(s: &Scheduler) -> Result<u64, DbError> {
    let now = s.clock.now();
    let lost = now - Duration::from_std(s.config.lost_message_after).unwrap_or_default();
    let settled = now - Duration::from_std(s.config.outbox_grace).unwrap_or_default();
    let rows = Conn::get(s.store.pool())
        .await?
        .query(
            "UPDATE jobs SET status = 'pending', enqueued_at = NULL, updated_at = $3 \
             WHERE id = ANY(ARRAY( \
               SELECT id FROM jobs WHERE status = 'queued' AND parked_at IS NULL \
                 AND run_at < $1 AND coalesce(enqueued_at, run_at) < $1 \
               LIMIT $2 FOR UPDATE SKIP LOCKED)) \
             AND status = 'queued' AND parked_at IS NULL \
             RETURNING id",
            &[&lost, &s.config.batch_limit, &settled],
        )
        .await?;
    if !rows.is_empty() {
        tracing::warn!(
            jobs = rows.len(),
            "queued jobs long past due were never delivered: their messages are sent again"
        );
    }
    Ok(rows.len() as u64)
}
