//! Recurring jobs: a cron expression in a time zone and a job template. The
//! scheduler's `recurring` duty turns each due schedule into one job; a
//! schedule that missed several runs (the scheduler was down) runs once, not
//! once per missed run.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use crate::db::DbError;
use crate::ids::{JobId, UserId, WorkspaceId};
use crate::job::QueueName;
use crate::store::NewJob;

/// A recurring job as stored and as the API returns it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Schedule {
    pub id: Uuid,
    pub workspace_id: WorkspaceId,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    #[serde(rename = "type")]
    pub job_type: String,
    pub payload: Value,
    pub queue: QueueName,
    pub priority: i16,
    pub max_attempts: i32,
    pub tags: Vec<String>,
    pub enabled: bool,
    pub next_run_at: DateTime<Utc>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip)]
    pub created_by: Option<UserId>,
}

/// The columns [`Schedule::from_row`] reads.
pub const COLUMNS: &str = "id, workspace_id, name, cron, timezone, job_type, payload, queue, \
    priority, max_attempts, tags, enabled, next_run_at, last_run_at, created_at, updated_at, created_by";

impl Schedule {
    pub fn from_row(r: &Row) -> Result<Schedule, tokio_postgres::Error> {
        Ok(Schedule {
            id: r.try_get("id")?,
            workspace_id: WorkspaceId(r.try_get("workspace_id")?),
            name: r.try_get("name")?,
            cron: r.try_get("cron")?,
            timezone: r.try_get("timezone")?,
            job_type: r.try_get("job_type")?,
            payload: r.try_get("payload")?,
            queue: r.try_get::<_, &str>("queue")?.parse().unwrap_or_default(),
            priority: r.try_get("priority")?,
            max_attempts: r.try_get("max_attempts")?,
            tags: r.try_get("tags")?,
            enabled: r.try_get("enabled")?,
            next_run_at: r.try_get("next_run_at")?,
            last_run_at: r.try_get("last_run_at")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
            created_by: r.try_get::<_, Option<Uuid>>("created_by")?.map(UserId),
        })
    }

    /// The job this schedule makes for its run due at `due`. The
    /// idempotency key names the run, so a run is never made twice.
    pub fn job_for(&self, due: DateTime<Utc>, now: DateTime<Utc>) -> NewJob {
        NewJob {
            id: JobId::new(),
            workspace_id: self.workspace_id,
            created_by: self.created_by,
            job_type: self.job_type.clone(),
            queue: self.queue,
            priority: self.priority,
            payload: self.payload.clone(),
            max_attempts: self.max_attempts,
            run_at: now,
            idempotency_key: Some(format!("schedule:{}:{}", self.id, due.timestamp())),
            tags: self.tags.clone(),
            parent: None,
        }
    }
}

/// A parsed cron expression with its time zone.
#[derive(Clone, Debug)]
pub struct Recurrence {
    cron: Cron,
    tz: Tz,
}

impl Recurrence {
    /// Parses a five-field cron expression (or an alias such as `@daily`)
    /// and an IANA time zone name.
    pub fn parse(cron: &str, timezone: &str) -> Result<Recurrence, String> {
        let tz = Tz::from_str(timezone).map_err(|_| {
            format!("unknown time zone {timezone:?}; use an IANA name such as Europe/Paris or UTC")
        })?;
        let parsed = Cron::from_str(cron.trim())
            .map_err(|e| format!("invalid cron expression {cron:?}: {e}"))?;
        Ok(Recurrence { cron: parsed, tz })
    }

    /// The first run strictly after `after`, computed in the schedule's time
    /// zone (so "0 2 * * *" stays at 02:00 local across DST changes).
    pub fn next_after(&self, after: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.tz), false)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| format!("the cron expression never runs again: {e}"))
    }
}

/// Takes up to `limit` due schedules, locked (`SKIP LOCKED`, so overlapping
/// scheduler runs take different ones), and within the same transaction
/// inserts one job for each and moves its `next_run_at` past `now`. Returns
/// the jobs inserted (already committed), for the caller to send.
pub async fn fire_due(
    db: &mut deadpool_postgres::Object,
    store: &crate::store::Store,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<crate::Job>, DbError> {
    let tx = db.transaction().await?;
    let rows = tx
        .query(
            &format!(
                "SELECT {COLUMNS} FROM schedules WHERE enabled AND next_run_at <= $1 \
                 ORDER BY next_run_at LIMIT $2 FOR UPDATE SKIP LOCKED"
            ),
            &[&now, &limit],
        )
        .await?;
    let mut jobs = Vec::new();
    for row in &rows {
        let s = Schedule::from_row(row)?;
        let next = Recurrence::parse(&s.cron, &s.timezone).and_then(|r| r.next_after(now));
        match next {
            Ok(next) => {
                let inserted = store
                    .insert(&tx, &[s.job_for(s.next_run_at, now)], now)
                    .await?;
                jobs.extend(inserted.into_iter().filter(|(_, new)| *new).map(|(j, _)| j));
                tx.execute(
                    "UPDATE schedules SET next_run_at = $2, last_run_at = $3, updated_at = $3 \
                     WHERE id = $1",
                    &[&s.id, &next, &now],
                )
                .await?;
            }
            Err(e) => {
                // Stored schedules were validated when saved; one that can no
                // longer be computed is switched off rather than retried forever.
                tracing::error!(schedule_id = %s.id, workspace_id = %s.workspace_id, error = %e,
                    "disabling a schedule that cannot run");
                tx.execute(
                    "UPDATE schedules SET enabled = false, updated_at = $2 WHERE id = $1",
                    &[&s.id, &now],
                )
                .await?;
            }
        }
    }
    tx.commit().await?;
    Ok(jobs)
}

/// Fields of a schedule a client sets.
#[derive(Clone, Debug)]
pub struct ScheduleSpec {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub job_type: String,
    pub payload: Value,
    pub queue: QueueName,
    pub priority: i16,
    pub max_attempts: i32,
    pub tags: Vec<String>,
    pub enabled: bool,
}

/// Creates a schedule; `next_run_at` is the first run after `now`.
pub async fn create(
    db: &impl GenericClient,
    workspace: WorkspaceId,
    created_by: Option<UserId>,
    spec: &ScheduleSpec,
    now: DateTime<Utc>,
) -> Result<Result<Schedule, String>, DbError> {
    let next = match Recurrence::parse(&spec.cron, &spec.timezone).and_then(|r| r.next_after(now)) {
        Ok(n) => n,
        Err(e) => return Ok(Err(e)),
    };
    let row = db
        .query_one(
            &format!(
                "INSERT INTO schedules (id, workspace_id, name, cron, timezone, job_type, payload, \
                   queue, priority, max_attempts, tags, enabled, next_run_at, created_by, \
                   created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $15) \
                 RETURNING {COLUMNS}"
            ),
            &[
                &Uuid::now_v7(),
                &workspace.0,
                &spec.name,
                &spec.cron,
                &spec.timezone,
                &spec.job_type,
                &spec.payload,
                &spec.queue.as_str(),
                &spec.priority,
                &spec.max_attempts,
                &spec.tags,
                &spec.enabled,
                &next,
                &created_by.map(|u| u.0),
                &now,
            ],
        )
        .await?;
    Ok(Ok(Schedule::from_row(&row)?))
}

/// Replaces a schedule's fields; `next_run_at` is recomputed from `now`.
/// `Ok(None)`: no such schedule in the workspace.
pub async fn update(
    db: &impl GenericClient,
    workspace: WorkspaceId,
    id: Uuid,
    spec: &ScheduleSpec,
    now: DateTime<Utc>,
) -> Result<Result<Option<Schedule>, String>, DbError> {
    let next = match Recurrence::parse(&spec.cron, &spec.timezone).and_then(|r| r.next_after(now)) {
        Ok(n) => n,
        Err(e) => return Ok(Err(e)),
    };
    let row = db
        .query_opt(
            &format!(
                "UPDATE schedules SET name = $3, cron = $4, timezone = $5, job_type = $6, \
                   payload = $7, queue = $8, priority = $9, max_attempts = $10, tags = $11, \
                   enabled = $12, next_run_at = $13, updated_at = $14 \
                 WHERE id = $1 AND workspace_id = $2 RETURNING {COLUMNS}"
            ),
            &[
                &id,
                &workspace.0,
                &spec.name,
                &spec.cron,
                &spec.timezone,
                &spec.job_type,
                &spec.payload,
                &spec.queue.as_str(),
                &spec.priority,
                &spec.max_attempts,
                &spec.tags,
                &spec.enabled,
                &next,
                &now,
            ],
        )
        .await?;
    Ok(Ok(row.as_ref().map(Schedule::from_row).transpose()?))
}

pub async fn get(
    db: &impl GenericClient,
    workspace: WorkspaceId,
    id: Uuid,
) -> Result<Option<Schedule>, DbError> {
    let row = db
        .query_opt(
            &format!("SELECT {COLUMNS} FROM schedules WHERE id = $1 AND workspace_id = $2"),
            &[&id, &workspace.0],
        )
        .await?;
    Ok(row.as_ref().map(Schedule::from_row).transpose()?)
}

pub async fn list(
    db: &impl GenericClient,
    workspace: WorkspaceId,
) -> Result<Vec<Schedule>, DbError> {
    let rows = db
        .query(
            &format!(
                "SELECT {COLUMNS} FROM schedules WHERE workspace_id = $1 ORDER BY created_at, id LIMIT 1000"
            ),
            &[&workspace.0],
        )
        .await?;
    Ok(rows
        .iter()
        .map(Schedule::from_row)
        .collect::<Result<_, _>>()?)
}

pub async fn delete(
    db: &impl GenericClient,
    workspace: WorkspaceId,
    id: Uuid,
) -> Result<bool, DbError> {
    Ok(db
        .execute(
            "DELETE FROM schedules WHERE id = $1 AND workspace_id = $2",
            &[&id, &workspace.0],
        )
        .await?
        == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn next_run_follows_the_schedules_time_zone() {
        let r = Recurrence::parse("0 2 * * *", "America/New_York").unwrap();
        let after = Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap();
        // 02:00 in New York in November (EST, UTC-5) is 07:00 UTC.
        assert_eq!(
            r.next_after(after).unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 26, 7, 0, 0).unwrap()
        );
        // In July (EDT, UTC-4) it is 06:00 UTC.
        let summer = Utc.with_ymd_and_hms(2026, 7, 1, 12, 0, 0).unwrap();
        assert_eq!(
            r.next_after(summer).unwrap(),
            Utc.with_ymd_and_hms(2026, 7, 2, 6, 0, 0).unwrap()
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_explained() {
        assert!(Recurrence::parse("61 * * * *", "UTC")
            .unwrap_err()
            .contains("invalid cron"));
        assert!(Recurrence::parse("* * * * *", "Mars/Olympus")
            .unwrap_err()
            .contains("time zone"));
        assert!(Recurrence::parse("@daily", "Europe/Paris").is_ok());
    }
}
