//! Workspace API keys: `/api/workspaces/{ws}/api-keys`, admins only.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, Problem};
use super::extract::{Ids, ItemPath, JsonBody, Member, WsPath};
use super::AppState;
use crate::api_keys::{self, ApiKey};
use crate::workspace::Role;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// What the key is for, e.g. `billing cron`; 1 to 200 characters.
    pub name: String,
    /// `member` (jobs, schedules read) or `admin` (everything, keys included).
    #[schema(value_type = String, example = "member")]
    pub role: Role,
}

/// A key as the API shows it; `key` (the secret) only in the answer to its
/// creation.
#[derive(Serialize, ToSchema)]
pub struct ApiKeyView {
    pub id: Uuid,
    pub name: String,
    #[schema(value_type = String, example = "member")]
    pub role: Role,
    /// The key's first characters, to tell keys apart.
    pub prefix: String,
    /// The secret (`ofk_…`): shown once, never stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub last_used_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl ApiKeyView {
    fn new(k: ApiKey, secret: Option<String>) -> Self {
        ApiKeyView {
            id: k.id,
            name: k.name,
            role: k.role,
            prefix: k.prefix,
            key: secret,
            created_at: k.created_at,
            last_used_at: k.last_used_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ApiKeyList {
    pub api_keys: Vec<ApiKeyView>,
}

#[utoipa::path(post, path = "/api/workspaces/{ws}/api-keys", operation_id = "create_api_key", tag = "api-keys",
    params(WsPath),
    request_body = CreateApiKey,
    responses((status = 201, description = "Created; `key` is the secret, shown only here", body = ApiKeyView),
              (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such workspace for this caller", body = Problem, content_type = "application/problem+json"),
              (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    member: Member,
    JsonBody(body): JsonBody<CreateApiKey>,
) -> Result<Response, ApiError> {
    member.require_admin()?;
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::invalid("name", "a name is 1 to 200 characters"));
    }
    let db = state.db().await?;
    let (key, secret) =
        api_keys::create(&**db, member.workspace, name, body.role, member.user).await?;
    Ok((
        StatusCode::CREATED,
        Json(ApiKeyView::new(key, Some(secret))),
    )
        .into_response())
}

#[utoipa::path(get, path = "/api/workspaces/{ws}/api-keys", operation_id = "list_api_keys", tag = "api-keys",
    params(WsPath),
    responses((status = 200, description = "The workspace's keys, oldest first, without their secrets", body = ApiKeyList),
              (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such workspace for this caller", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    member: Member,
) -> Result<Json<ApiKeyList>, ApiError> {
    member.require_admin()?;
    let db = state.db().await?;
    let keys = api_keys::list(&**db, member.workspace).await?;
    Ok(Json(ApiKeyList {
        api_keys: keys.into_iter().map(|k| ApiKeyView::new(k, None)).collect(),
    }))
}

#[utoipa::path(delete, path = "/api/workspaces/{ws}/api-keys/{id}", operation_id = "revoke_api_key", tag = "api-keys",
    params(ItemPath),
    responses((status = 204, description = "Revoked: the key answers 401 from now on"),
              (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such key in this workspace", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn revoke(
    State(state): State<AppState>,
    member: Member,
    Ids(ItemPath { id, .. }): Ids<ItemPath>,
) -> Result<StatusCode, ApiError> {
    member.require_admin()?;
    let db = state.db().await?;
    if api_keys::revoke(&**db, member.workspace, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("API key"))
    }
}
