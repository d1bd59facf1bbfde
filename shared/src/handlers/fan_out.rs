//! `fan_out`: batch-and-wait from the API. Creates up to 1 000 child jobs,
//! waits for them without holding a worker (`waiting`), and completes with
//! their counts and results in order. Without `continue_on_failure`, a dead
//! child ends the wait at once: the parent is `dead` and its unfinished
//! children are cancelled (V12's trigger does that for any parent that
//! ends dead or cancelled).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{ChildJob, JobContext, JobError, JobHandler, Outcome, PayloadError};
use crate::job::{JobStatus, Progress, QueueName};

/// Most children one `fan_out` creates.
pub const MAX_CHILDREN: usize = 1000;

pub struct FanOut;

/// One child, as in a create request.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FanOutChild {
    #[serde(rename = "type")]
    pub job_type: String,
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub payload: Value,
    /// `high`, `default` (the default) or `low`.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub queue: QueueName,
    #[serde(default)]
    pub tags: Vec<String>,
    /// 1..=100, default 5.
    pub max_attempts: Option<i32>,
}

fn empty_object() -> Value {
    json!({})
}

#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FanOutPayload {
    /// 1 to 1 000 jobs to create as children.
    pub jobs: Vec<FanOutChild>,
    /// Wait for every child even when some die (the parent then completes
    /// with their counts); by default a dead child makes the parent dead and
    /// cancels the others.
    #[serde(default)]
    pub continue_on_failure: bool,
}

#[derive(Debug, Default, Deserialize, Serialize)]
struct Checkpoint {
    created: bool,
}

#[async_trait]
impl JobHandler for FanOut {
    type Payload = FanOutPayload;
    const TYPE: &'static str = "fan_out";

    fn validate(&self, p: &FanOutPayload) -> Result<(), PayloadError> {
        if p.jobs.is_empty() || p.jobs.len() > MAX_CHILDREN {
            return Err(PayloadError::field(
                "jobs",
                format!("give 1 to {MAX_CHILDREN} jobs, got {}", p.jobs.len()),
            ));
        }
        for (i, c) in p.jobs.iter().enumerate() {
            if let Some(n) = c.max_attempts.filter(|n| !(1..=100).contains(n)) {
                return Err(PayloadError::field(
                    &format!("jobs[{i}].max_attempts"),
                    format!("max_attempts must be from 1 to 100, got {n}"),
                ));
            }
            if c.tags.len() > 20 {
                return Err(PayloadError::field(
                    &format!("jobs[{i}].tags"),
                    format!("at most 20 tags, got {}", c.tags.len()),
                ));
            }
            if let Some(j) = c.tags.iter().position(|t| {
                t.is_empty() || t.chars().count() > 100 || t.chars().any(char::is_control)
            }) {
                return Err(PayloadError::field(
                    &format!("jobs[{i}].tags[{j}]"),
                    "a tag is 1 to 100 printable characters",
                ));
            }
        }
        Ok(())
    }

    fn children<'a>(&self, p: &'a FanOutPayload) -> Vec<(String, &'a str, &'a Value)> {
        p.jobs
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("jobs[{i}]"), c.job_type.as_str(), &c.payload))
            .collect()
    }

    async fn run(&self, p: FanOutPayload, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let total = p.jobs.len();
        let mut cp: Checkpoint = ctx.checkpoint().unwrap_or_default();
        if !cp.created {
            let children: Vec<ChildJob> = p
                .jobs
                .iter()
                .map(|c| ChildJob {
                    queue: c.queue,
                    tags: c.tags.clone(),
                    max_attempts: c.max_attempts.unwrap_or(5),
                    ..ChildJob::new(&c.job_type, c.payload.clone())
                })
                .collect();
            let new = ctx.create_children(0, &children).await?;
            cp.created = true;
            ctx.save_checkpoint(&cp).await?;
            ctx.log("info", format!("created {new} of {total} children"), None)
                .await?;
        }
        // Whether to wait is decided by the counts the wait is released by,
        // never by the rows read here: a count of rows that missed some
        // (deleted, or not yet visible) waited again, was released at once
        // and spun without spending an attempt.
        let left = ctx.children_counts().await?;
        let kids = ctx.children(None, total as i64).await?;
        let count = |s: JobStatus| kids.iter().filter(|k| k.status == s).count();
        let (completed, dead, cancelled) = (
            count(JobStatus::Completed),
            count(JobStatus::Dead),
            count(JobStatus::Cancelled),
        );
        let summary = |results: Option<Vec<Value>>| {
            let mut v = json!({ "completed": completed, "dead": dead, "cancelled": cancelled });
            if let Some(r) = results {
                v["results"] = Value::Array(r);
            }
            v
        };
        ctx.progress(Progress {
            total: Some(total as u64),
            processed: (completed + cancelled) as u64,
            failed: dead as u64,
            ..Default::default()
        })
        .await?;
        if ctx.cancelled().await? {
            return Ok(Outcome::Cancelled(Some(summary(None))));
        }
        if (left.dead > 0 || dead > 0) && !p.continue_on_failure {
            let first = kids.iter().find(|k| k.status == JobStatus::Dead);
            let why = first.map_or("a child is dead".to_string(), |k| {
                format!(
                    "child {} ({}, {}) is dead: {}",
                    k.child_index.unwrap_or_default(),
                    k.job_type,
                    k.id,
                    k.error_message.as_deref().unwrap_or("no error recorded")
                )
            });
            return Err(JobError::Permanent(format!(
                "{why}; its unfinished siblings are cancelled (set continue_on_failure to wait for all)"
            )));
        }
        if left.unfinished > 0 {
            return Ok(ctx.wait_for_children(&cp, !p.continue_on_failure));
        }
        // Every child has finished. Each result sits at its child's index;
        // a child whose row is gone (never, while its parent exists) leaves
        // a null there rather than shifting the others.
        let mut results = vec![Value::Null; total];
        for k in &kids {
            if let Some(slot) = k.child_index.and_then(|i| results.get_mut(i as usize)) {
                *slot = k.result.clone().unwrap_or(Value::Null);
            }
        }
        if kids.len() < total {
            ctx.log(
                "warn",
                format!(
                    "{} of {total} children were not found; their results are null",
                    total - kids.len()
                ),
                None,
            )
            .await?;
        }
        Ok(Outcome::Completed(Some(summary(Some(results)))))
    }
}
