//! Helpers of the worker Lambda that tests call directly.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Turns Lambda's deadline (milliseconds since the epoch) into an `Instant`.
pub fn deadline_instant(deadline_ms: u64) -> tokio::time::Instant {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    tokio::time::Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}
