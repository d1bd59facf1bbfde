//! Creation limits (DESIGN.md "Tiers"): at most N unfinished jobs per
//! workspace, and hourly creation budgets per user and per workspace, kept
//! in Postgres token buckets shared by every API instance. A batch counts
//! each job it makes, and a job each child its payload asks for (a
//! `fan_out`'s); over a limit the answer is 429 with `Retry-After` and
//! nothing is created.

use axum::http::StatusCode;

use super::error::ApiError;
use super::extract::Member;
use crate::db::DbError;
use crate::ratelimit;
use crate::workspace::Tier;
use deadpool_postgres::Object;

/// Per-workspace hourly creation budget when not overridden: ten users' worth.
fn workspace_hourly(tier: Tier) -> Option<i64> {
    tier.limits().max_created_per_user_hour.map(|n| n * 10)
}

fn too_many(detail: String, retry_after_secs: u64) -> ApiError {
    ApiError {
        retry_after: Some(retry_after_secs.max(1)),
        ..ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
            detail,
        )
    }
}

/// Admits the creation of `n` jobs by `member`, or refuses all of them.
///
/// It runs on the caller's connection: taking a second one from the pool
/// while holding the first would let a burst of requests hold every
/// connection and wait for one more.
pub async fn admit(db: &Object, member: &Member, n: usize) -> Result<(), ApiError> {
    let stmt = db
        .prepare_cached(
            "SELECT tier, max_created_per_user_hour, max_unfinished, max_created_per_hour, unfinished \
             FROM workspaces WHERE id = $1",
        )
        .await
        .map_err(DbError::from)?;
    let row = db
        .query_opt(&stmt, &[&member.workspace.0])
        .await
        .map_err(DbError::from)?
        .ok_or_else(|| ApiError::not_found("workspace"))?;
    let tier: Tier = row.get::<_, &str>(0).parse().unwrap_or_default();
    if tier == Tier::Unlimited {
        return Ok(());
    }
    let base = tier.limits();
    let over = |i: usize, d: Option<i64>| row.get::<_, Option<i32>>(i).map(i64::from).or(d);
    let per_user = over(1, base.max_created_per_user_hour);
    let max_unfinished = over(2, base.max_unfinished);
    let per_workspace = over(3, workspace_hourly(tier));
    let unfinished = i64::from(row.get::<_, i32>(4));
    let n_i = n as i64;

    if let Some(max) = max_unfinished {
        if unfinished + n_i > max {
            return Err(too_many(
                format!(
                    "the workspace has {unfinished} unfinished jobs and may have at most {max}; \
                     wait for some to finish"
                ),
                30,
            ));
        }
    }
    let buckets = [
        per_user.map(|cap| {
            (
                format!("create:user:{}:{}", member.workspace, member.user),
                cap,
                "you",
            )
        }),
        per_workspace.map(|cap| {
            (
                format!("create:workspace:{}", member.workspace),
                cap,
                "this workspace",
            )
        }),
    ];
    let mut taken: Vec<String> = Vec::new();
    for (key, cap, who) in buckets.into_iter().flatten() {
        if n_i > cap {
            for k in &taken {
                ratelimit::give_back(db, k, n as f64).await?;
            }
            return Err(too_many(
                format!("{n} jobs is more than {who} may create in an hour ({cap})"),
                3600,
            ));
        }
        let (capacity, per_sec) = (cap as f64, cap as f64 / 3600.0);
        if !ratelimit::take(db, &key, capacity, per_sec, n as f64).await? {
            let wait = ratelimit::wait_for(db, &key, n as f64).await?;
            for k in &taken {
                ratelimit::give_back(db, k, n as f64).await?;
            }
            return Err(too_many(
                format!(
                    "{who} may create {cap} jobs per hour; try again in {} s",
                    wait.as_secs().max(1)
                ),
                wait.as_secs_f64().ceil() as u64,
            ));
        }
        taken.push(key);
    }
    Ok(())
}
