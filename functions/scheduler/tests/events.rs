//! The sample EventBridge event of `events/` (and an EventBridge Scheduler
//! input, which is any JSON) through the scheduler function's handler.

use std::sync::Arc;

use offload::clock::Clock;
use offload::job::JobStatus;
use offload::scheduler::{Scheduler, SchedulerConfig};
use offload::testing::{new_job, Invoked, LambdaRuntime, TestDb};
use offload::workspace::Tier;
use serde_json::{json, Value};

#[tokio::test]
async fn a_scheduled_event_runs_every_duty_and_reports_counts() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Standard).await;
    let job = db.insert(&[new_job(ws, "noop", json!({}))]).await.remove(0);
    let scheduler = Scheduler {
        store: db.store.clone(),
        queue: Arc::new(db.pg_queue(5)),
        clock: Clock::manual(chrono::Utc::now() + chrono::Duration::minutes(1)),
        config: SchedulerConfig::default(),
    };
    let raw = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../events/scheduled.json"
    ))
    .unwrap();
    let event: Value = serde_json::from_str(&raw).unwrap();
    let report = offload_scheduler::handle(&scheduler, event, false).await;
    assert_eq!(report["sent"], 1, "{report}");
    assert_eq!(report["errors"], json!([]));
    assert_eq!(db.job(job.id).await.status, JobStatus::Queued);
    // Sent but not started, due a minute ago by the scheduler's clock.
    let age = report["oldest_waiting_secs"].as_u64().unwrap();
    assert!((59..=61).contains(&age), "{report}");

    let report = offload_scheduler::handle(&scheduler, json!({"anything": ["goes"]}), false).await;
    assert_eq!(report["sent"], 0);
}

#[tokio::test]
async fn the_built_binary_runs_every_duty_on_the_scheduled_event() {
    let db = TestDb::new().await;
    let raw = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../events/scheduled.json"
    ))
    .unwrap();
    let event: Value = serde_json::from_str(&raw).unwrap();
    let mut rt = LambdaRuntime::serve().await;
    rt.start(
        env!("CARGO_BIN_EXE_scheduler"),
        "offload-scheduler",
        &[("DATABASE_URL", db.url.clone())],
    );
    let Invoked::Response(report) = rt.invoke(event, std::time::Duration::from_secs(30)).await
    else {
        panic!("the scheduled event failed");
    };
    assert_eq!(report["errors"], json!([]), "{report}");
    assert_eq!(report["rescued"], 0);
}
