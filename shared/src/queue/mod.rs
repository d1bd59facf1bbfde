//! The queue interface the worker, scheduler and API send through, and its
//! two backends: SQS (production) and a Postgres table (local runs,
//! benchmarks, and teams that run without SQS). One conformance suite
//! (`tests/queue_conformance.rs`) runs against both so they cannot drift.
//!
//! The interface is SQS's own semantics, narrowed to what Offload uses:
//! at-least-once delivery, a visibility timeout per receive, a receive count,
//! and redrive to a dead-letter queue after `max_receive_count` receives.

mod postgres;
mod sqs;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use thiserror::Error;

pub use postgres::PgQueue;
pub use sqs::{create_queues, sqs_client, SqsQueue};

use crate::job::QueueName;

/// SQS's limits, which both backends keep so code written against one
/// works against the other.
pub const MAX_DELAY: Duration = Duration::from_secs(900);
pub const MAX_VISIBILITY: Duration = Duration::from_secs(43_200);
pub const SQS_MAX_BATCH: usize = 10;

#[derive(Debug, Error)]
pub enum QueueError {
    #[error("queue backend unavailable: {0}")]
    Unavailable(String),
    #[error("queue rejected the request: {0}")]
    Rejected(String),
    #[error("{failed} of {total} messages were not sent: {reason}")]
    PartialSend {
        failed: usize,
        total: usize,
        reason: String,
        /// The `id`s of the entries that were sent.
        sent: Vec<String>,
    },
    #[error("receipt handle {0:?} is not valid (the message was received again, or deleted)")]
    BadReceipt(String),
}

/// A message to send: `id` is the caller's name for it within a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct OutgoingMessage {
    pub id: String,
    pub body: String,
    /// Invisible for this long after sending (at most [`MAX_DELAY`]).
    pub delay: Duration,
}

/// Refuses a batch holding a message delayed beyond [`MAX_DELAY`], as SQS does.
pub(crate) fn check_delays(messages: &[OutgoingMessage]) -> Result<(), QueueError> {
    match messages.iter().find(|m| m.delay > MAX_DELAY) {
        Some(m) => Err(QueueError::Rejected(format!(
            "message {} asks for a delay of {}s; the most is {}s",
            m.id,
            m.delay.as_secs(),
            MAX_DELAY.as_secs()
        ))),
        None => Ok(()),
    }
}

/// A received message, valid to change or delete by `receipt_handle` until
/// its visibility timeout ends.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedMessage {
    pub message_id: String,
    pub receipt_handle: String,
    pub body: String,
    /// How many times it has been received, this time included.
    pub receive_count: u32,
    pub sent_at: DateTime<Utc>,
}

/// Approximate message counts, as SQS reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueDepth {
    pub visible: u64,
    pub in_flight: u64,
    pub delayed: u64,
}

/// A queue backend. Every method addresses one of the logical queues.
#[async_trait]
pub trait Queue: Send + Sync {
    /// Sends messages; a backend splits them into batches as it must. On a
    /// partial failure, [`QueueError::PartialSend`] lists what was sent.
    async fn send_batch(
        &self,
        queue: QueueName,
        messages: &[OutgoingMessage],
    ) -> Result<(), QueueError>;

    /// Receives up to `max` messages, hiding them for `visibility`; waits up
    /// to `wait` for the first one to arrive.
    async fn receive(
        &self,
        queue: QueueName,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError>;

    /// Hides a received message for `timeout` from now (0: visible now).
    async fn change_visibility(
        &self,
        queue: QueueName,
        receipt_handle: &str,
        timeout: Duration,
    ) -> Result<(), QueueError>;

    /// Deletes received messages.
    async fn delete_batch(
        &self,
        queue: QueueName,
        receipt_handles: &[String],
    ) -> Result<(), QueueError>;

    async fn depth(&self, queue: QueueName) -> Result<QueueDepth, QueueError>;

    /// The largest batch one `receive` returns (10 for SQS).
    fn max_receive_batch(&self) -> usize;

    /// A stable ARN-like name for the queue, used as an SQS event's
    /// `eventSourceARN` so the worker knows which queue a record came from.
    fn arn(&self, queue: QueueName) -> String;

    /// The Postgres backend, whose messages can be written in the same
    /// transaction as the jobs they carry (one commit instead of three).
    fn as_postgres(&self) -> Option<&PgQueue> {
        None
    }

    async fn send(
        &self,
        queue: QueueName,
        body: String,
        delay: Duration,
    ) -> Result<(), QueueError> {
        self.send_batch(
            queue,
            &[OutgoingMessage {
                id: "0".into(),
                body,
                delay,
            }],
        )
        .await
    }

    async fn delete(&self, queue: QueueName, receipt_handle: &str) -> Result<(), QueueError> {
        self.delete_batch(queue, &[receipt_handle.to_string()])
            .await
    }
}
