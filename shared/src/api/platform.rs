//! Provisioning: `/api/workspaces` (a platform key creates, finds, changes
//! and deletes workspaces) and `/api/workspaces/{ws}/members` (a platform
//! key or a workspace admin adds, lists and removes members by the subject
//! their identity provider gives them).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Problem};
use super::extract::{Bounded, Ids, JsonBody, MemberAdmin, Params, Platform, WsPath};
use super::AppState;
use crate::auth::MAX_IDENTITY_CHARS;
use crate::ids::{UserId, WorkspaceId};
use crate::job::{Job, JobStatus};
use crate::platform::{self, LimitOverrides, WorkspaceRecord, PLATFORM_WORKSPACE};
use crate::store::NewJob;
use crate::workspace::{self, MemberRecord, Role, Tier};

/// `POST /api/workspaces`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWorkspace {
    /// 1 to 200 characters.
    pub name: String,
    /// `free`, `standard` (default), `enterprise` or `unlimited`.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "standard")]
    pub tier: Option<Tier>,
    /// The app's own id for the tenant (its organisation's id): creating
    /// with the same one again answers 200 with the existing workspace.
    #[serde(default)]
    pub external_id: Option<String>,
    #[serde(default)]
    pub limits: Option<LimitOverrides>,
}

/// `PATCH /api/workspaces/{ws}`: each field given replaces the stored one.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWorkspace {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "enterprise")]
    pub tier: Option<Tier>,
    /// `null` removes it.
    #[serde(default, deserialize_with = "given")]
    #[schema(value_type = Option<String>)]
    pub external_id: Option<Option<String>>,
    /// Each limit given replaces the workspace's own; `null` goes back to
    /// the tier's.
    #[serde(default)]
    #[schema(value_type = Option<LimitOverrides>)]
    pub limits: Option<LimitChange>,
}

/// Limits as a `PATCH` gives them: absent keeps, `null` clears.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitChange {
    #[serde(default, deserialize_with = "given")]
    max_running: Option<Option<i32>>,
    #[serde(default, deserialize_with = "given")]
    max_created_per_user_hour: Option<Option<i32>>,
    #[serde(default, deserialize_with = "given")]
    max_created_per_hour: Option<Option<i32>>,
    #[serde(default, deserialize_with = "given")]
    max_unfinished: Option<Option<i32>>,
}

/// A field that was given, `null` or not (absent stays `None` by `default`).
fn given<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// A list of workspaces.
#[derive(Serialize, ToSchema)]
pub struct WorkspaceList {
    pub workspaces: Vec<WorkspaceRecord>,
    pub next_cursor: Option<String>,
}

/// A workspace being removed, and the job removing it.
#[derive(Serialize, ToSchema)]
pub struct Deletion {
    pub workspace: WorkspaceRecord,
    /// The `workspace_delete` job: its `progress` says how far it is.
    #[schema(value_type = Object)]
    pub job: Job,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WorkspaceQuery {
    /// Only the workspace with this external id.
    external_id: Option<String>,
    /// The `next_cursor` of the page before.
    #[param(value_type = Option<String>)]
    cursor: Option<uuid::Uuid>,
    /// 1 to 200, default 50.
    #[param(value_type = Option<i64>)]
    limit: Option<Bounded<1, 200>>,
}

fn valid_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::invalid("name", "a name is 1 to 200 characters"));
    }
    Ok(name.to_string())
}

fn valid_identity(field: &str, s: &str) -> Result<(), ApiError> {
    if s.is_empty() || s.chars().count() > MAX_IDENTITY_CHARS {
        return Err(ApiError::invalid(
            field,
            format!("1 to {MAX_IDENTITY_CHARS} characters, exactly as the token carries it"),
        ));
    }
    Ok(())
}

fn valid_limits(l: &LimitOverrides) -> Result<(), ApiError> {
    match l.invalid() {
        Some(name) => Err(ApiError::invalid(
            &format!("limits.{name}"),
            "a limit is a whole number of 1 or more (null: the tier's)",
        )),
        None => Ok(()),
    }
}

#[utoipa::path(post, path = "/api/workspaces", operation_id = "create_workspace", tag = "platform",
    request_body = CreateWorkspace,
    responses((status = 201, description = "Created", body = WorkspaceRecord),
              (status = 200, description = "A workspace with this external_id exists: it, unchanged", body = WorkspaceRecord),
              (status = 401, description = "No valid platform key", body = Problem, content_type = "application/problem+json"),
              (status = 403, description = "Not a platform key", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "The workspace with this external_id is being deleted", body = Problem, content_type = "application/problem+json"),
              (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    platform_key: Platform,
    JsonBody(body): JsonBody<CreateWorkspace>,
) -> Result<Response, ApiError> {
    let name = valid_name(&body.name)?;
    if let Some(e) = &body.external_id {
        valid_identity("external_id", e)?;
    }
    let limits = body.limits.unwrap_or_default();
    valid_limits(&limits)?;
    let db = state.db().await?;
    let (ws, created) = platform::create_workspace(
        &**db,
        &name,
        body.tier.unwrap_or_default(),
        body.external_id.as_deref(),
        limits,
    )
    .await?;
    if ws.deleting_at.is_some() {
        return Err(ApiError::conflict(
            "the workspace with this external_id is being deleted; create it again once it is \
             gone (GET /api/workspaces/{ws} answers 404), or give another external_id",
        ));
    }
    let status = if created {
        tracing::info!(workspace_id = %ws.id, platform_key = %platform_key.key, "workspace created");
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(ws)).into_response())
}

#[utoipa::path(get, path = "/api/workspaces", operation_id = "list_workspaces", tag = "platform",
    params(WorkspaceQuery),
    responses((status = 200, description = "Workspaces, oldest first; with `external_id`, the one that has it (or none)", body = WorkspaceList),
              (status = 401, description = "No valid platform key", body = Problem, content_type = "application/problem+json"),
              (status = 403, description = "Not a platform key", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    _: Platform,
    Params(q): Params<WorkspaceQuery>,
) -> Result<Json<WorkspaceList>, ApiError> {
    let db = state.db().await?;
    if let Some(e) = q.external_id {
        let found = platform::by_external_id(&**db, &e).await?;
        return Ok(Json(WorkspaceList {
            workspaces: found.into_iter().collect(),
            next_cursor: None,
        }));
    }
    let limit = q.limit.map_or(50, |l| l.0);
    let mut workspaces = platform::list(&**db, q.cursor.map(WorkspaceId), limit + 1).await?;
    let next_cursor = if workspaces.len() as i64 > limit {
        workspaces.truncate(limit as usize);
        workspaces.last().map(|w| w.id.to_string())
    } else {
        None
    };
    Ok(Json(WorkspaceList {
        workspaces,
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/api/workspaces/{ws}", operation_id = "get_workspace", tag = "platform",
    params(WsPath),
    responses((status = 200, description = "The workspace (`deleting_at` set while it is being removed)", body = WorkspaceRecord),
              (status = 401, description = "No valid platform key", body = Problem, content_type = "application/problem+json"),
              (status = 403, description = "Not a platform key", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn get_one(
    State(state): State<AppState>,
    _: Platform,
    Ids(WsPath { ws }): Ids<WsPath>,
) -> Result<Json<WorkspaceRecord>, ApiError> {
    let db = state.db().await?;
    platform::workspace(&**db, ws)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("workspace"))
}

#[utoipa::path(patch, path = "/api/workspaces/{ws}", operation_id = "update_workspace", tag = "platform",
    params(WsPath),
    request_body = UpdateWorkspace,
    responses((status = 200, description = "Updated; a new tier or limit binds the workers within 30 s", body = WorkspaceRecord),
              (status = 401, description = "No valid platform key", body = Problem, content_type = "application/problem+json"),
              (status = 403, description = "Not a platform key", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "Another workspace has this external_id", body = Problem, content_type = "application/problem+json"),
              (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn update(
    State(state): State<AppState>,
    _: Platform,
    Ids(WsPath { ws }): Ids<WsPath>,
    JsonBody(body): JsonBody<UpdateWorkspace>,
) -> Result<Json<WorkspaceRecord>, ApiError> {
    let name = body.name.as_deref().map(valid_name).transpose()?;
    if let Some(Some(e)) = &body.external_id {
        valid_identity("external_id", e)?;
    }
    let l = body.limits.unwrap_or_default();
    valid_limits(&LimitOverrides {
        max_running: l.max_running.flatten(),
        max_created_per_user_hour: l.max_created_per_user_hour.flatten(),
        max_created_per_hour: l.max_created_per_hour.flatten(),
        max_unfinished: l.max_unfinished.flatten(),
    })?;
    let change = platform::Change {
        name,
        tier: body.tier,
        external_id: body.external_id,
        max_running: l.max_running,
        max_created_per_user_hour: l.max_created_per_user_hour,
        max_created_per_hour: l.max_created_per_hour,
        max_unfinished: l.max_unfinished,
    };
    let db = state.db().await?;
    match platform::update(&**db, ws, &change).await {
        Ok(Some(w)) => Ok(Json(w)),
        Ok(None) => Err(ApiError::not_found("workspace")),
        Err(crate::db::DbError::Query(q))
            if q.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
        {
            Err(ApiError::conflict("another workspace has this external_id")
                .with_field("external_id"))
        }
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(delete, path = "/api/workspaces/{ws}", operation_id = "delete_workspace", tag = "platform",
    params(WsPath),
    responses((status = 202, description = "Closed at once to its members and keys; its jobs, files and rows are removed by the job given, with progress", body = Deletion),
              (status = 401, description = "No valid platform key", body = Problem, content_type = "application/problem+json"),
              (status = 403, description = "Not a platform key", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    platform_key: Platform,
    Ids(WsPath { ws }): Ids<WsPath>,
) -> Result<Response, ApiError> {
    let mut db = state.db().await?;
    let workspace = platform::mark_deleting(&mut db, ws)
        .await?
        .ok_or_else(|| ApiError::not_found("workspace"))?;
    // Asked again, the same job answers (its key names the workspace).
    let new = NewJob {
        idempotency_key: Some(platform::deletion_key(ws)),
        ..NewJob::new(
            PLATFORM_WORKSPACE,
            <crate::handlers::WorkspaceDelete as crate::handlers::JobHandler>::TYPE,
            serde_json::json!({ "workspace_id": ws }),
        )
    };
    let now = state.clock.now();
    let (mut created, _) = crate::enqueue::create_jobs(
        &state.store,
        &*state.queue,
        &db,
        &[new],
        now,
        state.settings.send_budget(),
    )
    .await?;
    let (mut job, _) = created.remove(0);
    // A removal that ended dead (its retries spent) runs again when asked.
    if matches!(job.status, JobStatus::Dead | JobStatus::Cancelled) {
        if let Some(again) = state
            .store
            .manual_retry(PLATFORM_WORKSPACE, job.id, now)
            .await?
        {
            crate::enqueue::send_jobs(&state.store, &*state.queue, &[&again], now).await?;
            job = state
                .store
                .get(PLATFORM_WORKSPACE, job.id)
                .await?
                .unwrap_or(again);
        }
    }
    tracing::info!(workspace_id = %ws, platform_key = %platform_key.key, job_id = %job.id,
        "workspace closed; its removal is under way");
    Ok((StatusCode::ACCEPTED, Json(Deletion { workspace, job })).into_response())
}

/// An admin may not leave the workspace without one (a platform key may).
fn last_admin() -> ApiError {
    ApiError::conflict("this is the workspace's last admin: make another member an admin first")
}

/// `POST /api/workspaces/{ws}/members`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutMember {
    /// The user's `sub`, exactly as their token carries it (`auth0|65f…`,
    /// `user_2ab…`, a UUID); 1 to 255 characters.
    pub subject: String,
    /// The token's `iss`; absent: any issuer this deployment accepts.
    #[serde(default)]
    pub issuer: Option<String>,
    #[schema(value_type = String, example = "member")]
    pub role: Role,
}

#[derive(Serialize, ToSchema)]
pub struct MemberList {
    pub members: Vec<MemberRecord>,
}

/// `{ws}` and a member's `{id}`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct MemberPath {
    /// Workspace id
    #[param(value_type = uuid::Uuid)]
    #[allow(dead_code, reason = "read and checked by `MemberAdmin`")]
    pub ws: WorkspaceId,
    /// The member's id
    #[param(value_type = uuid::Uuid)]
    pub id: UserId,
}

#[utoipa::path(post, path = "/api/workspaces/{ws}/members", operation_id = "put_member", tag = "platform",
    params(WsPath),
    request_body = PutMember,
    responses((status = 201, description = "Added", body = MemberRecord),
              (status = 200, description = "Already a member: the role is now the one given", body = MemberRecord),
              (status = 409, description = "An admin demoting the workspace's last admin", body = Problem, content_type = "application/problem+json"),
              (status = 403, description = "Neither a platform key nor an admin", body = Problem, content_type = "application/problem+json"),
              (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn put_member(
    State(state): State<AppState>,
    admin: MemberAdmin,
    JsonBody(body): JsonBody<PutMember>,
) -> Result<Response, ApiError> {
    valid_identity("subject", &body.subject)?;
    if let Some(i) = &body.issuer {
        valid_identity("issuer", i)?;
    }
    let db = state.db().await?;
    if !admin.by_platform
        && body.role != Role::Admin
        && workspace::is_last_admin(
            &**db,
            admin.workspace,
            Err((&body.subject, body.issuer.as_deref())),
        )
        .await?
    {
        return Err(last_admin());
    }
    let (member, created) = workspace::put_member(
        &**db,
        admin.workspace,
        &body.subject,
        body.issuer.as_deref(),
        body.role,
    )
    .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(member)).into_response())
}

#[utoipa::path(get, path = "/api/workspaces/{ws}/members", operation_id = "list_members", tag = "platform",
    params(WsPath),
    responses((status = 200, description = "The members, oldest first", body = MemberList),
              (status = 403, description = "Neither a platform key nor an admin", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list_members(
    State(state): State<AppState>,
    admin: MemberAdmin,
) -> Result<Json<MemberList>, ApiError> {
    let db = state.db().await?;
    Ok(Json(MemberList {
        members: workspace::members(&**db, admin.workspace).await?,
    }))
}

#[utoipa::path(delete, path = "/api/workspaces/{ws}/members/{id}", operation_id = "remove_member", tag = "platform",
    params(MemberPath),
    responses((status = 204, description = "Removed: their tokens open nothing in the workspace from now on"),
              (status = 403, description = "Neither a platform key nor an admin", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such member", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "An admin removing the workspace's last admin", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn remove_member(
    State(state): State<AppState>,
    admin: MemberAdmin,
    Ids(MemberPath { id, .. }): Ids<MemberPath>,
) -> Result<StatusCode, ApiError> {
    let db = state.db().await?;
    if !admin.by_platform && workspace::is_last_admin(&**db, admin.workspace, Ok(id)).await? {
        return Err(last_admin());
    }
    if workspace::remove_member(&**db, admin.workspace, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("member"))
    }
}
