//! Deletes finished jobs (and their logs, by cascade) older than the
//! retention period, in bounded batches, until none is left or the run's
//! time budget is spent: a fixed number of batches per run fell behind a
//! busy system (10 x 1 000 rows a minute is 170 jobs/s) and the table grew
//! without bound.

use chrono::Duration;

use super::Scheduler;
use crate::db::DbError;

/// How long the stats route's per-minute rollups are kept: its longest
/// window is a day.
const STATS_KEPT_DAYS: i64 = 2;

pub(super) async fn run(s: &Scheduler) -> Result<u64, DbError> {
    let before = s.clock.now() - Duration::from_std(s.config.retention).unwrap_or_default();
    let until = tokio::time::Instant::now() + s.config.prune_budget;
    // Larger batches than the other duties': each is one DELETE, and its
    // cost is the rows it deletes, not the statement.
    let batch = s.config.batch_limit.saturating_mul(5);
    s.store.drop_expired_watches().await?;
    // The stats log (rows of the release before V18) into its rollups
    // first: it is what keeps the stats route's read small.
    while s.store.fold_stats(batch).await? as i64 >= batch && tokio::time::Instant::now() < until {}
    s.store.sample_depth(s.clock.now()).await?;
    s.store
        .prune_stats(s.clock.now() - Duration::days(STATS_KEPT_DAYS))
        .await?;
    let mut total = 0;
    loop {
        let n = s.store.prune(before, batch).await?;
        total += n;
        if (n as i64) < batch || tokio::time::Instant::now() >= until {
            return Ok(total);
        }
    }
}
