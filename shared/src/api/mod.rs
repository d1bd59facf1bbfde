//! The HTTP API (DESIGN.md "The API"): an axum router that the api Lambda
//! runs through `lambda_http` and the local runner serves directly.

mod api_keys;
mod browser_tokens;
pub mod crm;
pub mod dashboard;
mod error;
mod extract;
pub mod jobs;
mod limits;
mod platform;
pub mod providers;
pub mod realtime;
mod schedules;
mod stats;
mod stream;
pub mod tokens;
mod uploads;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::TimeoutLayer;

pub use error::ApiError;
pub use extract::{JsonBody, Member, Viewer};

use crate::auth::Verifier;
use crate::clock::Clock;
use crate::handlers::Registry;
use crate::queue::Queue;
use crate::store::Store;

/// Everything a request handler needs. Cloning is shallow.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub queue: Arc<dyn Queue>,
    pub registry: Arc<Registry>,
    pub auth: Verifier,
    pub clock: Clock,
    pub settings: ApiSettings,
    /// Where jobs' files are, for download links.
    pub storage: crate::storage::Storage,
    /// The process's long-polls.
    pub watch: Arc<watch::Watch>,
    /// The key browser tokens are signed with; `None` refuses them.
    pub browser: Option<crate::browser_token::BrowserKeys>,
    /// The process's realtime (WebSocket) connections.
    pub realtime: Arc<realtime::Realtime>,
}

impl AppState {
    /// A connection from the pool; an unreachable database is a 503.
    pub async fn db(&self) -> Result<deadpool_postgres::Object, crate::db::DbError> {
        Ok(self.store.pool().get().await?)
    }
}

/// HTTP-level settings from the configuration.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    pub max_body_bytes: usize,
    /// Largest file a client may upload.
    pub max_upload_bytes: u64,
    pub request_timeout: Duration,
    pub cors_origins: Vec<String>,
    /// How long an `Idempotency-Key` names its job.
    pub idempotency_ttl: chrono::Duration,
    /// Where browsers connect for live changes, when not `/api/realtime`.
    pub realtime_url: Option<String>,
}

impl ApiSettings {
    /// How long a create may spend sending its jobs' messages: a third of
    /// the request's time, so a slow queue never turns a committed create
    /// into a timeout (what is not sent by then, the outbox sends).
    pub fn send_budget(&self) -> Duration {
        self.request_timeout / 3
    }
}

impl From<&crate::config::Config> for ApiSettings {
    fn from(c: &crate::config::Config) -> Self {
        ApiSettings {
            max_body_bytes: c.max_body_bytes,
            max_upload_bytes: c.max_upload_bytes,
            cors_origins: c.cors_origins.clone(),
            request_timeout: c.request_timeout,
            idempotency_ttl: chrono::Duration::from_std(c.idempotency_ttl)
                .unwrap_or(chrono::TimeDelta::MAX),
            realtime_url: c.realtime_url.clone(),
        }
    }
}

/// The values of [`crate::config::Config::defaults`].
impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings::from(&crate::config::Config::defaults())
    }
}

/// Security scheme and metadata of the OpenAPI document.
struct Doc;

impl utoipa::Modify for Doc {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT or API key")
                    .description(Some(
                        "A JWT from the identity provider (RS/ES, verified against its JWKS; \
                         HS256 where a shared secret is configured), its `iss` and `sub` naming \
                         a member; a workspace API key `ofk_…` on that workspace's routes; a \
                         platform key `ofp_…` on the provisioning routes; or a browser token \
                         `ofb_…` on the job reads it names",
                    ))
                    .build(),
            ),
        );
        openapi.info.title = "Offload".into();
        openapi.info.description =
            Some("Background jobs for web apps: create, watch, cancel and retry jobs.".into());
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(modifiers(&Doc), tags(
    (name = "jobs", description = "Create, list, inspect, cancel, retry and delete jobs"),
    (name = "schedules", description = "Recurring jobs"),
    (name = "stats", description = "Queue depth, throughput, failure rate, latency"),
    (name = "api-keys", description = "Workspace API keys for servers (admins)"),
    (name = "enrichment", description = "The data providers enrichment jobs call (admins)"),
    (name = "crm", description = "The CRMs sync_crm keeps in sync (admins), and the conflicts it parks for review"),
    (name = "uploads", description = "Short-lived URLs to send files (CSV imports) to"),
    (name = "platform", description = "Provisioning by a web app's server with a platform key: workspaces, and their members (admins too)"),
    (name = "health", description = "Liveness"),
))]
struct ApiDoc;

/// The routes and the OpenAPI document made from the same declarations, so
/// the document cannot drift from the routes.
fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    use utoipa::OpenApi;
    use utoipa_axum::router::OpenApiRouter;
    use utoipa_axum::routes;
    let routes = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(jobs::create, jobs::list))
        .routes(routes!(jobs::create_batch))
        .routes(routes!(jobs::get_one, jobs::delete))
        .routes(routes!(jobs::cancel))
        .routes(routes!(jobs::retry))
        .routes(routes!(jobs::logs))
        .routes(routes!(jobs::children))
        .routes(routes!(tokens::complete))
        .routes(routes!(stream::stream))
        .routes(routes!(jobs::file))
        .routes(routes!(stats::stats))
        .routes(routes!(api_keys::create, api_keys::list))
        .routes(routes!(api_keys::revoke))
        .routes(routes!(providers::list))
        .routes(routes!(providers::put, providers::delete))
        .routes(routes!(crm::list))
        .routes(routes!(crm::put, crm::delete))
        .routes(routes!(crm::conflicts))
        .routes(routes!(crm::resolve))
        .routes(routes!(uploads::create))
        .routes(routes!(platform::create, platform::list))
        .routes(routes!(
            platform::get_one,
            platform::update,
            platform::delete
        ))
        .routes(routes!(platform::put_member, platform::list_members))
        .routes(routes!(platform::remove_member))
        .routes(routes!(browser_tokens::create))
        .routes(routes!(schedules::list, schedules::create))
        .routes(routes!(
            schedules::get_one,
            schedules::update,
            schedules::delete
        ))
        .split_for_parts();
    let (router, mut doc) = routes;
    common_responses(&mut doc);
    (router, doc)
}

/// The problem answers every workspace route can give, declared here once
/// instead of on each route: 401 (no valid token or key), 404 (not a
/// workspace of the caller; a route that says more about its 404 keeps its
/// own), 400 for a malformed id or query parameter, and 503 (database or
/// storage unreachable, or a query past its time limit; nothing changed).
fn common_responses(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let problem = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build()
    };
    for (path, item) in doc.paths.paths.iter_mut() {
        if !path.starts_with("/api/workspaces/{ws}") {
            continue;
        }
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            let answers = &mut op.responses.responses;
            for (status, description) in [
                ("400", "A malformed id in the path or query parameter"),
                ("401", "No valid token or API key"),
                ("404", "No such workspace for this caller"),
                (
                    "503",
                    "Database or storage unreachable, or the query took too long; nothing \
                     changed (see Retry-After)",
                ),
            ] {
                answers
                    .entry(status.to_string())
                    .or_insert_with(|| problem(description).into());
            }
        }
    }
}

/// The OpenAPI document of the API, as served at `/api/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().1
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let settings = state.settings.clone();
    let (routes, doc) = routes();
    let doc = Arc::new(doc.to_json().expect("the OpenAPI document serializes"));
    let mut app = routes
        .route(
            "/api/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        (*doc).clone(),
                    )
                }
            }),
        )
        // Local storage's upload URL (what a presigned S3 URL is in
        // production): outside the document, its own size limit.
        .route(
            "/api/workspaces/{ws}/uploads/{id}/{name}",
            axum::routing::put(uploads::receive).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        // The realtime channel: a WebSocket, outside the document (OpenAPI
        // describes no WebSocket); DESIGN.md gives its messages.
        .route("/api/realtime", get(realtime::connect))
        .route("/", get(dashboard::index))
        .route("/assets/{name}", get(dashboard::asset))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        // The limit is enforced where the body is read, so an oversize body
        // gets the same problem body as any other bad input.
        .layer(axum::extract::DefaultBodyLimit::max(
            settings.max_body_bytes,
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            settings.request_timeout,
        ));
    if !settings.cors_origins.is_empty() {
        let origins: Vec<HeaderValue> = settings
            .cors_origins
            .iter()
            .filter_map(|o| o.parse().ok())
            .collect();
        app = app.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([
                    Method::GET,
                    Method::POST,
                    Method::PUT,
                    Method::PATCH,
                    Method::DELETE,
                ])
                .allow_headers([
                    axum::http::header::AUTHORIZATION,
                    axum::http::header::CONTENT_TYPE,
                    axum::http::HeaderName::from_static("idempotency-key"),
                    axum::http::header::IF_NONE_MATCH,
                ])
                .expose_headers([axum::http::header::ETAG, axum::http::header::RETRY_AFTER])
                .max_age(Duration::from_secs(600)),
        );
    }
    app.layer(axum::middleware::map_response(problem_for_bare_errors))
}

/// Error responses made outside the handlers (a timeout, a rejection deep
/// in a layer) come without a body; give them a problem body like every
/// other error.
async fn problem_for_bare_errors(resp: axum::response::Response) -> axum::response::Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error())
        || resp
            .headers()
            .contains_key(axum::http::header::CONTENT_TYPE)
    {
        return resp;
    }
    let (kind, title, detail) = match status {
        StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => (
            "timeout",
            "Timeout",
            "the request took too long; if it created something, it is there: check before retrying",
        ),
        _ => ("error", "Error", "the request could not be handled"),
    };
    ApiError::new(status, kind, title, detail).into_response()
}

/// Liveness with a database round trip: 503 when the database is down.
#[utoipa::path(get, path = "/health", operation_id = "health", tag = "health",
    responses((status = 200, description = "Up, database reachable"),
              (status = 503, description = "Database unreachable", body = error::Problem, content_type = "application/problem+json")))]
async fn health(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let db = state.db().await?;
    db.query_one("SELECT 1", &[])
        .await
        .map_err(crate::db::DbError::from)?;
    Ok(Json(json!({ "status": "ok", "database": "ok" })))
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        "no such route; the API lives under /api/workspaces/{ws}/…",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "this route does not take that method",
    )
}
