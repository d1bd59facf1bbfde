//! Request extractors: the authenticated member of the workspace in the
//! path, and JSON bodies whose every rejection is a problem body.

use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::AppState;
use crate::auth::AuthError;
use crate::ids::{UserId, WorkspaceId};
use crate::workspace::{self, Role};
use crate::{api_keys, browser_token, platform};

/// The caller, proven a member of the workspace named in the path: a user
/// by a verified token, or a server by one of the workspace's API keys
/// (then `user` is the key's id). A non-member, or another workspace's key,
/// gets 404 for everything in it, so the workspace's existence is not
/// revealed.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    pub user: UserId,
    pub workspace: WorkspaceId,
    pub role: Role,
}

impl Member {
    /// 403 unless the member is an admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.role == Role::Admin {
            Ok(())
        } else {
            Err(ApiError::forbidden("only a workspace admin may do this"))
        }
    }
}

/// The bearer token of the request.
fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let header = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized(AuthError::Missing.to_string()))?;
    header
        .to_str()
        .ok()
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized(AuthError::Missing.to_string()))
}

/// The workspace named in the path.
async fn path_workspace(parts: &mut Parts, state: &AppState) -> Result<WorkspaceId, ApiError> {
    let Path(params): Path<Vec<(String, String)>> = Path::from_request_parts(parts, state)
        .await
        .map_err(|e| ApiError::bad_request(e.body_text()))?;
    let ws = params
        .iter()
        .find(|(k, _)| k == "ws")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    ws.parse().map_err(|_| {
        ApiError::bad_request(format!("workspace id {ws:?} is not a UUID")).with_field("ws")
    })
}

impl FromRequestParts<AppState> for Member {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?.to_owned();
        let workspace = path_workspace(parts, state).await?;
        member(state, &token, workspace).await
    }
}

/// The member `token` names in `workspace`: a user's token, or an API key
/// of that workspace. A platform key or a browser token is refused here:
/// neither opens the routes that take a member.
async fn member(state: &AppState, token: &str, workspace: WorkspaceId) -> Result<Member, ApiError> {
    if platform::is_platform_key(token) {
        return Err(ApiError::forbidden(
            "a platform key provisions workspaces and members; it opens no workspace's jobs \
                 (use a member's token or the workspace's API key)",
        ));
    }
    if browser_token::is_browser_token(token) {
        return Err(ApiError::forbidden(
            "a browser token opens only GET of the jobs it names (their logs, stream and \
                 children) and, when granted, their cancel",
        ));
    }
    if api_keys::is_api_key(token) {
        let db = state.db().await?;
        let key = api_keys::authenticate(&db, token).await?.ok_or_else(|| {
            ApiError::unauthorized("the API key is not valid: revoked, or never issued")
        })?;
        // A key works on its own workspace's routes only; elsewhere the
        // workspace does not exist for it.
        if key.workspace_id != workspace {
            return Err(ApiError::not_found("workspace"));
        }
        return Ok(Member {
            user: UserId(key.id),
            workspace,
            role: key.role,
        });
    }
    let who = state
        .auth
        .verify(token)
        .await
        .map_err(|e| ApiError::unauthorized(e.to_string()))?;
    let db = state.db().await?;
    match workspace::member_role(&db, workspace, &who).await? {
        Some((user, role)) => Ok(Member {
            user,
            workspace,
            role,
        }),
        None => Err(ApiError::not_found("workspace")),
    }
}

/// Who reads a job: a member, or a browser token naming the job. A route
/// taking a `Viewer` checks [`Viewer::sees`] on the job it read and answers
/// 404 when it does not.
#[derive(Clone, Debug)]
pub enum Viewer {
    Member(Member),
    Browser(std::sync::Arc<browser_token::Grant>),
}

impl Viewer {
    pub fn workspace(&self) -> WorkspaceId {
        match self {
            Viewer::Member(m) => m.workspace,
            Viewer::Browser(g) => g.workspace,
        }
    }

    /// Whether the job is the viewer's to see.
    pub fn sees(&self, job: &crate::job::Job) -> bool {
        match self {
            Viewer::Member(m) => job.workspace_id == m.workspace,
            Viewer::Browser(g) => g.sees(job),
        }
    }

    /// 404 unless the viewer sees the job.
    pub fn check(&self, job: Option<crate::job::Job>) -> Result<crate::job::Job, ApiError> {
        job.filter(|j| self.sees(j))
            .ok_or_else(|| ApiError::not_found("job"))
    }

    /// 403 for a browser token without the `cancel` scope.
    pub fn require_cancel(&self) -> Result<(), ApiError> {
        match self {
            Viewer::Browser(g) if !g.may_cancel() => Err(ApiError::forbidden(
                "this browser token may read its jobs, not cancel them (ask for the `cancel` scope)",
            )),
            _ => Ok(()),
        }
    }
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?.to_owned();
        let workspace = path_workspace(parts, state).await?;
        viewer(state, &token, workspace).await
    }
}

/// The viewer `token` names in `workspace`.
pub async fn viewer(
    state: &AppState,
    token: &str,
    workspace: WorkspaceId,
) -> Result<Viewer, ApiError> {
    if !browser_token::is_browser_token(token) {
        return member(state, token, workspace).await.map(Viewer::Member);
    }
    let grant = browser_grant(state, token)?;
    if grant.workspace != workspace {
        return Err(ApiError::not_found("workspace"));
    }
    Ok(Viewer::Browser(std::sync::Arc::new(grant)))
}

/// The grant of a browser token, verified without the database.
pub fn browser_grant(state: &AppState, token: &str) -> Result<browser_token::Grant, ApiError> {
    let keys = state.browser.as_ref().ok_or_else(|| {
        ApiError::unauthorized(
            "browser tokens are not accepted here: no OFFLOAD_BROWSER_TOKEN_SECRET is configured",
        )
    })?;
    keys.verify(token)
        .map_err(|e| ApiError::unauthorized(e.to_string()))
}

/// A web app's server, by a platform key (`ofp_…`): it provisions
/// workspaces and members, nothing else.
#[derive(Clone, Copy, Debug)]
pub struct Platform {
    pub key: uuid::Uuid,
}

impl FromRequestParts<AppState> for Platform {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?.to_owned();
        platform_key(state, &token).await
    }
}

async fn platform_key(state: &AppState, token: &str) -> Result<Platform, ApiError> {
    if !platform::is_platform_key(token) {
        return Err(ApiError::forbidden(
            "only a platform key (`ofp_…`, made by `offload platform-key create`) provisions \
             workspaces",
        ));
    }
    let db = state.db().await?;
    platform::authenticate(&db, token)
        .await?
        .map(|key| Platform { key })
        .ok_or_else(|| ApiError::unauthorized("the platform key is not valid: never issued"))
}

/// Who manages a workspace's members: a platform key, or an admin of the
/// workspace in the path.
#[derive(Clone, Copy, Debug)]
pub struct MemberAdmin {
    pub workspace: WorkspaceId,
    /// A platform key rather than an admin of the workspace.
    pub by_platform: bool,
}

impl FromRequestParts<AppState> for MemberAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?.to_owned();
        let workspace = path_workspace(parts, state).await?;
        if platform::is_platform_key(&token) {
            platform_key(state, &token).await?;
            let db = state.db().await?;
            return match platform::workspace(&**db, workspace).await? {
                Some(w) if w.deleting_at.is_none() => Ok(MemberAdmin {
                    workspace,
                    by_platform: true,
                }),
                _ => Err(ApiError::not_found("workspace")),
            };
        }
        let m = member(state, &token, workspace).await?;
        m.require_admin()?;
        Ok(MemberAdmin {
            workspace,
            by_platform: false,
        })
    }
}

/// `Json<T>` whose rejections (wrong content type, malformed JSON, a body
/// that does not fit `T`) are problem bodies naming what is wrong.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let json_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<mime::Mime>().ok())
            .is_some_and(|m| {
                m.type_() == "application"
                    && (m.subtype() == "json" || m.suffix().is_some_and(|s| s == "json"))
            });
        if !json_type {
            return Err(ApiError::new(
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
                "send the body as JSON with `Content-Type: application/json`",
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                ApiError::new(
                    axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                    "payload-too-large",
                    "Payload too large",
                    format!("the body could not be read: {}", e.body_text()),
                )
            })?;
        if has_nul_escape(&bytes) {
            // PostgreSQL stores no NUL character in text or jsonb: refuse it
            // here, naming where it is, rather than fail at the insert.
            let path = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| crate::db::nul_path(&v));
            if let Some(path) = path {
                let detail = "text may not contain the NUL character (\\u0000)";
                return Err(if path.is_empty() {
                    ApiError::bad_request(detail)
                } else {
                    ApiError::invalid(&path, detail)
                });
            }
        }
        // Straight from the bytes into the request type (no intermediate
        // JSON tree: a batch of 1000 jobs is parsed once).
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if !inner.is_data() {
                return ApiError::bad_request(format!("the body is not valid JSON: {inner}"));
            }
            let err = ApiError::invalid(&path, inner.to_string());
            if path == "." {
                ApiError { field: None, ..err }
            } else {
                err
            }
        })?;
        de.end()
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
        Ok(JsonBody(value))
    }
}

/// Whether JSON text holds a `\u0000` escape (a backslash-u0000 preceded by
/// an even number of other backslashes), the only way JSON can carry NUL.
fn has_nul_escape(bytes: &[u8]) -> bool {
    bytes.windows(6).enumerate().any(|(i, w)| {
        w == b"\\u0000" && bytes[..i].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 0
    })
}

/// The path of a workspace's routes.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct WsPath {
    /// Workspace id
    #[param(value_type = uuid::Uuid)]
    #[allow(
        dead_code,
        reason = "read and checked by `Member`; declared here for the document"
    )]
    pub ws: WorkspaceId,
}

/// The path of one item of a workspace that is not a job (a schedule, an
/// API key).
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ItemPath {
    /// Workspace id
    #[param(value_type = uuid::Uuid)]
    #[allow(
        dead_code,
        reason = "read and checked by `Member`; declared here for the document"
    )]
    pub ws: WorkspaceId,
    /// Id of the schedule or API key
    pub id: uuid::Uuid,
}

/// Query parameters as `T`, a `#[serde(deny_unknown_fields)]` struct: a
/// value that does not fit, a parameter given twice, or one the route does
/// not take is a 400 naming the parameter.
pub struct Params<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let raw = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(url::form_urlencoded::parse(raw.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(Params)
            .map_err(|e| {
                let path = e.path().to_string();
                let message = e.into_inner().to_string();
                if let Some(rest) = message.strip_prefix("unknown field ") {
                    let name = rest.split('`').nth(1).unwrap_or_default().to_string();
                    return ApiError::bad_request(format!("unknown query parameter {rest}"))
                        .with_field(name);
                }
                let name = if path == "." {
                    message.split('`').nth(1).unwrap_or_default().to_string()
                } else {
                    path
                };
                ApiError::bad_request(format!("query parameter `{name}`: {message}"))
                    .with_field(name)
            })
    }
}

/// Path parameters as `T` (a struct named like the route's `{…}`
/// segments); an id that is not a UUID is a 400 naming the segment.
pub struct Ids<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Ids<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(t)) => Ok(Ids(t)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => match e.kind() {
                ErrorKind::ParseErrorAtKey { key, value, .. }
                | ErrorKind::DeserializeError { key, value, .. } => Err(ApiError::bad_request(
                    format!("the {key} in the path, {value:?}, is not a UUID"),
                )
                .with_field(key.clone())),
                _ => Err(ApiError::bad_request(e.body_text())),
            },
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

/// A whole-number query parameter from `MIN` to `MAX`; anything else is
/// refused with the range in the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounded<const MIN: i64, const MAX: i64>(pub i64);

impl<'de, const MIN: i64, const MAX: i64> serde::Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(
            d,
            |raw| {
                raw.trim()
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (MIN..=MAX).contains(n))
                    .map(Bounded)
            },
            |raw| format!("must be a whole number from {MIN} to {MAX}, got {raw:?}"),
        )
    }
}

/// A time query parameter in RFC 3339 (`2026-01-31T09:00:00Z`).
#[derive(Clone, Copy, Debug)]
pub struct Rfc3339(pub chrono::DateTime<chrono::Utc>);

impl<'de> serde::Deserialize<'de> for Rfc3339 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(
            d,
            |raw| {
                chrono::DateTime::parse_from_rfc3339(raw)
                    .ok()
                    .map(|t| Rfc3339(t.with_timezone(&chrono::Utc)))
            },
            |raw| format!("must be an RFC 3339 time such as 2026-01-31T09:00:00Z, got {raw:?}"),
        )
    }
}

/// A query value read from its text by `parse`; text it cannot read is
/// refused with the message `refusal` makes of it (the parameter's name is
/// added by [`Params`]).
pub fn from_text<'de, D: serde::Deserializer<'de>, T>(
    d: D,
    parse: impl FnOnce(&str) -> Option<T>,
    refusal: impl FnOnce(&str) -> String,
) -> Result<T, D::Error> {
    let raw = <std::borrow::Cow<str> as serde::Deserialize>::deserialize(d)?;
    parse(&raw).ok_or_else(|| serde::de::Error::custom(refusal(&raw)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Q {
        limit: Option<Bounded<1, 200>>,
        after: Option<Rfc3339>,
        status: Option<crate::job::JobStatus>,
    }

    async fn parse(query: &str) -> Result<Q, ApiError> {
        let (mut parts, _) = Request::get(format!("/x?{query}"))
            .body(())
            .unwrap()
            .into_parts();
        Params::<Q>::from_request_parts(&mut parts, &())
            .await
            .map(|p| p.0)
    }

    #[tokio::test]
    async fn query_parameters_are_typed_and_every_refusal_names_the_parameter() {
        let q = parse("limit=20&after=2026-01-31T09:00:00Z&status=dead")
            .await
            .unwrap();
        assert_eq!(q.limit, Some(Bounded(20)));
        assert!(parse("").await.unwrap().limit.is_none());
        for (query, field, says) in [
            ("limit=0", "limit", "from 1 to 200"),
            ("limit=ten", "limit", "from 1 to 200"),
            ("limit=1&limit=2", "limit", "duplicate"),
            ("after=yesterday", "after", "RFC 3339"),
            ("status=lost", "status", "unknown variant"),
            ("colour=red", "colour", "unknown query parameter `colour`"),
        ] {
            let e = parse(query).await.unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{query}");
            assert_eq!(e.field.as_deref(), Some(field), "{query}: {}", e.detail);
            assert!(e.detail.contains(says), "{query}: {}", e.detail);
        }
    }
}
