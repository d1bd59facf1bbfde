//! `GET /api/workspaces/{ws}/stats`: what an operator's dashboard shows.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::extract::{query_number, Member};
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
    /// Completed and failed per minute over the last hour, oldest first; minutes with none are left out.
    pub throughput: Vec<Minute>,
    /// Failed / (completed + failed) among jobs finished in the window (null with none).
    pub failure_rate: Option<f64>,
    /// Created to started, for jobs started in the window.
    pub wait_ms: Percentiles,
    /// Started to finished, for jobs finished in the window.
    pub run_ms: Percentiles,
    pub window_seconds: i64,
}

#[utoipa::path(get, path = "/api/workspaces/{ws}/stats", tag = "stats",
    params(("ws" = uuid::Uuid, Path, description = "Workspace id"),
           ("window" = Option<u32>, Query, description = "Seconds back for rates and percentiles, 60..=86400, default 3600")),
    responses(
        (status = 200, description = "Counts, throughput, failure rate and latency percentiles", body = Stats),
        (status = 400, description = "Bad window", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such workspace for this user", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn stats(
    State(state): State<AppState>,
    member: Member,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Stats>, ApiError> {
    let window = query_number(&q, "window", 3600, 60..=86_400, " of seconds")?;
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

    // Finished jobs were created before they finished, so bounding
    // created_at by the retention-independent lower bound of a day before
    // the window keeps the scan on the (workspace, created_at) index.
    let created_floor = since.min(hour) - chrono::Duration::days(1);
    let throughput = db
        .query(
            "SELECT date_trunc('minute', finished_at) AS m, \
                    count(*) FILTER (WHERE status = 'completed'), \
                    count(*) FILTER (WHERE status = 'dead') \
             FROM jobs WHERE workspace_id = $1 AND created_at >= $3 AND finished_at >= $2 \
               AND status IN ('completed', 'dead') \
             GROUP BY 1 ORDER BY 1",
            &[&ws, &hour, &created_floor],
        )
        .await
        .map_err(DbError::from)?
        .iter()
        .map(|r| Minute {
            minute: r.get(0),
            completed: r.get(1),
            failed: r.get(2),
        })
        .collect();

    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'completed' AND finished_at >= $2), \
                    count(*) FILTER (WHERE status = 'dead' AND finished_at >= $2), \
                    count(*) FILTER (WHERE status = 'cancelled' AND finished_at >= $2), \
                    percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP ( \
                      ORDER BY extract(epoch FROM started_at - created_at) * 1000) \
                      FILTER (WHERE started_at >= $2), \
                    count(*) FILTER (WHERE started_at >= $2), \
                    percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP ( \
                      ORDER BY extract(epoch FROM finished_at - started_at) * 1000) \
                      FILTER (WHERE finished_at >= $2 AND started_at IS NOT NULL), \
                    count(*) FILTER (WHERE finished_at >= $2 AND started_at IS NOT NULL) \
             FROM jobs WHERE workspace_id = $1 AND created_at >= $3",
            &[&ws, &since, &created_floor],
        )
        .await
        .map_err(DbError::from)?;
    let (completed, dead, cancelled): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    for (status, n) in [
        ("completed", completed),
        ("dead", dead),
        ("cancelled", cancelled),
    ] {
        by_status.insert(status.into(), n);
    }
    let pct = |i: usize, n: usize| -> Percentiles {
        let v: Option<Vec<f64>> = row.get(i);
        let samples: i64 = row.get(n);
        match v {
            Some(v) if v.len() == 3 && samples > 0 => Percentiles {
                p50: Some(round(v[0])),
                p95: Some(round(v[1])),
                p99: Some(round(v[2])),
                samples,
            },
            _ => Percentiles::default(),
        }
    };
    Ok(Json(Stats {
        by_status,
        by_queue,
        throughput,
        failure_rate: (completed + dead > 0).then(|| dead as f64 / (completed + dead) as f64),
        wait_ms: pct(3, 4),
        run_ms: pct(5, 6),
        window_seconds: window,
    }))
}

fn round(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}
