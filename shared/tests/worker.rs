//! The worker against a real Postgres and the Postgres queue: what happens
//! to each message of a batch, and to each job.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use offload::clock::Clock;
use offload::config::WorkerConfig;
use offload::event_source::to_event;
use offload::handlers::{JobContext, JobError, JobHandler, Outcome, Registry};
use offload::job::{ErrorKind, JobStatus, QueueName};
use offload::queue::Queue;
use offload::store::Store;
use offload::testing::{enqueue, event_source, new_job, receive_batch, TestDb};
use offload::worker::Worker;
use offload::workspace::Tier;
use serde_json::json;

fn quick() -> WorkerConfig {
    WorkerConfig {
        backoff_base: Duration::from_secs(10),
        ..WorkerConfig::default()
    }
}

fn deadline(secs: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(secs)
}

#[tokio::test]
async fn a_batch_of_noops_completes_and_reports_no_failures() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let jobs = db
        .insert(
            &(0..10)
                .map(|_| new_job(ws, "noop", json!({})))
                .collect::<Vec<_>>(),
        )
        .await;
    enqueue(&db, &*q, &jobs).await;
    let source = event_source(q.clone(), db.worker(q.clone(), quick()));
    assert_eq!(
        source.drain().await,
        1,
        "one invocation for the batch of 10"
    );
    for j in &jobs {
        let j = db.job(j.id).await;
        assert_eq!((j.status, j.attempts), (JobStatus::Completed, 1));
    }
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM queue_messages").await,
        0
    );
}

#[tokio::test]
async fn a_garbage_body_fails_only_its_own_record() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let job = db.insert(&[new_job(ws, "noop", json!({}))]).await.remove(0);
    let mut event = SqsEvent::default();
    for (id, body) in [
        (
            "good",
            format!(r#"{{"job_id":"{}","workspace_id":"{}"}}"#, job.id, ws),
        ),
        ("bad", "\u{0}not json".to_string()),
        ("empty", String::new()),
        ("wrong-shape", r#"{"job_id": 42}"#.to_string()),
    ] {
        let mut m = SqsMessage::default();
        m.message_id = Some(id.into());
        m.body = Some(body);
        event.records.push(m);
    }
    let resp = db
        .worker(q.clone(), quick())
        .handle(event, deadline(60))
        .await;
    let mut failed: Vec<_> = resp
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    failed.sort();
    assert_eq!(failed, ["bad", "empty", "wrong-shape"]);
    assert_eq!(db.job(job.id).await.status, JobStatus::Completed);
}

#[tokio::test]
async fn duplicate_messages_in_one_batch_run_the_job_once() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let job = db.insert(&[new_job(ws, "noop", json!({}))]).await.remove(0);
    for _ in 0..3 {
        enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    }
    let msgs = receive_batch(&*q).await;
    assert_eq!(msgs.len(), 3);
    let resp = db
        .worker(q.clone(), quick())
        .handle(to_event(&msgs, &q.arn(QueueName::Default)), deadline(60))
        .await;
    assert!(
        resp.batch_item_failures.is_empty(),
        "duplicates are acknowledged"
    );
    let j = db.job(job.id).await;
    assert_eq!((j.status, j.attempts), (JobStatus::Completed, 1));
}

#[tokio::test]
async fn a_retryable_failure_comes_back_after_a_backoff_and_the_last_one_is_dead() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(10));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let mut nj = new_job(ws, "sleep", json!({"ms": 0, "fail_attempts": 9}));
    nj.max_attempts = 2;
    let job = db.insert(&[nj]).await.remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    let worker = db.worker(q.clone(), quick());

    let msgs = receive_batch(&*q).await;
    let before = chrono::Utc::now();
    let resp = worker
        .handle(to_event(&msgs, &q.arn(QueueName::Default)), deadline(60))
        .await;
    assert_eq!(
        resp.batch_item_failures.len(),
        1,
        "a retry is reported failed"
    );
    let j = db.job(job.id).await;
    assert_eq!(
        (j.status, j.attempts, j.error_kind),
        (JobStatus::Queued, 1, Some(ErrorKind::Retryable))
    );
    let wait = (j.run_at - before).num_milliseconds();
    assert!((4_000..=10_500).contains(&wait), "first backoff {wait}ms");
    // The message is hidden until the retry is due.
    assert!(receive_batch(&*q).await.is_empty());

    // Make it due now and deliver it again: the second (last) attempt fails for good.
    q.change_visibility(QueueName::Default, &msgs[0].receipt_handle, Duration::ZERO)
        .await
        .unwrap();
    db.pool
        .get()
        .await
        .unwrap()
        .execute("UPDATE jobs SET run_at = now()", &[])
        .await
        .unwrap();
    let msgs = receive_batch(&*q).await;
    let resp = worker
        .handle(to_event(&msgs, &q.arn(QueueName::Default)), deadline(60))
        .await;
    assert!(
        resp.batch_item_failures.is_empty(),
        "a dead job's message is deleted"
    );
    let j = db.job(job.id).await;
    assert_eq!((j.status, j.attempts), (JobStatus::Dead, 2));
    assert!(j.error_message.unwrap().contains("no attempts left"));
    assert!(
        db.scalar_i64("SELECT count(*) FROM job_logs WHERE level = 'error'")
            .await
            >= 1
    );
}

#[tokio::test]
async fn a_permanent_error_is_dead_at_once() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let job = db
        .insert(&[new_job(
            ws,
            "sleep",
            json!({"ms": 0, "fail_attempts": 1, "permanent": true}),
        )])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    event_source(q.clone(), db.worker(q.clone(), quick()))
        .drain()
        .await;
    let j = db.job(job.id).await;
    assert_eq!(
        (j.status, j.attempts, j.error_kind),
        (JobStatus::Dead, 1, Some(ErrorKind::Permanent))
    );
}

struct Panics;

#[async_trait]
impl JobHandler for Panics {
    type Payload = serde_json::Value;
    const TYPE: &'static str = "panics";
    async fn run(&self, _: serde_json::Value, _: &mut JobContext) -> Result<Outcome, JobError> {
        panic!("handler bug")
    }
}

#[tokio::test]
async fn a_panicking_handler_fails_only_its_job_and_is_retried() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let jobs = db
        .insert(&[
            new_job(ws, "panics", json!({})),
            new_job(ws, "noop", json!({})),
        ])
        .await;
    enqueue(&db, &*q, &jobs).await;
    let worker = db.worker_with(q.clone(), quick(), Registry::builtin().with(Panics));
    let msgs = receive_batch(&*q).await;
    let resp = worker
        .handle(to_event(&msgs, &q.arn(QueueName::Default)), deadline(60))
        .await;
    assert_eq!(resp.batch_item_failures.len(), 1);
    let p = db.job(jobs[0].id).await;
    assert_eq!(p.status, JobStatus::Queued);
    assert!(p.error_message.unwrap().contains("handler bug"));
    assert_eq!(db.job(jobs[1].id).await.status, JobStatus::Completed);
}

#[tokio::test]
async fn an_unreachable_database_fails_the_whole_batch_and_it_comes_back_within_seconds() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let jobs = db
        .insert(
            &(0..4)
                .map(|_| new_job(ws, "noop", json!({})))
                .collect::<Vec<_>>(),
        )
        .await;
    enqueue(&db, &*q, &jobs).await;
    // A visibility of an hour: without the worker's short backoff the
    // messages would stay hidden that long.
    let msgs = q
        .receive(
            QueueName::Default,
            10,
            Duration::from_secs(3600),
            Duration::ZERO,
        )
        .await
        .unwrap();
    let config = WorkerConfig {
        batch_failure_delay: Duration::from_secs(2),
        ..quick()
    };
    let unreachable =
        Store::new(offload::db::pool("postgres://postgres:x@127.0.0.1:1/none", 1).unwrap());
    let worker = Worker::new(
        unreachable,
        q.clone(),
        Arc::new(Registry::builtin()),
        config,
        Clock::System,
        "cut-off",
        db.storage(),
    );
    let resp = worker
        .handle(to_event(&msgs, &q.arn(QueueName::Default)), deadline(60))
        .await;
    assert_eq!(resp.batch_item_failures.len(), 4);
    let mut back = 0;
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    while back < 4 && tokio::time::Instant::now() < end {
        back += q
            .receive(
                QueueName::Default,
                10,
                Duration::from_secs(30),
                Duration::from_millis(500),
            )
            .await
            .unwrap()
            .len();
    }
    assert_eq!(back, 4, "the batch is back within seconds, not an hour");
}

/// Holds every connection of the pool, then asks for one more, on its
/// first run only: the way a burst of concurrent invocations meets a pool
/// (or a server) with no connection to give.
struct Hog(std::sync::atomic::AtomicBool);

#[async_trait]
impl JobHandler for Hog {
    type Payload = serde_json::Value;
    const TYPE: &'static str = "hog";
    async fn run(&self, _: serde_json::Value, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        if !self.0.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let _a = ctx.db().get().await.map_err(offload::db::DbError::from)?;
            let _b = ctx.db().get().await.map_err(offload::db::DbError::from)?;
            let _c = ctx.db().get().await.map_err(offload::db::DbError::from)?;
        }
        Ok(Outcome::Completed(Some(json!({"ran": true}))))
    }
}

#[tokio::test]
async fn a_pool_timeout_does_not_spend_the_jobs_attempt() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let mut one_attempt = new_job(ws, "hog", json!({}));
    one_attempt.max_attempts = 1;
    let jobs = db.insert(&[one_attempt]).await;
    enqueue(&db, &*q, &jobs).await;
    let small = offload::db::pool_with(
        &db.url,
        offload::db::PoolOptions {
            wait_timeout: Duration::from_millis(300),
            ..offload::db::PoolOptions::new(2)
        },
        None,
    )
    .unwrap();
    let worker = Worker::new(
        Store::new(small),
        q.clone(),
        Arc::new(Registry::builtin().with(Hog(Default::default()))),
        WorkerConfig {
            batch_failure_delay: Duration::from_secs(1),
            ..quick()
        },
        Clock::System,
        "small-pool",
        db.storage(),
    );
    let source = event_source(q.clone(), worker);
    source.drain().await;

    // Its only attempt ran into the timeout: not dead, back shortly, the
    // attempt given back, and the reason in its log.
    let j = db.job(jobs[0].id).await;
    assert_eq!((j.status, j.attempts), (JobStatus::Queued, 0), "{j:?}");
    let wait = (j.run_at - chrono::Utc::now()).num_milliseconds();
    assert!(
        wait <= 1_000,
        "back within the busy pause, not a backoff: {wait} ms"
    );
    let said = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT message FROM job_logs WHERE job_id = $1 AND level = 'warn'",
            &[&jobs[0].id.0],
        )
        .await
        .unwrap()
        .get::<_, String>(0);
    assert!(
        said.contains("database busy") && said.contains("not counted"),
        "{said}"
    );

    // When it comes back it runs, on that same single attempt.
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while db.job(jobs[0].id).await.status != JobStatus::Completed
        && tokio::time::Instant::now() < end
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        source.drain().await;
    }
    let j = db.job(jobs[0].id).await;
    assert_eq!((j.status, j.attempts), (JobStatus::Completed, 1), "{j:?}");
}

#[tokio::test]
async fn cancel_stops_a_running_job_at_its_next_step() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let job = db
        .insert(&[new_job(ws, "sleep", json!({"ms": 2000, "steps": 20}))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    let source = event_source(q.clone(), db.worker(q.clone(), quick()));
    let run = tokio::spawn(async move { source.drain().await });
    db.wait_for_status(job.id, JobStatus::Running, Duration::from_secs(5))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    db.store
        .request_cancel(ws, job.id, chrono::Utc::now())
        .await
        .unwrap();
    let j = db
        .wait_for_status(job.id, JobStatus::Cancelled, Duration::from_secs(3))
        .await;
    let done = j.result.unwrap()["steps_done"].as_u64().unwrap();
    assert!((2..20).contains(&done), "stopped after {done} steps");
    run.await.unwrap();
}

#[tokio::test]
async fn a_long_job_hands_off_near_the_deadline_and_finishes_the_same() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let job = db
        .insert(&[new_job(ws, "sleep", json!({"ms": 1000, "steps": 10}))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    let config = WorkerConfig {
        handoff_margin: Duration::from_secs(1),
        ..quick()
    };
    let mut source = event_source(q.clone(), db.worker(q.clone(), config));
    // Each invocation has 1.25 s: 0.25 s of work before the 1 s margin.
    source.invocation_timeout = Duration::from_millis(1250);
    let invocations = source.drain().await;
    let j = db.job(job.id).await;
    assert_eq!(j.status, JobStatus::Completed);
    assert_eq!(j.result, Some(json!({"slept_ms": 1000, "steps": 10})));
    assert_eq!(j.attempts, 1, "hand-offs use no attempts");
    assert!(invocations >= 4, "only {invocations} invocations");
    assert_eq!(j.progress.processed, 10);
}

#[tokio::test]
async fn a_batch_of_ten_with_three_failures_reports_exactly_those_three() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let specs: Vec<_> = (0..10)
        .map(|i| {
            if i % 3 == 1 {
                new_job(ws, "sleep", json!({"ms": 0, "fail_attempts": 1}))
            } else {
                new_job(ws, "noop", json!({}))
            }
        })
        .collect();
    let jobs = db.insert(&specs).await;
    enqueue(&db, &*q, &jobs).await;
    let msgs = receive_batch(&*q).await;
    let by_job: std::collections::HashMap<String, String> = msgs
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_str(&m.body).unwrap();
            (
                v["job_id"].as_str().unwrap().to_string(),
                m.message_id.clone(),
            )
        })
        .collect();
    let resp = db
        .worker(q.clone(), quick())
        .handle(to_event(&msgs, &q.arn(QueueName::Default)), deadline(60))
        .await;
    let mut failed: Vec<String> = resp
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect();
    failed.sort();
    let mut want: Vec<String> = jobs
        .iter()
        .filter(|j| j.job_type == "sleep")
        .map(|j| by_job[&j.id.to_string()].clone())
        .collect();
    want.sort();
    assert_eq!(failed.len(), 3);
    assert_eq!(failed, want);
}

#[tokio::test]
async fn a_worker_that_lost_its_lease_cannot_complete_the_job() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let job = db
        .insert(&[new_job(ws, "sleep", json!({"ms": 1500}))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    // A worker whose heartbeat never comes in time (a frozen Lambda).
    let frozen = WorkerConfig {
        lease: Duration::from_millis(500),
        heartbeat: Duration::from_secs(600),
        ..quick()
    };
    let slow = event_source(q.clone(), db.worker(q.clone(), frozen));
    let first = tokio::spawn(async move { slow.drain().await });
    db.wait_for_status(job.id, JobStatus::Running, Duration::from_secs(5))
        .await;
    // A second later by the scheduler's clock (no waiting), it rescues the
    // job; a healthy worker on the same clock runs it to the end.
    let later = Clock::manual(chrono::Utc::now() + chrono::Duration::seconds(1));
    let scheduler = offload::scheduler::Scheduler {
        store: db.store.clone(),
        queue: q.clone(),
        clock: later.clone(),
        config: Default::default(),
    };
    assert_eq!(scheduler.run_once().await.rescued, 1);
    let healthy = Worker::new(
        db.store.clone(),
        q.clone(),
        Arc::new(Registry::builtin()),
        quick(),
        later,
        "healthy",
        db.storage(),
    );
    let healthy = event_source(q.clone(), healthy);
    healthy.drain().await;
    let done = db.job(job.id).await;
    assert_eq!((done.status, done.attempts), (JobStatus::Completed, 2));
    let finished_at = done.finished_at;
    // The first worker wakes up and tries to complete attempt 1: nothing changes.
    first.await.unwrap();
    let after = db.job(job.id).await;
    assert_eq!(
        (after.status, after.attempts, after.finished_at),
        (JobStatus::Completed, 2, finished_at)
    );
    assert_eq!(after.worker_id, done.worker_id);
}

#[test]
fn metric_lines_are_embedded_metric_format_one_per_type_queue_and_outcome() {
    let job = |job_type: &str, queue: QueueName| offload::Job {
        id: offload::JobId::new(),
        workspace_id: offload::WorkspaceId::new(),
        job_type: job_type.into(),
        queue,
        priority: 0,
        status: JobStatus::Running,
        payload: json!({}),
        attempts: 1,
        max_attempts: 5,
        run_at: chrono::Utc::now(),
        progress: Default::default(),
        result: None,
        error_message: None,
        error_kind: None,
        tags: vec![],
        created_at: chrono::Utc::now() - chrono::Duration::milliseconds(40),
        started_at: Some(chrono::Utc::now()),
        finished_at: None,
        updated_at: chrono::Utc::now(),
        created_by: None,
        idempotency_key: None,
        checkpoint: None,
        worker_id: None,
        lease_expires_at: None,
        enqueued_at: None,
        cancel_requested_at: None,
        busy_snoozes: 0,
        parent_id: None,
        wait: None,
        child_index: None,
    };
    let mut m = offload::run_metrics::RunMetrics::default();
    // 250 completed no-op runs on `high`, 3 dead ones, 1 completed `sleep`.
    for i in 0..250 {
        m.add(
            &job("noop", QueueName::High),
            "completed",
            Duration::from_millis(i),
        );
    }
    for _ in 0..3 {
        m.add(
            &job("noop", QueueName::High),
            "dead",
            Duration::from_millis(7),
        );
    }
    m.add(
        &job("sleep", QueueName::Default),
        "completed",
        Duration::from_millis(12),
    );
    let lines = m.take_lines(chrono::Utc::now());
    assert!(m.is_empty(), "taking the lines empties the set");
    // 250 values take three lines (100 values a metric at most), the other
    // two groups one each.
    assert_eq!(lines.len(), 5);
    for line in &lines {
        let m = &line["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(m["Namespace"], "Offload");
        assert_eq!(m["Dimensions"], json!([["JobType", "Queue", "Outcome"]]));
        for metric in m["Metrics"].as_array().unwrap() {
            let name = metric["Name"].as_str().unwrap();
            assert!(line.get(name).is_some(), "metric {name} has a value");
        }
        let n = line["Jobs"].as_u64().unwrap() as usize;
        assert!(n <= 100);
        assert_eq!(line["RunTime"].as_array().unwrap().len(), n);
        assert_eq!(line["WaitTime"].as_array().unwrap().len(), n);
        for w in line["WaitTime"].as_array().unwrap() {
            assert!((35..=100).contains(&w.as_i64().unwrap()), "{line}");
        }
    }
    let count = |ty: &str, q: &str, outcome: &str| -> u64 {
        lines
            .iter()
            .filter(|l| l["JobType"] == ty && l["Queue"] == q && l["Outcome"] == outcome)
            .map(|l| l["Jobs"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(count("noop", "high", "completed"), 250);
    assert_eq!(count("noop", "high", "dead"), 3);
    assert_eq!(count("sleep", "default", "completed"), 1);
    let run_times: Vec<u64> = lines
        .iter()
        .filter(|l| l["JobType"] == "noop" && l["Outcome"] == "completed")
        .flat_map(|l| l["RunTime"].as_array().unwrap().clone())
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(
        run_times,
        (0..250).collect::<Vec<u64>>(),
        "every run time, in order"
    );
}

/// Fails with, and logs, a message holding a URL with credentials and a
/// token in its query string, as a client library's error might.
struct LeaksAUrl;

#[async_trait]
impl JobHandler for LeaksAUrl {
    type Payload = serde_json::Value;
    const TYPE: &'static str = "leaks_a_url";
    async fn run(&self, _: serde_json::Value, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let url = "https://svc:Pa55word@api.example.com/v1/items?api_key=Tok3n";
        ctx.log(
            "warn",
            format!("calling {url} failed"),
            Some(json!({ "endpoint": url, "attempt": 1 })),
        )
        .await?;
        Err(JobError::Permanent(format!(
            "error sending request for url ({url})"
        )))
    }
}

#[tokio::test]
async fn a_handlers_error_and_logs_are_stored_without_a_urls_secrets() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Standard).await;
    let worker = db.worker_with(q.clone(), quick(), Registry::builtin().with(LeaksAUrl));
    let job = db
        .insert(&[new_job(ws, "leaks_a_url", json!({}))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    let done = offload::testing::run_until_finished(
        &db,
        &event_source(q, worker),
        job.id,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(done.status, JobStatus::Dead);
    let error = done.error_message.unwrap_or_default();
    assert_eq!(
        error,
        "error sending request for url (https://***@api.example.com/v1/items)"
    );
    let conn = db.pool.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT message, metadata::text FROM job_logs WHERE job_id = $1 AND level = 'warn'",
            &[&job.id.0],
        )
        .await
        .unwrap();
    let (message, metadata): (String, String) = (row.get(0), row.get(1));
    assert_eq!(
        message,
        "calling https://***@api.example.com/v1/items failed"
    );
    assert!(metadata.contains("api.example.com/v1/items"), "{metadata}");
    for text in [&message, &metadata] {
        assert!(
            !text.contains("Pa55word") && !text.contains("Tok3n"),
            "{text}"
        );
    }
}
