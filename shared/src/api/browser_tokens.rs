//! `POST /api/workspaces/{ws}/browser-tokens`: a short-lived token for a
//! web page, opening only the jobs (or tags) it names.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::extract::{JsonBody, Member, WsPath};
use super::AppState;
use crate::browser_token::{Grant, Scope, MAX_JOBS, MAX_TAGS, MAX_TTL_SECS};
use crate::ids::JobId;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBrowserToken {
    /// Jobs it opens (and their children), at most 100.
    #[serde(default)]
    #[schema(value_type = Vec<uuid::Uuid>)]
    pub jobs: Vec<JobId>,
    /// It also opens every job carrying one of these tags, at most 20.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Seconds it lives: 1 to 86 400, default 900.
    #[serde(default)]
    pub ttl_s: Option<i64>,
    /// `["read"]` (default) or `["read", "cancel"]`.
    #[serde(default)]
    pub scopes: Option<Vec<Scope>>,
}

#[derive(Serialize, ToSchema)]
pub struct BrowserToken {
    /// `ofb_…`: send it as `Authorization: Bearer`, or as `?token=` to the
    /// realtime channel.
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

#[utoipa::path(post, path = "/api/workspaces/{ws}/browser-tokens", operation_id = "create_browser_token", tag = "jobs",
    params(WsPath),
    request_body = CreateBrowserToken,
    responses((status = 201, description = "A token for a web page, opening only what it names", body = BrowserToken),
              (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
              (status = 503, description = "No key to sign browser tokens is configured", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    member: Member,
    JsonBody(body): JsonBody<CreateBrowserToken>,
) -> Result<Response, ApiError> {
    if body.jobs.is_empty() && body.tags.is_empty() {
        return Err(ApiError::invalid(
            "jobs",
            "name the jobs (or tags) the token opens: a browser token opens nothing else",
        ));
    }
    if body.jobs.len() > MAX_JOBS {
        return Err(ApiError::invalid(
            "jobs",
            format!("at most {MAX_JOBS} jobs"),
        ));
    }
    if body.tags.len() > MAX_TAGS {
        return Err(ApiError::invalid(
            "tags",
            format!("at most {MAX_TAGS} tags"),
        ));
    }
    if let Some(i) = body.tags.iter().position(|t| t.is_empty() || t.len() > 200) {
        return Err(ApiError::invalid(
            &format!("tags[{i}]"),
            "a tag is 1 to 200 bytes",
        ));
    }
    let ttl = body.ttl_s.unwrap_or(900);
    if !(1..=MAX_TTL_SECS).contains(&ttl) {
        return Err(ApiError::invalid(
            "ttl_s",
            format!("from 1 to {MAX_TTL_SECS} seconds (24 h)"),
        ));
    }
    let mut scopes = body.scopes.unwrap_or_else(|| vec![Scope::Read]);
    if !scopes.contains(&Scope::Read) {
        scopes.push(Scope::Read);
    }
    scopes.sort_by_key(|s| *s as u8);
    scopes.dedup();
    let keys = state.browser.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-configured",
            "Not configured",
            "this deployment signs no browser tokens: set OFFLOAD_BROWSER_TOKEN_SECRET (or its ARN)",
        )
    })?;
    let now = state.clock.now();
    let expires_at = now + chrono::Duration::seconds(ttl);
    let grant = Grant::new(
        member.workspace,
        body.jobs,
        body.tags,
        scopes,
        now,
        expires_at,
    );
    let token = keys.sign(&grant);
    Ok((
        StatusCode::CREATED,
        Json(BrowserToken {
            token,
            expires_at: DateTime::from_timestamp(grant.exp, 0).unwrap_or(expires_at),
        }),
    )
        .into_response())
}
