//! Once a create's rows are committed the answer is 202 with them, whatever
//! fails after; and a client can retry a batch without making it twice.
//! Run on the path where rows and messages are not one statement (SQS's):
//! a real Postgres-backed queue that does not offer its transaction.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use offload::api::ApiSettings;
use offload::testing::{expect_problem, HookedQueue, SendHook, TestApp, TestDb};
use offload::workspace::Tier;
use serde_json::{json, Value};

/// Each send waits `delay`, then (with `cut_db`) cuts every other
/// connection to the database: the create's next statement fails as if the
/// database went away.
struct SlowOrCut {
    delay: Duration,
    cut_db: Option<String>,
}

#[async_trait]
impl SendHook for SlowOrCut {
    async fn before_send(&self) {
        tokio::time::sleep(self.delay).await;
    }
    async fn after_send(&self) {
        if let Some(url) = &self.cut_db {
            let c = offload::db::connect(url).await.expect("connect");
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("terminate");
        }
    }
}

/// A count on a connection of its own (the pool's may have been cut).
async fn count(app: &TestApp, sql: &str) -> i64 {
    let c = offload::db::connect(&app.db.url).await.expect("connect");
    c.query_one(sql, &[]).await.expect(sql).get(0)
}

/// The API over such a queue, for an unlimited workspace: its batches get a
/// message per job (a limited one's batch beyond its limit goes in parked).
async fn app(delay: Duration, cut_db: bool, settings: ApiSettings) -> TestApp {
    let db = TestDb::new().await;
    let queue = Arc::new(HookedQueue {
        inner: db.pg_queue(5),
        hook: SlowOrCut {
            delay,
            cut_db: cut_db.then(|| db.url.clone()),
        },
    });
    TestApp::spawn_full(db, queue, Tier::Unlimited, settings).await
}

#[tokio::test]
async fn a_database_error_after_the_send_still_answers_202_with_one_job() {
    let app = app(Duration::ZERO, true, ApiSettings::default()).await;
    let resp = app.create_job(json!({"type": "noop", "payload": {}})).await;
    assert_eq!(resp.status(), 202, "the row is committed: 202, not 503");
    let job: Value = resp.json().await.unwrap();
    assert_eq!(
        job["status"], "pending",
        "not marked queued, so shown pending"
    );
    assert_eq!(count(&app, "SELECT count(*) FROM jobs").await, 1);
    assert_eq!(
        count(&app, "SELECT count(*) FROM queue_messages").await,
        1,
        "its message went out"
    );
}

fn batch(n: usize, tag: &str) -> Value {
    json!({"jobs": (0..n)
        .map(|i| json!({"type": "noop", "payload": {}, "idempotency_key": format!("{tag}-{i}")}))
        .collect::<Vec<_>>()})
}

#[tokio::test]
async fn a_batch_against_a_slow_queue_answers_in_time_and_a_retry_makes_nothing_new() {
    let settings = ApiSettings {
        request_timeout: Duration::from_secs(3),
        ..ApiSettings::default()
    };
    // Each send call takes 300 ms: the batch's ten calls would take 3 s.
    let app = app(Duration::from_millis(300), false, settings).await;
    let started = std::time::Instant::now();
    let resp = app
        .req("POST", "/jobs/batch")
        .json(&batch(1000, "import-7"))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 202);
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    let first: Value = resp.json().await.unwrap();
    let jobs = first["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1000);
    let pending = jobs.iter().filter(|j| j["status"] == "pending").count();
    let queued = jobs.iter().filter(|j| j["status"] == "queued").count();
    assert!(
        pending > 0 && queued > 0,
        "{queued} queued, {pending} pending"
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM jobs WHERE status = 'pending'").await,
        pending as i64,
        "the answer shows what waits for the outbox"
    );

    // The client never saw the answer and sends the same batch again.
    let resp = app
        .req("POST", "/jobs/batch")
        .json(&batch(1000, "import-7"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "nothing new");
    let again: Value = resp.json().await.unwrap();
    let ids = |v: &Value| -> Vec<String> {
        v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&first), ids(&again), "the same jobs, in the same order");
    assert_eq!(count(&app, "SELECT count(*) FROM jobs").await, 1000);

    // Half old, half new: only the new half is made.
    let mut mixed = batch(1000, "import-7");
    mixed["jobs"].as_array_mut().unwrap().truncate(500);
    let extra = batch(10, "import-8");
    mixed["jobs"]
        .as_array_mut()
        .unwrap()
        .extend(extra["jobs"].as_array().unwrap().iter().cloned());
    let resp = app
        .req("POST", "/jobs/batch")
        .json(&mixed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(count(&app, "SELECT count(*) FROM jobs").await, 1010);
}

#[tokio::test]
async fn a_batch_key_reused_for_another_job_or_twice_in_one_batch_is_refused() {
    let app = app(Duration::ZERO, false, ApiSettings::default()).await;
    let resp = app
        .req("POST", "/jobs/batch")
        .json(&batch(3, "k"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let other = json!({"jobs": [
        {"type": "noop", "payload": {}, "idempotency_key": "k-0"},
        {"type": "sleep", "payload": {"ms": 1}, "idempotency_key": "k-1"},
    ]});
    let resp = app
        .req("POST", "/jobs/batch")
        .json(&other)
        .send()
        .await
        .unwrap();
    let body = expect_problem(resp, reqwest::StatusCode::CONFLICT).await;
    assert_eq!(body["field"], "jobs[1].idempotency_key");
    let twice = json!({"jobs": [
        {"type": "noop", "payload": {}, "idempotency_key": "z"},
        {"type": "noop", "payload": {}, "idempotency_key": "z"},
    ]});
    let resp = app
        .req("POST", "/jobs/batch")
        .json(&twice)
        .send()
        .await
        .unwrap();
    let body = expect_problem(resp, reqwest::StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(body["field"], "jobs[1].idempotency_key");
    assert_eq!(count(&app, "SELECT count(*) FROM jobs").await, 3);
}
