//! The SQS backend (`aws-sdk-sqs`). With an endpoint override it talks to a
//! local server speaking the SQS API (moto in the tests), and can create the
//! queues and their redrive policy itself.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;
use chrono::{TimeZone, Utc};
use futures::StreamExt;

use super::{
    OutgoingMessage, Queue, QueueDepth, QueueError, ReceivedMessage, MAX_VISIBILITY, SQS_MAX_BATCH,
};
use crate::config::SqsConfig;
use crate::job::QueueName;

/// The longest a send may take, retries included.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Calls of ten messages in flight at once for one large send.
const PARALLEL_SENDS: usize = 8;

const ALL: [QueueName; 4] = [
    QueueName::High,
    QueueName::Default,
    QueueName::Low,
    QueueName::DeadLetter,
];

/// The four queues in SQS. Cloning is shallow (the SDK client is shared).
#[derive(Clone)]
pub struct SqsQueue {
    client: Client,
    /// URLs in the order of [`ALL`].
    urls: [String; 4],
    region: String,
}

fn index(q: QueueName) -> usize {
    ALL.iter()
        .position(|x| *x == q)
        .expect("every queue is in ALL")
}

fn err(e: impl std::fmt::Debug) -> QueueError {
    // The SDK's Display for service errors says only "service error"; the
    // Debug form carries the code and message a person needs.
    let s = format!("{e:?}");
    if s.contains("DispatchFailure") || s.contains("TimeoutError") || s.contains("Connect") {
        QueueError::Unavailable(s)
    } else {
        QueueError::Rejected(s)
    }
}

/// Whole seconds, rounded up: SQS counts time in seconds only.
fn secs(d: Duration) -> i32 {
    d.as_millis().div_ceil(1000) as i32
}

impl SqsQueue {
    /// Builds the SDK client once (it dominates cold start) and resolves the
    /// queue URLs: as configured, else by name, else (only with an endpoint
    /// override, i.e. a local server) by creating the queues.
    pub async fn connect(cfg: &SqsConfig, max_receive_count: u32) -> Result<SqsQueue, QueueError> {
        let client = sqs_client(cfg).await;
        let urls = match &cfg.urls {
            Some(urls) => urls.clone(),
            None if cfg.endpoint.is_some() => {
                create_queues(&client, &cfg.prefix, max_receive_count).await?
            }
            None => {
                let mut urls: [String; 4] = Default::default();
                for q in ALL {
                    let name = format!("{}-{}", cfg.prefix, q.sqs_suffix());
                    let out = client
                        .get_queue_url()
                        .queue_name(&name)
                        .send()
                        .await
                        .map_err(err)?;
                    urls[index(q)] = out.queue_url().unwrap_or_default().to_string();
                }
                urls
            }
        };
        Ok(SqsQueue {
            client,
            urls,
            region: cfg.region.clone(),
        })
    }

    fn url(&self, q: QueueName) -> &str {
        &self.urls[index(q)]
    }
}

/// An SDK client; with an endpoint override and no credentials in the
/// environment it uses fixed local ones (a local server ignores them, and
/// the default chain would otherwise wait on the EC2 metadata service).
pub async fn sqs_client(cfg: &SqsConfig) -> Client {
    Client::new(&crate::config::aws_sdk_config(&cfg.region, cfg.endpoint.as_deref()).await)
}

/// Creates `<prefix>-high|default|low` with a redrive policy to
/// `<prefix>-dlq` after `max_receive_count` receives (all idempotent), and
/// returns their URLs in the order high, default, low, dead-letter.
pub async fn create_queues(
    client: &Client,
    prefix: &str,
    max_receive_count: u32,
) -> Result<[String; 4], QueueError> {
    let dlq = client
        .create_queue()
        .queue_name(format!("{prefix}-dlq"))
        .attributes(QueueAttributeName::MessageRetentionPeriod, "1209600")
        .send()
        .await
        .map_err(err)?
        .queue_url()
        .unwrap_or_default()
        .to_string();
    let dlq_arn = client
        .get_queue_attributes()
        .queue_url(&dlq)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(err)?
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .unwrap_or_default();
    let redrive = serde_json::json!({
        "deadLetterTargetArn": dlq_arn,
        "maxReceiveCount": max_receive_count.to_string(),
    })
    .to_string();
    let mut urls: [String; 4] = Default::default();
    urls[3] = dlq;
    for q in [QueueName::High, QueueName::Default, QueueName::Low] {
        let url = client
            .create_queue()
            .queue_name(format!("{prefix}-{}", q.sqs_suffix()))
            .attributes(QueueAttributeName::RedrivePolicy, &redrive)
            .attributes(QueueAttributeName::VisibilityTimeout, "60")
            .send()
            .await
            .map_err(err)?
            .queue_url()
            .unwrap_or_default()
            .to_string();
        urls[index(q)] = url;
    }
    Ok(urls)
}

impl SqsQueue {
    /// One call of up to ten messages, bounded by [`SEND_TIMEOUT`].
    async fn send_chunk<'a>(
        &self,
        queue: QueueName,
        chunk: &'a [OutgoingMessage],
    ) -> Result<
        (
            &'a [OutgoingMessage],
            Result<
                aws_sdk_sqs::operation::send_message_batch::SendMessageBatchOutput,
                aws_sdk_sqs::error::SdkError<
                    aws_sdk_sqs::operation::send_message_batch::SendMessageBatchError,
                >,
            >,
        ),
        QueueError,
    > {
        let mut req = self.client.send_message_batch().queue_url(self.url(queue));
        for m in chunk {
            let entry = SendMessageBatchRequestEntry::builder()
                .id(&m.id)
                .message_body(&m.body)
                .delay_seconds(secs(m.delay))
                .build()
                .map_err(err)?;
            req = req.entries(entry);
        }
        let out = req
            .customize()
            .config_override(
                aws_sdk_sqs::config::Builder::default().timeout_config(
                    aws_sdk_sqs::config::timeout::TimeoutConfig::builder()
                        .operation_timeout(SEND_TIMEOUT)
                        .build(),
                ),
            )
            .send()
            .await;
        Ok((chunk, out))
    }
}

#[async_trait]
impl Queue for SqsQueue {
    async fn send_batch(
        &self,
        queue: QueueName,
        messages: &[OutgoingMessage],
    ) -> Result<(), QueueError> {
        super::check_delays(messages)?;
        // SQS takes ten per call: the calls for a large batch go out
        // together, each bounded by SEND_TIMEOUT so that an unreachable queue
        // answers soon (the jobs stay `pending` for the scheduler) instead of
        // after the SDK's full retry schedule.
        let calls: Vec<_> = messages
            .chunks(SQS_MAX_BATCH)
            .map(|chunk| self.send_chunk(queue, chunk))
            .collect();
        let results: Vec<_> = futures::stream::iter(calls)
            .buffer_unordered(PARALLEL_SENDS)
            .collect()
            .await;
        let mut sent = Vec::new();
        let mut failures = Vec::new();
        let mut first_error = None;
        for r in results {
            let (chunk, out) = r?;
            match out {
                Ok(out) => {
                    sent.extend(out.successful().iter().map(|s| s.id().to_string()));
                    failures.extend(
                        out.failed()
                            .iter()
                            .map(|f| format!("{}: {}", f.id(), f.message().unwrap_or(f.code()))),
                    );
                }
                Err(e) => {
                    failures.extend(chunk.iter().map(|m| format!("{}: {e}", m.id)));
                    first_error.get_or_insert(e);
                }
            }
        }
        if sent.is_empty() {
            if let Some(e) = first_error {
                return Err(err(e));
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(QueueError::PartialSend {
                failed: failures.len(),
                total: messages.len(),
                reason: failures.join("; "),
                sent,
            })
        }
    }

    async fn receive(
        &self,
        queue: QueueName,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let out = self
            .client
            .receive_message()
            .queue_url(self.url(queue))
            .max_number_of_messages(max.clamp(1, SQS_MAX_BATCH) as i32)
            .visibility_timeout(secs(visibility.min(MAX_VISIBILITY)))
            .wait_time_seconds(secs(wait).min(20))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .send()
            .await
            .map_err(err)?;
        Ok(out
            .messages()
            .iter()
            .map(|m| {
                let attr =
                    |n: MessageSystemAttributeName| m.attributes().and_then(|a| a.get(&n)).cloned();
                let sent_ms: i64 = attr(MessageSystemAttributeName::SentTimestamp)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_default();
                ReceivedMessage {
                    message_id: m.message_id().unwrap_or_default().to_string(),
                    receipt_handle: m.receipt_handle().unwrap_or_default().to_string(),
                    body: m.body().unwrap_or_default().to_string(),
                    receive_count: attr(MessageSystemAttributeName::ApproximateReceiveCount)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(1),
                    sent_at: Utc
                        .timestamp_millis_opt(sent_ms)
                        .single()
                        .unwrap_or_else(Utc::now),
                }
            })
            .collect())
    }

    async fn change_visibility(
        &self,
        queue: QueueName,
        receipt_handle: &str,
        timeout: Duration,
    ) -> Result<(), QueueError> {
        self.client
            .change_message_visibility()
            .queue_url(self.url(queue))
            .receipt_handle(receipt_handle)
            .visibility_timeout(secs(timeout.min(MAX_VISIBILITY)))
            .send()
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn delete_batch(
        &self,
        queue: QueueName,
        receipt_handles: &[String],
    ) -> Result<(), QueueError> {
        for chunk in receipt_handles.chunks(SQS_MAX_BATCH) {
            let mut req = self
                .client
                .delete_message_batch()
                .queue_url(self.url(queue));
            for (i, r) in chunk.iter().enumerate() {
                req = req.entries(
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .build()
                        .map_err(err)?,
                );
            }
            req.send().await.map_err(err)?;
        }
        Ok(())
    }

    async fn depth(&self, queue: QueueName) -> Result<QueueDepth, QueueError> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(self.url(queue))
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(err)?;
        let get = |n: QueueAttributeName| -> u64 {
            out.attributes()
                .and_then(|a| a.get(&n))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(QueueDepth {
            visible: get(QueueAttributeName::ApproximateNumberOfMessages),
            in_flight: get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
            delayed: get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        })
    }

    fn max_receive_batch(&self) -> usize {
        SQS_MAX_BATCH
    }

    fn arn(&self, queue: QueueName) -> String {
        let name = self.url(queue).rsplit('/').next().unwrap_or_default();
        format!("arn:aws:sqs:{}:000000000000:{name}", self.region)
    }
}
