//! Deletes finished jobs (and their logs, by cascade) older than the
//! retention period, in bounded batches.

use chrono::Duration;

use super::Scheduler;
use crate::db::DbError;

/// At most this many batches per run, so one run stays short.
const MAX_BATCHES: usize = 10;

pub(super) async fn run(s: &Scheduler) -> Result<u64, DbError> {
    let before = s.clock.now() - Duration::from_std(s.config.retention).unwrap_or_default();
    let mut total = 0;
    for _ in 0..MAX_BATCHES {
        let n = s.store.prune(before, s.config.batch_limit).await?;
        total += n;
        if (n as i64) < s.config.batch_limit {
            break;
        }
    }
    Ok(total)
}
