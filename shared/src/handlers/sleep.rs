//! `sleep`: sleeps `ms` in `steps` steps, reporting progress after each and
//! checking for cancellation between them; its first `fail_attempts`
//! attempts fail (retryably, or permanently with `permanent`). It exercises
//! every delivery rule without touching anything outside Offload.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{JobContext, JobError, JobHandler, Outcome, PayloadError};
use crate::job::Progress;

pub struct Sleep;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SleepPayload {
    pub ms: u64,
    #[serde(default = "one")]
    pub steps: u32,
    #[serde(default)]
    pub fail_attempts: u32,
    #[serde(default)]
    pub permanent: bool,
}

fn one() -> u32 {
    1
}

/// Where a handed-off sleep resumes.
#[derive(Debug, Deserialize, Serialize)]
struct Checkpoint {
    next_step: u32,
}

/// One day: longer sleeps are surely a mistake.
const MAX_MS: u64 = 86_400_000;

#[async_trait]
impl JobHandler for Sleep {
    type Payload = SleepPayload;
    const TYPE: &'static str = "sleep";

    fn validate(&self, p: &SleepPayload) -> Result<(), PayloadError> {
        if p.ms > MAX_MS {
            return Err(PayloadError::field(
                "ms",
                format!("must be at most {MAX_MS}"),
            ));
        }
        if !(1..=10_000).contains(&p.steps) {
            return Err(PayloadError::field("steps", "must be from 1 to 10000"));
        }
        Ok(())
    }

    async fn run(&self, p: SleepPayload, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        if ctx.attempt() <= p.fail_attempts as i32 {
            let msg = format!(
                "failing attempt {} of {} on purpose",
                ctx.attempt(),
                p.fail_attempts
            );
            return Err(if p.permanent {
                JobError::Permanent(msg)
            } else {
                JobError::Retryable(msg)
            });
        }
        let start = ctx
            .checkpoint::<Checkpoint>()
            .map(|c| c.next_step)
            .unwrap_or(0);
        let step = Duration::from_millis(p.ms / p.steps as u64);
        for i in start..p.steps {
            if ctx.cancelled().await? {
                return Ok(Outcome::Cancelled(Some(json!({ "steps_done": i }))));
            }
            if ctx.should_hand_off() {
                return Ok(ctx.hand_off(&Checkpoint { next_step: i }));
            }
            tokio::time::sleep(step).await;
            ctx.progress(Progress {
                stage: Some("sleeping".into()),
                message: Some(format!("step {} of {}", i + 1, p.steps)),
                ..Progress::of(i as u64 + 1, p.steps as u64)
            })
            .await?;
        }
        Ok(Outcome::Completed(Some(
            json!({ "slept_ms": p.ms, "steps": p.steps }),
        )))
    }
}
