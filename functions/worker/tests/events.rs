//! The sample SQS event of `events/` through the worker function: its
//! handler called directly, and its built binary started as Lambda starts
//! it (against the Runtime API stand-in).

use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::sqs::SqsEvent;
use offload::config::WorkerConfig;
use offload::ids::{JobId, UserId, WorkspaceId};
use offload::job::JobStatus;
use offload::testing::{new_job, Invoked, LambdaRuntime, TestDb};
use offload::workspace::{self, Role, Tier};
use serde_json::{json, Value};

/// The record of the sample batch whose body is not a job message.
const GARBAGE: &str = "5f1a5c7e-1d2b-4c53-9f0e-000000000003";

/// The sample batch's workspace and jobs, and the batch itself.
async fn sample(db: &TestDb) -> (Vec<JobId>, Value) {
    let ws: WorkspaceId = "0ff10ad0-0000-4000-8000-00000000d3e0".parse().unwrap();
    let conn = db.pool.get().await.unwrap();
    workspace::ensure_workspace(&**conn, ws, "Sample", Tier::Standard)
        .await
        .unwrap();
    workspace::add_member(&**conn, ws, UserId::new(), Role::Admin)
        .await
        .unwrap();
    let ids: Vec<JobId> = [
        "0ff10ad0-0000-4000-8000-00000000e001",
        "0ff10ad0-0000-4000-8000-00000000e002",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let jobs: Vec<_> = ids
        .iter()
        .map(|id| {
            let mut j = new_job(ws, "noop", json!({}));
            j.id = *id;
            j
        })
        .collect();
    db.insert(&jobs).await;
    let raw = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../events/sqs-batch.json"
    ))
    .unwrap();
    (ids, serde_json::from_str(&raw).unwrap())
}

#[tokio::test]
async fn the_sample_batch_completes_its_jobs_and_reports_the_garbage_record() {
    let db = TestDb::new().await;
    let (ids, event) = sample(&db).await;
    let event: SqsEvent = serde_json::from_value(event).unwrap();
    let worker = db.worker(Arc::new(db.pg_queue(5)), WorkerConfig::default());
    let deadline = offload_worker::deadline_instant(
        (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            + 60_000) as u64,
    );
    let resp = worker.handle(event, deadline).await;
    let failed: Vec<_> = resp
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    assert_eq!(failed, [GARBAGE]);
    for id in ids {
        assert_eq!(db.job(id).await.status, JobStatus::Completed);
    }
    // The response serializes as Lambda expects it.
    let v = serde_json::to_value(&resp).unwrap();
    assert_eq!(v["batchItemFailures"][0]["itemIdentifier"], GARBAGE);
}

#[tokio::test]
async fn the_built_binary_runs_the_sample_batch_and_reports_the_garbage_record() {
    let db = TestDb::new().await;
    let (ids, event) = sample(&db).await;
    let mut rt = LambdaRuntime::serve().await;
    rt.start(
        env!("CARGO_BIN_EXE_worker"),
        "offload-worker",
        &[("DATABASE_URL", db.url.clone())],
    );
    let Invoked::Response(resp) = rt.invoke(event, Duration::from_secs(30)).await else {
        panic!("the batch failed");
    };
    assert_eq!(
        resp["batchItemFailures"],
        json!([{"itemIdentifier": GARBAGE}]),
        "{resp}"
    );
    for id in ids {
        assert_eq!(db.job(id).await.status, JobStatus::Completed);
    }
}
