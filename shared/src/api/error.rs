//! The one place an error becomes HTTP: every failure is an
//! `application/problem+json` body (RFC 9457) with a stable `type`, a
//! `title`, a `detail` a person understands and, where there is one, the
//! offending `field`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::db::{self, DbError};

/// An error answer of the API.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// A stable, machine-readable slug; the `type` URI ends with it.
    pub kind: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub field: Option<String>,
    pub retry_after: Option<u64>,
}

/// An error body (`application/problem+json`, RFC 9457).
#[derive(Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A stable URI per kind of error, ending in its slug.
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    /// What went wrong, for a person.
    pub detail: String,
    /// The offending field (`payload.ms`, `jobs[3].type`, `Idempotency-Key`), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            title,
            detail: detail.into(),
            field: None,
            retry_after: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Bad request",
            detail,
        )
    }

    pub fn invalid(field: &str, detail: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
            "Validation failed",
            detail,
        )
        .with_field(field)
    }

    pub fn not_found(what: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            format!("no {what} with that id in this workspace"),
        )
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            detail,
        )
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, "conflict", "Conflict", detail)
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        if db::is_connection_error(&e) {
            tracing::error!(error = %e, "database unavailable");
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database-unavailable",
                "Service unavailable",
                "the database is unreachable or has no connection free; nothing was changed, \
                 try again shortly",
            );
            e.retry_after = Some(2);
            e
        } else if db::is_statement_timeout(&e) {
            tracing::warn!(error = %e, "a request's statement ran past the statement timeout");
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "query-timeout",
                "Took too long",
                "the database took too long to answer and the request was stopped; nothing \
                 was changed. Narrow it (a shorter window, fewer items) or try again shortly",
            );
            e.retry_after = Some(5);
            e
        } else {
            tracing::error!(error = %e, "database error");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "an unexpected error occurred; it has been logged",
            )
        }
    }
}

/// Storage that fails is a 503: nothing was changed, and a retry may pass.
/// (A missing object means something else to each route; they match
/// `StorageError::NotFound` before this.)
impl From<crate::storage::StorageError> for ApiError {
    fn from(e: crate::storage::StorageError) -> Self {
        tracing::error!(error = %e, "storage unavailable");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage-unavailable",
            "Service unavailable",
            "the file storage is unreachable; try again shortly",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&Problem {
            type_: format!("https://offload.dev/problems/{}", self.kind),
            title: self.title.to_string(),
            status: self.status.as_u16(),
            detail: self.detail,
            field: self.field,
        })
        .unwrap_or_default();
        let mut resp = (self.status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
