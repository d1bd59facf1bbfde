//! `POST /api/workspaces/{ws}/tokens/{token}/complete`: ends a job's wait
//! for its wait token (an `approval`, or any handler that waits for one),
//! once. The token is scoped to its workspace: another workspace's member
//! gets 404 for it, as for a token that does not exist.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Problem};
use super::extract::{Ids, JsonBody, Member};
use super::AppState;
use crate::ids::{JobId, WorkspaceId};
use crate::store::Completion;

/// The path of one wait token.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct TokenPath {
    /// Workspace id
    #[param(value_type = uuid::Uuid)]
    pub ws: WorkspaceId,
    /// The token, as the waiting job's `wait.token` shows it (`wt_…`)
    pub token: String,
}

/// What completes a wait token.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteToken {
    /// Handed to the waiting job (an `approval` completes with
    /// `{"data": …}`), e.g. `{"approved": true, "by": "ana"}`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: Value,
}

/// A completed wait token.
#[derive(Serialize, ToSchema)]
pub struct CompletedToken {
    pub token: String,
    #[schema(value_type = uuid::Uuid)]
    pub job_id: JobId,
    pub completed_at: DateTime<Utc>,
}

/// `POST …/tokens/{token}/complete` with `{"data": any}`
#[utoipa::path(post, path = "/api/workspaces/{ws}/tokens/{token}/complete", operation_id = "complete_token", tag = "jobs",
    params(TokenPath),
    request_body = CompleteToken,
    responses(
        (status = 200, description = "Completed; the job that waited for it runs again", body = CompletedToken),
        (status = 404, description = "No such token in this workspace", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Completed before, timed out, or of an earlier run of a job retried since", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a JSON object with `data`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn complete(
    State(state): State<AppState>,
    member: Member,
    Ids(TokenPath { token, .. }): Ids<TokenPath>,
    JsonBody(body): JsonBody<CompleteToken>,
) -> Result<Json<CompletedToken>, ApiError> {
    let now = state.clock.now();
    match state
        .store
        .complete_token(member.workspace, &token, &body.data, now)
        .await?
    {
        Completion::Unknown => Err(ApiError::not_found("wait token")),
        Completion::Closed { timed_out: true } => Err(ApiError::conflict(
            "this wait token timed out: its job no longer waits for it",
        )),
        Completion::Closed { timed_out: false } => {
            Err(ApiError::conflict("this wait token was completed already"))
        }
        Completion::Retired { job_id } => Err(ApiError::conflict(format!(
            "this wait token belongs to an earlier run of job {job_id}, which was retried; \
             the new run waits on a new token (its `wait.token`)"
        ))),
        Completion::Done {
            job_id,
            completed_at,
            woken,
        } => {
            if let Some(job) = woken {
                // Committed: a send that fails leaves it `pending` for the outbox.
                if let Err(e) =
                    crate::enqueue::send_jobs(&state.store, &*state.queue, &[&job], now).await
                {
                    tracing::warn!(error = %e, job_id = %job.id, "woken job not sent; the outbox will send it");
                }
            }
            Ok(Json(CompletedToken {
                token,
                job_id,
                completed_at,
            }))
        }
    }
}
