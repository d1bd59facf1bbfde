//! The counts of waiting and running jobs the stats route reads
//! (`workspace_job_counts`, kept by triggers) equal a count of the jobs
//! themselves through every change a job goes through: batch creates,
//! parking for a limited workspace, claims, outcomes, cancels, retries,
//! deletes, and a workspace deleted.

use offload::config::WorkerConfig;
use offload::testing::{event_source, TestApp, TestDb};
use offload::workspace::Tier;
use serde_json::{json, Value};

/// Every (workspace, queue, status) with jobs waiting or running, from the
/// counts and from the jobs; they must be the same.
async fn assert_counts_true(db: &TestDb, when: &str) {
    let conn = db.pool.get().await.unwrap();
    let read = |sql: &'static str| {
        let conn = &conn;
        async move {
            let mut rows: Vec<(String, String, String, i64)> = conn
                .query(sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    let ws: uuid::Uuid = r.get(0);
                    (ws.to_string(), r.get(1), r.get(2), r.get(3))
                })
                .collect();
            rows.sort();
            rows
        }
    };
    let kept =
        read("SELECT workspace_id, queue, status, n FROM workspace_job_counts WHERE n <> 0").await;
    let truth = read(
        "SELECT workspace_id, queue, status, count(*) FROM jobs \
         WHERE status IN ('pending', 'queued', 'running') GROUP BY 1, 2, 3",
    )
    .await;
    assert_eq!(kept, truth, "{when}");
}

#[tokio::test]
async fn the_kept_counts_follow_every_change_of_a_job() {
    // A standard workspace: five at a time, the rest parked.
    let db = TestDb::new().await;
    let queue: std::sync::Arc<dyn offload::queue::Queue> = std::sync::Arc::new(db.pg_queue(5));
    let app = TestApp::spawn_full(db, queue, Tier::Standard, Default::default()).await;
    let mut jobs: Vec<Value> = (0..24)
        .map(|i| {
            let queue = ["high", "default", "low"][i % 3];
            json!({"type": "noop", "queue": queue})
        })
        .collect();
    jobs.extend((0..3).map(
        |_| json!({"type": "sleep", "payload": {"ms": 0, "fail_attempts": 1, "permanent": true}}),
    ));
    jobs.push(json!({"type": "noop", "run_at": (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339()}));
    let created: Value = app
        .req("POST", "/jobs/batch")
        .json(&json!({ "jobs": jobs }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_counts_true(&app.db, "after a batch create").await;

    // Cancel the delayed one (not started: cancelled at once).
    let delayed = created["jobs"][27]["id"].as_str().unwrap();
    let resp = app
        .req("POST", &format!("/jobs/{delayed}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_counts_true(&app.db, "after a cancel").await;

    // Run the default queue: claims, parking and taking, completions,
    // failures (the high and low ones stay queued).
    let worker = app.db.worker(app.queue.clone(), WorkerConfig::default());
    let source = event_source(app.queue.clone(), worker);
    for _ in 0..20 {
        source.drain().await;
        assert_counts_true(&app.db, "while draining").await;
        let waiting = app
            .db
            .scalar_i64(
                "SELECT count(*) FROM jobs WHERE status IN ('pending', 'queued', 'running')",
            )
            .await;
        if waiting == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.db
            .scalar_i64("SELECT count(*) FROM jobs WHERE status = 'dead'")
            .await,
        3
    );

    // Retry a dead one, delete a finished one.
    let failed = created["jobs"][24]["id"].as_str().unwrap();
    let resp = app
        .req("POST", &format!("/jobs/{failed}/retry"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_counts_true(&app.db, "after a retry").await;
    let done = created["jobs"][1]["id"].as_str().unwrap();
    let resp = app
        .req("DELETE", &format!("/jobs/{done}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_counts_true(&app.db, "after a delete").await;

    // The stats route says what the jobs say.
    let s: Value = app.get_json("/stats").await;
    assert_eq!(s["by_status"]["queued"], 8 + 8 + 1, "{s}");
    assert_eq!(s["by_queue"]["high"]["queued"], 8, "{s}");
    assert_eq!(s["by_status"]["completed"], 8 - 1, "{s}");
    assert_eq!(s["by_status"]["cancelled"], 1, "{s}");

    // A deleted workspace leaves no counts behind.
    app.db
        .pool
        .get()
        .await
        .unwrap()
        .execute("DELETE FROM workspaces WHERE id = $1", &[&app.workspace.0])
        .await
        .unwrap();
    assert_eq!(
        app.db
            .scalar_i64("SELECT count(*) FROM workspace_job_counts")
            .await,
        0
    );
}
