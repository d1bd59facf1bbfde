//! The worker binary started the way Lambda starts it (against a stand-in
//! for the Runtime API) and invoked with the SQS event of `events/`.

use std::time::Duration;

use offload::ids::{JobId, UserId, WorkspaceId};
use offload::job::JobStatus;
use offload::testing::{new_job, Invoked, LambdaRuntime, TestDb};
use offload::workspace::{self, Role, Tier};
use serde_json::{json, Value};

#[tokio::test]
async fn the_built_binary_runs_the_sample_batch_and_reports_the_garbage_record() {
    let db = TestDb::new().await;
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
    let event: Value = serde_json::from_str(&raw).unwrap();

    let mut rt = LambdaRuntime::serve().await;
    rt.start(
        env!("CARGO_BIN_EXE_worker"),
        "offload-worker",
        &[("DATABASE_URL", db.url.clone())],
    );
    let Invoked::Response(resp) = rt.invoke(event, Duration::from_secs(30)).await else {
        panic!("the batch failed");
    };
    let failed = resp["batchItemFailures"].as_array().expect("{resp}");
    assert_eq!(failed.len(), 1, "only the garbage record: {resp}");
    for id in ids {
        assert_eq!(db.job(id).await.status, JobStatus::Completed);
    }
}
