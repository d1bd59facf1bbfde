//! Recurring jobs: `/api/workspaces/{ws}/schedules`. Members read them;
//! admins create, change and delete them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, Problem};
use super::extract::{Ids, ItemPath, JsonBody, Member, WsPath};
use super::AppState;
use crate::schedule::{self, Schedule, ScheduleSpec};

/// A schedule as a client writes it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleBody {
    pub name: String,
    /// Five fields (minute hour day-of-month month day-of-week) or an alias like `@daily`.
    pub cron: String,
    /// IANA time zone the expression is read in; default `UTC`.
    #[serde(default = "utc")]
    pub timezone: String,
    #[serde(rename = "type")]
    pub job_type: String,
    #[serde(default = "empty")]
    #[schema(value_type = Object)]
    pub payload: Value,
    pub queue: Option<String>,
    pub priority: Option<i64>,
    pub max_attempts: Option<i64>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn utc() -> String {
    "UTC".into()
}
fn empty() -> Value {
    serde_json::json!({})
}
fn yes() -> bool {
    true
}

/// A schedule as the API returns it.
#[derive(Serialize, ToSchema)]
#[schema(as = Schedule)]
pub struct ScheduleView {
    pub id: Uuid,
    pub workspace_id: Uuid,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    #[serde(rename = "type")]
    pub job_type: String,
    #[schema(value_type = Object)]
    pub payload: Value,
    pub queue: String,
    pub priority: i16,
    pub max_attempts: i32,
    pub tags: Vec<String>,
    pub enabled: bool,
    pub next_run_at: chrono::DateTime<chrono::Utc>,
    /// The next five runs, `next_run_at` first (while the schedule is paused,
    /// those it would make once resumed).
    pub upcoming: Vec<chrono::DateTime<chrono::Utc>>,
    pub last_run_at: Option<chrono::DateTime<chrono::Utc>>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// How many runs `upcoming` lists.
const UPCOMING: usize = 5;

impl From<Schedule> for ScheduleView {
    fn from(s: Schedule) -> Self {
        let mut upcoming = vec![s.next_run_at];
        if let Ok(r) = schedule::Recurrence::parse(&s.cron, &s.timezone) {
            while upcoming.len() < UPCOMING {
                match r.next_after(upcoming[upcoming.len() - 1]) {
                    Ok(t) => upcoming.push(t),
                    Err(_) => break,
                }
            }
        }
        ScheduleView {
            upcoming,
            id: s.id,
            workspace_id: s.workspace_id.0,
            name: s.name,
            cron: s.cron,
            timezone: s.timezone,
            job_type: s.job_type,
            payload: s.payload,
            queue: s.queue.as_str().into(),
            priority: s.priority,
            max_attempts: s.max_attempts,
            tags: s.tags,
            enabled: s.enabled,
            next_run_at: s.next_run_at,
            last_run_at: s.last_run_at,
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ScheduleList {
    pub schedules: Vec<ScheduleView>,
}

fn spec(state: &AppState, member: &Member, b: ScheduleBody) -> Result<ScheduleSpec, ApiError> {
    let name = b.name.trim().to_string();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::invalid("name", "a name is 1 to 200 characters"));
    }
    let tpl = super::jobs::check_template(
        state,
        member.workspace,
        super::jobs::TemplateInput {
            job_type: &b.job_type,
            payload: &b.payload,
            queue: b.queue.as_deref(),
            priority: b.priority,
            max_attempts: b.max_attempts,
            tags: &b.tags,
        },
    )?;
    Ok(ScheduleSpec {
        name,
        cron: b.cron,
        timezone: b.timezone,
        job_type: b.job_type,
        payload: b.payload,
        queue: tpl.queue,
        priority: tpl.priority,
        max_attempts: tpl.max_attempts,
        tags: b.tags,
        enabled: b.enabled,
    })
}

/// Cron and time-zone errors name their field.
fn schedule_error(e: String) -> ApiError {
    let field = if e.contains("time zone") {
        "timezone"
    } else {
        "cron"
    };
    ApiError::invalid(field, e)
}

#[utoipa::path(get, path = "/api/workspaces/{ws}/schedules", operation_id = "list_schedules", tag = "schedules",
    params(WsPath),
    responses((status = 200, description = "The workspace's schedules, oldest first", body = ScheduleList),),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    member: Member,
) -> Result<Json<ScheduleList>, ApiError> {
    let db = state.db().await?;
    let schedules = schedule::list(&**db, member.workspace).await?;
    Ok(Json(ScheduleList {
        schedules: schedules.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(post, path = "/api/workspaces/{ws}/schedules", operation_id = "create_schedule", tag = "schedules",
    params(WsPath),
    request_body = ScheduleBody,
    responses((status = 201, description = "Created; `next_run_at` is its first run", body = ScheduleView),
              (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
              (status = 422, description = "Invalid field (cron, timezone, type, payload…)", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    member: Member,
    JsonBody(body): JsonBody<ScheduleBody>,
) -> Result<Response, ApiError> {
    member.require_admin()?;
    let spec = spec(&state, &member, body)?;
    let db = state.db().await?;
    let s = schedule::create(
        &**db,
        member.workspace,
        Some(member.user),
        &spec,
        state.clock.now(),
    )
    .await?
    .map_err(schedule_error)?;
    Ok((StatusCode::CREATED, Json(ScheduleView::from(s))).into_response())
}

#[utoipa::path(get, path = "/api/workspaces/{ws}/schedules/{id}", operation_id = "get_schedule", tag = "schedules",
    params(ItemPath),
    responses((status = 200, description = "The schedule", body = ScheduleView),
              (status = 404, description = "No such schedule", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn get_one(
    State(state): State<AppState>,
    member: Member,
    Ids(ItemPath { id, .. }): Ids<ItemPath>,
) -> Result<Json<ScheduleView>, ApiError> {
    let db = state.db().await?;
    schedule::get(&**db, member.workspace, id)
        .await?
        .map(|s| Json(s.into()))
        .ok_or_else(|| ApiError::not_found("schedule"))
}

#[utoipa::path(put, path = "/api/workspaces/{ws}/schedules/{id}", operation_id = "update_schedule", tag = "schedules",
    params(ItemPath),
    request_body = ScheduleBody,
    responses((status = 200, description = "Replaced; `next_run_at` recomputed", body = ScheduleView),
              (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such schedule", body = Problem, content_type = "application/problem+json"),
              (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn update(
    State(state): State<AppState>,
    member: Member,
    Ids(ItemPath { id, .. }): Ids<ItemPath>,
    JsonBody(body): JsonBody<ScheduleBody>,
) -> Result<Json<ScheduleView>, ApiError> {
    member.require_admin()?;
    let spec = spec(&state, &member, body)?;
    let db = state.db().await?;
    schedule::update(&**db, member.workspace, id, &spec, state.clock.now())
        .await?
        .map_err(schedule_error)?
        .map(|s| Json(s.into()))
        .ok_or_else(|| ApiError::not_found("schedule"))
}

#[utoipa::path(delete, path = "/api/workspaces/{ws}/schedules/{id}", operation_id = "delete_schedule", tag = "schedules",
    params(ItemPath),
    responses((status = 204, description = "Deleted; jobs it already made are kept"),
              (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such schedule", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    member: Member,
    Ids(ItemPath { id, .. }): Ids<ItemPath>,
) -> Result<StatusCode, ApiError> {
    member.require_admin()?;
    let db = state.db().await?;
    if schedule::delete(&**db, member.workspace, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("schedule"))
    }
}
