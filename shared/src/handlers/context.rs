//! What a running handler can see and do: its lease-guarded writes
//! (progress, checkpoint, log lines), the cancel flag, a rate limiter, and
//! the time left before the invocation's deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

use super::{JobError, Outcome, WaitOn};
use crate::clock::Clock;
use crate::ids::{JobId, UserId, WorkspaceId};
use crate::job::{Job, Progress, QueueName};
use crate::queue::Queue;
use crate::ratelimit;
pub use crate::store::TokenState;
use crate::store::{Lease, LogLine, Store};

/// Progress is written at most this often; the last value is always kept
/// and written when the job finishes.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How long creating children may spend sending their messages before it
/// leaves the rest to the outbox.
const CHILDREN_SEND_BUDGET: Duration = Duration::from_secs(10);
/// The cancel flag is re-read from the database at most this often (the
/// heartbeat and progress writes refresh it too).
const CANCEL_CHECK_EVERY: Duration = Duration::from_millis(250);

/// The context of one run of one job.
pub struct JobContext {
    store: Store,
    clock: Clock,
    lease: Lease,
    workspace_id: WorkspaceId,
    /// Who created the job: its children are theirs too, and count against
    /// their creation quota.
    created_by: Option<UserId>,
    job_type: String,
    checkpoint: Option<Value>,
    progress: Option<Progress>,
    progress_written_at: Option<Instant>,
    progress_dirty: bool,
    cancel: Arc<AtomicBool>,
    cancel_checked_at: Instant,
    deadline: Instant,
    handoff_margin: Duration,
    /// Whether `should_hand_off` was asked before in this run.
    asked_hand_off: bool,
    storage: crate::storage::Storage,
    queue: Arc<dyn Queue>,
}

/// A child job to create with [`JobContext::create_children`].
#[derive(Clone, Debug)]
pub struct ChildJob {
    pub job_type: String,
    pub payload: Value,
    pub queue: QueueName,
    pub priority: i16,
    pub max_attempts: i32,
    pub tags: Vec<String>,
}

impl ChildJob {
    /// A child of `job_type` with the defaults of a new job.
    pub fn new(job_type: &str, payload: Value) -> Self {
        ChildJob {
            job_type: job_type.into(),
            payload,
            queue: QueueName::Default,
            priority: 0,
            max_attempts: 5,
            tags: Vec::new(),
        }
    }
}

impl JobContext {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        store: Store,
        clock: Clock,
        lease: Lease,
        workspace_id: WorkspaceId,
        created_by: Option<UserId>,
        job_type: String,
        checkpoint: Option<Value>,
        cancel: Arc<AtomicBool>,
        deadline: Instant,
        handoff_margin: Duration,
        storage: crate::storage::Storage,
        queue: Arc<dyn Queue>,
    ) -> Self {
        JobContext {
            store,
            clock,
            lease,
            workspace_id,
            created_by,
            job_type,
            checkpoint,
            progress: None,
            progress_written_at: None,
            progress_dirty: false,
            cancel,
            cancel_checked_at: Instant::now(),
            deadline,
            handoff_margin,
            asked_hand_off: false,
            storage,
            queue,
        }
    }

    /// A connection from the pool (none free in time: [`JobError::Busy`]).
    async fn conn(&self) -> Result<deadpool_postgres::Object, JobError> {
        Ok(self
            .store
            .pool()
            .get()
            .await
            .map_err(crate::db::DbError::from)?)
    }

    /// Object storage for the files the job reads and writes.
    pub fn storage(&self) -> &crate::storage::Storage {
        &self.storage
    }

    /// The storage key of this job's file `name` (under its workspace's
    /// prefix). A file the job lists in its result's `files` can be
    /// downloaded from [`JobContext::file_path`].
    pub fn file_key(&self, name: &str) -> String {
        crate::storage::job_file_key(self.workspace_id, self.lease.job_id, name)
    }

    /// The API path that serves this job's file `name`.
    pub fn file_path(&self, name: &str) -> String {
        crate::storage::job_file_path(self.workspace_id, self.lease.job_id, name)
    }

    /// Saves the checkpoint inside the caller's transaction, so the effects
    /// of a step and the record that it was done commit together (a crash
    /// can never leave one without the other).
    pub async fn save_checkpoint_in<T: Serialize>(
        &mut self,
        tx: &deadpool_postgres::Transaction<'_>,
        checkpoint: &T,
    ) -> Result<(), JobError> {
        let value = serde_json::to_value(checkpoint)
            .map_err(|e| JobError::Permanent(format!("checkpoint does not serialize: {e}")))?;
        let stmt = tx
            .prepare_cached(
                "UPDATE jobs SET checkpoint = $4, updated_at = $5 \
                 WHERE id = $1 AND status = 'running' AND attempts = $2 AND worker_id = $3",
            )
            .await
            .map_err(crate::db::DbError::from)?;
        let n = tx
            .execute(
                &stmt,
                &[
                    &self.lease.job_id.0,
                    &self.lease.attempt,
                    &self.lease.worker_id,
                    &value,
                    &self.clock.now(),
                ],
            )
            .await
            .map_err(crate::db::DbError::from)?;
        if n != 1 {
            return Err(JobError::LeaseLost);
        }
        self.checkpoint = Some(value);
        Ok(())
    }

    /// The time now, by the worker's clock (injected in tests).
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    pub fn job_id(&self) -> JobId {
        self.lease.job_id
    }

    pub fn workspace_id(&self) -> WorkspaceId {
        self.workspace_id
    }

    pub fn job_type(&self) -> &str {
        &self.job_type
    }

    /// This run's attempt number, starting at 1.
    pub fn attempt(&self) -> i32 {
        self.lease.attempt
    }

    /// The database, for the handler's own tables. Write effects idempotently
    /// (unique keys, `ON CONFLICT DO NOTHING`): a job may run again after a crash.
    pub fn db(&self) -> &Pool {
        self.store.pool()
    }

    /// The checkpoint saved by an earlier run of this job, if any.
    pub fn checkpoint<T: DeserializeOwned>(&self) -> Option<T> {
        self.checkpoint
            .as_ref()
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    /// Saves a checkpoint now, so a crash resumes from here.
    pub async fn save_checkpoint<T: Serialize>(&mut self, checkpoint: &T) -> Result<(), JobError> {
        let value = serde_json::to_value(checkpoint)
            .map_err(|e| JobError::Permanent(format!("checkpoint does not serialize: {e}")))?;
        if !self
            .store
            .save_checkpoint(&self.lease, &value, self.clock.now())
            .await?
        {
            return Err(JobError::LeaseLost);
        }
        self.checkpoint = Some(value);
        Ok(())
    }

    /// Stops here and continues in a fresh invocation from `checkpoint`.
    pub fn hand_off<T: Serialize>(&mut self, checkpoint: &T) -> Outcome {
        self.resume_from(checkpoint, Outcome::HandOff)
    }

    /// `outcome`, with the run continuing later from `checkpoint`.
    fn resume_from<T: Serialize>(&mut self, checkpoint: &T, outcome: Outcome) -> Outcome {
        self.checkpoint = serde_json::to_value(checkpoint).ok();
        outcome
    }

    pub(crate) fn take_checkpoint(&mut self) -> Option<Value> {
        self.checkpoint.take()
    }

    /// Creates children of this job, the i-th with index `first + i` among
    /// them, as the API creates a batch (with the Postgres queue, rows and
    /// messages in one statement; with SQS, the rows, then the messages,
    /// the outbox sending what a crash between the two left; in a workspace
    /// with a concurrency limit, parked beyond its free slots). A child whose
    /// index exists is not created again: a run repeated after a crash gets
    /// the same children, never a second set. Like every write of a
    /// handler, nothing is created once the job's lease is lost
    /// ([`JobError::LeaseLost`]). Returns how many were new.
    pub async fn create_children(
        &mut self,
        first: i32,
        children: &[ChildJob],
    ) -> Result<u64, JobError> {
        let now = self.clock.now();
        let parent = self.lease.job_id;
        let rows: Vec<crate::store::NewJob> = children
            .iter()
            .enumerate()
            .map(|(i, c)| {
                crate::store::NewJob {
                    queue: c.queue,
                    priority: c.priority,
                    max_attempts: c.max_attempts,
                    tags: c.tags.clone(),
                    run_at: now,
                    created_by: self.created_by,
                    ..crate::store::NewJob::new(self.workspace_id, &c.job_type, c.payload.clone())
                }
                .child_of(parent, first + i as i32)
            })
            .collect();
        let mut db = self.conn().await?;
        // A workspace with a concurrency limit gets them parked, with
        // messages for its free slots only, as a batch create does.
        let limit = crate::workspace::limits(&**db, self.workspace_id)
            .await?
            .max_running;
        let Some((created, sent)) = crate::enqueue::create_children(
            &self.store,
            &*self.queue,
            &mut db,
            &rows,
            self.workspace_id,
            limit,
            &self.lease,
            now,
            CHILDREN_SEND_BUDGET,
        )
        .await?
        else {
            return Err(JobError::LeaseLost);
        };
        if let Some(e) = sent.error {
            // Committed: they stay `pending` and the scheduler's outbox sends them.
            tracing::warn!(error = %e, job_id = %parent, "children not sent; the outbox will send them");
        }
        Ok(created.iter().filter(|(_, new)| *new).count() as u64)
    }

    /// How many of this job's children are unfinished and how many dead,
    /// as its wait for them counts.
    pub async fn children_counts(&self) -> Result<crate::store::ChildCounts, JobError> {
        Ok(self.store.children_counts(self.lease.job_id).await?)
    }

    /// Up to `limit` of this job's children after index `after`, in order.
    pub async fn children(&self, after: Option<i32>, limit: i64) -> Result<Vec<Job>, JobError> {
        Ok(self.store.children(self.lease.job_id, after, limit).await?)
    }

    /// Suspends the job until its children have finished (with `fail_fast`,
    /// or one of them is dead), then runs it again from `checkpoint`. No
    /// worker is held meanwhile.
    pub fn wait_for_children<T: Serialize>(&mut self, checkpoint: &T, fail_fast: bool) -> Outcome {
        self.resume_from(checkpoint, Outcome::Wait(WaitOn::Children { fail_fast }))
    }

    /// Suspends the job for `duration` (then runs it again from
    /// `checkpoint`). No worker is held meanwhile.
    pub fn wait_for<T: Serialize>(&mut self, checkpoint: &T, duration: Duration) -> Outcome {
        let until = self.clock.now() + chrono::Duration::from_std(duration).unwrap_or_default();
        self.wait_until(checkpoint, until)
    }

    /// Suspends the job until `until` (then runs it again from
    /// `checkpoint`). No worker is held meanwhile: a queue's delayed message
    /// resumes it when `until` is within 15 minutes, the scheduler's when
    /// it is further.
    pub fn wait_until<T: Serialize>(
        &mut self,
        checkpoint: &T,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Outcome {
        self.resume_from(checkpoint, Outcome::Wait(WaitOn::Until(until)))
    }

    /// This job's wait token named `name`, created the first time (timing
    /// out `timeout` from then): a re-run gets the same token. Whoever holds
    /// it completes it with `POST /api/workspaces/{ws}/tokens/{token}/complete`.
    pub async fn create_token(&self, name: &str, timeout: Duration) -> Result<String, JobError> {
        let now = self.clock.now();
        let timeout_at = now + chrono::Duration::from_std(timeout).unwrap_or_default();
        Ok(self
            .store
            .token_for(self.workspace_id, self.lease.job_id, name, timeout_at, now)
            .await?)
    }

    /// Whether this job's `token` is still open, completed (with the data it
    /// was completed with) or timed out.
    pub async fn token_state(&self, token: &str) -> Result<TokenState, JobError> {
        Ok(self
            .store
            .token_state(self.lease.job_id, token, self.clock.now())
            .await?)
    }

    /// Suspends the job until `token` is completed (then runs it again from
    /// `checkpoint`, where [`JobContext::token_state`] gives the data) or
    /// times out (the job is then `dead`). No worker is held meanwhile.
    pub fn wait_for_token<T: Serialize>(&mut self, checkpoint: &T, token: &str) -> Outcome {
        self.resume_from(checkpoint, Outcome::Wait(WaitOn::Token(token.to_string())))
    }

    /// Appends `chunk` to the job's output stream (AI output, per-item
    /// results), which `GET …/jobs/{id}/stream` serves as server-sent events
    /// as it grows. Returns the chunk's cursor. A job run again after a
    /// crash appends after what its earlier run appended.
    pub async fn stream(&self, chunk: &Value) -> Result<i64, JobError> {
        self.store
            .append_stream(&self.lease, self.workspace_id, chunk, self.clock.now())
            .await?
            .ok_or(JobError::LeaseLost)
    }

    /// Reports progress. Writes are throttled; the latest value is written
    /// when the job ends whatever the throttle.
    pub async fn progress(&mut self, progress: Progress) -> Result<(), JobError> {
        let progress = progress.with_percentage();
        let due = self
            .progress_written_at
            .is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
        self.progress = Some(progress);
        self.progress_dirty = true;
        if due {
            self.flush_progress().await?;
        }
        Ok(())
    }

    pub(crate) async fn flush_progress(&mut self) -> Result<(), JobError> {
        let Some(p) = self.progress.as_ref().filter(|_| self.progress_dirty) else {
            return Ok(());
        };
        match self
            .store
            .set_progress(&self.lease, p, self.clock.now())
            .await?
        {
            None => return Err(JobError::LeaseLost),
            Some(cancel) => {
                if cancel {
                    self.cancel.store(true, Ordering::Relaxed);
                }
                self.cancel_checked_at = Instant::now();
            }
        }
        self.progress_written_at = Some(Instant::now());
        self.progress_dirty = false;
        self.store.push_changes_soon();
        Ok(())
    }

    pub(crate) fn last_progress(&self) -> Option<&Progress> {
        self.progress.as_ref()
    }

    /// Whether a cancel was requested; check between steps and stop with
    /// [`Outcome::Cancelled`] when it is.
    pub async fn cancelled(&mut self) -> Result<bool, JobError> {
        if self.cancel.load(Ordering::Relaxed) {
            return Ok(true);
        }
        if self.cancel_checked_at.elapsed() >= CANCEL_CHECK_EVERY {
            self.cancel_checked_at = Instant::now();
            match self.store.cancel_requested(&self.lease).await? {
                None => return Err(JobError::LeaseLost),
                Some(true) => self.cancel.store(true, Ordering::Relaxed),
                Some(false) => {}
            }
        }
        Ok(self.cancel.load(Ordering::Relaxed))
    }

    /// Time left before the invocation's deadline.
    pub fn time_left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// True when the deadline is near enough that the handler should save a
    /// checkpoint and return [`JobContext::hand_off`]. The first answer of a
    /// run is always `false`, so every invocation makes at least one step of
    /// progress: a job claimed late in an invocation cannot hand off forever
    /// without moving.
    pub fn should_hand_off(&mut self) -> bool {
        let first = !self.asked_hand_off;
        self.asked_hand_off = true;
        !first && self.time_left() < self.handoff_margin
    }

    /// A line of this job's log, also traced (so it reaches the function's
    /// own logs).
    fn log_line(&self, level: &'static str, message: String, metadata: Option<Value>) -> LogLine {
        tracing::info!(job_id = %self.lease.job_id, workspace_id = %self.workspace_id,
            attempt = self.lease.attempt, job_type = %self.job_type, level, "{message}");
        LogLine {
            job_id: self.lease.job_id,
            workspace_id: self.workspace_id,
            attempt: self.lease.attempt,
            level,
            message,
            metadata,
        }
    }

    /// Writes one line to the job's log inside the caller's transaction, so
    /// it is there exactly when the step it tells of is.
    pub async fn log_in(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        level: &'static str,
        message: impl Into<String>,
        metadata: Option<Value>,
    ) -> Result<(), JobError> {
        let line = self.log_line(level, message.into(), metadata);
        crate::store::append_logs(tx, std::slice::from_ref(&line), self.clock.now()).await?;
        Ok(())
    }

    /// Writes one line to the job's log (`job_logs`), which support reads.
    pub async fn log(
        &self,
        level: &'static str,
        message: impl Into<String>,
        metadata: Option<Value>,
    ) -> Result<(), JobError> {
        let line = self.log_line(level, message.into(), metadata);
        self.store.append_logs(&[line], self.clock.now()).await?;
        Ok(())
    }

    /// Takes one token from the bucket `key`, as [`Self::take_token`] does;
    /// when it is empty, how long until one is back (to sleep or snooze).
    pub async fn take_token_or_wait(
        &self,
        key: &str,
        capacity: f64,
        per_second: f64,
    ) -> Result<Option<Duration>, JobError> {
        let db = self.conn().await?;
        if ratelimit::take(&db, key, capacity, per_second, 1.0).await? {
            return Ok(None);
        }
        Ok(Some(ratelimit::wait_for(&db, key, 1.0).await?))
    }

    /// Takes one token from the bucket `key` (created full with `capacity`
    /// tokens, refilled at `per_second`). `false`: empty; the handler should
    /// return [`Outcome::Snooze`] with [`ratelimit::wait_for_token`].
    pub async fn take_token(
        &self,
        key: &str,
        capacity: f64,
        per_second: f64,
    ) -> Result<bool, JobError> {
        let db = self.conn().await?;
        Ok(ratelimit::take(&db, key, capacity, per_second, 1.0).await?)
    }
}
