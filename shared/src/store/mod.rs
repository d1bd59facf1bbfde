//! Every read and write of `jobs` and `job_logs`. Each state transition of
//! DESIGN.md "States" is one conditional UPDATE that names the state it
//! leaves (and, for a worker, the attempt and worker id it holds): a writer
//! that lost the race, or its lease, changes nothing and learns so from the
//! returned row count.
//!
//! By role: [`create`] inserts jobs, keeps idempotency keys and marks what
//! was sent; [`slots`] claims, parks and refills; [`lease`] holds the
//! worker's lease-guarded writes; [`reads`] answers the API; [`sweeps`] are
//! the scheduler's.

use chrono::{DateTime, SubsecRound, Utc};
use deadpool_postgres::GenericClient;
use deadpool_postgres::Pool;
use serde_json::Value;

use crate::db::{storable_message, storable_message_json, DbError};
use crate::ids::{JobId, UserId, WorkspaceId};
use crate::job::{Job, JobStatus, Progress, QueueName};

mod children;
mod create;
mod lease;
mod reads;
mod slots;
mod stream;
mod sweeps;
mod waits;

pub use children::ChildCounts;
pub use create::{mark_enqueued_on, MessageRows};
pub use lease::{
    bury, complete, finish_cancelled, hand_off, heartbeat, lock_held, retry_later, snooze,
    wait_for_children, wait_for_token, wait_until,
};
pub use reads::ListFilter;
pub use slots::{lock_workspaces, prepare_group, refill, Claimed, ParkedWorkspace, Peeked, Refill};
pub use sweeps::Rescued;
pub use waits::{Completion, TokenState};

/// The prefix of the idempotency keys children carry: refused in the keys
/// clients send.
pub const RESERVED_KEY_PREFIX: &str = "child:";

/// A job to insert, already validated.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub id: JobId,
    pub workspace_id: WorkspaceId,
    pub created_by: Option<UserId>,
    pub job_type: String,
    pub queue: QueueName,
    pub priority: i16,
    pub payload: Value,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub idempotency_key: Option<String>,
    pub tags: Vec<String>,
    /// For a child job: its parent and its index among the parent's
    /// children (see [`NewJob::child_of`]).
    pub parent: Option<(JobId, i32)>,
}

impl NewJob {
    /// The row [`Store::insert`] writes for this job, as a [`Job`]: times
    /// at the microsecond precision PostgreSQL keeps, tags as stored.
    fn as_inserted(&self, status: JobStatus, now: DateTime<Utc>) -> Job {
        let now = now.trunc_subsecs(6);
        Job {
            id: self.id,
            workspace_id: self.workspace_id,
            job_type: self.job_type.clone(),
            queue: self.queue,
            priority: self.priority,
            status,
            payload: self.payload.clone(),
            attempts: 0,
            max_attempts: self.max_attempts,
            run_at: self.run_at.trunc_subsecs(6),
            progress: Progress::default(),
            result: None,
            error_message: None,
            error_kind: None,
            tags: if self.tags.concat().is_empty() && self.tags.len() <= 1 {
                Vec::new()
            } else {
                self.tags.clone()
            },
            created_at: now,
            started_at: None,
            finished_at: None,
            updated_at: now,
            created_by: self.created_by,
            idempotency_key: self.idempotency_key.clone(),
            checkpoint: None,
            worker_id: None,
            lease_expires_at: None,
            enqueued_at: (status == JobStatus::Queued).then_some(now),
            cancel_requested_at: None,
            busy_snoozes: 0,
            parent_id: self.parent.map(|p| p.0),
            wait: None,
            child_index: self.parent.map(|p| p.1),
        }
    }

    /// A job of `job_type` with the defaults of DESIGN.md (queue `default`,
    /// priority 0, 5 attempts, due now).
    pub fn new(workspace_id: WorkspaceId, job_type: &str, payload: Value) -> Self {
        NewJob {
            id: JobId::new(),
            workspace_id,
            created_by: None,
            job_type: job_type.into(),
            queue: QueueName::Default,
            priority: 0,
            payload,
            max_attempts: 5,
            run_at: Utc::now(),
            idempotency_key: None,
            tags: Vec::new(),
            parent: None,
        }
    }

    /// This job as child number `index` of `parent`. The pair is the
    /// child's key (unique, V12's `jobs_children`, the insert's conflict
    /// target), so creating the same child again (a parent re-run after a
    /// crash or a retry) returns the one that exists. It also carries the
    /// idempotency key `child:{parent}:{index}` that releases before V16
    /// look children up by, so a rollback finds them; the API refuses keys
    /// with that prefix ([`RESERVED_KEY_PREFIX`]), so no client can take one.
    pub fn child_of(mut self, parent: JobId, index: i32) -> Self {
        self.idempotency_key = Some(format!("{RESERVED_KEY_PREFIX}{parent}:{index}"));
        self.parent = Some((parent, index));
        self
    }
}

/// What a worker holds while it runs a job: every write it makes names all
/// three, so a worker whose lease was rescued (the row's attempt or worker id
/// moved on) writes nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub job_id: JobId,
    pub attempt: i32,
    pub worker_id: String,
}

/// One line of a job's execution log.
#[derive(Clone, Debug)]
pub struct LogLine {
    pub job_id: JobId,
    pub workspace_id: WorkspaceId,
    pub attempt: i32,
    pub level: &'static str,
    pub message: String,
    pub metadata: Option<Value>,
}

/// Handle to the jobs tables. Cloning is shallow (the pool is shared).
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// Where changes of followed jobs go in AWS (the WebSocket API's
    /// connections); `None` locally, where the API pushes them itself.
    push: Option<std::sync::Arc<crate::realtime::Pusher>>,
}

/// The longest one call sends queued changes (a request or a batch waits
/// for it); what is left goes with the next call.
const PUSH_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);

impl Store {
    pub fn new(pool: Pool) -> Self {
        Store { pool, push: None }
    }

    /// The same store, sending changes of followed jobs to `pusher`'s
    /// connections when [`Store::push_changes`] is called.
    pub fn with_push(mut self, pusher: Option<std::sync::Arc<crate::realtime::Pusher>>) -> Self {
        self.push = pusher;
        self
    }

    pub fn pusher(&self) -> Option<&std::sync::Arc<crate::realtime::Pusher>> {
        self.push.as_ref()
    }

    /// Sends the changes of followed jobs queued so far to their
    /// WebSocket subscribers (AWS); nothing without a pusher, or while
    /// nobody is connected. A failure is logged: the job's next change
    /// sends its state again.
    pub async fn push_changes(&self) {
        let Some(p) = &self.push else { return };
        if let Err(e) = p.drain(self, PUSH_BUDGET).await {
            tracing::warn!(error = %e, "realtime: queued changes not sent; the next change sends them");
        }
    }

    /// [`Store::push_changes`] without waiting for it (a handler's progress
    /// write goes on at once).
    pub fn push_changes_soon(&self) {
        if self.push.is_some() {
            let store = self.clone();
            tokio::spawn(async move { store.push_changes().await });
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Appends log lines in one statement.
    pub async fn append_logs(&self, lines: &[LogLine], now: DateTime<Utc>) -> Result<(), DbError> {
        if lines.is_empty() {
            return Ok(());
        }
        append_logs(&self.pool.get().await?, lines, now).await
    }
}

/// Appends log lines in one statement, on the caller's connection or transaction.
pub async fn append_logs(
    db: &impl GenericClient,
    lines: &[LogLine],
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    if lines.is_empty() {
        return Ok(());
    }
    let job_ids: Vec<_> = lines.iter().map(|l| l.job_id.0).collect();
    let wss: Vec<_> = lines.iter().map(|l| l.workspace_id.0).collect();
    let attempts: Vec<_> = lines.iter().map(|l| l.attempt).collect();
    let levels: Vec<_> = lines.iter().map(|l| l.level).collect();
    let messages: Vec<_> = lines.iter().map(|l| storable_message(&l.message)).collect();
    let metadata: Vec<_> = lines
        .iter()
        .map(|l| {
            l.metadata
                .as_ref()
                .map(|m| storable_message_json(m).into_owned())
        })
        .collect();
    let stmt = db
        .prepare_cached(
            "INSERT INTO job_logs (job_id, workspace_id, attempt, level, message, metadata, created_at) \
             SELECT u.*, $7 FROM unnest($1::uuid[], $2::uuid[], $3::int4[], $4::text[], $5::text[], \
               $6::jsonb[]) AS u",
        )
        .await?;
    db.execute(
        &stmt,
        &[
            &job_ids, &wss, &attempts, &levels, &messages, &metadata, &now,
        ],
    )
    .await?;
    Ok(())
}
