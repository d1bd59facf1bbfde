//! Sending jobs' messages and recording that the queue accepted them: the
//! second half of "insert the row, then send" (DESIGN.md "Nothing lost").
//! The API, the worker's hand-offs and the scheduler's outbox all send
//! through here.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::db::DbError;
use crate::ids::JobId;
use crate::job::{Job, JobMessage, QueueName};
use crate::queue::{OutgoingMessage, Queue, QueueError, MAX_DELAY};
use crate::store::Store;

/// What one [`send_jobs`] call did.
#[derive(Debug, Default)]
pub struct Sent {
    /// Jobs whose message the queue accepted (now `queued`).
    pub sent: Vec<JobId>,
    /// Jobs left `pending` for the scheduler: too far in the future for a
    /// queue's delay, or the queue refused them.
    pub deferred: Vec<JobId>,
    /// The queue's error, when it refused any.
    pub error: Option<QueueError>,
}

/// Sends a message for each job due within the queues' maximum delay (with
/// `DelaySeconds` up to its `run_at`) and marks the sent ones `queued`. A
/// queue failure is reported in [`Sent::error`], not raised: the rows are
/// committed and stay `pending`, and the scheduler sends them later.
pub async fn send_jobs(
    store: &Store,
    queue: &dyn Queue,
    jobs: &[&Job],
    now: DateTime<Utc>,
) -> Result<Sent, DbError> {
    let out = send_messages(queue, jobs, now).await;
    store.mark_enqueued(&out.sent, now).await?;
    Ok(out)
}

/// What a message needs to know of its job.
#[derive(Clone, Copy)]
struct Target {
    id: JobId,
    workspace_id: crate::ids::WorkspaceId,
    queue: QueueName,
    run_at: DateTime<Utc>,
}

impl From<&Job> for Target {
    fn from(j: &Job) -> Self {
        Target {
            id: j.id,
            workspace_id: j.workspace_id,
            queue: j.queue,
            run_at: j.run_at,
        }
    }
}

impl From<&crate::store::NewJob> for Target {
    fn from(j: &crate::store::NewJob) -> Self {
        Target {
            id: j.id,
            workspace_id: j.workspace_id,
            queue: j.queue,
            run_at: j.run_at,
        }
    }
}

/// One queue's messages and the jobs they carry, in the same order.
type Group = (QueueName, Vec<JobId>, Vec<OutgoingMessage>);

/// The messages for `jobs`, by queue, with each job's delay; jobs due
/// beyond the queues' maximum delay are left out (deferred to the outbox).
fn messages_for(
    jobs: &[Target],
    now: DateTime<Utc>,
) -> (BTreeMap<&'static str, Group>, Vec<JobId>) {
    let mut by_queue: BTreeMap<&'static str, Group> = BTreeMap::new();
    let mut deferred = Vec::new();
    for job in jobs {
        let delay = (job.run_at - now).to_std().unwrap_or_default();
        if delay > MAX_DELAY {
            deferred.push(job.id);
            continue;
        }
        let entry = by_queue
            .entry(job.queue.as_str())
            .or_insert_with(|| (job.queue, Vec::new(), Vec::new()));
        entry.2.push(OutgoingMessage {
            id: entry.1.len().to_string(),
            body: JobMessage {
                job_id: job.id,
                workspace_id: job.workspace_id,
            }
            .body(),
            delay,
        });
        entry.1.push(job.id);
    }
    (by_queue, deferred)
}

/// The sending half of [`send_jobs`], for callers that record the result in
/// a transaction of their own.
pub async fn send_messages(queue: &dyn Queue, jobs: &[&Job], now: DateTime<Utc>) -> Sent {
    let targets: Vec<Target> = jobs.iter().map(|j| Target::from(*j)).collect();
    let (by_queue, deferred) = messages_for(&targets, now);
    let mut out = Sent {
        deferred,
        ..Sent::default()
    };
    for (_, (q, group, messages)) in by_queue {
        match queue.send_batch(q, &messages).await {
            Ok(()) => out.sent.extend(group),
            Err(QueueError::PartialSend {
                sent,
                failed,
                total,
                reason,
            }) => {
                for (i, id) in group.into_iter().enumerate() {
                    if sent.contains(&i.to_string()) {
                        out.sent.push(id);
                    } else {
                        out.deferred.push(id);
                    }
                }
                out.error = Some(QueueError::PartialSend {
                    sent,
                    failed,
                    total,
                    reason,
                });
            }
            Err(e) => {
                out.deferred.extend(group);
                out.error = Some(e);
            }
        }
    }
    out
}

/// Inserts jobs and sends their messages: with the Postgres queue in one
/// statement (the rows, already `queued`, and their messages commit
/// together: one round trip and one durable commit instead of three); with
/// SQS the rows commit first and the messages follow. Returns each job with
/// whether it was new (an existing idempotency key returns the old job),
/// and what was sent.
pub async fn create_jobs(
    store: &Store,
    queue: &dyn Queue,
    db: &deadpool_postgres::Object,
    jobs: &[crate::store::NewJob],
    now: DateTime<Utc>,
) -> Result<(Vec<(Job, bool)>, Sent), DbError> {
    if queue.as_postgres().is_none() {
        // Everything on the one connection the caller holds: taking a
        // second from the pool here could wait on requests that hold the rest.
        let mut created = store.insert(db, jobs, now).await?;
        let new: Vec<&Job> = created.iter().filter(|(_, n)| *n).map(|(j, _)| j).collect();
        let sent = send_messages(queue, &new, now).await;
        crate::store::mark_enqueued_on(db, &sent.sent, now).await?;
        mark_sent(&mut created, &sent);
        return Ok((created, sent));
    }
    // One statement writes the messages and the rows (already `queued`):
    // one round trip and one commit, and no message without its row. Ids
    // are made here, so the messages can name jobs not yet inserted.
    let targets: Vec<Target> = jobs.iter().map(Target::from).collect();
    let (by_queue, deferred) = messages_for(&targets, now);
    let mut sent = Sent {
        deferred,
        ..Sent::default()
    };
    let mut rows = crate::store::MessageRows::default();
    for (_, (q, group, messages)) in by_queue {
        for m in messages {
            rows.queues.push(q.as_str());
            rows.bodies.push(m.body);
            rows.delays_ms.push(m.delay.as_millis() as f64);
        }
        sent.sent.extend(group);
    }
    let mut created = store
        .insert_as(db, jobs, &sent.sent, Some(&rows), now)
        .await?;
    mark_sent(&mut created, &sent);
    Ok((created, sent))
}

/// Shows the jobs that were sent as `queued` in the answer.
fn mark_sent(created: &mut [(Job, bool)], sent: &Sent) {
    let ids: std::collections::HashSet<JobId> = sent.sent.iter().copied().collect();
    for (j, _) in created.iter_mut() {
        if ids.contains(&j.id) {
            j.status = crate::job::JobStatus::Queued;
        }
    }
}
