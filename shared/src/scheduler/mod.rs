//! The scheduler: periodic duties, one module each, every one idempotent and
//! safe to run in overlapping invocations (each works on rows it locked with
//! `SKIP LOCKED` or changes them with a compare-and-set). EventBridge calls
//! it every minute in AWS; the local runner every few seconds.

mod dead_letters;
mod outbox;
mod prune;
mod recurring;
mod release;
mod rescue;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::clock::Clock;
use crate::queue::Queue;
use crate::store::Store;

/// Settings of the scheduler's duties.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// A `pending` job younger than this is left to the request that created
    /// it, which is probably sending it right now.
    pub outbox_grace: Duration,
    /// Rows one duty handles per invocation at most (work is in bounded batches).
    pub batch_limit: i64,
    /// Finished jobs older than this are pruned.
    pub retention: Duration,
    /// Parked jobs of a workspace with free slots are released when its
    /// running count has not changed for this long.
    pub release_grace: Duration,
    /// Longest one run spends pruning: it deletes in batches until nothing
    /// is left to prune or this is spent, so pruning keeps up with a drain
    /// of tens of thousands of jobs a second.
    pub prune_budget: Duration,
    /// A `queued` job whose message has not delivered it this long after it
    /// was due is sent a fresh one (its message was lost: a purged or
    /// replaced queue). A duplicate message is harmless, so this only
    /// bounds how much work a deep but healthy backlog repeats.
    pub lost_message_after: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            outbox_grace: Duration::from_secs(10),
            batch_limit: 1_000,
            retention: crate::config::Config::defaults().retention,
            release_grace: Duration::from_secs(10),
            prune_budget: Duration::from_secs(10),
            lost_message_after: Duration::from_secs(3600),
        }
    }
}

/// Everything the scheduler needs, built once per process.
pub struct Scheduler {
    pub store: Store,
    pub queue: Arc<dyn Queue>,
    pub clock: Clock,
    pub config: SchedulerConfig,
}

/// What one run did, duty by duty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Running jobs whose lease expired, put back to be sent again.
    pub rescued: u64,
    /// Running jobs whose lease expired on their last attempt.
    pub rescued_dead: u64,
    /// Pending jobs (new, delayed, rescued, handed off) sent to a queue.
    pub sent: u64,
    /// Jobs made by due recurring schedules.
    pub scheduled: u64,
    /// Messages drained from the dead-letter queue.
    pub dead_lettered: u64,
    /// Finished jobs deleted after the retention period.
    pub pruned: u64,
    /// Parked jobs released into free slots nobody filled (each a repair).
    pub released: u64,
    /// Queued jobs long past due whose message was lost, sent again.
    pub resent: u64,
    /// Time waits (`wait_until`) handed to the outbox: due within a queue's
    /// delay but carried by no message (longer waits, lost messages).
    pub waits_released: u64,
    /// Jobs ended `dead` because their wait token timed out.
    pub tokens_expired: u64,
    /// How long the oldest due job still waiting to start (pending,
    /// queued or parked) has been due, in seconds; 0 when none waits. The
    /// alarm on it catches a backlog the queues' own ages cannot see (jobs
    /// waiting in the database for a slot or for the outbox).
    pub oldest_waiting_secs: u64,
    /// Duties that failed this run (each is retried next run).
    pub errors: Vec<String>,
}

impl Scheduler {
    /// Runs every duty once and logs one summary line. A failing duty does
    /// not stop the others.
    pub async fn run_once(&self) -> Report {
        let mut report = Report::default();
        match rescue::run(self).await {
            Ok((requeued, dead)) => {
                report.rescued = requeued;
                report.rescued_dead = dead;
            }
            Err(e) => report.errors.push(format!("rescue: {e}")),
        }
        match recurring::run(self).await {
            Ok(n) => report.scheduled = n,
            Err(e) => report.errors.push(format!("recurring: {e}")),
        }
        let now = self.clock.now();
        let horizon = chrono::Duration::from_std(crate::queue::MAX_DELAY).unwrap_or_default();
        let lost = chrono::Duration::from_std(self.config.outbox_grace).unwrap_or_default()
            + chrono::Duration::minutes(1);
        match self
            .store
            .release_time_waits(now, horizon, lost, self.config.batch_limit)
            .await
        {
            Ok(n) => report.waits_released = n,
            Err(e) => report.errors.push(format!("time waits: {e}")),
        }
        match self.store.expire_tokens(now, self.config.batch_limit).await {
            Ok(n) => report.tokens_expired = n,
            Err(e) => report.errors.push(format!("wait tokens: {e}")),
        }
        match outbox::resend_lost(self).await {
            Ok(n) => report.resent = n,
            Err(e) => report.errors.push(format!("lost messages: {e}")),
        }
        match outbox::run(self).await {
            Ok(n) => report.sent = n,
            Err(e) => report.errors.push(format!("outbox: {e}")),
        }
        match release::run(self).await {
            Ok(n) => report.released = n,
            Err(e) => report.errors.push(format!("release: {e}")),
        }
        match dead_letters::run(self).await {
            Ok(n) => report.dead_lettered = n,
            Err(e) => report.errors.push(format!("dead letters: {e}")),
        }
        match prune::run(self).await {
            Ok(n) => report.pruned = n,
            Err(e) => report.errors.push(format!("prune: {e}")),
        }
        match self.store.oldest_waiting(self.clock.now()).await {
            Ok(age) => report.oldest_waiting_secs = age.num_seconds().max(0) as u64,
            Err(e) => report.errors.push(format!("oldest waiting job: {e}")),
        }
        if report.errors.is_empty() {
            tracing::info!(
                rescued = report.rescued,
                rescued_dead = report.rescued_dead,
                sent = report.sent,
                dead_lettered = report.dead_lettered,
                pruned = report.pruned,
                released = report.released,
                resent = report.resent,
                waits_released = report.waits_released,
                tokens_expired = report.tokens_expired,
                oldest_waiting_secs = report.oldest_waiting_secs,
                "scheduler run"
            );
        } else {
            tracing::warn!(rescued = report.rescued, rescued_dead = report.rescued_dead,
                scheduled = report.scheduled, sent = report.sent, dead_lettered = report.dead_lettered, pruned = report.pruned, released = report.released,
                errors = ?report.errors, "scheduler run with errors");
        }
        // Rescues, dead letters and released waits, to whoever follows
        // those jobs over WebSockets (AWS).
        self.store.push_changes().await;
        report
    }
}

impl Report {
    /// The run as a CloudWatch embedded-metric-format line (namespace
    /// `Offload`), for the alarms on the scheduler: its duty errors and the
    /// oldest waiting job's age.
    pub fn metric_line(&self, now: chrono::DateTime<chrono::Utc>) -> serde_json::Value {
        serde_json::json!({
            "_aws": {
                "Timestamp": now.timestamp_millis(),
                "CloudWatchMetrics": [{
                    "Namespace": "Offload",
                    "Dimensions": [[]],
                    "Metrics": [
                        {"Name": "SchedulerErrors", "Unit": "Count"},
                        {"Name": "OldestWaitingJobAge", "Unit": "Seconds"},
                        {"Name": "Rescued", "Unit": "Count"},
                        {"Name": "DeadLettered", "Unit": "Count"},
                        {"Name": "Pruned", "Unit": "Count"}
                    ]
                }]
            },
            "SchedulerErrors": self.errors.len(),
            "OldestWaitingJobAge": self.oldest_waiting_secs,
            "Rescued": self.rescued + self.rescued_dead,
            "DeadLettered": self.dead_lettered,
            "Pruned": self.pruned,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metric_line_is_embedded_metric_format_with_every_figure() {
        let report = Report {
            oldest_waiting_secs: 300,
            rescued: 2,
            rescued_dead: 1,
            errors: vec!["prune: x".into(), "outbox: y".into()],
            ..Report::default()
        };
        let line = report.metric_line(chrono::Utc::now());
        let spec = &line["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(spec["Namespace"], "Offload");
        // Every metric declared is a top-level number, as CloudWatch reads it.
        for m in spec["Metrics"].as_array().unwrap() {
            let name = m["Name"].as_str().unwrap();
            assert!(line[name].is_number(), "{name} missing: {line}");
        }
        assert_eq!(line["OldestWaitingJobAge"], 300);
        assert_eq!(line["SchedulerErrors"], 2);
        assert_eq!(line["Rescued"], 3);
    }
}
