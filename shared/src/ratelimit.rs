//! Token buckets in Postgres (`rate_limits`), shared by every worker and API
//! instance: one row per key (`apollo:<workspace>`, `create:<user>`), refilled
//! continuously from the time elapsed since its last take.

use std::time::Duration;

use deadpool_postgres::GenericClient;

use crate::db::DbError;

/// Takes `n` tokens from bucket `key`, creating it full when absent. One
/// statement, so concurrent takers cannot overdraw it. `false`: not enough
/// tokens (nothing is taken).
pub async fn take(
    db: &impl GenericClient,
    key: &str,
    capacity: f64,
    per_second: f64,
    n: f64,
) -> Result<bool, DbError> {
    let row = {
        let stmt = db.prepare_cached("INSERT INTO rate_limits AS r (key, tokens, capacity, refill_per_sec, updated_at) \
             SELECT $1::text, $2::float8 - $4::float8, $2::float8, $3::float8, clock_timestamp() \
             WHERE $4::float8 <= $2::float8 \
             ON CONFLICT (key) DO UPDATE SET \
               tokens = least(r.capacity, r.tokens + extract(epoch FROM clock_timestamp() - r.updated_at) \
                 * r.refill_per_sec) - $4, \
               capacity = EXCLUDED.capacity, refill_per_sec = EXCLUDED.refill_per_sec, \
               updated_at = clock_timestamp() \
             WHERE least(r.capacity, r.tokens + extract(epoch FROM clock_timestamp() - r.updated_at) \
                 * r.refill_per_sec) >= $4 \
             RETURNING tokens").await?;
        db.query_opt(&stmt, &[&key, &capacity, &per_second, &n])
            .await?
    };
    Ok(row.is_some())
}

/// How long until one token is back, for a snooze delay.
pub fn wait_for_token(per_second: f64) -> Duration {
    if per_second <= 0.0 {
        Duration::from_secs(60)
    } else {
        Duration::from_secs_f64((1.0 / per_second).clamp(0.1, 900.0))
    }
}

/// How long until bucket `key` holds `n` tokens again (zero if it already
/// does, or does not exist).
pub async fn wait_for(db: &impl GenericClient, key: &str, n: f64) -> Result<Duration, DbError> {
    let row = {
        let stmt = db.prepare_cached("SELECT least(capacity, tokens + extract(epoch FROM clock_timestamp() - updated_at) \
               * refill_per_sec)::float8, refill_per_sec FROM rate_limits WHERE key = $1").await?;
        db.query_opt(&stmt, &[&key]).await?
    };
    Ok(match row {
        None => Duration::ZERO,
        Some(r) => {
            let (have, rate): (f64, f64) = (r.get(0), r.get(1));
            if have >= n {
                Duration::ZERO
            } else if rate <= 0.0 {
                Duration::from_secs(3600)
            } else {
                Duration::from_secs_f64(((n - have) / rate).min(86_400.0))
            }
        }
    })
}

/// Returns `n` tokens taken from bucket `key` (up to its capacity), for a
/// request that took them and was then refused for another reason.
pub async fn give_back(db: &impl GenericClient, key: &str, n: f64) -> Result<(), DbError> {
    let stmt = db
        .prepare_cached(
            "UPDATE rate_limits SET tokens = least(capacity, tokens + $2::float8) WHERE key = $1",
        )
        .await?;
    db.execute(&stmt, &[&key, &n]).await?;
    Ok(())
}
