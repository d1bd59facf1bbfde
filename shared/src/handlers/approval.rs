//! `approval`: a human in the loop. Creates its wait token (once), waits for
//! `POST /api/workspaces/{ws}/tokens/{token}/complete` without holding a
//! worker, and completes with `{"data": <the completion's data>}`; when
//! `timeout_s` passes first it ends `dead` with a timeout error. The token
//! is in the job's `wait.token` while it waits.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

use super::{JobContext, JobError, JobHandler, Outcome, PayloadError, TokenState};

/// The longest wait: 30 days.
pub const MAX_TIMEOUT_S: u64 = 2_592_000;

pub struct Approval;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalPayload {
    /// What is to be approved, 1 to 200 characters.
    pub name: String,
    /// 1..=2592000 seconds.
    pub timeout_s: u64,
}

#[async_trait]
impl JobHandler for Approval {
    type Payload = ApprovalPayload;
    const TYPE: &'static str = "approval";

    fn validate(&self, p: &ApprovalPayload) -> Result<(), PayloadError> {
        let len = p.name.chars().count();
        if len == 0 || len > 200 || p.name.chars().any(char::is_control) {
            return Err(PayloadError::field(
                "name",
                "a name is 1 to 200 printable characters",
            ));
        }
        if !(1..=MAX_TIMEOUT_S).contains(&p.timeout_s) {
            return Err(PayloadError::field(
                "timeout_s",
                format!(
                    "timeout_s must be from 1 to {MAX_TIMEOUT_S} (30 days), got {}",
                    p.timeout_s
                ),
            ));
        }
        Ok(())
    }

    async fn run(&self, p: ApprovalPayload, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let token = ctx
            .create_token(&p.name, Duration::from_secs(p.timeout_s))
            .await?;
        match ctx.token_state(&token).await? {
            TokenState::Completed(data) => Ok(Outcome::Completed(Some(json!({ "data": data })))),
            TokenState::TimedOut => Err(JobError::Permanent(format!(
                "timed out: wait token {} was not completed within {} s",
                p.name, p.timeout_s
            ))),
            TokenState::Open => {
                if ctx.cancelled().await? {
                    return Ok(Outcome::Cancelled(None));
                }
                Ok(ctx.wait_for_token(&json!({}), &token))
            }
        }
    }
}
