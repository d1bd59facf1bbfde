//! The backstop for parked jobs: a workspace with parked jobs and free slots
//! whose running count has not moved for a while lost a wake-up (a slot was
//! freed by a path that takes no parked job: a rescue, a dead-lettered
//! message, a limit raised). Its parked jobs are released into the free
//! slots by message. Each release counts as a repair: in a healthy system it
//! stays at zero.

use chrono::Duration;

use super::Scheduler;
use crate::db::DbError;
use crate::enqueue;
use crate::job::Job;
use crate::workspace::LimitCache;

pub(super) async fn run(s: &Scheduler) -> Result<u64, DbError> {
    let now = s.clock.now();
    let quiet = now - Duration::from_std(s.config.release_grace).unwrap_or_default();
    let parked = s.store.parked_workspaces(s.config.batch_limit).await?;
    let stale: Vec<_> = parked
        .into_iter()
        .filter(|p| p.slots_changed_at <= quiet)
        .collect();
    if stale.is_empty() {
        return Ok(0);
    }
    let ids: Vec<_> = stale.iter().map(|p| p.id).collect();
    // Limits read now, not cached: a limit just raised is what frees slots.
    let limits = LimitCache::default()
        .max_running(s.store.pool(), &ids)
        .await?;
    let free: Vec<_> = limits
        .into_iter()
        .filter(|(ws, max)| stale.iter().any(|p| p.id == *ws && p.running < *max))
        .collect();
    if free.is_empty() {
        return Ok(0);
    }
    let released = s.store.release_parked(&free, now).await?;
    if !released.is_empty() {
        let refs: Vec<&Job> = released.iter().collect();
        let sent = enqueue::send_jobs(&s.store, &*s.queue, &refs, now).await?;
        if let Some(e) = sent.error {
            tracing::warn!(error = %e, "release: queue refused some messages; the outbox will send them");
        }
        tracing::warn!(
            jobs = released.len(),
            workspaces = free.len(),
            "parked jobs released by the backstop (a slot was freed without taking them)"
        );
    }
    Ok(released.len() as u64)
}
