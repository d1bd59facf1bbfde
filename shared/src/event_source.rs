//! Plays the Lambda SQS event source mapping on a laptop (and in tests):
//! receive a batch, invoke the worker with it as a real `SqsEvent`, delete
//! every message the worker did not report as failed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use tokio::sync::{watch, Semaphore};

use crate::job::QueueName;
use crate::queue::{Queue, ReceivedMessage};
use crate::worker::Worker;

/// Plays the Lambda SQS event source mapping for one queue: receive a
/// batch, invoke the worker with it as an `SqsEvent`, delete every message
/// it did not report as failed.
pub struct EventSource {
    pub queue: Arc<dyn Queue>,
    pub worker: Arc<Worker>,
    pub name: QueueName,
    pub batch: usize,
    pub visibility: Duration,
    pub wait: Duration,
    pub invocation_timeout: Duration,
    /// Invocations that may run at once, shared by every poller of the
    /// queue: the mapping's maximum concurrency. A poller receives only
    /// when it holds a permit, so a slow batch never holds up new messages
    /// while permits are free, and messages are never taken that nobody
    /// can run.
    pub concurrency: Arc<Semaphore>,
}

impl EventSource {
    /// Polls until `stop`, then waits for its invocations in flight.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut running = tokio::task::JoinSet::new();
        while !*stop.borrow() {
            let permit = tokio::select! {
                p = self.concurrency.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = stop.changed() => break,
            };
            let received = tokio::select! {
                r = self.queue.receive(self.name, self.batch, self.visibility, self.wait) => r,
                _ = stop.changed() => break,
            };
            match received {
                Ok(messages) if messages.is_empty() => {}
                Ok(messages) => {
                    let me = self.clone();
                    running.spawn(async move {
                        me.invoke(messages).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(queue = %self.name, error = %e, "receive failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            while running.try_join_next().is_some() {}
        }
        while running.join_next().await.is_some() {}
    }

    /// One worker invocation. Like Lambda, it is stopped at its deadline:
    /// handlers still running are dropped, nothing is deleted, and every
    /// message of the batch returns when its visibility ends (jobs whose
    /// outcome was already written are acknowledged then).
    pub async fn invoke(&self, messages: Vec<ReceivedMessage>) -> usize {
        let event = to_event(&messages, &self.queue.arn(self.name));
        let deadline = tokio::time::Instant::now() + self.invocation_timeout;
        let response =
            match tokio::time::timeout_at(deadline, self.worker.handle(event, deadline)).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::error!(queue = %self.name, messages = messages.len(),
                    timeout_secs = self.invocation_timeout.as_secs(),
                    "invocation timed out and was stopped, as Lambda stops it");
                    return messages.len();
                }
            };
        let failed: HashSet<String> = response
            .batch_item_failures
            .into_iter()
            .map(|f| f.item_identifier)
            .collect();
        let done: Vec<String> = messages
            .iter()
            .filter(|m| !failed.contains(&m.message_id))
            .map(|m| m.receipt_handle.clone())
            .collect();
        if let Err(e) = self.queue.delete_batch(self.name, &done).await {
            tracing::warn!(queue = %self.name, error = %e, "delete failed; messages will be redelivered");
        }
        failed.len()
    }

    /// Receives and invokes until a receive comes back empty; returns the
    /// number of invocations. For tests and one-shot drains.
    pub async fn drain(&self) -> usize {
        let mut invocations = 0;
        loop {
            match self
                .queue
                .receive(self.name, self.batch, self.visibility, Duration::ZERO)
                .await
            {
                Ok(m) if m.is_empty() => return invocations,
                Ok(m) => {
                    self.invoke(m).await;
                    invocations += 1;
                }
                Err(e) => panic!("receive failed: {e}"),
            }
        }
    }
}

/// How the local event sources poll each work queue.
#[derive(Clone, Debug)]
pub struct Polling {
    /// Messages per invocation.
    pub batch: usize,
    /// Receive loops per queue.
    pub loops_per_queue: usize,
    /// Invocations at once per queue (at least `loops_per_queue`).
    pub max_concurrency: usize,
    pub visibility: Duration,
    /// How long a receive waits for a first message.
    pub wait: Duration,
    pub invocation_timeout: Duration,
}

/// Starts the event sources of every work queue on `tasks`, as `offload
/// dev` runs them: `loops_per_queue` receive loops per queue sharing its
/// invocations, each running until `stop`.
pub fn spawn_all(
    tasks: &mut tokio::task::JoinSet<()>,
    queue: Arc<dyn Queue>,
    worker: Arc<Worker>,
    polling: &Polling,
    stop: &watch::Receiver<bool>,
) {
    for name in QueueName::WORK {
        let concurrency = Arc::new(Semaphore::new(
            polling.max_concurrency.max(polling.loops_per_queue),
        ));
        for _ in 0..polling.loops_per_queue {
            let source = Arc::new(EventSource {
                queue: queue.clone(),
                worker: worker.clone(),
                name,
                batch: polling.batch,
                visibility: polling.visibility,
                wait: polling.wait,
                invocation_timeout: polling.invocation_timeout,
                concurrency: concurrency.clone(),
            });
            let stop = stop.clone();
            tasks.spawn(async move { source.run(stop).await });
        }
    }
}

/// Builds the event Lambda would deliver for these messages.
pub fn to_event(messages: &[ReceivedMessage], arn: &str) -> SqsEvent {
    let mut event = SqsEvent::default();
    event.records = messages
        .iter()
        .map(|m| {
            let mut r = SqsMessage::default();
            r.message_id = Some(m.message_id.clone());
            r.receipt_handle = Some(m.receipt_handle.clone());
            r.body = Some(m.body.clone());
            r.attributes = HashMap::from([
                (
                    "ApproximateReceiveCount".to_string(),
                    m.receive_count.to_string(),
                ),
                (
                    "SentTimestamp".to_string(),
                    m.sent_at.timestamp_millis().to_string(),
                ),
            ]);
            r.event_source = Some("aws:sqs".into());
            r.event_source_arn = Some(arn.to_string());
            r
        })
        .collect();
    event
}
