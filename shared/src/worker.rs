//! The worker: the SQS event handler. For a batch of messages it claims
//! every job in one statement, runs the claimed ones concurrently with a
//! shared heartbeat, writes each outcome with a compare-and-set, and returns
//! the messages that must come back (`batchItemFailures`); Lambda, or the
//! local runner, deletes the rest.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use chrono::{DateTime, Utc};
use futures::FutureExt;
use rand::Rng;
use serde_json::json;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::config::WorkerConfig;
use crate::enqueue;
use crate::handlers::{JobContext, JobError, Outcome, Registry};
use crate::ids::{JobId, WorkspaceId};
use crate::job::{ErrorKind, Job, JobMessage, JobStatus, Progress, QueueName};
use crate::queue::{OutgoingMessage, Queue, QueueError, MAX_DELAY, MAX_VISIBILITY};
use crate::store::{Lease, LogLine, Store};
use crate::workspace::LimitCache;

/// Everything a worker invocation needs, built once per process.
pub struct Worker {
    pub store: Store,
    pub queue: Arc<dyn Queue>,
    pub registry: Arc<Registry>,
    pub config: WorkerConfig,
    pub clock: Clock,
    /// Names this process in `worker_id` (with a fresh suffix per batch).
    pub name: String,
    /// Workspaces' concurrency limits, read at most every 30 s.
    pub limits: Arc<LimitCache>,
    /// Where handlers read and write files.
    pub storage: crate::storage::Storage,
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

/// What became of one claimed job.
struct Ran {
    job: Job,
    lease: Lease,
    result: Result<Outcome, JobError>,
    checkpoint: Option<serde_json::Value>,
    progress: Option<Progress>,
    run_time: Duration,
}

/// Delay before retry number `attempt` (1-based): exponential from `base`,
/// capped, then jittered uniformly between half and all of that value. Pure
/// "full jitter" (zero to all) can retry a failing dependency at once; the
/// lower half-bound keeps every wait at least half the exponential step
/// while still spreading a burst of failures apart.
pub fn backoff(config: &WorkerConfig, attempt: i32, rng: &mut impl Rng) -> Duration {
    let exp = config
        .backoff_base
        .saturating_mul(2u32.saturating_pow(attempt.clamp(1, 31) as u32 - 1))
        .min(config.backoff_cap);
    let ms = exp.as_millis() as u64;
    Duration::from_millis(rng.random_range(ms / 2..=ms.max(1)))
}

impl Worker {
    /// Handles one SQS event. `deadline` is when the invocation will be
    /// stopped (Lambda's deadline); handlers hand off before it.
    pub async fn handle(&self, event: SqsEvent, deadline: Instant) -> SqsBatchResponse {
        let mut failures: Vec<String> = Vec::new();
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
                    // Reported failed, so it returns and, after
                    // maxReceiveCount receives, reaches the dead-letter
                    // queue where the scheduler records it.
                    tracing::warn!(message_id = %message_id, error = %e,
                        body = %body.chars().take(200).collect::<String>(),
                        "message body is not a job message");
                    failures.push(message_id);
                }
            }
        }
        if records.is_empty() {
            return response(failures);
        }

        let worker_id = format!("{}:{}", self.name, uuid::Uuid::new_v4().simple());
        let now = self.clock.now();
        let lease = chrono::Duration::from_std(self.config.lease).unwrap_or_default();
        let ids: Vec<JobId> = records.iter().map(|r| r.job.job_id).collect();
        let workspaces: Vec<WorkspaceId> = records.iter().map(|r| r.job.workspace_id).collect();
        let claimed = match self.claim(&ids, &workspaces, &worker_id, now, lease).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, messages = records.len(),
                    "cannot claim: returning the whole batch");
                failures.extend(records.into_iter().map(|r| r.message_id));
                return response(failures);
            }
        };

        // The first message of each claimed job runs it; any other message
        // for the same job in this batch is a duplicate and is acknowledged.
        let mut claimed: HashMap<JobId, Job> = claimed.into_iter().map(|j| (j.id, j)).collect();
        let mut runs: Vec<(Record, Job)> = Vec::new();
        let mut unclaimed: Vec<Record> = Vec::new();
        let mut seen = HashSet::new();
        for r in records {
            if let Some(job) = claimed.remove(&r.job.job_id) {
                seen.insert(r.job.job_id);
                runs.push((r, job));
            } else if seen.contains(&r.job.job_id) {
                tracing::info!(job_id = %r.job.job_id, "duplicate message in one batch: acknowledged");
            } else {
                unclaimed.push(r);
            }
        }
        if !unclaimed.is_empty() {
            self.triage_unclaimed(unclaimed, &mut failures).await;
        }
        if runs.is_empty() {
            return response(failures);
        }

        let ran = self
            .run_all(
                &worker_id,
                runs_as_leases(&runs, &worker_id),
                &runs,
                deadline,
            )
            .await;
        let by_id: HashMap<JobId, &Record> = runs.iter().map(|(r, j)| (j.id, r)).collect();
        self.finish(ran, &by_id, &worker_id, &mut failures).await;
        response(failures)
    }

    async fn claim(
        &self,
        ids: &[JobId],
        workspaces: &[WorkspaceId],
        worker_id: &str,
        now: DateTime<Utc>,
        lease: chrono::Duration,
    ) -> Result<Vec<Job>, crate::db::DbError> {
        let limits = self
            .limits
            .max_running(self.store.pool(), workspaces)
            .await?;
        self.store.claim(ids, worker_id, now, lease, &limits).await
    }

    /// Decides the fate of messages whose job could not be claimed.
    async fn triage_unclaimed(&self, unclaimed: Vec<Record>, failures: &mut Vec<String>) {
        let ids: Vec<JobId> = unclaimed.iter().map(|r| r.job.job_id).collect();
        let states: HashMap<JobId, (JobStatus, DateTime<Utc>)> = match self.store.peek(&ids).await {
            Ok(rows) => rows.into_iter().map(|(id, s, r)| (id, (s, r))).collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read unclaimed jobs: returning their messages");
                failures.extend(unclaimed.into_iter().map(|r| r.message_id));
                return;
            }
        };
        let now = self.clock.now();
        let mut later = Vec::new();
        for r in &unclaimed {
            let job_id = r.job.job_id;
            match states.get(&job_id) {
                None => {
                    tracing::warn!(job_id = %job_id, workspace_id = %r.job.workspace_id,
                        "message for a job that does not exist: acknowledged");
                }
                Some((status, _)) if status.is_terminal() || *status == JobStatus::Running => {
                    tracing::debug!(job_id = %job_id, status = %status,
                        "job finished or held by another worker: message acknowledged");
                }
                Some((_, run_at)) => {
                    // Not yet due (an early duplicate, or a retry delivered
                    // before its backoff ended), or its workspace is at its
                    // limit of running jobs: it comes back later.
                    let wait = (*run_at - now)
                        .to_std()
                        .unwrap_or(self.config.fairness_delay)
                        .max(Duration::from_secs(1));
                    later.push((r, wait));
                }
            }
        }
        self.come_back_later(&later, now, failures).await;
    }

    /// Runs every claimed job concurrently while one heartbeat task renews
    /// all their leases and message visibilities.
    async fn run_all(
        &self,
        worker_id: &str,
        leases: Vec<Lease>,
        runs: &[(Record, Job)],
        deadline: Instant,
    ) -> Vec<Ran> {
        let cancels: HashMap<JobId, Arc<AtomicBool>> = runs
            .iter()
            .map(|(_, j)| {
                (
                    j.id,
                    Arc::new(AtomicBool::new(j.cancel_requested_at.is_some())),
                )
            })
            .collect();
        let tasks: Vec<_> = runs
            .iter()
            .zip(leases)
            .map(|((_, job), lease)| {
                let mut ctx = JobContext::new(
                    self.store.clone(),
                    self.clock.clone(),
                    lease.clone(),
                    job.workspace_id,
                    job.job_type.clone(),
                    job.checkpoint.clone(),
                    cancels[&job.id].clone(),
                    deadline,
                    self.config.handoff_margin,
                    self.storage.clone(),
                );
                let registry = self.registry.clone();
                let job = job.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let result = std::panic::AssertUnwindSafe(registry.run(
                        &job.job_type,
                        &job.payload,
                        &mut ctx,
                    ))
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
                        progress: ctx.last_progress().cloned(),
                        checkpoint: ctx.take_checkpoint(),
                        job,
                        lease,
                        result,
                        run_time: started.elapsed(),
                    }
                })
            })
            .collect();

        // If this future is dropped (the invocation is cancelled), the
        // guards stop the handlers and the heartbeat with it: a heartbeat
        // that outlived its batch would keep a dead invocation's leases
        // alive for ever, and nobody would ever rescue those jobs.
        let stop = Arc::new(tokio::sync::Notify::new());
        let mut heartbeat = AbortOnDrop(vec![self.spawn_heartbeat(
            worker_id,
            runs,
            cancels,
            stop.clone(),
        )]);
        let mut tasks = AbortOnDrop(tasks);
        let mut ran = Vec::with_capacity(tasks.0.len());
        for (task, (_, job)) in tasks.0.iter_mut().zip(runs) {
            match task.await {
                Ok(r) => ran.push(r),
                // The panic was caught inside the task; a join error here
                // means the runtime is shutting down. The job's lease will
                // expire and it will be rescued.
                Err(e) => tracing::error!(job_id = %job.id, error = %e, "job task lost"),
            }
        }
        // The heartbeat ends before the outcomes are written: its statement
        // and the completion's touch the same rows, and two statements
        // locking them in different orders could deadlock.
        stop.notify_one();
        if let Some(h) = heartbeat.0.pop() {
            let _ = h.await;
        }
        ran
    }

    fn spawn_heartbeat(
        &self,
        worker_id: &str,
        runs: &[(Record, Job)],
        cancels: HashMap<JobId, Arc<AtomicBool>>,
        stop: Arc<tokio::sync::Notify>,
    ) -> tokio::task::JoinHandle<()> {
        let store = self.store.clone();
        let queue = self.queue.clone();
        let clock = self.clock.clone();
        let every = self.config.heartbeat;
        let lease = self.config.lease;
        let worker_id = worker_id.to_string();
        let held: Vec<(JobId, i32, QueueName, String)> = runs
            .iter()
            .map(|(r, j)| (j.id, j.attempts, r.queue, r.receipt.clone()))
            .collect();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.notified() => return,
                }
                let leases: Vec<(JobId, i32)> = held.iter().map(|h| (h.0, h.1)).collect();
                let chrono_lease = chrono::Duration::from_std(lease).unwrap_or_default();
                match store
                    .heartbeat(&worker_id, &leases, clock.now(), chrono_lease)
                    .await
                {
                    Ok(alive) => {
                        for (id, cancel) in &alive {
                            if *cancel {
                                cancels[id].store(true, Ordering::Relaxed);
                            }
                        }
                        let alive: HashSet<JobId> = alive.into_iter().map(|a| a.0).collect();
                        for (id, _, q, receipt) in &held {
                            if alive.contains(id) {
                                if let Err(e) = queue.change_visibility(*q, receipt, lease).await {
                                    tracing::warn!(job_id = %id, error = %e, "cannot extend message visibility");
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
        })
    }

    /// Writes every outcome and fills `failures` with the messages that must
    /// come back.
    async fn finish(
        &self,
        ran: Vec<Ran>,
        records: &HashMap<JobId, &Record>,
        worker_id: &str,
        failures: &mut Vec<String>,
    ) {
        let now = self.clock.now();
        let mut completed = Vec::new();
        let mut logs = Vec::new();
        for r in ran {
            let rec = records[&r.job.id];
            let job = &r.job;
            let span_log = |level: &'static str, message: String| LogLine {
                job_id: job.id,
                workspace_id: job.workspace_id,
                attempt: r.lease.attempt,
                level,
                message,
                metadata: None,
            };
            let outcome = match r.result {
                Ok(Outcome::Completed(result)) => {
                    completed.push((r.lease.clone(), result, r.progress.clone()));
                    self.metric(job, "completed", r.run_time);
                    continue;
                }
                Ok(Outcome::Cancelled(partial)) => {
                    let won = self.store.finish_cancelled(&r.lease, partial, now).await;
                    logs.push(span_log("info", "stopped on a cancel request".into()));
                    won.map(|_| "cancelled")
                }
                Ok(Outcome::HandOff) => {
                    let cp = r.checkpoint.clone().unwrap_or(serde_json::Value::Null);
                    match self
                        .store
                        .hand_off(&r.lease, &cp, r.progress.as_ref(), now)
                        .await
                    {
                        Ok(true) => {
                            logs.push(span_log(
                                "info",
                                "handed off to a fresh invocation near the time limit".into(),
                            ));
                            let mut fresh = job.clone();
                            fresh.run_at = now;
                            if let Err(e) =
                                enqueue::send_jobs(&self.store, &*self.queue, &[&fresh], now).await
                            {
                                tracing::warn!(job_id = %job.id, error = %e, "hand-off send failed; the scheduler will send it");
                            }
                            Ok("handed_off")
                        }
                        other => other.map(|_| "lost"),
                    }
                }
                Ok(Outcome::Snooze(delay)) => {
                    let run_at = now + chrono::Duration::from_std(delay).unwrap_or_default();
                    match self.store.snooze(&r.lease, run_at, now).await {
                        Ok(true) => {
                            self.come_back_later(&[(rec, delay)], now, failures).await;
                            Ok("snoozed")
                        }
                        other => other.map(|_| "lost"),
                    }
                }
                Err(JobError::LeaseLost) => Ok("lost"),
                Err(JobError::Retryable(msg)) if r.lease.attempt < job.max_attempts => {
                    let delay = backoff(&self.config, r.lease.attempt, &mut rand::rng());
                    let run_at = now + chrono::Duration::from_std(delay).unwrap_or_default();
                    let via_outbox = delay > MAX_VISIBILITY;
                    let mut line = span_log(
                        "warn",
                        format!(
                            "attempt {} of {} failed: {msg}; retrying in {}s",
                            r.lease.attempt,
                            job.max_attempts,
                            delay.as_secs()
                        ),
                    );
                    line.metadata = Some(json!({ "delay_ms": delay.as_millis() as u64 }));
                    logs.push(line);
                    match self
                        .store
                        .retry_later(&r.lease, run_at, &msg, via_outbox, now)
                        .await
                    {
                        Ok(true) if !via_outbox => {
                            // A failure is reported and its message hidden
                            // for the backoff, unless the next receive would
                            // dead-letter a job that has attempts left.
                            if rec.receive_count + 1 < self.config.max_receive_count {
                                self.hide(rec, delay, now, failures).await;
                            } else {
                                self.come_back_later(&[(rec, delay)], now, failures).await;
                            }
                            Ok("retried")
                        }
                        other => other.map(|_| "retried"),
                    }
                }
                Err(e) => {
                    let (kind, msg) = match &e {
                        JobError::Permanent(m) => (ErrorKind::Permanent, m.clone()),
                        other => (
                            ErrorKind::Retryable,
                            format!(
                                "{other} (attempt {} of {}: no attempts left)",
                                r.lease.attempt, job.max_attempts
                            ),
                        ),
                    };
                    logs.push(span_log("error", format!("job failed for good: {msg}")));
                    self.store
                        .bury(&r.lease, &msg, kind, now)
                        .await
                        .map(|_| "dead")
                }
            };
            match outcome {
                Ok(what) => {
                    tracing::info!(job_id = %job.id, workspace_id = %job.workspace_id,
                        attempt = r.lease.attempt, job_type = %job.job_type, outcome = what, "job ended its run");
                    self.metric(job, what, r.run_time);
                }
                Err(e) => {
                    tracing::error!(job_id = %job.id, error = %e, "cannot record outcome: message returned");
                    failures.push(rec.message_id.clone());
                }
            }
        }
        if let Err(e) = self.store.complete(worker_id, &completed, now).await {
            tracing::error!(error = %e, jobs = completed.len(), "cannot record completions: messages returned");
            failures.extend(
                completed
                    .iter()
                    .map(|c| records[&c.0.job_id].message_id.clone()),
            );
        }
        if let Err(e) = self.store.append_logs(&logs, now).await {
            tracing::warn!(error = %e, "cannot write job log lines");
        }
    }

    /// Makes messages come back after their delays without spending a
    /// receive: each is replaced by a fresh message sent with its delay and
    /// is itself acknowledged. Snoozes, fairness waits and early duplicates
    /// are not failures; hiding the same message instead would count each
    /// toward the queue's maxReceiveCount and dead-letter a job that never
    /// failed. Delays beyond the queue's limit go to the outbox; where the
    /// queue will not take a fresh message, the old one is hidden for the
    /// delay instead.
    async fn come_back_later(
        &self,
        later: &[(&Record, Duration)],
        now: DateTime<Utc>,
        failures: &mut Vec<String>,
    ) {
        let mut by_queue: HashMap<QueueName, Vec<(&Record, Duration)>> = HashMap::new();
        for &(rec, delay) in later {
            if delay > MAX_DELAY {
                self.to_outbox_or_hide(rec, delay, now, failures).await;
            } else {
                by_queue.entry(rec.queue).or_default().push((rec, delay));
            }
        }
        for (q, items) in by_queue {
            let messages: Vec<OutgoingMessage> = items
                .iter()
                .enumerate()
                .map(|(i, (rec, delay))| OutgoingMessage {
                    id: i.to_string(),
                    body: rec.job.body(),
                    delay: *delay,
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
            for (i, (rec, delay)) in items.into_iter().enumerate() {
                if !sent.contains(&i.to_string()) {
                    self.hide(rec, delay, now, failures).await;
                }
            }
        }
    }

    /// Leaves the job to the scheduler, which sends it when it is due, and
    /// acknowledges its message.
    async fn to_outbox_or_hide(
        &self,
        rec: &Record,
        delay: Duration,
        now: DateTime<Utc>,
        failures: &mut Vec<String>,
    ) {
        if let Err(e) = self.store.to_outbox(rec.job.job_id, now).await {
            tracing::warn!(job_id = %rec.job.job_id, error = %e, "cannot move job to the outbox");
            self.hide(rec, delay, now, failures).await;
        }
    }

    /// The fallback when no fresh message can be sent: the message itself
    /// is hidden for the delay and reported failed (spending a receive).
    async fn hide(
        &self,
        rec: &Record,
        delay: Duration,
        now: DateTime<Utc>,
        failures: &mut Vec<String>,
    ) {
        match self
            .queue
            .change_visibility(rec.queue, &rec.receipt, delay.min(MAX_VISIBILITY))
            .await
        {
            Ok(()) => failures.push(rec.message_id.clone()),
            Err(e) => {
                tracing::warn!(job_id = %rec.job.job_id, error = %e, "cannot delay message; the scheduler will resend");
                match self.store.to_outbox(rec.job.job_id, now).await {
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(job_id = %rec.job.job_id, error = %e, "cannot move job to the outbox");
                        failures.push(rec.message_id.clone());
                    }
                }
            }
        }
    }

    /// One CloudWatch Embedded Metric Format line per job run, on stdout
    /// where Lambda sends it to CloudWatch Logs.
    fn metric(&self, job: &Job, outcome: &str, run_time: Duration) {
        if self.config.emit_metrics {
            println!("{}", metric_line(job, outcome, run_time, self.clock.now()));
        }
    }
}

/// The Embedded Metric Format record of one job run: dimensions job type,
/// queue and outcome; metrics count, wait time (created to started) and run
/// time.
pub fn metric_line(
    job: &Job,
    outcome: &str,
    run_time: Duration,
    now: DateTime<Utc>,
) -> serde_json::Value {
    let wait_ms = job
        .started_at
        .map(|s| (s - job.created_at).num_milliseconds().max(0))
        .unwrap_or(0);
    json!({
        "_aws": {
            "Timestamp": now.timestamp_millis(),
            "CloudWatchMetrics": [{
                "Namespace": "Offload",
                "Dimensions": [["JobType", "Queue", "Outcome"]],
                "Metrics": [
                    {"Name": "Jobs", "Unit": "Count"},
                    {"Name": "WaitTime", "Unit": "Milliseconds"},
                    {"Name": "RunTime", "Unit": "Milliseconds"}
                ]
            }]
        },
        "JobType": job.job_type,
        "Queue": job.queue.as_str(),
        "Outcome": outcome,
        "Jobs": 1,
        "WaitTime": wait_ms,
        "RunTime": run_time.as_millis() as u64,
        "job_id": job.id,
        "workspace_id": job.workspace_id,
    })
}

/// Aborts its tasks when dropped (a finished task ignores the abort).
struct AbortOnDrop<T>(Vec<tokio::task::JoinHandle<T>>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn runs_as_leases(runs: &[(Record, Job)], worker_id: &str) -> Vec<Lease> {
    runs.iter()
        .map(|(_, j)| Lease {
            job_id: j.id,
            attempt: j.attempts,
            worker_id: worker_id.to_string(),
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let cfg = WorkerConfig {
            backoff_base: Duration::from_secs(2),
            backoff_cap: Duration::from_secs(60),
            ..WorkerConfig::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempt in 1..=10 {
            let exp = (2u64 << (attempt - 1)).min(60);
            for _ in 0..50 {
                let d = backoff(&cfg, attempt, &mut rng).as_millis() as u64;
                assert!(d <= exp * 1000, "attempt {attempt}: {d}ms over {exp}s");
                assert!(
                    d >= exp * 500,
                    "attempt {attempt}: {d}ms under half of {exp}s"
                );
            }
        }
    }
}
