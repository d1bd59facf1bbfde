//! The outbox: sends every `pending` job that is due (within the queues'
//! maximum delay) and has no message: created while the queue was down,
//! delayed beyond 15 minutes, rescued, handed off, or manually retried.

use chrono::Duration;

use super::Scheduler;
use crate::db::DbError;
use crate::enqueue;
use crate::job::Job;
use crate::job_columns;
use crate::queue::MAX_DELAY;

pub(super) async fn run(s: &Scheduler) -> Result<u64, DbError> {
    let now = s.clock.now();
    let horizon = now + Duration::from_std(MAX_DELAY).unwrap_or_default();
    let settled = now - Duration::from_std(s.config.outbox_grace).unwrap_or_default();
    let mut db = s.store.pool().get().await?;
    // The rows stay locked until their messages are sent and they are
    // marked `queued`, so an overlapping run skips them instead of sending
    // them twice.
    let tx = db.transaction().await?;
    let rows = tx
        .query(
            concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE status = 'pending' AND run_at <= $1 AND updated_at <= $2 \
                 ORDER BY run_at LIMIT $3 FOR UPDATE SKIP LOCKED"
            ),
            &[&horizon, &settled, &s.config.batch_limit],
        )
        .await?;
    let jobs: Vec<Job> = rows.iter().map(Job::from_row).collect::<Result<_, _>>()?;
    if jobs.is_empty() {
        return Ok(0);
    }
    let refs: Vec<&Job> = jobs.iter().collect();
    let sent = enqueue::send_messages(&*s.queue, &refs, now).await;
    if let Some(e) = &sent.error {
        tracing::warn!(error = %e, unsent = sent.deferred.len(), "outbox: queue refused some messages");
    }
    crate::store::mark_enqueued_on(&tx, &sent.sent, now).await?;
    tx.commit().await?;
    Ok(sent.sent.len() as u64)
}
