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

#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error(transparent)]
    Db(#[from] DbError),
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
) -> Result<Sent, EnqueueError> {
    let out = send_messages(queue, jobs, now).await;
    if !out.sent.is_empty() {
        store.mark_enqueued(&out.sent, now).await?;
    }
    Ok(out)
}

/// The sending half of [`send_jobs`], for callers that record the result in
/// a transaction of their own.
pub async fn send_messages(queue: &dyn Queue, jobs: &[&Job], now: DateTime<Utc>) -> Sent {
    let mut by_queue: BTreeMap<&'static str, (QueueName, Vec<&Job>)> = BTreeMap::new();
    let mut out = Sent::default();
    for job in jobs {
        let delay = (job.run_at - now).to_std().unwrap_or_default();
        if delay > MAX_DELAY {
            out.deferred.push(job.id);
            continue;
        }
        by_queue
            .entry(job.queue.as_str())
            .or_insert_with(|| (job.queue, Vec::new()))
            .1
            .push(job);
    }
    for (_, (q, group)) in by_queue {
        let messages: Vec<OutgoingMessage> = group
            .iter()
            .enumerate()
            .map(|(i, j)| OutgoingMessage {
                id: i.to_string(),
                body: JobMessage {
                    job_id: j.id,
                    workspace_id: j.workspace_id,
                }
                .body(),
                delay: (j.run_at - now).to_std().unwrap_or_default(),
            })
            .collect();
        match queue.send_batch(q, &messages).await {
            Ok(()) => out.sent.extend(group.iter().map(|j| j.id)),
            Err(QueueError::PartialSend {
                sent,
                failed,
                total,
                reason,
            }) => {
                for (i, j) in group.iter().enumerate() {
                    if sent.contains(&i.to_string()) {
                        out.sent.push(j.id);
                    } else {
                        out.deferred.push(j.id);
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
                out.deferred.extend(group.iter().map(|j| j.id));
                out.error = Some(e);
            }
        }
    }
    out
}
