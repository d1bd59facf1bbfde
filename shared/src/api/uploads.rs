//! Uploads: `POST /api/workspaces/{ws}/uploads` gives a key under the
//! workspace's prefix and a short-lived URL to send the file to (a
//! presigned S3 PUT, or on local storage the signed `PUT` route here); the
//! key then goes into a job's payload, e.g. `contact_import`'s
//! `{"source": {"object": key}}`. A link takes one file: of the size the
//! client declared when it asked for the link (required on S3, where the
//! signature is what holds a file to the limit), and never a second one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, Problem};
use super::extract::{JsonBody, Member, Params, WsPath};
use super::AppState;
use crate::ids::WorkspaceId;
use crate::storage::{upload_key, valid_file_name, Upload};

/// How long an upload URL works.
pub const UPLOAD_LINK_TTL: Duration = Duration::from_secs(900);

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUpload {
    /// The file's name: 1 to 100 letters, digits, `.`, `-`, `_`.
    pub filename: String,
    /// Its media type; default `application/octet-stream`.
    pub content_type: Option<String>,
    /// Its size in bytes, at most the limit (`max_bytes` of the answer):
    /// the link then takes a file of exactly this size. Required when files
    /// are kept on S3, where the link is signed for it; optional on local
    /// storage.
    #[schema(minimum = 0)]
    pub size: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct UploadView {
    /// Where the file will be: put it in a job's payload.
    pub key: String,
    /// Where to send it: an absolute presigned URL (S3), or a path of this
    /// API (local storage).
    pub url: String,
    /// Always `PUT`.
    pub method: &'static str,
    /// Headers to send with it, as they are: on S3 `Content-Length` and
    /// `If-None-Match` are part of the link's signature.
    pub headers: BTreeMap<String, String>,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// The largest file accepted, in bytes.
    pub max_bytes: u64,
}

#[utoipa::path(post, path = "/api/workspaces/{ws}/uploads", operation_id = "create_upload", tag = "uploads",
    params(WsPath),
    request_body = CreateUpload,
    responses((status = 201, description = "Send the file to `url` with `method` and `headers` before `expires_at`", body = UploadView),
              (status = 404, description = "No such workspace for this caller", body = Problem, content_type = "application/problem+json"),
              (status = 422, description = "Invalid field; `size` over the limit, or missing on S3", body = Problem, content_type = "application/problem+json"),
              (status = 503, description = "Storage unreachable", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    member: Member,
    JsonBody(body): JsonBody<CreateUpload>,
) -> Result<Response, ApiError> {
    if !valid_file_name(&body.filename) {
        return Err(ApiError::invalid(
            "filename",
            "a file name is 1 to 100 letters, digits, '.', '-' and '_', not starting with '.'",
        ));
    }
    let content_type = match body.content_type {
        None => "application/octet-stream".to_string(),
        Some(ct) => match ct.parse::<mime::Mime>() {
            Ok(m) => m.to_string(),
            Err(_) => {
                return Err(ApiError::invalid(
                    "content_type",
                    format!("{ct:?} is not a media type like text/csv"),
                ))
            }
        },
    };
    let limit = state.settings.max_upload_bytes;
    match body.size {
        Some(n) if n > limit => {
            return Err(ApiError::invalid(
                "size",
                format!("files are at most {limit} bytes"),
            ))
        }
        None if state.storage.upload_size_required() => {
            return Err(ApiError::invalid(
                "size",
                "the file's size in bytes is required: the upload link is made for it",
            ))
        }
        _ => {}
    }
    let id = Uuid::now_v7();
    let key = upload_key(member.workspace, id, &body.filename);
    let now = state.clock.now();
    let mut headers = BTreeMap::from([("Content-Type".to_string(), content_type)]);
    let url = match state
        .storage
        .upload(&key, body.size, UPLOAD_LINK_TTL, now)
        .await?
    {
        Upload::Link {
            url,
            headers: signed,
        } => {
            headers.extend(signed.into_iter().map(|(k, v)| (k.to_string(), v)));
            url
        }
        Upload::Signed { expires, signature } => {
            let size = match body.size {
                Some(n) => {
                    headers.insert("Content-Length".into(), n.to_string());
                    format!("&size={n}")
                }
                None => String::new(),
            };
            format!(
                "/api/workspaces/{}/uploads/{id}/{}?expires={expires}{size}&signature={signature}",
                member.workspace, body.filename
            )
        }
    };
    let view = UploadView {
        key,
        url,
        method: "PUT",
        headers,
        expires_at: now
            + chrono::Duration::from_std(UPLOAD_LINK_TTL).unwrap_or(chrono::TimeDelta::MAX),
        max_bytes: state.settings.max_upload_bytes,
    };
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[derive(Deserialize)]
pub struct Signed {
    expires: Option<i64>,
    /// The size the link was made for, if the client declared one.
    size: Option<u64>,
    signature: Option<String>,
}

/// The local storage's upload URL: takes the file for a signed, unexpired
/// link, streaming it to storage, at most `max_upload_bytes` and exactly
/// the size the link names, if it names one. The link is the credential
/// (as a presigned S3 URL is); it names one key, in one workspace, and a
/// kept file is never overwritten, even by two uploads at once.
pub async fn receive(
    State(state): State<AppState>,
    Path((ws, id, name)): Path<(String, String, String)>,
    Params(signed): Params<Signed>,
    body: Body,
) -> Result<Response, ApiError> {
    let refused = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "upload-link-invalid",
            "Upload link not valid",
            "this upload link is not valid or has expired; ask for a new one with \
             POST /api/workspaces/{ws}/uploads",
        )
    };
    let (Ok(ws), Ok(id)) = (ws.parse::<WorkspaceId>(), id.parse::<Uuid>()) else {
        return Err(refused());
    };
    if !valid_file_name(&name) {
        return Err(refused());
    }
    let key = upload_key(ws, id, &name);
    let (Some(expires), Some(signature)) = (signed.expires, signed.signature) else {
        return Err(refused());
    };
    let size = signed.size;
    if !state
        .storage
        .upload_allowed(&key, expires, size, &signature, state.clock.now())
    {
        return Err(refused());
    }
    let exists = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "upload-exists",
            "Already uploaded",
            "a file was already sent to this link; ask for a new one to send another",
        )
    };
    // Spares a repeat the upload of its body; two uploads at once both
    // pass it, and `put_stream_new` picks one of them.
    if state.storage.exists(&key).await? {
        return Err(exists());
    }
    let max = state.settings.max_upload_bytes;
    let limit = size.map_or(max, |n| n.min(max));
    let too_large = match size {
        Some(n) => format!("this link takes a file of exactly {n} bytes; nothing was kept"),
        None => format!("files are at most {max} bytes; nothing was kept"),
    };
    let seen = Arc::new(AtomicU64::new(0));
    let counted = seen.clone();
    let chunks = body
        .into_data_stream()
        .map(move |chunk| -> Result<Bytes, ApiError> {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request(format!("the upload broke off: {e}; nothing was kept"))
            })?;
            let total =
                counted.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
            if total > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "upload-too-large",
                    "File too large",
                    too_large.clone(),
                ));
            }
            Ok(chunk)
        });
    // After the last chunk: a file shorter than the link's size is refused
    // too, before anything is kept.
    let short = futures::stream::once(async move {
        let got = seen.load(Ordering::Relaxed);
        size.filter(|n| *n != got).map(|n| {
            Err(ApiError::bad_request(format!(
                "this link takes a file of exactly {n} bytes and {got} came; nothing was kept"
            )))
        })
    })
    .filter_map(futures::future::ready);
    if !state
        .storage
        .put_stream_new(&key, chunks.chain(short).boxed())
        .await?
    {
        return Err(exists());
    }
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "key": key }))).into_response())
}
