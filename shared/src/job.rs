//! The job model: its status machine, its queue, its progress, and the JSON
//! object a client sees. This is the one place where status and queue names
//! map to the strings stored in Postgres.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_postgres::Row;

use crate::ids::{JobId, UserId, WorkspaceId};

/// Where a job is in its life. See DESIGN.md "States".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Created, not yet accepted by the queue (the outbox).
    Pending,
    /// Its message is in the queue (or it waits for a retry's backoff).
    Queued,
    /// A worker holds its lease.
    Running,
    /// Suspended without a worker until what it waits for (its children,
    /// a time, a wait token) is done; see [`Job::wait`].
    Waiting,
    Completed,
    Cancelled,
    /// Exhausted its attempts, failed permanently, or poisoned its worker.
    Dead,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Pending,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Waiting,
        JobStatus::Completed,
        JobStatus::Cancelled,
        JobStatus::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Waiting => "waiting",
            JobStatus::Completed => "completed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Dead => "dead",
        }
    }

    /// A terminal job never changes again except by a manual retry.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Cancelled | JobStatus::Dead
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("unknown status {s:?}; expected one of pending, queued, running, waiting, completed, cancelled, dead")
            })
    }
}

/// Which queue carries a job's message. SQS has no priorities, so the queue
/// is the priority; `DeadLetter` is where messages go after
/// `maxReceiveCount` receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum QueueName {
    High,
    #[default]
    Default,
    Low,
    #[serde(rename = "dead_letter")]
    DeadLetter,
}

impl QueueName {
    /// The three queues jobs are sent to, most urgent first.
    pub const WORK: [QueueName; 3] = [QueueName::High, QueueName::Default, QueueName::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            QueueName::High => "high",
            QueueName::Default => "default",
            QueueName::Low => "low",
            QueueName::DeadLetter => "dead_letter",
        }
    }

    /// The suffix of the queue's name in SQS (`<prefix>-high`, ..., `<prefix>-dlq`).
    pub fn sqs_suffix(self) -> &'static str {
        match self {
            QueueName::DeadLetter => "dlq",
            other => other.as_str(),
        }
    }

    /// Recognises a queue from an SQS ARN or URL by its name's suffix.
    pub fn from_arn(arn: &str) -> Option<QueueName> {
        let name = arn.rsplit([':', '/']).next()?;
        [
            QueueName::High,
            QueueName::Default,
            QueueName::Low,
            QueueName::DeadLetter,
        ]
        .into_iter()
        .find(|q| name == q.sqs_suffix() || name.ends_with(&format!("-{}", q.sqs_suffix())))
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QueueName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QueueName::WORK
            .into_iter()
            .find(|q| q.as_str() == s)
            .ok_or_else(|| format!("unknown queue {s:?}; expected high, default or low"))
    }
}

/// Why a job's last attempt failed: `retryable` errors are tried again after
/// a backoff, `permanent` ones make the job `dead` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Retryable,
    Permanent,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Retryable => "retryable",
            ErrorKind::Permanent => "permanent",
        }
    }
}

/// How far a running job has got; handlers report it, clients poll it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub total: Option<u64>,
    pub processed: u64,
    pub failed: u64,
    /// 0..=100, derived from `processed` and `total` when both are known.
    pub percentage: Option<f64>,
    pub stage: Option<String>,
    pub message: Option<String>,
}

impl Progress {
    /// Progress of `processed` items out of `total`, with the percentage filled in.
    pub fn of(processed: u64, total: u64) -> Self {
        Progress {
            total: Some(total),
            processed,
            ..Default::default()
        }
        .with_percentage()
    }

    /// Fills `percentage` from `processed + failed` over `total`.
    pub fn with_percentage(mut self) -> Self {
        if let Some(total) = self.total {
            let done = (self.processed + self.failed).min(total);
            self.percentage = Some(if total == 0 {
                100.0
            } else {
                ((done as f64 / total as f64) * 10_000.0).round() / 100.0
            });
        }
        self
    }
}

/// The column list of [`Job::from_row`], as a literal so SQL constants can
/// `concat!` it.
#[macro_export]
macro_rules! job_columns {
    () => {
        "id, workspace_id, job_type, queue, priority, status, payload, attempts, max_attempts, \
         run_at, progress, result, error_message, error_kind, tags, created_at, started_at, \
         finished_at, updated_at, created_by, idempotency_key, checkpoint, worker_id, \
         lease_expires_at, enqueued_at, cancel_requested_at, parent_id, child_index, wait_kind, \
         wait_until, wait_token, busy_snoozes"
    };
}

/// What a `waiting` job waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WaitKind {
    /// Its children to finish (or, if it chose to fail fast, one to die).
    Children,
    /// A point in time.
    Time,
    /// A wait token to be completed.
    Token,
}

impl WaitKind {
    fn parse(s: &str) -> Option<WaitKind> {
        match s {
            "children" => Some(WaitKind::Children),
            "time" => Some(WaitKind::Time),
            "token" => Some(WaitKind::Token),
            _ => None,
        }
    }
}

/// A `waiting` job's wait, as clients see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Wait {
    pub kind: WaitKind,
    /// When a time wait ends, or a token wait times out.
    pub until: Option<DateTime<Utc>>,
    /// The token that completes a token wait.
    pub token: Option<String>,
}

/// One job as stored and as returned by the API. The fields a client sees
/// serialize to exactly DESIGN.md's job object; the worker's bookkeeping is
/// skipped.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Job {
    #[schema(value_type = uuid::Uuid)]
    pub id: JobId,
    #[schema(value_type = uuid::Uuid)]
    pub workspace_id: WorkspaceId,
    #[serde(rename = "type")]
    pub job_type: String,
    /// `high`, `default` or `low`.
    #[schema(value_type = String, example = "default")]
    pub queue: QueueName,
    /// 0..=10, higher first within a queue.
    pub priority: i16,
    pub status: JobStatus,
    #[schema(value_type = Object)]
    pub payload: Value,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub progress: Progress,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub error_message: Option<String>,
    pub error_kind: Option<ErrorKind>,
    pub tags: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// The job that created this one as its child; null for top-level jobs.
    #[schema(value_type = Option<uuid::Uuid>)]
    pub parent_id: Option<JobId>,
    /// What the job waits for while `waiting`; null otherwise.
    pub wait: Option<Wait>,
    /// Its place among its parent's children (0-based).
    #[serde(skip)]
    pub child_index: Option<i32>,
    /// The member (or API key) that created it: a member's `id` as
    /// `GET …/members` lists it; null for jobs the system made.
    #[schema(value_type = Option<uuid::Uuid>)]
    pub created_by: Option<UserId>,
    #[serde(skip)]
    pub idempotency_key: Option<String>,
    #[serde(skip)]
    pub checkpoint: Option<Value>,
    #[serde(skip)]
    pub worker_id: Option<String>,
    #[serde(skip)]
    pub lease_expires_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    pub enqueued_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// Runs in a row that found no database connection and snoozed (see
    /// [`crate::worker::decide::decide`]'s bound on them).
    #[serde(skip)]
    pub busy_snoozes: i32,
}

impl Job {
    /// The column list every query that builds a [`Job`] selects.
    pub const COLUMNS: &'static str = job_columns!();

    /// Reads a row selected with [`Job::COLUMNS`].
    pub fn from_row(row: &Row) -> Result<Job, tokio_postgres::Error> {
        let queue: String = row.try_get("queue")?;
        let status: String = row.try_get("status")?;
        let error_kind: Option<String> = row.try_get("error_kind")?;
        let progress: Option<Value> = row.try_get("progress")?;
        let wait_kind: Option<String> = row.try_get("wait_kind")?;
        let status: JobStatus = status.parse().unwrap_or(JobStatus::Dead);
        let wait = match (status, wait_kind.as_deref().and_then(WaitKind::parse)) {
            (JobStatus::Waiting, Some(kind)) => Some(Wait {
                kind,
                until: row.try_get("wait_until")?,
                token: row.try_get("wait_token")?,
            }),
            _ => None,
        };
        Ok(Job {
            id: JobId(row.try_get("id")?),
            workspace_id: WorkspaceId(row.try_get("workspace_id")?),
            job_type: row.try_get("job_type")?,
            // The CHECK constraints of the schema keep these three parseable.
            queue: queue.parse().unwrap_or_default(),
            priority: row.try_get("priority")?,
            status,
            payload: row.try_get("payload")?,
            attempts: row.try_get("attempts")?,
            max_attempts: row.try_get("max_attempts")?,
            run_at: row.try_get("run_at")?,
            progress: progress
                .and_then(|p| serde_json::from_value(p).ok())
                .unwrap_or_default(),
            result: row.try_get("result")?,
            error_message: row.try_get("error_message")?,
            error_kind: error_kind.map(|k| {
                if k == "permanent" {
                    ErrorKind::Permanent
                } else {
                    ErrorKind::Retryable
                }
            }),
            tags: row.try_get("tags")?,
            created_at: row.try_get("created_at")?,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
            updated_at: row.try_get("updated_at")?,
            parent_id: row
                .try_get::<_, Option<uuid::Uuid>>("parent_id")?
                .map(JobId),
            wait,
            child_index: row.try_get("child_index")?,
            created_by: row
                .try_get::<_, Option<uuid::Uuid>>("created_by")?
                .map(UserId),
            idempotency_key: row.try_get("idempotency_key")?,
            checkpoint: row.try_get("checkpoint")?,
            worker_id: row.try_get("worker_id")?,
            lease_expires_at: row.try_get("lease_expires_at")?,
            enqueued_at: row.try_get("enqueued_at")?,
            cancel_requested_at: row.try_get("cancel_requested_at")?,
            busy_snoozes: row.try_get("busy_snoozes")?,
        })
    }
}

/// What the worker's queue message carries: never the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobMessage {
    pub job_id: JobId,
    pub workspace_id: WorkspaceId,
}

impl JobMessage {
    pub fn body(&self) -> String {
        serde_json::to_string(self).expect("a JobMessage always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip_and_unknown_names_are_rejected() {
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>().unwrap(), s);
        }
        assert!("done".parse::<JobStatus>().unwrap_err().contains("done"));
    }

    #[test]
    fn queue_is_recognised_from_arn_and_url() {
        assert_eq!(
            QueueName::from_arn("arn:aws:sqs:eu-west-1:123:offload-prod-high"),
            Some(QueueName::High)
        );
        assert_eq!(
            QueueName::from_arn("http://localhost:4566/000000000000/offload-dlq"),
            Some(QueueName::DeadLetter)
        );
        assert_eq!(QueueName::from_arn("arn:aws:sqs:x:1:other"), None);
    }

    #[test]
    fn percentage_counts_failed_items_and_caps_at_100() {
        let p = Progress {
            total: Some(8),
            processed: 3,
            failed: 1,
            ..Default::default()
        }
        .with_percentage();
        assert_eq!(p.percentage, Some(50.0));
        assert_eq!(Progress::of(12, 10).percentage, Some(100.0));
        assert_eq!(Progress::of(0, 0).percentage, Some(100.0));
    }

    #[test]
    fn a_message_body_names_the_job_and_workspace_only() {
        let m = JobMessage {
            job_id: JobId::new(),
            workspace_id: WorkspaceId::new(),
        };
        let v: Value = serde_json::from_str(&m.body()).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 2);
        assert!(serde_json::from_str::<JobMessage>(r#"{"job_id":"nope"}"#).is_err());
    }
}
