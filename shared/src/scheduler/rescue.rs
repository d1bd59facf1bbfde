//! Rescues `running` jobs whose lease expired (their worker died or froze):
//! back to the outbox when attempts remain, else `dead`.

use super::Scheduler;
use crate::db::DbError;
use crate::store::Rescued;

pub(super) async fn run(s: &Scheduler) -> Result<Rescued, DbError> {
    s.store
        .rescue_expired(s.clock.now(), s.config.batch_limit)
        .await
}
