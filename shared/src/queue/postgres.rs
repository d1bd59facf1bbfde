//! The Postgres queue backend: one row per message in `queue_messages`,
//! received with `FOR UPDATE SKIP LOCKED` (the technique of pgmq), woken by
//! LISTEN/NOTIFY with a slow poll as the fallback.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use tokio::sync::Notify;

use super::{OutgoingMessage, Queue, QueueDepth, QueueError, ReceivedMessage};
use crate::db;
use crate::job::QueueName;

/// Receives a batch and, in the same statement, moves to the dead-letter
/// queue every visible message already received `max_receive_count` times
/// (SQS's redrive). Ids are picked in a `SKIP LOCKED` sub-select and matched
/// with `= ANY(ARRAY(...))`: joining the sub-select in `FROM` instead made
/// the planner scan the whole table. `read_ct` in the receipt makes a
/// receipt from an earlier receive useless once the message is received again.
const RECEIVE: &str = "\
WITH redriven AS (
    UPDATE queue_messages SET queue = 'dead_letter', read_ct = 0, vt = now()
    WHERE $1 <> 'dead_letter' AND msg_id = ANY(ARRAY(
        SELECT msg_id FROM queue_messages
        WHERE queue = $1 AND vt <= now() AND read_ct >= $3
        ORDER BY msg_id LIMIT 100 FOR UPDATE SKIP LOCKED))
    RETURNING msg_id)
UPDATE queue_messages SET vt = now() + $4 * interval '1 millisecond', read_ct = read_ct + 1
WHERE msg_id = ANY(ARRAY(
    SELECT msg_id FROM queue_messages
    WHERE queue = $1 AND vt <= now() AND ($1 = 'dead_letter' OR read_ct < $3)
    ORDER BY msg_id LIMIT $2 FOR UPDATE SKIP LOCKED))
RETURNING msg_id, body, read_ct, enqueued_at";

/// A queue in Postgres. Cloning is shallow.
#[derive(Clone)]
pub struct PgQueue {
    pool: Pool,
    max_receive_count: i32,
    wake: Arc<Wake>,
}

/// Wakes waiting receivers when messages are sent: one receiver per queue
/// (not all of them, which would send every idle poller of every queue to
/// look for the same message); a receiver that comes back with a full batch
/// wakes the next one of its queue, so a burst is shared out.
#[derive(Default)]
struct Wake {
    queues: [Notify; 4],
}

impl Wake {
    fn of(&self, queue: QueueName) -> &Notify {
        &self.queues[match queue {
            QueueName::High => 0,
            QueueName::Default => 1,
            QueueName::Low => 2,
            QueueName::DeadLetter => 3,
        }]
    }

    /// A message was sent to some queue: wake one receiver of each.
    fn one_each(&self) {
        self.queues.iter().for_each(Notify::notify_one);
    }

    /// Something may have been missed: wake every receiver.
    fn all(&self) {
        self.queues.iter().for_each(Notify::notify_waiters);
    }
}

impl PgQueue {
    /// A queue that finds new messages by polling only. Call
    /// [`PgQueue::listen`] to be woken as soon as a message is sent.
    pub fn new(pool: Pool, max_receive_count: u32) -> Self {
        PgQueue {
            pool,
            max_receive_count: max_receive_count as i32,
            wake: Arc::new(Wake::default()),
        }
    }

    /// Keeps a dedicated connection that LISTENs for sends and wakes waiting
    /// receivers; it reconnects by itself if the connection drops.
    pub fn listen(&self, database_url: &str) -> tokio::task::JoinHandle<()> {
        let wake = self.wake.clone();
        let url = database_url.to_string();
        tokio::spawn(async move {
            loop {
                if let Err(e) = listen_once(&url, &wake).await {
                    tracing::warn!(error = %e, "queue listener lost its connection; reconnecting");
                }
                // Wake everyone so nobody sleeps through what was missed.
                wake.all();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }

    async fn receive_now(
        &self,
        queue: QueueName,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let client = db::Conn::get(&self.pool).await.map_err(unavailable)?;
        let rows = client
            .query(
                RECEIVE,
                &[
                    &queue.as_str(),
                    &(max as i64),
                    &self.max_receive_count,
                    &(visibility.as_millis() as f64),
                ],
            )
            .await
            .map_err(unavailable)?;
        let mut out: Vec<ReceivedMessage> = rows
            .iter()
            .map(|r| {
                let id: i64 = r.get(0);
                let ct: i32 = r.get(2);
                ReceivedMessage {
                    message_id: id.to_string(),
                    receipt_handle: format!("{id}:{ct}"),
                    body: r.get(1),
                    receive_count: ct as u32,
                    sent_at: r.get(3),
                }
            })
            .collect();
        out.sort_by_key(|m| m.message_id.parse::<i64>().unwrap_or_default());
        Ok(out)
    }
}

impl PgQueue {
    /// Sends messages on the caller's connection or transaction, so they
    /// commit (and wake receivers) together with whatever else it writes.
    pub async fn send_batch_in(
        &self,
        db: &impl deadpool_postgres::GenericClient,
        queue: QueueName,
        messages: &[OutgoingMessage],
    ) -> Result<(), QueueError> {
        if messages.is_empty() {
            return Ok(());
        }
        super::check_delays(messages)?;
        let bodies: Vec<&str> = messages.iter().map(|m| m.body.as_str()).collect();
        let delays: Vec<f64> = messages
            .iter()
            .map(|m| m.delay.as_millis() as f64)
            .collect();
        let stmt = db
            .prepare_cached(
                "INSERT INTO queue_messages (queue, body, vt) \
                 SELECT $1, u.body, now() + u.delay * interval '1 millisecond' \
                 FROM unnest($2::text[], $3::float8[]) AS u(body, delay)",
            )
            .await
            .map_err(unavailable)?;
        db.execute(&stmt, &[&queue.as_str(), &bodies, &delays])
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

async fn listen_once(url: &str, wake: &Wake) -> Result<(), db::DbError> {
    db::listen(url, "offload_queue", || wake.all(), |_| wake.one_each()).await
}

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

fn parse_receipt(receipt: &str) -> Result<(i64, i32), QueueError> {
    let bad = || QueueError::BadReceipt(receipt.to_string());
    let (id, ct) = receipt.split_once(':').ok_or_else(bad)?;
    Ok((
        id.parse().map_err(|_| bad())?,
        ct.parse().map_err(|_| bad())?,
    ))
}

#[async_trait]
impl Queue for PgQueue {
    async fn send_batch(
        &self,
        queue: QueueName,
        messages: &[OutgoingMessage],
    ) -> Result<(), QueueError> {
        let client = self.pool.get().await.map_err(unavailable)?;
        self.send_batch_in(&client, queue, messages).await
    }

    async fn receive(
        &self,
        queue: QueueName,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register for a wake-up before looking, so a send between the
            // look and the wait is not missed.
            let wake = self.wake.of(queue);
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got = self.receive_now(queue, max, visibility).await?;
            if got.len() >= max {
                // There may be more: let the next receiver look too.
                wake.notify_one();
            }
            if !got.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(got);
            }
            // Delayed messages and visibility timeouts send no signal: poll
            // at least every 250 ms while waiting.
            let nap = (deadline - tokio::time::Instant::now()).min(Duration::from_millis(250));
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }

    async fn change_visibility(
        &self,
        _queue: QueueName,
        receipt_handle: &str,
        timeout: Duration,
    ) -> Result<(), QueueError> {
        let (id, ct) = parse_receipt(receipt_handle)?;
        let timeout = timeout.min(super::MAX_VISIBILITY);
        let client = db::Conn::get(&self.pool).await.map_err(unavailable)?;
        let n = client
            .execute(
                "UPDATE queue_messages SET vt = now() + $3 * interval '1 millisecond' \
                 WHERE msg_id = $1 AND read_ct = $2",
                &[&id, &ct, &(timeout.as_millis() as f64)],
            )
            .await
            .map_err(unavailable)?;
        if n == 0 {
            return Err(QueueError::BadReceipt(receipt_handle.to_string()));
        }
        Ok(())
    }

    async fn delete_batch(
        &self,
        _queue: QueueName,
        receipt_handles: &[String],
    ) -> Result<(), QueueError> {
        if receipt_handles.is_empty() {
            return Ok(());
        }
        let (ids, cts): (Vec<i64>, Vec<i32>) = receipt_handles
            .iter()
            .map(|r| parse_receipt(r))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let client = db::Conn::get(&self.pool).await.map_err(unavailable)?;
        client
            .execute(
                "DELETE FROM queue_messages USING unnest($1::int8[], $2::int4[]) AS u(id, ct) \
                 WHERE msg_id = u.id AND read_ct = u.ct",
                &[&ids, &cts],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn depth(&self, queue: QueueName) -> Result<QueueDepth, QueueError> {
        let client = db::Conn::get(&self.pool).await.map_err(unavailable)?;
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE vt <= now()), \
                        count(*) FILTER (WHERE vt > now() AND read_ct > 0), \
                        count(*) FILTER (WHERE vt > now() AND read_ct = 0) \
                 FROM queue_messages WHERE queue = $1",
                &[&queue.as_str()],
            )
            .await
            .map_err(unavailable)?;
        Ok(QueueDepth {
            visible: row.get::<_, i64>(0) as u64,
            in_flight: row.get::<_, i64>(1) as u64,
            delayed: row.get::<_, i64>(2) as u64,
        })
    }

    fn max_receive_batch(&self) -> usize {
        10_000
    }

    fn as_postgres(&self) -> Option<&PgQueue> {
        Some(self)
    }

    fn arn(&self, queue: QueueName) -> String {
        format!(
            "arn:offload:postgres:local:0:offload-{}",
            queue.sqs_suffix()
        )
    }
}
