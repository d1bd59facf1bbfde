//! A workspace's enrichment providers, admins only:
//! `/api/workspaces/{ws}/enrichment-providers[/{name}]`. The API key is
//! written, never shown again (its last four characters tell keys apart).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Problem};
use super::extract::{Ids, JsonBody, Member};
use super::AppState;
use crate::db::DbError;
use crate::handlers::{http_url, valid_provider_name, Entity};
use crate::ids::WorkspaceId;

/// The path of one provider.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ProviderPath {
    /// Workspace id
    #[param(value_type = uuid::Uuid)]
    pub ws: WorkspaceId,
    /// The name jobs give as `provider`: 1 to 40 of a-z, 0-9, `_` and `-`
    pub name: String,
}

/// A provider's settings.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutProvider {
    /// Where its API lives, e.g. `https://api.example.com/v1`: the jobs
    /// call `POST {base_url}/people/enrich` with `{"email"}` and
    /// `POST {base_url}/companies/enrich` with `{"domain"}`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer …`.
    pub api_key: String,
    /// Our field → the dotted path of the provider's answer holding it,
    /// e.g. `{"title": "person.title"}`; a field not listed is looked for
    /// under its own name.
    #[serde(default)]
    pub field_map: BTreeMap<String, String>,
    /// Calls the workspace's jobs make to it per hour (1 to 1 000 000,
    /// default 1 000); when they are spent, jobs wait for the next.
    #[serde(default = "default_per_hour")]
    pub calls_per_hour: i32,
}

fn default_per_hour() -> i32 {
    1000
}

/// A provider as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct ProviderView {
    pub name: String,
    pub base_url: String,
    /// The API key's last four characters.
    pub api_key_ends: String,
    pub field_map: BTreeMap<String, String>,
    pub calls_per_hour: i32,
    pub updated_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct ProviderList {
    pub providers: Vec<ProviderView>,
}

/// A secret's last four characters, to tell secrets apart.
pub(super) fn key_tail(key: &str) -> String {
    let n = key.chars().count();
    key.chars().skip(n.saturating_sub(4)).collect()
}

fn view(r: &tokio_postgres::Row) -> ProviderView {
    ProviderView {
        name: r.get(0),
        base_url: r.get(1),
        api_key_ends: key_tail(r.get(2)),
        field_map: serde_json::from_value(r.get(3)).unwrap_or_default(),
        calls_per_hour: r.get(4),
        updated_at: r.get(5),
    }
}

const COLUMNS: &str = "name, base_url, api_key, field_map, calls_per_hour, updated_at";

fn check(name: &str, p: &PutProvider) -> Result<(), ApiError> {
    if !valid_provider_name(name) {
        return Err(ApiError::invalid("name", "1 to 40 of a-z, 0-9, _ and -"));
    }
    http_url(&p.base_url).map_err(|e| ApiError::invalid("base_url", e))?;
    if p.base_url.len() > 2048 {
        return Err(ApiError::invalid("base_url", "at most 2048 characters"));
    }
    if p.api_key.is_empty() || p.api_key.len() > 1000 || p.api_key.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "api_key",
            "1 to 1000 characters, none of them control characters",
        ));
    }
    for (field, path) in &p.field_map {
        if !Entity::Contact.has(field) && !Entity::Account.has(field) {
            return Err(ApiError::invalid(
                &format!("field_map.{field}"),
                format!(
                    "not a field enrichment fills; known: {}",
                    Entity::known().join(", ")
                ),
            ));
        }
        if path.is_empty() || path.len() > 200 || path.split('.').any(str::is_empty) {
            return Err(ApiError::invalid(
                &format!("field_map.{field}"),
                "a dotted path such as person.title, at most 200 characters",
            ));
        }
    }
    if !(1..=1_000_000).contains(&p.calls_per_hour) {
        return Err(ApiError::invalid("calls_per_hour", "from 1 to 1000000"));
    }
    Ok(())
}

#[utoipa::path(put, path = "/api/workspaces/{ws}/enrichment-providers/{name}", operation_id = "put_enrichment_provider", tag = "enrichment",
    params(ProviderPath),
    request_body = PutProvider,
    responses((status = 200, description = "Saved (created or replaced); the API key is not shown again", body = ProviderView),
              (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
              (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn put(
    State(state): State<AppState>,
    member: Member,
    Ids(ProviderPath { name, .. }): Ids<ProviderPath>,
    JsonBody(body): JsonBody<PutProvider>,
) -> Result<Json<ProviderView>, ApiError> {
    member.require_admin()?;
    check(&name, &body)?;
    let db = state.db().await?;
    let map = serde_json::to_value(&body.field_map).unwrap_or_default();
    let row = db
        .query_one(
            &format!(
                "INSERT INTO enrichment_providers (workspace_id, name, base_url, api_key, field_map, calls_per_hour, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (workspace_id, name) DO UPDATE SET base_url = EXCLUDED.base_url, \
                   api_key = EXCLUDED.api_key, field_map = EXCLUDED.field_map, \
                   calls_per_hour = EXCLUDED.calls_per_hour, updated_at = EXCLUDED.updated_at \
                 RETURNING {COLUMNS}"
            ),
            &[
                &member.workspace.0,
                &name,
                &body.base_url,
                &body.api_key,
                &map,
                &body.calls_per_hour,
                &state.clock.now(),
            ],
        )
        .await
        .map_err(DbError::from)?;
    Ok(Json(view(&row)))
}

#[utoipa::path(get, path = "/api/workspaces/{ws}/enrichment-providers", operation_id = "list_enrichment_providers", tag = "enrichment",
    params(super::extract::WsPath),
    responses((status = 200, description = "The workspace's providers by name, without their API keys", body = ProviderList),
              (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    member: Member,
) -> Result<Json<ProviderList>, ApiError> {
    member.require_admin()?;
    let db = state.db().await?;
    let rows = db
        .query(
            &format!(
                "SELECT {COLUMNS} FROM enrichment_providers WHERE workspace_id = $1 ORDER BY name"
            ),
            &[&member.workspace.0],
        )
        .await
        .map_err(DbError::from)?;
    Ok(Json(ProviderList {
        providers: rows.iter().map(view).collect(),
    }))
}

#[utoipa::path(delete, path = "/api/workspaces/{ws}/enrichment-providers/{name}", operation_id = "delete_enrichment_provider", tag = "enrichment",
    params(ProviderPath),
    responses((status = 204, description = "Removed: jobs naming it now end dead"),
              (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such provider in this workspace", body = Problem, content_type = "application/problem+json")),
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
            "DELETE FROM enrichment_providers WHERE workspace_id = $1 AND name = $2",
            &[&member.workspace.0, &name],
        )
        .await
        .map_err(DbError::from)?;
    if n == 1 {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("enrichment provider"))
    }
}
