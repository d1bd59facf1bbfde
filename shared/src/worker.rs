//! The worker: the SQS event handler. For a batch of messages it claims the
//! jobs in one statement (parking, in the database, those whose workspace is
//! at its concurrency limit), runs the claimed ones concurrently, and
//! records each outcome as soon as its handler returns: whatever finished
//! while the previous write was under way is written together (a group
//! commit), so a short job never waits for a long neighbour and a crash
//! re-runs only what was still running. The same transaction fills the
//! slots those jobs freed with their workspaces' parked jobs, which this
//! invocation starts itself for a short while and then releases by message.
//! It returns the messages that must come back (`batchItemFailures`);
//! Lambda, or the local runner, deletes the rest.

mod decide;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use chrono::{DateTime, Utc};
use futures::FutureExt;
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

pub use decide::{backoff, decide, delay_for, jittered, Action, Facts, Route};

use crate::clock::Clock;
use crate::config::WorkerConfig;
use crate::db::{self, DbError};
use crate::enqueue;
use crate::handlers::{JobContext, JobError, Outcome, Registry, WaitOn};
use crate::ids::{JobId, WorkspaceId};
use crate::job::{Job, JobMessage, JobStatus, Progress, QueueName};
use crate::queue::{OutgoingMessage, Queue, QueueError, MAX_DELAY, MAX_VISIBILITY};
use crate::run_metrics::RunMetrics;
use crate::storage::Storage;
use crate::store::{self, Lease, LogLine, Refill, Store};
use crate::workspace::LimitCache;

/// Everything a worker invocation needs, built once per process.
pub struct Worker {
    store: Store,
    queue: Arc<dyn Queue>,
    registry: Arc<Registry>,
    config: WorkerConfig,
    clock: Clock,
    /// Names this process in `worker_id` (with a fresh suffix per claim).
    name: String,
    /// Workspaces' concurrency limits, read at most every 30 s.
    limits: LimitCache,
    /// Where handlers read and write files.
    storage: Storage,
}

/// One message of the batch, parsed.
struct Record {
    message_id: String,
    receipt: String,
    queue: QueueName,
    job: JobMessage,
    /// Times the queue has delivered this message, this one included.
    receive_count: u32,
}

/// A job this invocation runs.
struct Held {
    job: Job,
    lease: Lease,
    /// The message that delivered it (none for a parked job taken into a
    /// freed slot).
    record: Option<Arc<Record>>,
    cancel: Arc<AtomicBool>,
}

/// What a handler returned, with what its context kept.
struct Ran {
    job_id: JobId,
    result: Result<Outcome, JobError>,
    checkpoint: Option<serde_json::Value>,
    progress: Option<Progress>,
    run_time: Duration,
}

/// What writing an action left the job as.
enum Written {
    /// The statement won; the job is now in this status.
    Now(JobStatus),
    /// The lease was lost: nothing was written.
    Lost,
}

/// A job to deliver again after `delay` by a fresh message.
struct ComeBack {
    job: JobMessage,
    queue: QueueName,
    /// Its current message, if it came with one.
    record: Option<Arc<Record>>,
    delay: Duration,
}

impl ComeBack {
    fn of(held: &Held, delay: Duration) -> ComeBack {
        ComeBack {
            job: JobMessage {
                job_id: held.job.id,
                workspace_id: held.job.workspace_id,
            },
            queue: held.job.queue,
            record: held.record.clone(),
            delay,
        }
    }
}

impl Worker {
    pub fn new(
        store: Store,
        queue: Arc<dyn Queue>,
        registry: Arc<Registry>,
        config: WorkerConfig,
        clock: Clock,
        name: impl Into<String>,
        storage: Storage,
    ) -> Worker {
        Worker {
            store,
            queue,
            registry,
            config,
            clock,
            name: name.into(),
            limits: LimitCache::default(),
            storage,
        }
    }

    /// The same worker with handlers reading and writing `storage`.
    pub fn with_storage(mut self, storage: Storage) -> Worker {
        self.storage = storage;
        self
    }

    /// Reads the concurrency limits of these workspaces into the cache, as a
    /// long-lived worker has them.
    pub async fn warm_limits(&self, workspaces: &[WorkspaceId]) -> Result<(), DbError> {
        self.limits
            .max_running(self.store.pool(), workspaces)
            .await
            .map(|_| ())
    }

    /// A name for one claim: the lease guard's `worker_id`.
    fn claim_name(&self) -> String {
        format!("{}:{}", self.name, uuid::Uuid::new_v4().simple())
    }

    /// Handles one SQS event. `deadline` is when the invocation will be
    /// stopped (Lambda's deadline); handlers hand off before it.
    pub async fn handle(&self, event: SqsEvent, deadline: Instant) -> SqsBatchResponse {
        let started = Instant::now();
        let mut failures: Vec<String> = Vec::new();
        let records = parse_records(event, &mut failures);
        if records.is_empty() {
            return response(failures);
        }

        let worker_id = self.claim_name();
        let now = self.clock.now();
        let ids: Vec<JobId> = records.iter().map(|r| r.job.job_id).collect();
        let workspaces: Vec<WorkspaceId> = records.iter().map(|r| r.job.workspace_id).collect();
        let claimed = match self.claim(&ids, &workspaces, &worker_id, now).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, messages = records.len(),
                    "cannot claim: the whole batch comes back shortly");
                self.fail_all(&records.iter().collect::<Vec<_>>(), &mut failures)
                    .await;
                return response(failures);
            }
        };
        let mut runs: Vec<(Arc<Record>, Job)> = Vec::new();
        let mut seen = HashSet::new();
        let unclaimed = sort_claimed(records, claimed, &mut runs, &mut seen);
        let busy = if unclaimed.is_empty() {
            Vec::new()
        } else {
            self.triage_unclaimed(unclaimed, &mut failures).await
        };
        if !busy.is_empty() {
            // Due and waiting, but another transaction held the row: most
            // often the sender still marking it `queued` after its message
            // went out. Such a lock lasts milliseconds; one more claim after
            // a pause starts the job now instead of seconds later.
            tokio::time::sleep(BUSY_PAUSE).await;
            let ids: Vec<JobId> = busy.iter().map(|r| r.job.job_id).collect();
            let ws: Vec<WorkspaceId> = busy.iter().map(|r| r.job.workspace_id).collect();
            let again = match self.claim(&ids, &ws, &worker_id, self.clock.now()).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "second claim failed");
                    store::Claimed::default()
                }
            };
            let still = sort_claimed(busy, again, &mut runs, &mut seen);
            let wait = self.config.fairness_delay;
            let later = still.into_iter().map(|r| (Arc::new(r), wait)).collect();
            self.come_back_records(later, self.clock.now(), &mut failures)
                .await;
        }
        if runs.is_empty() {
            return response(failures);
        }

        let mut inv = Invocation {
            worker: self,
            tasks: JoinSet::new(),
            task_jobs: HashMap::new(),
            held: HashMap::new(),
            failures,
            deadline,
            refill_until: (started + self.config.refill_window).min(
                deadline
                    .checked_sub(self.config.handoff_margin)
                    .unwrap_or(started),
            ),
            candidates: HashMap::new(),
            metrics: RunMetrics::default(),
        };
        for (record, job) in runs {
            let lease = Lease {
                job_id: job.id,
                attempt: job.attempts,
                worker_id: worker_id.clone(),
            };
            inv.start(job, lease, Some(record));
        }
        inv.run().await;
        for line in inv.metrics.take_lines(self.clock.now()) {
            println!("{line}");
        }
        // The jobs' ends, to whoever follows them over WebSockets (AWS).
        self.store.push_changes().await;
        response(inv.failures)
    }

    async fn claim(
        &self,
        ids: &[JobId],
        workspaces: &[WorkspaceId],
        worker_id: &str,
        now: DateTime<Utc>,
    ) -> Result<store::Claimed, DbError> {
        let limits = self
            .limits
            .max_running(self.store.pool(), workspaces)
            .await?;
        self.store
            .claim(ids, worker_id, now, self.lease(), &limits)
            .await
    }

    fn lease(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.config.lease).unwrap_or_default()
    }

    /// Reports every record failed and hides each for a short delay,
    /// jittered per message so they do not all come back at the same
    /// instant: a batch-wide failure (the database unreachable, a statement
    /// refused) is usually brief, and without this the messages would stay
    /// hidden for the queue's whole visibility timeout.
    async fn fail_all(&self, records: &[&Record], failures: &mut Vec<String>) {
        for r in records {
            let delay = jittered(self.config.batch_failure_delay, &mut rand::rng());
            if let Err(e) = self
                .queue
                .change_visibility(r.queue, &r.receipt, delay)
                .await
            {
                tracing::debug!(job_id = %r.job.job_id, error = %e, "cannot shorten visibility");
            }
            failures.push(r.message_id.clone());
        }
    }

    /// Decides the fate of messages whose job could not be claimed, and
    /// returns those whose job is due and waiting (its row was busy).
    async fn triage_unclaimed(
        &self,
        unclaimed: Vec<Record>,
        failures: &mut Vec<String>,
    ) -> Vec<Record> {
        let ids: Vec<JobId> = unclaimed.iter().map(|r| r.job.job_id).collect();
        let states: HashMap<JobId, store::Peeked> = match self.store.peek(&ids).await {
            Ok(rows) => rows.into_iter().map(|p| (p.id, p)).collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read unclaimed jobs: their messages come back shortly");
                self.fail_all(&unclaimed.iter().collect::<Vec<_>>(), failures)
                    .await;
                return Vec::new();
            }
        };
        let now = self.clock.now();
        let cancel: Vec<JobId> = states
            .values()
            .filter(|p| p.cancel_requested && !p.status.is_terminal())
            .map(|p| p.id)
            .collect();
        if !cancel.is_empty() {
            match self.store.end_cancel_requested(&cancel, now).await {
                Ok(ended) => {
                    for id in ended {
                        tracing::info!(job_id = %id, "cancel requested before the job started: cancelled");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot end cancelled jobs; the scheduler will")
                }
            }
        }
        let mut later = Vec::new();
        let mut busy = Vec::new();
        for r in unclaimed {
            let job_id = r.job.job_id;
            match states.get(&job_id) {
                None => {
                    tracing::warn!(job_id = %job_id, workspace_id = %r.job.workspace_id,
                        "message for a job that does not exist: acknowledged");
                }
                Some(p)
                    if p.status.is_terminal()
                        || p.status == JobStatus::Running
                        || p.status == JobStatus::Waiting
                        || p.cancel_requested =>
                {
                    // Finished, held by another worker, waiting (what ends
                    // its wait sends it a message of its own), or (an expired
                    // lease with no attempts left, or a cancel) for the
                    // scheduler's rescue to end.
                    tracing::debug!(job_id = %job_id, status = %p.status,
                        "job finished or held elsewhere: message acknowledged");
                }
                Some(p) => match (p.run_at - now).to_std() {
                    // Not yet due (an early duplicate, or a retry delivered
                    // before its backoff ended): it comes back when it is.
                    Ok(wait) if !wait.is_zero() => {
                        later.push((Arc::new(r), wait.max(Duration::from_secs(1))));
                    }
                    _ => busy.push(r),
                },
            }
        }
        self.come_back_records(later, now, failures).await;
        busy
    }

    /// [`Worker::come_back_later`] for messages whose job was not claimed.
    async fn come_back_records(
        &self,
        later: Vec<(Arc<Record>, Duration)>,
        now: DateTime<Utc>,
        failures: &mut Vec<String>,
    ) {
        let items = later
            .into_iter()
            .map(|(r, delay)| ComeBack {
                job: r.job,
                queue: r.queue,
                record: Some(r),
                delay,
            })
            .collect();
        self.come_back_later(items, now, failures).await;
    }

    /// Makes jobs come back after their delays without spending a receive:
    /// each gets a fresh message sent with its delay and its old message (if
    /// any) is acknowledged. Snoozes, waits and early duplicates are not
    /// failures; hiding the same message instead would count each toward
    /// the queue's maxReceiveCount and dead-letter a job that never failed.
    /// Delays beyond the queue's limit go to the outbox; where the queue
    /// will not take a fresh message, the old one is hidden for the delay
    /// instead (or, with no old message, the outbox sends one).
    async fn come_back_later(
        &self,
        items: Vec<ComeBack>,
        now: DateTime<Utc>,
        failures: &mut Vec<String>,
    ) {
        let mut by_queue: HashMap<QueueName, Vec<ComeBack>> = HashMap::new();
        for item in items {
            if item.delay > MAX_DELAY {
                self.to_outbox_or_hide(&item, now, failures).await;
            } else {
                by_queue.entry(item.queue).or_default().push(item);
            }
        }
        for (q, items) in by_queue {
            let messages: Vec<OutgoingMessage> = items
                .iter()
                .enumerate()
                .map(|(i, c)| OutgoingMessage {
                    id: i.to_string(),
                    body: c.job.body(),
                    delay: c.delay,
                })
                .collect();
            let sent: HashSet<String> = match self.queue.send_batch(q, &messages).await {
                Ok(()) => messages.into_iter().map(|m| m.id).collect(),
                Err(QueueError::PartialSend { sent, .. }) => sent.into_iter().collect(),
                Err(e) => {
                    tracing::warn!(queue = %q, error = %e, "cannot send fresh messages; hiding the old ones");
                    HashSet::new()
                }
            };
            for (i, item) in items.into_iter().enumerate() {
                if !sent.contains(&i.to_string()) {
                    self.to_outbox_or_hide(&item, now, failures).await;
                }
            }
        }
    }

    /// Hides the old message for the delay, or (without one, or beyond the
    /// queue's limits) leaves the job to the scheduler's outbox.
    async fn to_outbox_or_hide(
        &self,
        item: &ComeBack,
        now: DateTime<Utc>,
        failures: &mut Vec<String>,
    ) {
        if item.delay <= MAX_DELAY {
            if let Some(rec) = &item.record {
                if self.hide(rec, item.delay, failures).await {
                    return;
                }
            }
        }
        if let Err(e) = self.store.to_outbox(item.job.job_id, now).await {
            tracing::error!(job_id = %item.job.job_id, error = %e, "cannot move job to the outbox");
            if let Some(rec) = &item.record {
                failures.push(rec.message_id.clone());
            }
        }
    }

    /// Hides a message for the delay and reports it failed (spending a
    /// receive). `false` when the queue refused.
    async fn hide(&self, rec: &Record, delay: Duration, failures: &mut Vec<String>) -> bool {
        match self
            .queue
            .change_visibility(rec.queue, &rec.receipt, delay.min(MAX_VISIBILITY))
            .await
        {
            Ok(()) => {
                failures.push(rec.message_id.clone());
                true
            }
            Err(e) => {
                tracing::warn!(job_id = %rec.job.job_id, error = %e, "cannot delay message");
                false
            }
        }
    }
}

/// One invocation's running jobs, from the claim until the last outcome is
/// written.
struct Invocation<'w> {
    worker: &'w Worker,
    /// Dropping the set (the invocation is cancelled) aborts the handlers.
    tasks: JoinSet<Ran>,
    task_jobs: HashMap<tokio::task::Id, JobId>,
    held: HashMap<JobId, Held>,
    failures: Vec<String>,
    deadline: Instant,
    /// Until then, slots freed here are filled by starting parked jobs in
    /// this invocation; after it they are released by message, so one busy
    /// workspace never keeps an invocation (and its concurrency) for itself.
    refill_until: Instant,
    /// The next parked ids of the workspaces this invocation takes from, in
    /// order, read ahead (see `store::refill`).
    candidates: HashMap<WorkspaceId, Vec<JobId>>,
    /// What the invocation's runs ended with, printed as metrics at its end
    /// (with `emit_metrics`).
    metrics: RunMetrics,
}

impl Invocation<'_> {
    /// Starts a claimed job's handler.
    fn start(&mut self, job: Job, lease: Lease, record: Option<Arc<Record>>) {
        let w = self.worker;
        let cancel = Arc::new(AtomicBool::new(job.cancel_requested_at.is_some()));
        let mut ctx = JobContext::new(
            w.store.clone(),
            w.clock.clone(),
            lease.clone(),
            job.workspace_id,
            job.created_by,
            job.job_type.clone(),
            job.checkpoint.clone(),
            cancel.clone(),
            self.deadline,
            w.config.handoff_margin,
            w.storage.clone(),
            w.queue.clone(),
        );
        let registry = w.registry.clone();
        let span = tracing::info_span!("job", job_id = %job.id, workspace_id = %job.workspace_id,
            attempt = lease.attempt, job_type = %job.job_type);
        let (id, job_type, payload) = (job.id, job.job_type.clone(), job.payload.clone());
        let handle = self.tasks.spawn(
            async move {
                let started = Instant::now();
                let result =
                    std::panic::AssertUnwindSafe(registry.run(&job_type, &payload, &mut ctx))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|panic| {
                            let msg = panic
                                .downcast_ref::<&str>()
                                .map(|s| s.to_string())
                                .or_else(|| panic.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "unknown panic".into());
                            Err(JobError::Retryable(format!("handler panicked: {msg}")))
                        });
                let result = match result {
                    // The last progress must be written even when the
                    // throttle held it back.
                    Ok(o) => ctx.flush_progress().await.map(|_| o),
                    err => err,
                };
                Ran {
                    job_id: id,
                    progress: ctx.last_progress().cloned(),
                    checkpoint: ctx.take_checkpoint(),
                    result,
                    run_time: started.elapsed(),
                }
            }
            .instrument(span),
        );
        self.task_jobs.insert(handle.id(), id);
        self.held.insert(
            id,
            Held {
                job,
                lease,
                record,
                cancel,
            },
        );
    }

    /// Writes outcomes as handlers return and renews the leases of what
    /// still runs, until nothing does. One loop does both, so a heartbeat
    /// and an outcome never lock the same rows at once.
    async fn run(&mut self) {
        let every = self.worker.config.heartbeat;
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        while !self.tasks.is_empty() {
            tokio::select! {
                Some(first) = self.tasks.join_next_with_id() => {
                    let mut done = vec![self.ran(first)];
                    // Handlers finishing at this instant (a batch of short
                    // jobs) join the group, for as long as they keep
                    // finishing: each group is a statement and a commit
                    // that the workspace's other writers wait for.
                    let mut quiet = 0;
                    while quiet < GROUP_YIELDS {
                        tokio::task::yield_now().await;
                        let before = done.len();
                        while let Some(more) = self.tasks.try_join_next_with_id() {
                            done.push(self.ran(more));
                        }
                        quiet = if done.len() == before { quiet + 1 } else { 0 };
                    }
                    self.record(done).await;
                }
                _ = tick.tick() => self.heartbeat().await,
            }
        }
    }

    fn ran(&mut self, joined: Result<(tokio::task::Id, Ran), tokio::task::JoinError>) -> Ran {
        match joined {
            Ok((id, ran)) => {
                self.task_jobs.remove(&id);
                ran
            }
            // The panic was caught inside the task; a join error means it was
            // aborted. Its job is retried like any failure.
            Err(e) => {
                let job_id = self.task_jobs.remove(&e.id()).unwrap_or_default();
                tracing::error!(job_id = %job_id, error = %e, "job task lost");
                Ran {
                    job_id,
                    result: Err(JobError::Retryable(format!("job task lost: {e}"))),
                    checkpoint: None,
                    progress: None,
                    run_time: Duration::ZERO,
                }
            }
        }
    }

    async fn heartbeat(&mut self) {
        let w = self.worker;
        let leases: Vec<Lease> = self.held.values().map(|h| h.lease.clone()).collect();
        let alive = match w.store.heartbeat(&leases, w.clock.now(), w.lease()).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                return;
            }
        };
        for (id, cancel) in &alive {
            let Some(h) = self.held.get(id) else { continue };
            if *cancel {
                h.cancel.store(true, Ordering::Relaxed);
            }
            if let Some(rec) = &h.record {
                if let Err(e) = w
                    .queue
                    .change_visibility(rec.queue, &rec.receipt, w.config.lease)
                    .await
                {
                    tracing::warn!(job_id = %id, error = %e, "cannot extend message visibility");
                }
            }
        }
    }

    /// Decides, writes in one transaction (with the refill of the slots the
    /// jobs freed), then sends what must come back and starts what was taken.
    async fn record(&mut self, done: Vec<Ran>) {
        let w = self.worker;
        let now = w.clock.now();
        let mut plan: Vec<(Held, Action, Ran)> = Vec::with_capacity(done.len());
        for ran in done {
            let Some(held) = self.held.remove(&ran.job_id) else {
                continue;
            };
            let facts = Facts {
                attempt: held.lease.attempt,
                max_attempts: held.job.max_attempts,
                cancel_requested: held.cancel.load(Ordering::Relaxed),
                receive_count: held.record.as_ref().map(|r| r.receive_count),
                max_receive_count: w.config.max_receive_count,
                busy_snoozes: held.job.busy_snoozes,
                max_busy_snoozes: w.config.max_busy_snoozes,
            };
            let delay = delay_for(&w.config, &ran.result, &facts, &mut rand::rng());
            let action = decide(&ran.result, ran.checkpoint.as_ref(), &facts, delay);
            plan.push((held, action, ran));
        }
        if plan.is_empty() {
            return;
        }
        let limits = match w
            .limits
            .max_running(
                w.store.pool(),
                &plan
                    .iter()
                    .map(|p| p.0.job.workspace_id)
                    .collect::<Vec<_>>(),
            )
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot read workspace limits");
                return self.unrecorded(plan, &e).await;
            }
        };
        let refill = if Instant::now() < self.refill_until {
            Refill::Take
        } else {
            Refill::Release
        };
        let claim = w.claim_name();
        // Candidates for the take: the first few read-ahead ids of each
        // limited workspace of the group.
        let group_limits: Vec<(WorkspaceId, i64)> = limits
            .iter()
            .filter(|l| plan.iter().any(|p| p.0.job.workspace_id == l.0))
            .copied()
            .collect();
        let passed: Vec<JobId> = match refill {
            Refill::Take => group_limits
                .iter()
                .flat_map(|(ws, max)| {
                    let list = self.candidates.get(ws).map(Vec::as_slice).unwrap_or(&[]);
                    list[..list.len().min(2 * *max as usize)].to_vec()
                })
                .collect(),
            Refill::Release => Vec::new(),
        };
        // A failed write strands the group's jobs in `running` until their
        // leases expire (and then runs them again), so a short outage (a
        // dropped connection, a failover) is waited out while the
        // invocation has time.
        let mut pauses = WRITE_RETRY_PAUSES.iter();
        let written = loop {
            let r = db::retry_conflicts(|| {
                write_group(w, &plan, &group_limits, &passed, refill, &claim, now)
            })
            .await;
            match (r, pauses.next()) {
                (Err(e), Some(pause)) if Instant::now() + *pause < self.deadline => {
                    tracing::warn!(error = %e, jobs = plan.len(), "cannot record outcomes; trying again");
                    tokio::time::sleep(*pause).await;
                }
                (r, _) => break r,
            }
        };
        let (statuses, refilled) = match written {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, jobs = plan.len(), "cannot record outcomes");
                return self.unrecorded(plan, &e).await;
            }
        };

        let mut later: Vec<ComeBack> = Vec::new();
        let mut handed_off: Vec<Job> = Vec::new();
        let mut finished: Vec<(JobId, JobStatus)> = Vec::new();
        for ((held, action, ran), written) in plan.into_iter().zip(statuses) {
            let job = &held.job;
            if let (Some(parent), Written::Now(st)) = (job.parent_id, &written) {
                finished.push((parent, *st));
            }
            let outcome = match (&action, &written) {
                (_, Written::Lost) => "lost",
                (_, Written::Now(JobStatus::Cancelled)) => "cancelled",
                (Action::Complete(_), _) => "completed",
                (Action::Bury { .. }, _) => "dead",
                // A wait that was over before it began (its children had
                // finished, its token was completed) runs again now, as a
                // hand-off does.
                (Action::HandOff(_), _)
                | (Action::Wait { .. }, Written::Now(JobStatus::Pending)) => {
                    let mut fresh = held.job.clone();
                    fresh.run_at = now;
                    handed_off.push(fresh);
                    "handed_off"
                }
                (
                    Action::Wait {
                        on: WaitOn::Until(until),
                        ..
                    },
                    Written::Now(JobStatus::Waiting),
                ) => {
                    // A delayed message resumes it when it is due within a
                    // queue's delay; a later one the scheduler sends then.
                    let mut resumed = held.job.clone();
                    resumed.run_at = *until;
                    handed_off.push(resumed);
                    "waiting"
                }
                (Action::Wait { .. }, _) => "waiting",
                (Action::Snooze(delay), _) => {
                    later.push(ComeBack::of(&held, *delay));
                    "snoozed"
                }
                (Action::Retry { delay, route, .. }, _) => {
                    match (route, &held.record) {
                        (Route::Visibility, Some(rec)) => {
                            if !w.hide(rec, *delay, &mut self.failures).await {
                                later.push(ComeBack::of(&held, *delay));
                            }
                        }
                        (Route::Outbox, _) => {}
                        _ => later.push(ComeBack::of(&held, *delay)),
                    }
                    "retried"
                }
                (Action::Cancel(_), _) | (Action::Drop, _) => "cancelled",
            };
            // The outcome is on the job; a line per job in CloudWatch Logs
            // would cost about what running it does, so only the rarer
            // outcomes that want an operator's eye are logged at `info`.
            match outcome {
                "completed" | "waiting" | "snoozed" | "handed_off" => {
                    tracing::debug!(job_id = %job.id, workspace_id = %job.workspace_id,
                        attempt = held.lease.attempt, job_type = %job.job_type, outcome,
                        "job ended its run")
                }
                _ => tracing::info!(job_id = %job.id, workspace_id = %job.workspace_id,
                    attempt = held.lease.attempt, job_type = %job.job_type, outcome,
                    "job ended its run"),
            }
            if w.config.emit_metrics {
                self.metrics.add(job, outcome, ran.run_time);
            }
        }
        // Parents whose last child (or, failing fast, a dead one) this group
        // finished were woken by the same commit: their messages go now (the
        // scheduler's outbox sends any this misses).
        let parents: Vec<JobId> = finished
            .iter()
            .filter_map(|(parent, status)| status.is_terminal().then_some(*parent))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if !parents.is_empty() {
            match w.store.woken_parents(&parents).await {
                Ok(parents) => handed_off.extend(parents),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read woken parents; the outbox will send them")
                }
            }
        }
        if !handed_off.is_empty() {
            let refs: Vec<&Job> = handed_off.iter().collect();
            if let Err(e) = enqueue::send_jobs(&w.store, &*w.queue, &refs, now).await {
                tracing::warn!(error = %e, "hand-off send failed; the scheduler will send it");
            }
        }
        if !later.is_empty() {
            w.come_back_later(later, now, &mut self.failures).await;
        }
        match refill {
            Refill::Take => {
                self.read_ahead(&group_limits, &passed, &refilled).await;
                for job in refilled {
                    let lease = Lease {
                        job_id: job.id,
                        attempt: job.attempts,
                        worker_id: claim.clone(),
                    };
                    self.start(job, lease, None);
                }
            }
            Refill::Release if !refilled.is_empty() => {
                let refs: Vec<&Job> = refilled.iter().collect();
                match enqueue::send_jobs(&w.store, &*w.queue, &refs, now).await {
                    Ok(sent) => {
                        if let Some(e) = sent.error {
                            tracing::warn!(error = %e, "released jobs not sent; the outbox will send them");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "released jobs not marked; the outbox will send them")
                    }
                }
            }
            Refill::Release => {}
        }
    }

    /// Keeps the read-ahead candidates of the group's workspaces current:
    /// drops those taken, and all of a workspace's if the take had to search
    /// beyond them (the rest were taken elsewhere or are no longer parked);
    /// reads more when few are left and the workspace still had parked jobs.
    async fn read_ahead(&mut self, limits: &[(WorkspaceId, i64)], passed: &[JobId], taken: &[Job]) {
        let passed: HashSet<JobId> = passed.iter().copied().collect();
        let mut low = Vec::new();
        for (ws, max) in limits {
            let of_ws: Vec<&Job> = taken.iter().filter(|j| j.workspace_id == *ws).collect();
            let list = self.candidates.entry(*ws).or_default();
            if of_ws.iter().any(|j| !passed.contains(&j.id)) {
                list.clear();
            } else {
                let gone: HashSet<JobId> = of_ws.iter().map(|j| j.id).collect();
                list.retain(|id| !gone.contains(id));
            }
            if !of_ws.is_empty() && list.len() < 2 * *max as usize {
                low.push((*ws, *max));
            }
        }
        if low.is_empty() {
            return;
        }
        let ids: Vec<WorkspaceId> = low.iter().map(|l| l.0).collect();
        let per = low
            .iter()
            .map(|l| l.1)
            .max()
            .unwrap_or(1)
            .saturating_mul(READ_AHEAD_SLOTS)
            .max(64);
        match self.worker.store.parked_candidates(&ids, per).await {
            Ok(rows) => {
                for ws in &ids {
                    self.candidates.insert(*ws, Vec::new());
                }
                for (ws, id) in rows {
                    self.candidates.entry(ws).or_default().push(id);
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read parked candidates"),
        }
    }

    /// Outcomes that could not be written: their messages come back shortly
    /// (a job without one is rescued when its lease expires).
    async fn unrecorded(&mut self, plan: Vec<(Held, Action, Ran)>, e: &DbError) {
        for (held, _, _) in &plan {
            tracing::warn!(job_id = %held.job.id, error = %e, "outcome not recorded");
        }
        let records: Vec<&Record> = plan
            .iter()
            .filter_map(|(h, _, _)| h.record.as_deref())
            .collect();
        self.worker.fail_all(&records, &mut self.failures).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn write_group(
    w: &Worker,
    plan: &[(Held, Action, Ran)],
    in_group: &[(WorkspaceId, i64)],
    candidates: &[JobId],
    refill: Refill,
    claim: &str,
    now: DateTime<Utc>,
) -> Result<(Vec<Written>, Vec<Job>), DbError> {
    let mut db = w.store.pool().get().await?;
    let ws: Vec<WorkspaceId> = in_group.iter().map(|l| l.0).collect();
    let done: Vec<_> = plan
        .iter()
        .filter(|p| matches!(p.1, Action::Complete(_)))
        .map(|(h, a, r)| (h.lease.clone(), completed_result(a), r.progress.clone()))
        .collect();
    if done.len() == plan.len() {
        // Only completions (what a busy system mostly writes).
        let (won, refilled) = if in_group.is_empty() {
            // No limited workspace: no slot to refill, one statement.
            (store::complete(&db, &done, now).await?, Vec::new())
        } else {
            // The three statements go out together, so the transaction, and
            // with it the workspace rows' lock, lasts one round trip instead
            // of three. They run in the order they are sent, which is the
            // order below once they are prepared, and polled in that order
            // (`biased`: tokio otherwise rotates which it polls first), so a
            // failure reports the statement that failed, not a later one's
            // "transaction is aborted", and a deadlock is retried.
            let tx = db.transaction().await?;
            store::prepare_group(&tx, refill).await?;
            let (_, won, refilled) = tokio::try_join!(
                biased;
                store::lock_workspaces(&tx, &ws),
                store::complete(&tx, &done, now),
                store::refill(&tx, refill, in_group, candidates, claim, now, w.lease()),
            )?;
            tx.commit().await?;
            (won, refilled)
        };
        let won: HashSet<JobId> = won.into_iter().collect();
        let statuses = plan
            .iter()
            .map(|p| match won.contains(&p.0.job.id) {
                true => Written::Now(JobStatus::Completed),
                false => Written::Lost,
            })
            .collect();
        return Ok((statuses, refilled));
    }
    let tx = db.transaction().await?;
    store::prepare_group(&tx, refill).await?;
    let (_, won) = tokio::try_join!(
        biased;
        store::lock_workspaces(&tx, &ws),
        store::complete(&tx, &done, now),
    )?;
    let won: HashSet<JobId> = won.into_iter().collect();
    let mut statuses = Vec::with_capacity(plan.len());
    let mut logs = Vec::new();
    for (held, action, ran) in plan {
        let lease = &held.lease;
        let job = &held.job;
        let line = |level: &'static str, message: String| LogLine {
            job_id: job.id,
            workspace_id: job.workspace_id,
            attempt: lease.attempt,
            level,
            message,
            metadata: None,
        };
        let status = match action {
            Action::Complete(_) => won.contains(&job.id).then_some(JobStatus::Completed),
            Action::Drop => None,
            Action::Cancel(partial) => {
                let won = store::finish_cancelled(&tx, lease, partial.clone(), now).await?;
                if won {
                    logs.push(line("info", "stopped on a cancel request".into()));
                }
                won.then_some(JobStatus::Cancelled)
            }
            Action::HandOff(cp) => {
                let st = store::hand_off(&tx, lease, cp, ran.progress.as_ref(), now).await?;
                match st {
                    Some(JobStatus::Cancelled) => logs.push(line(
                        "info",
                        "cancel requested: stopped at its hand-off".into(),
                    )),
                    Some(_) => logs.push(line(
                        "info",
                        "handed off to a fresh invocation near the time limit".into(),
                    )),
                    None => {}
                }
                st
            }
            Action::Wait { checkpoint, on } => {
                let p = ran.progress.as_ref();
                let st = match on {
                    WaitOn::Children { fail_fast } => {
                        store::wait_for_children(&tx, lease, *fail_fast, checkpoint, p, now).await?
                    }
                    WaitOn::Until(until) => {
                        store::wait_until(&tx, lease, *until, checkpoint, p, now).await?
                    }
                    WaitOn::Token(token) => {
                        store::wait_for_token(&tx, lease, token, checkpoint, p, now).await?
                    }
                };
                let what = match on {
                    WaitOn::Children { .. } => "its children".to_string(),
                    WaitOn::Until(t) => t.to_rfc3339(),
                    WaitOn::Token(_) => "its wait token".to_string(),
                };
                match st {
                    Some(JobStatus::Cancelled) => logs.push(line(
                        "info",
                        format!("cancel requested: stopped instead of waiting for {what}"),
                    )),
                    Some(JobStatus::Waiting) => {
                        logs.push(line("info", format!("waiting for {what}")))
                    }
                    _ => {}
                }
                st
            }
            Action::Snooze(delay) => {
                let run_at = now + chrono::Duration::from_std(*delay).unwrap_or_default();
                let busy = matches!(ran.result, Err(JobError::Busy(_)));
                let st = store::snooze(&tx, lease, run_at, busy, now).await?;
                match (&st, &ran.result) {
                    (Some(JobStatus::Cancelled), _) => {
                        logs.push(line("info", "cancel requested: not snoozed".into()))
                    }
                    (Some(_), Err(JobError::Busy(why))) => logs.push(line(
                        "warn",
                        format!(
                            "{why}; back in {}s, the attempt not counted",
                            delay.as_secs().max(1)
                        ),
                    )),
                    _ => {}
                }
                st
            }
            Action::Retry {
                delay,
                error,
                route,
            } => {
                let run_at = now + chrono::Duration::from_std(*delay).unwrap_or_default();
                let st =
                    store::retry_later(&tx, lease, run_at, error, *route == Route::Outbox, now)
                        .await?;
                match st {
                    Some(JobStatus::Cancelled) => logs.push(line(
                        "info",
                        format!(
                            "attempt {} failed: {error}; cancel requested: not retried",
                            lease.attempt
                        ),
                    )),
                    Some(_) => {
                        let mut l = line(
                            "warn",
                            format!(
                                "attempt {} of {} failed: {error}; retrying in {}s",
                                lease.attempt,
                                job.max_attempts,
                                delay.as_secs()
                            ),
                        );
                        l.metadata = Some(json!({ "delay_ms": delay.as_millis() as u64 }));
                        logs.push(l);
                    }
                    None => {}
                }
                st
            }
            Action::Bury { error, kind } => {
                let won = store::bury(&tx, lease, error, *kind, now).await?;
                if won {
                    logs.push(line("error", format!("job failed for good: {error}")));
                }
                won.then_some(JobStatus::Dead)
            }
        };
        statuses.push(status.map(Written::Now).unwrap_or(Written::Lost));
    }
    store::append_logs(&tx, &logs, now).await?;
    let refilled = store::refill(&tx, refill, in_group, candidates, claim, now, w.lease()).await?;
    tx.commit().await?;
    Ok((statuses, refilled))
}

fn completed_result(a: &Action) -> Option<serde_json::Value> {
    match a {
        Action::Complete(r) => r.clone(),
        _ => None,
    }
}

/// Scheduler turns in a row with no other handler finishing that an
/// outcome waits before its group is written: no timer, so it costs
/// microseconds, yet a batch of short jobs makes one write, not several.
const GROUP_YIELDS: usize = 3;

/// Pauses before the group write is tried again after a failure that is
/// not a conflict.
const WRITE_RETRY_PAUSES: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(2),
];

/// Parked ids read ahead per workspace, as a multiple of its limit: each
/// read walks the parked index, so it happens about every this many / 2
/// refills of a busy workspace.
const READ_AHEAD_SLOTS: i64 = 16;

/// How long the worker waits before claiming again a due job whose row was
/// held by another transaction.
const BUSY_PAUSE: Duration = Duration::from_millis(20);

/// Sorts a batch's records by what the claim did with their jobs: the first
/// message of each claimed job goes to `runs`; any other message of a job
/// already running here is a duplicate, and the message of a job now parked
/// in the database is done with: both are acknowledged. Returns the rest.
fn sort_claimed(
    records: Vec<Record>,
    claimed: store::Claimed,
    runs: &mut Vec<(Arc<Record>, Job)>,
    seen: &mut HashSet<JobId>,
) -> Vec<Record> {
    let mut running: HashMap<JobId, Job> = claimed.running.into_iter().map(|j| (j.id, j)).collect();
    let parked: HashSet<JobId> = claimed.parked.into_iter().collect();
    let mut rest = Vec::new();
    for r in records {
        let id = r.job.job_id;
        if let Some(job) = running.remove(&id) {
            seen.insert(id);
            runs.push((Arc::new(r), job));
        } else if seen.contains(&id) || parked.contains(&id) {
            tracing::debug!(job_id = %id, "duplicate or parked: message acknowledged");
        } else {
            rest.push(r);
        }
    }
    rest
}

/// Parses each record on its own: a bad body fails only its record, which
/// returns and, after maxReceiveCount receives, reaches the dead-letter
/// queue where the scheduler records it.
fn parse_records(event: SqsEvent, failures: &mut Vec<String>) -> Vec<Record> {
    let mut records = Vec::with_capacity(event.records.len());
    for (i, m) in event.records.into_iter().enumerate() {
        let message_id = m.message_id.clone().unwrap_or_else(|| format!("#{i}"));
        let body = m.body.as_deref().unwrap_or("");
        match serde_json::from_str::<JobMessage>(body) {
            Ok(job) => records.push(Record {
                message_id,
                receipt: m.receipt_handle.unwrap_or_default(),
                queue: m
                    .event_source_arn
                    .as_deref()
                    .and_then(QueueName::from_arn)
                    .unwrap_or_default(),
                receive_count: m
                    .attributes
                    .get("ApproximateReceiveCount")
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(1),
                job,
            }),
            Err(e) => {
                tracing::warn!(message_id = %message_id, error = %e,
                    body = %body.chars().take(200).collect::<String>(),
                    "message body is not a job message");
                failures.push(message_id);
            }
        }
    }
    records
}

fn response(failures: Vec<String>) -> SqsBatchResponse {
    let mut resp = SqsBatchResponse::default();
    resp.batch_item_failures = failures
        .into_iter()
        .map(|id| {
            let mut f = BatchItemFailure::default();
            f.item_identifier = id;
            f
        })
        .collect();
    resp
}
