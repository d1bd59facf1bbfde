//! Drains the dead-letter queue: a message that came back
//! `maxReceiveCount` times (its worker kept dying on it) makes its job
//! `dead` with the reason, so someone can inspect and re-run it.

use std::time::Duration;

use super::Scheduler;
use crate::db::DbError;
use crate::ids::JobId;
use crate::job::{JobMessage, QueueName};
use crate::store::LogLine;

/// Receives per call; a run drains at most `batch_limit` messages.
const RECEIVE: usize = 10;

pub(super) async fn run(s: &Scheduler) -> Result<u64, DbError> {
    let mut drained = 0u64;
    while (drained as i64) < s.config.batch_limit {
        let messages = s
            .queue
            .receive(
                QueueName::DeadLetter,
                RECEIVE,
                Duration::from_secs(60),
                Duration::ZERO,
            )
            .await
            .map_err(|e| DbError::Inconsistent(format!("dead-letter queue: {e}")))?;
        if messages.is_empty() {
            break;
        }
        let now = s.clock.now();
        let mut ids = Vec::new();
        let mut logs = Vec::new();
        for m in &messages {
            match serde_json::from_str::<JobMessage>(&m.body) {
                Ok(jm) => {
                    ids.push(jm.job_id);
                    logs.push(LogLine {
                        job_id: jm.job_id,
                        workspace_id: jm.workspace_id,
                        attempt: 0,
                        level: "error",
                        message: reason(),
                        metadata: None,
                    });
                }
                Err(e) => tracing::warn!(message_id = %m.message_id, error = %e,
                    body = %m.body.chars().take(200).collect::<String>(),
                    "dead-letter message is not a job message; dropped"),
            }
        }
        let buried: Vec<JobId> = s.store.bury_dead_lettered(&ids, &reason(), now).await?;
        let logs: Vec<LogLine> = logs
            .into_iter()
            .filter(|l| buried.contains(&l.job_id))
            .collect();
        s.store.append_logs(&logs, now).await?;
        let receipts: Vec<String> = messages.iter().map(|m| m.receipt_handle.clone()).collect();
        s.queue
            .delete_batch(QueueName::DeadLetter, &receipts)
            .await
            .map_err(|e| DbError::Inconsistent(format!("dead-letter queue: {e}")))?;
        drained += messages.len() as u64;
    }
    Ok(drained)
}

fn reason() -> String {
    "its message reached the dead-letter queue: it was delivered the maximum number of times \
     (maxReceiveCount) without the job finishing, which usually means the worker crashed or \
     timed out while running it"
        .into()
}
