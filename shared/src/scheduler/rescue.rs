//! Rescues `running` jobs whose lease expired (their worker died or froze):
//! back to `pending` and sent a fresh message at once when attempts remain,
//! else `dead`.

use super::Scheduler;
use crate::db::DbError;
use crate::enqueue;
use crate::job::Job;

/// Returns (rescued and sent or left for the outbox, dead-lettered).
pub(super) async fn run(s: &Scheduler) -> Result<(u64, u64), DbError> {
    let now = s.clock.now();
    let rescued = s.store.rescue_expired(now, s.config.batch_limit).await?;
    if !rescued.requeued.is_empty() {
        let refs: Vec<&Job> = rescued.requeued.iter().collect();
        // What the queue refuses stays pending for the outbox's next run.
        let sent = enqueue::send_jobs(&s.store, &*s.queue, &refs, now).await?;
        if let Some(e) = sent.error {
            tracing::warn!(error = %e, "rescue: queue refused some messages");
        }
    }
    if rescued.cancelled > 0 {
        tracing::info!(
            cancelled = rescued.cancelled,
            "rescue: expired leases of cancelled jobs"
        );
    }
    Ok((rescued.requeued.len() as u64, rescued.dead))
}
