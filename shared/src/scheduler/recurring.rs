//! Enqueues due recurring schedules: one job per due schedule, however many
//! runs it missed, then sends them.

use super::Scheduler;
use crate::db::DbError;
use crate::enqueue;
use crate::job::Job;
use crate::schedule;

pub(super) async fn run(s: &Scheduler) -> Result<u64, DbError> {
    let now = s.clock.now();
    let mut db = s.store.pool().get().await?;
    let jobs = schedule::fire_due(&mut db, &s.store, now, s.config.batch_limit).await?;
    drop(db);
    if !jobs.is_empty() {
        let refs: Vec<&Job> = jobs.iter().collect();
        // The jobs are committed; what the queue refuses, the outbox sends.
        let sent = enqueue::send_jobs(&s.store, &*s.queue, &refs, now).await?;
        if let Some(e) = sent.error {
            tracing::warn!(error = %e, "recurring: queue refused some messages");
        }
    }
    Ok(jobs.len() as u64)
}
