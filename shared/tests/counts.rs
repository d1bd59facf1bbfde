//! The counts of waiting and running jobs the stats route reads
//! (`workspace_job_counts`, kept by triggers) equal a count of the jobs
//! themselves through every change a job goes through: batch creates,
//! parking for a limited workspace, claims, outcomes, cancels, retries,
//! deletes, and a workspace deleted; and the per-minute rollups the
//! route's finished counts and percentiles come from agree with the jobs.

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

    // The stats route says what the jobs say, and the depth the scheduler
    // samples is what was waiting then.
    app.db.store.sample_depth(chrono::Utc::now()).await.unwrap();
    let s: Value = app.get_json("/stats").await;
    assert_eq!(s["depth"].as_array().unwrap().len(), 1, "{s}");
    assert_eq!(s["depth"][0]["waiting"], 8 + 8 + 1, "{s}");
    assert_eq!(s["depth"][0]["running"], 0, "{s}");
    assert_eq!(s["by_status"]["queued"], 8 + 8 + 1, "{s}");
    assert_eq!(s["by_queue"]["high"]["queued"], 8, "{s}");
    // Finished counts are what finished within the window: the deleted
    // job and the retried one still count there, like in the throughput.
    assert_eq!(s["by_status"]["completed"], 8, "{s}");
    assert_eq!(s["by_status"]["dead"], 3, "{s}");
    assert_eq!(s["by_status"]["cancelled"], 1, "{s}");
    assert_eq!(s["by_type"]["sleep"]["dead"], 3, "{s}");
    assert_eq!(s["run_ms"]["samples"], 11, "{s}");

    // A deleted workspace leaves no counts behind.
    app.db
        .pool
        .get()
        .await
        .unwrap()
        .execute("DELETE FROM workspaces WHERE id = $1", &[&app.workspace.0])
        .await
        .unwrap();
    for table in [
        "workspace_job_counts",
        "job_stats_log",
        "job_stats_minutes",
        "job_latency_minutes",
    ] {
        assert_eq!(
            app.db
                .scalar_i64(&format!("SELECT count(*) FROM {table}"))
                .await,
            0,
            "{table}"
        );
    }
}

/// The exact nearest-rank percentile of sorted values.
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).max(1);
    sorted[rank - 1]
}

#[tokio::test]
async fn percentiles_from_the_rollups_are_within_five_percent_of_the_jobs() {
    let app = TestApp::spawn().await;
    let conn = app.db.pool.get().await.unwrap();
    // 300 jobs inserted already finished (the insert trigger), run i * 7 ms
    // after waiting i * 3 ms...
    conn.execute(
        "INSERT INTO jobs (id, workspace_id, job_type, status, attempts, payload, \
                           created_at, started_at, finished_at, updated_at) \
         SELECT gen_random_uuid(), $1, 'noop', 'completed', 1, '{}', t, \
                t + i * interval '3 ms', t + i * interval '10 ms', t + i * interval '10 ms' \
         FROM (SELECT i, now() - interval '10 minutes' AS t FROM generate_series(1, 300) i) s",
        &[&app.workspace.0],
    )
    .await
    .unwrap();
    // ...and 200 created waiting, then started and finished by updates (the
    // update trigger), 40 of them dead.
    conn.execute(
        "INSERT INTO jobs (id, workspace_id, job_type, status, payload, created_at) \
         SELECT gen_random_uuid(), $1, 'sleep', 'queued', jsonb_build_object('i', i), \
                now() - interval '5 minutes' \
         FROM generate_series(1, 200) i",
        &[&app.workspace.0],
    )
    .await
    .unwrap();
    conn.execute(
        "UPDATE jobs SET status = 'running', attempts = 1, \
                started_at = created_at + (payload->>'i')::int * interval '40 ms' \
         WHERE job_type = 'sleep'",
        &[],
    )
    .await
    .unwrap();
    conn.execute(
        "UPDATE jobs SET status = CASE WHEN (payload->>'i')::int % 5 = 0 THEN 'dead' \
                                       ELSE 'completed' END, \
                finished_at = started_at + (payload->>'i')::int * interval '900 ms' \
         WHERE job_type = 'sleep'",
        &[],
    )
    .await
    .unwrap();

    // The statements that finished the jobs wrote the rollups: no row per job.
    let s: Value = app.get_json("/stats").await;
    assert_eq!(
        app.db
            .scalar_i64("SELECT count(*) FROM job_stats_log")
            .await,
        0,
        "nothing logged per job"
    );
    assert_eq!(
        app.db
            .scalar_i64("SELECT sum(completed + dead)::int8 FROM job_stats_minutes")
            .await,
        500
    );

    // The release before logged a row per finished job, which the stats read
    // and the scheduler folds: the same jobs logged that way read alike,
    // unfolded, half folded and folded.
    conn.batch_execute(
        "DELETE FROM job_stats_minutes; DELETE FROM job_latency_minutes; \
         INSERT INTO job_stats_log (workspace_id, minute, job_type, status, wait_bucket, run_bucket) \
         SELECT workspace_id, date_trunc('minute', finished_at), job_type, status, \
                latency_bucket(extract(epoch FROM started_at - created_at) * 1000), \
                latency_bucket(extract(epoch FROM finished_at - started_at) * 1000) \
         FROM jobs",
    )
    .await
    .unwrap();
    let unfolded: Value = app.get_json("/stats").await;
    assert_eq!(app.db.store.fold_stats(200).await.unwrap(), 200);
    let half: Value = app.get_json("/stats").await;
    assert_eq!(app.db.store.fold_stats(10_000).await.unwrap(), 300);
    let folded: Value = app.get_json("/stats").await;
    assert_eq!(
        unfolded, s,
        "a log as the release before wrote it reads alike"
    );
    assert_eq!(half, s, "half folded reads alike");
    assert_eq!(folded, s, "folded reads alike");
    assert_eq!(
        app.db
            .scalar_i64("SELECT count(*) FROM job_stats_log")
            .await,
        0
    );
    assert_eq!(s["by_status"]["completed"], 300 + 160, "{s}");
    assert_eq!(s["by_status"]["dead"], 40, "{s}");
    assert_eq!(s["by_type"]["sleep"]["completed"], 160, "{s}");
    assert_eq!(s["by_type"]["noop"]["completed"], 300, "{s}");
    assert_eq!(s["failure_rate"].as_f64().unwrap(), 40.0 / 500.0);
    let minutes: i64 = s["throughput"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["completed"].as_i64().unwrap() + m["failed"].as_i64().unwrap())
        .sum();
    assert_eq!(minutes, 500, "{s}");

    for (name, column) in [
        ("wait_ms", "started_at - created_at"),
        ("run_ms", "finished_at - started_at"),
    ] {
        let mut exact: Vec<f64> = conn
            .query(
                &format!("SELECT (extract(epoch FROM {column}) * 1000)::float8 FROM jobs"),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        exact.sort_by(f64::total_cmp);
        assert_eq!(s[name]["samples"], 500, "{name}: {s}");
        for (p, key) in [(0.5, "p50"), (0.95, "p95"), (0.99, "p99")] {
            let want = nearest_rank(&exact, p);
            let got = s[name][key].as_f64().unwrap();
            assert!(
                (got - want).abs() <= want * 0.05,
                "{name} {key}: {got} from the rollups, {want} from the jobs"
            );
        }
    }
}
