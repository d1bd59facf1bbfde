//! The HTTP API (DESIGN.md "The API"): an axum router that the api Lambda
//! runs through `lambda_http` and the local runner serves directly.

mod error;
mod extract;
mod jobs;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::TimeoutLayer;

pub use error::ApiError;
pub use extract::{JsonBody, Member};

use crate::auth::Keys;
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
    pub keys: Keys,
    pub clock: Clock,
    pub settings: ApiSettings,
}

/// HTTP-level settings from the configuration.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub cors_origins: Vec<String>,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(29),
            cors_origins: Vec::new(),
        }
    }
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let settings = state.settings.clone();
    let mut app = Router::new()
        .route("/health", get(health))
        .route(
            "/api/workspaces/{ws}/jobs",
            post(jobs::create).get(jobs::list),
        )
        .route(
            "/api/workspaces/{ws}/jobs/{id}",
            get(jobs::get_one).delete(jobs::delete),
        )
        .route("/api/workspaces/{ws}/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/workspaces/{ws}/jobs/{id}/retry", post(jobs::retry))
        .route("/api/workspaces/{ws}/jobs/{id}/logs", get(jobs::logs))
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
                .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
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
    app
}

/// Liveness with a database round trip: 503 when the database is down.
async fn health(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let db = state
        .store
        .pool()
        .get()
        .await
        .map_err(crate::db::DbError::from)?;
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
