//! `GET /api/workspaces/{ws}/stats`: what an operator's dashboard shows.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, DurationRound, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Problem};
use super::extract::{Bounded, Member, Params, WsPath};
use super::AppState;
use crate::db::DbError;

/// p50 / p95 / p99 of a duration, in milliseconds (null with no samples).
#[derive(Serialize, ToSchema, Default)]
pub struct Percentiles {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    pub samples: i64,
}

/// Jobs waiting (pending or queued) and running in one minute, as the
/// scheduler sampled them.
#[derive(Serialize, ToSchema)]
pub struct Depth {
    pub minute: DateTime<Utc>,
    pub waiting: i64,
    pub running: i64,
}

/// Jobs of one type finished within the window.
#[derive(Serialize, ToSchema, Default)]
pub struct TypeCounts {
    pub completed: i64,
    pub dead: i64,
    pub cancelled: i64,
}

/// One minute of finished jobs.
#[derive(Serialize, ToSchema)]
pub struct Minute {
    pub minute: DateTime<Utc>,
    pub completed: i64,
    /// Jobs that ended `dead` in that minute.
    pub failed: i64,
}

#[derive(Serialize, ToSchema)]
pub struct Stats {
    /// Jobs by status, every status present: `pending`, `queued` and
    /// `running` as they are now; `completed`, `cancelled` and `dead` among
    /// jobs finished within the window.
    pub by_status: BTreeMap<String, i64>,
    /// Unfinished jobs by queue, then by status (`pending`, `queued`, `running`).
    pub by_queue: BTreeMap<String, BTreeMap<String, i64>>,
    /// Jobs finished within the window, by job type.
    pub by_type: BTreeMap<String, TypeCounts>,
    /// Waiting and running jobs per minute over the last hour, oldest first, sampled by
    /// the scheduler; minutes with none are left out.
    pub depth: Vec<Depth>,
    /// Completed and failed per minute over the last hour, oldest first; minutes with none are left out.
    pub throughput: Vec<Minute>,
    /// Failed / (completed + failed) among jobs finished in the window (null with none).
    pub failure_rate: Option<f64>,
    /// Created to first started, for jobs finished in the window.
    pub wait_ms: Percentiles,
    /// Started to finished, for jobs finished in the window.
    pub run_ms: Percentiles,
    pub window_seconds: i64,
}

/// The query of `GET …/stats`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StatsParams {
    /// Seconds back for finished counts, rates and percentiles, default 3600
    #[param(value_type = Option<u32>, minimum = 60, maximum = 86400)]
    window: Option<Bounded<60, 86_400>>,
}

#[utoipa::path(get, path = "/api/workspaces/{ws}/stats", operation_id = "stats", tag = "stats",
    params(WsPath, StatsParams),
    responses(
        (status = 200, description = "Counts, throughput, failure rate and latency percentiles", body = Stats),
        (status = 400, description = "Bad window", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn stats(
    State(state): State<AppState>,
    member: Member,
    Params(q): Params<StatsParams>,
) -> Result<Json<Stats>, ApiError> {
    let window = q.window.map_or(3600, |w| w.0);
    let now = state.clock.now();
    let since = now - chrono::Duration::seconds(window);
    let hour = now - chrono::Duration::hours(1);
    let ws = member.workspace.0;
    let db = state.db().await?;

    let mut by_status: BTreeMap<String, i64> = crate::job::JobStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), 0))
        .collect();
    let mut by_queue: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for q in crate::job::QueueName::WORK {
        by_queue.insert(
            q.as_str().into(),
            ["pending", "queued", "running"]
                .iter()
                .map(|s| (s.to_string(), 0))
                .collect(),
        );
    }
    // Waiting and running jobs from the counts the triggers keep (V9): no
    // scan of the workspace's history; finished ones within the window, below.
    let rows = db
        .query(
            "SELECT status, queue, n FROM workspace_job_counts WHERE workspace_id = $1",
            &[&ws],
        )
        .await
        .map_err(DbError::from)?;
    for r in rows {
        let (status, queue, n): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
        *by_status.entry(status.clone()).or_default() += n;
        if let Some(per) = by_queue.get_mut(&queue) {
            if let Some(c) = per.get_mut(&status) {
                *c += n;
            }
        }
    }

    // Finished jobs, throughput and latencies from the per-minute rollups
    // (V11, written by the statements that finish the jobs since V18) and
    // the log rows the release before V18 wrote that the scheduler has not
    // folded yet: a day's window reads at most 1 440 minutes of rows,
    // however many jobs ran in them. Whole minutes: the window starts at the
    // beginning of the minute `since` falls in.
    let since_minute = minute_floor(since);
    let hour_minute = minute_floor(hour);
    let first = since_minute.min(hour_minute);
    let rows = db
        .query(
            "SELECT minute, job_type, sum(c)::bigint, sum(d)::bigint, sum(x)::bigint FROM ( \
               SELECT minute, job_type, completed AS c, dead AS d, cancelled AS x \
               FROM job_stats_minutes WHERE workspace_id = $1 AND minute >= $2 \
               UNION ALL \
               SELECT minute, job_type, count(*) FILTER (WHERE status = 'completed'), \
                      count(*) FILTER (WHERE status = 'dead'), \
                      count(*) FILTER (WHERE status = 'cancelled') \
               FROM job_stats_log WHERE workspace_id = $1 AND minute >= $2 GROUP BY 1, 2 \
             ) r GROUP BY 1, 2 ORDER BY 1",
            &[&ws, &first],
        )
        .await
        .map_err(DbError::from)?;
    let mut throughput: Vec<Minute> = Vec::new();
    let mut by_type: BTreeMap<String, TypeCounts> = BTreeMap::new();
    let (mut completed, mut dead, mut cancelled) = (0_i64, 0_i64, 0_i64);
    for r in rows {
        let (minute, job_type): (DateTime<Utc>, String) = (r.get(0), r.get(1));
        let (c, d, x): (i64, i64, i64) = (r.get(2), r.get(3), r.get(4));
        if minute >= since_minute {
            completed += c;
            dead += d;
            cancelled += x;
            let t = by_type.entry(job_type).or_default();
            t.completed += c;
            t.dead += d;
            t.cancelled += x;
        }
        if minute >= hour_minute && c + d > 0 {
            match throughput.last_mut() {
                Some(m) if m.minute == minute => {
                    m.completed += c;
                    m.failed += d;
                }
                _ => throughput.push(Minute {
                    minute,
                    completed: c,
                    failed: d,
                }),
            }
        }
    }
    for (status, n) in [
        ("completed", completed),
        ("dead", dead),
        ("cancelled", cancelled),
    ] {
        by_status.insert(status.into(), n);
    }

    let rows = db
        .query(
            "SELECT kind, bucket, sum(n)::bigint FROM ( \
               SELECT kind, bucket, n FROM job_latency_minutes \
               WHERE workspace_id = $1 AND kind IN ('wait', 'run') AND minute >= $2 \
               UNION ALL \
               SELECT 'wait', wait_bucket, count(*) FROM job_stats_log \
               WHERE workspace_id = $1 AND minute >= $2 AND wait_bucket IS NOT NULL \
               GROUP BY 2 \
               UNION ALL \
               SELECT 'run', run_bucket, count(*) FROM job_stats_log \
               WHERE workspace_id = $1 AND minute >= $2 AND run_bucket IS NOT NULL \
               GROUP BY 2 \
             ) r GROUP BY 1, 2 ORDER BY 1, 2",
            &[&ws, &since_minute],
        )
        .await
        .map_err(DbError::from)?;
    let (mut wait, mut run) = (Vec::new(), Vec::new());
    for r in rows {
        let (kind, bucket, n): (String, i16, i64) = (r.get(0), r.get(1), r.get(2));
        if kind == "wait" { &mut wait } else { &mut run }.push((bucket, n));
    }
    let depth = db
        .query(
            "SELECT minute, waiting, running FROM workspace_depth_minutes \
             WHERE workspace_id = $1 AND minute >= $2 ORDER BY minute",
            &[&ws, &hour_minute],
        )
        .await
        .map_err(DbError::from)?
        .iter()
        .map(|r| Depth {
            minute: r.get(0),
            waiting: r.get(1),
            running: r.get(2),
        })
        .collect();
    Ok(Json(Stats {
        by_status,
        by_queue,
        by_type,
        depth,
        throughput,
        failure_rate: (completed + dead > 0).then(|| dead as f64 / (completed + dead) as f64),
        wait_ms: percentiles(&wait),
        run_ms: percentiles(&run),
        window_seconds: window,
    }))
}

fn minute_floor(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(chrono::Duration::minutes(1)).unwrap_or(t)
}

/// The duration a latency bucket stands for, in ms: bucket 0 holds
/// everything under 1 ms, bucket b >= 1 holds [1.1^(b-1), 1.1^b) and stands
/// for its geometric middle, so the figure is within 5 % of any duration in
/// it (`latency_bucket` in migration V11).
fn bucket_ms(bucket: i16) -> f64 {
    if bucket <= 0 {
        0.5
    } else {
        1.1_f64.powf(f64::from(bucket) - 0.5)
    }
}

/// Nearest-rank percentiles of a histogram given as (bucket, count) in
/// bucket order.
fn percentiles(hist: &[(i16, i64)]) -> Percentiles {
    let samples: i64 = hist.iter().map(|(_, n)| n).sum();
    if samples == 0 {
        return Percentiles::default();
    }
    let at = |p: f64| -> Option<f64> {
        let rank = ((p * samples as f64).ceil() as i64).max(1);
        let mut seen = 0;
        hist.iter().find_map(|&(bucket, n)| {
            seen += n;
            (seen >= rank).then(|| round(bucket_ms(bucket)))
        })
    };
    Percentiles {
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
        samples,
    }
}

fn round(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank_of_the_histogram() {
        // 90 samples near 10 ms (bucket 25), 8 near 100 ms, 2 near 1 s.
        let p = percentiles(&[(25, 90), (49, 8), (73, 2)]);
        assert_eq!(p.samples, 100);
        let (p50, p95, p99) = (p.p50.unwrap(), p.p95.unwrap(), p.p99.unwrap());
        assert!((9.5..10.5).contains(&p50), "{p50}");
        assert!((95.0..105.0).contains(&p95), "{p95}");
        assert!((950.0..1050.0).contains(&p99), "{p99}");
        assert_eq!(percentiles(&[]).p50, None);
        assert_eq!(percentiles(&[(0, 3)]).p99, Some(0.5));
    }
}
