//! A workspace's CRMs, admins only: `/api/workspaces/{ws}/crm-providers[/{name}]`
//! (the access token is written, never shown again); and the conflicts
//! `sync_crm` parked for review, which members list and resolve:
//! `/api/workspaces/{ws}/crm-conflicts[/{id}/resolve]`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::error::{ApiError, Problem};
use super::extract::{Ids, JsonBody, Member, Params, WsPath};
use super::providers::{key_tail, ProviderPath};
use super::AppState;
use crate::db::DbError;
use crate::handlers::{
    http_url, resolve_conflict, valid_provider_name, Keep, Resolved, HUBSPOT_API,
};
use crate::ids::WorkspaceId;

/// A CRM's settings.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutCrmProvider {
    /// Where HubSpot's API lives (default `https://api.hubapi.com`); the
    /// jobs call `{base_url}/crm/v3/objects/{contacts|companies}/…`.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// A HubSpot private app's access token, sent as `Authorization:
    /// Bearer …`. The app needs the CRM objects' read and write scopes, and
    /// contacts and companies a unique-value text property `offload_id`.
    pub access_token: String,
    /// Records a page and a batch call (1 to 100, HubSpot's most; default 100).
    #[serde(default = "default_batch")]
    pub batch_size: i32,
    /// Calls the workspace's syncs make to it per 10 seconds (1 to 10 000,
    /// default 100: HubSpot's limit for a private app on Free and Starter).
    #[serde(default = "default_rate")]
    pub requests_per_10s: i32,
}

fn default_base_url() -> String {
    HUBSPOT_API.into()
}
fn default_batch() -> i32 {
    100
}
fn default_rate() -> i32 {
    100
}

/// A CRM as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct CrmProviderView {
    pub name: String,
    /// `hubspot`.
    pub kind: String,
    pub base_url: String,
    /// The token's last four characters.
    pub access_token_ends: String,
    pub batch_size: i32,
    pub requests_per_10s: i32,
    pub updated_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct CrmProviderList {
    pub providers: Vec<CrmProviderView>,
}

const COLUMNS: &str =
    "name, kind, base_url, access_token, batch_size, requests_per_10s, updated_at";

fn view(r: &tokio_postgres::Row) -> CrmProviderView {
    CrmProviderView {
        name: r.get(0),
        kind: r.get(1),
        base_url: r.get(2),
        access_token_ends: key_tail(r.get(3)),
        batch_size: r.get(4),
        requests_per_10s: r.get(5),
        updated_at: r.get(6),
    }
}

fn check(name: &str, p: &PutCrmProvider) -> Result<(), ApiError> {
    if !valid_provider_name(name) {
        return Err(ApiError::invalid("name", "1 to 40 of a-z, 0-9, _ and -"));
    }
    http_url(&p.base_url).map_err(|e| ApiError::invalid("base_url", e))?;
    if p.base_url.len() > 2048 {
        return Err(ApiError::invalid("base_url", "at most 2048 characters"));
    }
    if p.access_token.is_empty()
        || p.access_token.len() > 1000
        || p.access_token.chars().any(char::is_control)
    {
        return Err(ApiError::invalid(
            "access_token",
            "1 to 1000 characters, none of them control characters",
        ));
    }
    if !(1..=100).contains(&p.batch_size) {
        return Err(ApiError::invalid("batch_size", "from 1 to 100"));
    }
    if !(1..=10_000).contains(&p.requests_per_10s) {
        return Err(ApiError::invalid("requests_per_10s", "from 1 to 10000"));
    }
    Ok(())
}

#[utoipa::path(put, path = "/api/workspaces/{ws}/crm-providers/{name}", operation_id = "put_crm_provider", tag = "crm",
    params(ProviderPath),
    request_body = PutCrmProvider,
    responses((status = 200, description = "Saved (created or replaced); the token is not shown again", body = CrmProviderView),
              (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
              (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn put(
    State(state): State<AppState>,
    member: Member,
    Ids(ProviderPath { name, .. }): Ids<ProviderPath>,
    JsonBody(body): JsonBody<PutCrmProvider>,
) -> Result<Json<CrmProviderView>, ApiError> {
    member.require_admin()?;
    check(&name, &body)?;
    let db = state.db().await?;
    let row = db
        .query_one(
            &format!(
                "INSERT INTO crm_providers (workspace_id, name, base_url, access_token, batch_size, requests_per_10s, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (workspace_id, name) DO UPDATE SET base_url = EXCLUDED.base_url, \
                   access_token = EXCLUDED.access_token, batch_size = EXCLUDED.batch_size, \
                   requests_per_10s = EXCLUDED.requests_per_10s, updated_at = EXCLUDED.updated_at \
                 RETURNING {COLUMNS}"
            ),
            &[
                &member.workspace.0,
                &name,
                &body.base_url,
                &body.access_token,
                &body.batch_size,
                &body.requests_per_10s,
                &state.clock.now(),
            ],
        )
        .await
        .map_err(DbError::from)?;
    Ok(Json(view(&row)))
}

#[utoipa::path(get, path = "/api/workspaces/{ws}/crm-providers", operation_id = "list_crm_providers", tag = "crm",
    params(WsPath),
    responses((status = 200, description = "The workspace's CRMs by name, without their tokens", body = CrmProviderList),
              (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    member: Member,
) -> Result<Json<CrmProviderList>, ApiError> {
    member.require_admin()?;
    let db = state.db().await?;
    let rows = db
        .query(
            &format!("SELECT {COLUMNS} FROM crm_providers WHERE workspace_id = $1 ORDER BY name"),
            &[&member.workspace.0],
        )
        .await
        .map_err(DbError::from)?;
    Ok(Json(CrmProviderList {
        providers: rows.iter().map(view).collect(),
    }))
}

#[utoipa::path(delete, path = "/api/workspaces/{ws}/crm-providers/{name}", operation_id = "delete_crm_provider", tag = "crm",
    params(ProviderPath),
    responses((status = 204, description = "Removed: syncs naming it now end dead; its links and cursors stay, so configuring it again resumes where it was"),
              (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such CRM in this workspace", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    member: Member,
    Ids(ProviderPath { name, .. }): Ids<ProviderPath>,
) -> Result<StatusCode, ApiError> {
    member.require_admin()?;
    let db = state.db().await?;
    let n = db
        .execute(
            "DELETE FROM crm_providers WHERE workspace_id = $1 AND name = $2",
            &[&member.workspace.0, &name],
        )
        .await
        .map_err(DbError::from)?;
    if n == 1 {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("CRM provider"))
    }
}

/// A record changed both here and in the CRM since it last synced.
#[derive(Serialize, ToSchema)]
pub struct CrmConflict {
    pub id: i64,
    pub provider: String,
    /// `contacts` or `accounts`.
    pub entity: String,
    pub local_id: Uuid,
    pub remote_id: String,
    /// Our values when it was parked, by the CRM's property names.
    #[schema(value_type = Object)]
    pub local: Value,
    /// The CRM's values when it was parked.
    #[schema(value_type = Object)]
    pub remote: Value,
    pub local_updated_at: Option<DateTime<Utc>>,
    pub remote_updated_at: Option<DateTime<Utc>>,
    /// The sync that found it.
    pub job_id: Uuid,
    /// `open`, `kept_local` or `kept_remote`.
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
pub struct CrmConflictList {
    pub conflicts: Vec<CrmConflict>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ConflictQuery {
    /// `open` (default) or `all`.
    #[serde(default)]
    pub status: Option<String>,
    /// Conflicts with an id after this one (paging; they come in id order).
    #[serde(default)]
    pub after: Option<i64>,
    /// 1 to 500, default 100.
    #[serde(default)]
    pub limit: Option<i64>,
}

const CONFLICT_COLUMNS: &str = "id, provider, entity, local_id, remote_id, local, remote, \
     local_updated_at, remote_updated_at, job_id, status, created_at, resolved_at";

fn conflict(r: &tokio_postgres::Row) -> CrmConflict {
    CrmConflict {
        id: r.get(0),
        provider: r.get(1),
        entity: r.get(2),
        local_id: r.get(3),
        remote_id: r.get(4),
        local: r.get(5),
        remote: r.get(6),
        local_updated_at: r.get(7),
        remote_updated_at: r.get(8),
        job_id: r.get(9),
        status: r.get(10),
        created_at: r.get(11),
        resolved_at: r.get(12),
    }
}

#[utoipa::path(get, path = "/api/workspaces/{ws}/crm-conflicts", operation_id = "list_crm_conflicts", tag = "crm",
    params(WsPath, ConflictQuery),
    responses((status = 200, description = "Conflicts `sync_crm` parked for review, oldest first", body = CrmConflictList)),
    security(("bearer" = [])))]
pub async fn conflicts(
    State(state): State<AppState>,
    member: Member,
    Params(q): Params<ConflictQuery>,
) -> Result<Json<CrmConflictList>, ApiError> {
    let all = match q.status.as_deref() {
        None | Some("open") => false,
        Some("all") => true,
        Some(_) => {
            return Err(ApiError::bad_request("status is `open` or `all`").with_field("status"))
        }
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request("limit is 1 to 500").with_field("limit"));
    }
    let db = state.db().await?;
    let rows = db
        .query(
            &format!(
                "SELECT {CONFLICT_COLUMNS} FROM crm_conflicts WHERE workspace_id = $1 \
                 AND ($2 OR status = 'open') AND id > $3 ORDER BY id LIMIT $4"
            ),
            &[&member.workspace.0, &all, &q.after.unwrap_or(0), &limit],
        )
        .await
        .map_err(DbError::from)?;
    Ok(Json(CrmConflictList {
        conflicts: rows.iter().map(conflict).collect(),
    }))
}

/// The path of one conflict.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ConflictPath {
    /// Workspace id
    #[param(value_type = uuid::Uuid)]
    pub ws: WorkspaceId,
    /// Conflict id
    pub id: i64,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveConflict {
    /// `local` (ours; the next push writes it to the CRM) or `remote` (the
    /// CRM's values the conflict shows, written here now).
    pub keep: Keep,
}

#[utoipa::path(post, path = "/api/workspaces/{ws}/crm-conflicts/{id}/resolve", operation_id = "resolve_crm_conflict", tag = "crm",
    params(ConflictPath),
    request_body = ResolveConflict,
    responses((status = 200, description = "Resolved; the record syncs again", body = CrmConflict),
              (status = 404, description = "No such conflict, or its record is gone", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "Resolved already", body = Problem, content_type = "application/problem+json"),
              (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn resolve(
    State(state): State<AppState>,
    member: Member,
    Ids(ConflictPath { id, .. }): Ids<ConflictPath>,
    JsonBody(body): JsonBody<ResolveConflict>,
) -> Result<Json<CrmConflict>, ApiError> {
    let ws = member.workspace.0;
    let mut db = state.db().await?;
    match resolve_conflict(&mut db, ws, id, body.keep, state.clock.now()).await? {
        Resolved::Done => {}
        Resolved::NotFound => return Err(ApiError::not_found("conflict")),
        Resolved::Gone => return Err(ApiError::not_found("record of this conflict")),
        Resolved::Already(s) => {
            return Err(ApiError::conflict(format!(
                "the conflict was resolved already ({s})"
            )))
        }
    }
    let row = db
        .query_one(
            &format!(
                "SELECT {CONFLICT_COLUMNS} FROM crm_conflicts WHERE workspace_id = $1 AND id = $2"
            ),
            &[&ws, &id],
        )
        .await
        .map_err(DbError::from)?;
    Ok(Json(conflict(&row)))
}
