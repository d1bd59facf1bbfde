//! The worker's CloudWatch metrics, in Embedded Metric Format: lines on
//! stdout that Lambda sends to CloudWatch Logs, where they become metrics.
//!
//! One line per job type, queue and outcome per invocation, not one per
//! job: CloudWatch Logs bills every byte ingested ($0.50 per GB at list
//! price), and a line per job (~450 bytes) cost more than the requests and
//! compute of running the job. A line holds the count and up to
//! [`VALUES_PER_LINE`] wait and run times (the format's limit per metric);
//! a larger group takes more lines.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::job::Job;

/// The most values Embedded Metric Format takes for one metric in one line.
pub const VALUES_PER_LINE: usize = 100;

/// Job type, queue and outcome: the line's dimensions.
type Dimensions = (String, &'static str, &'static str);

/// The runs of one invocation, by their dimensions: each run's wait and run
/// time, ms.
#[derive(Default)]
pub struct RunMetrics {
    groups: BTreeMap<Dimensions, Vec<(i64, u64)>>,
}

impl RunMetrics {
    /// Counts one run of `job` that ended with `outcome` after `run_time`:
    /// its wait is from its creation to its first start.
    pub fn add(&mut self, job: &Job, outcome: &'static str, run_time: Duration) {
        let wait_ms = job
            .started_at
            .map(|s| (s - job.created_at).num_milliseconds().max(0))
            .unwrap_or(0);
        self.groups
            .entry((job.job_type.clone(), job.queue.as_str(), outcome))
            .or_default()
            .push((wait_ms, run_time.as_millis() as u64));
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The lines for everything counted, stamped `now`; empties the set.
    pub fn take_lines(&mut self, now: DateTime<Utc>) -> Vec<Value> {
        let mut lines = Vec::new();
        for ((job_type, queue, outcome), runs) in std::mem::take(&mut self.groups) {
            for chunk in runs.chunks(VALUES_PER_LINE) {
                lines.push(json!({
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
                    "JobType": job_type,
                    "Queue": queue,
                    "Outcome": outcome,
                    "Jobs": chunk.len(),
                    "WaitTime": chunk.iter().map(|r| r.0).collect::<Vec<_>>(),
                    "RunTime": chunk.iter().map(|r| r.1).collect::<Vec<_>>(),
                }));
            }
        }
        lines
    }
}
