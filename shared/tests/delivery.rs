//! The delivery rules of DESIGN.md that need more than one batch: retries
//! with growing backoff until success or death, duplicates across
//! concurrent batches, leases kept alive by heartbeats, fairness per
//! workspace, and snoozing on an empty rate limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use offload::config::WorkerConfig;
use offload::event_source::to_event;
use offload::handlers::{JobContext, JobError, JobHandler, Outcome, Registry};
use offload::job::{JobStatus, QueueName};
use offload::queue::Queue;
use offload::testing::{enqueue, event_source, new_job, run_until_finished, sqs_queue, TestDb};
use offload::workspace::Tier;
use offload::Job;
use serde_json::json;

const Q: QueueName = QueueName::Default;

fn deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(60)
}

/// The retry delays the worker chose, from the log lines it wrote.
async fn retry_delays_ms(db: &TestDb) -> Vec<i64> {
    let conn = db.pool.get().await.unwrap();
    conn.query(
        "SELECT (metadata->>'delay_ms')::int8 FROM job_logs WHERE metadata ? 'delay_ms' ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Delivers until the job is finished, as the event source would.
async fn run_to_end(db: &TestDb, q: Arc<dyn Queue>, config: WorkerConfig, job: &Job) -> Job {
    let source = event_source(q.clone(), db.worker(q, config));
    run_until_finished(db, &source, job.id, Duration::from_secs(30)).await
}

fn fast_retries() -> WorkerConfig {
    WorkerConfig {
        backoff_base: Duration::from_millis(40),
        ..WorkerConfig::default()
    }
}

#[tokio::test]
async fn four_failures_then_success_completes_on_attempt_five_with_growing_delays() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(10));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let job = db
        .insert(&[new_job(ws, "sleep", json!({"ms": 0, "fail_attempts": 4}))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    let j = run_to_end(&db, q, fast_retries(), &job).await;
    assert_eq!((j.status, j.attempts), (JobStatus::Completed, 5));
    let delays = retry_delays_ms(&db).await;
    assert_eq!(delays.len(), 4, "{delays:?}");
    for (i, pair) in delays.windows(2).enumerate() {
        assert!(pair[1] >= pair[0], "delay {} shrank: {delays:?}", i + 2);
    }
    assert!(
        delays[3] >= 4 * delays[0] / 2,
        "no exponential growth: {delays:?}"
    );
}

#[tokio::test]
async fn the_fifth_failure_is_dead_with_the_reason() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(10));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let job = db
        .insert(&[new_job(ws, "sleep", json!({"ms": 0, "fail_attempts": 5}))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    let j = run_to_end(&db, q.clone(), fast_retries(), &job).await;
    assert_eq!((j.status, j.attempts), (JobStatus::Dead, 5));
    assert!(j.error_message.unwrap().contains("failing attempt 5"));
    assert_eq!(
        q.depth(Q).await.unwrap(),
        Default::default(),
        "its message is gone"
    );
}

#[tokio::test]
async fn a_retry_comes_back_through_sqs_visibility() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(sqs_queue(10).await);
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let job = db
        .insert(&[new_job(ws, "sleep", json!({"ms": 0, "fail_attempts": 1}))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    let config = WorkerConfig {
        backoff_base: Duration::from_secs(1),
        ..WorkerConfig::default()
    };
    let j = run_to_end(&db, q, config, &job).await;
    assert_eq!((j.status, j.attempts), (JobStatus::Completed, 2));
}

/// Counts its runs; sleeps `ms`.
struct Counted(Arc<AtomicUsize>);

#[async_trait]
impl JobHandler for Counted {
    type Payload = serde_json::Value;
    const TYPE: &'static str = "counted";
    async fn run(&self, p: serde_json::Value, _: &mut JobContext) -> Result<Outcome, JobError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(p["ms"].as_u64().unwrap_or(0))).await;
        Ok(Outcome::Completed(None))
    }
}

#[tokio::test]
async fn the_same_message_in_two_concurrent_batches_runs_the_handler_once() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(10));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let job = db
        .insert(&[new_job(ws, "counted", json!({"ms": 200}))])
        .await
        .remove(0);
    for _ in 0..2 {
        enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    }
    let msgs = q
        .receive(Q, 10, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(msgs.len(), 2);
    let runs = Arc::new(AtomicUsize::new(0));
    let w1 = db.worker_with(
        q.clone(),
        WorkerConfig::default(),
        Registry::builtin().with(Counted(runs.clone())),
    );
    let w2 = db.worker_with(
        q.clone(),
        WorkerConfig::default(),
        Registry::builtin().with(Counted(runs.clone())),
    );
    let arn = q.arn(Q);
    let (a, b) = tokio::join!(
        w1.handle(to_event(&msgs[..1], &arn), deadline()),
        w2.handle(to_event(&msgs[1..], &arn), deadline())
    );
    assert!(a.batch_item_failures.is_empty() && b.batch_item_failures.is_empty());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(db.job(job.id).await.attempts, 1);
}

#[tokio::test]
async fn a_heartbeat_keeps_a_long_job_from_running_twice() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(10));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let job = db
        .insert(&[new_job(ws, "counted", json!({"ms": 2500}))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    // A 1 s lease renewed every 250 ms; the handler runs 2.5 s.
    let config = WorkerConfig {
        lease: Duration::from_secs(1),
        heartbeat: Duration::from_millis(250),
        ..WorkerConfig::default()
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let registry = || Registry::builtin().with(Counted(runs.clone()));
    let first = event_source(
        q.clone(),
        db.worker_with(q.clone(), config.clone(), registry()),
    );
    let running = tokio::spawn(async move { first.drain().await });
    db.wait_for_status(job.id, JobStatus::Running, Duration::from_secs(5))
        .await;
    // Well past the first lease, a duplicate delivery reaches another worker.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    let msgs = q
        .receive(Q, 10, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        msgs.len(),
        1,
        "only the duplicate is visible: the first is kept invisible"
    );
    let second = db.worker_with(q.clone(), config, registry());
    let resp = second.handle(to_event(&msgs, &q.arn(Q)), deadline()).await;
    assert!(
        resp.batch_item_failures.is_empty(),
        "the duplicate is acknowledged"
    );
    running.await.unwrap();
    let j = db.job(job.id).await;
    assert_eq!((j.status, j.attempts), (JobStatus::Completed, 1));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_free_workspace_runs_one_job_at_a_time_without_using_attempts() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(10));
    let (free, _) = db.workspace(Tier::Free).await;
    let (other, _) = db.workspace(Tier::Unlimited).await;
    let mut jobs = db
        .insert(
            &(0..3)
                .map(|_| new_job(free, "sleep", json!({"ms": 300})))
                .collect::<Vec<_>>(),
        )
        .await;
    jobs.extend(
        db.insert(
            &(0..3)
                .map(|_| new_job(other, "sleep", json!({"ms": 300})))
                .collect::<Vec<_>>(),
        )
        .await,
    );
    enqueue(&db, &*q, &jobs).await;
    let config = WorkerConfig {
        fairness_delay: Duration::from_secs(1),
        ..WorkerConfig::default()
    };
    let source = Arc::new(event_source(q.clone(), db.worker(q.clone(), config)));
    let s2 = source.clone();
    let drain = tokio::spawn(async move { s2.drain().await });
    // While the first batch runs, the free workspace has exactly one job running.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let running_free = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM jobs WHERE workspace_id = '{free}' AND status = 'running'"
        ))
        .await;
    let running_other = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM jobs WHERE workspace_id = '{other}' AND status = 'running'"
        ))
        .await;
    assert_eq!((running_free, running_other), (1, 3));
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT running::int8 FROM workspaces WHERE id = '{free}'"
        ))
        .await,
        1
    );
    drain.await.unwrap();

    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while db
        .scalar_i64("SELECT count(*) FROM jobs WHERE status <> 'completed'")
        .await
        > 0
    {
        assert!(
            tokio::time::Instant::now() < end,
            "jobs never all completed"
        );
        source.drain().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for j in &jobs {
        assert_eq!(
            db.job(j.id).await.attempts,
            1,
            "waiting for a slot uses no attempt"
        );
    }
    assert_eq!(
        db.scalar_i64("SELECT coalesce(sum(running), 0)::int8 FROM workspaces")
            .await,
        0
    );
}

/// Takes a token from a bucket of 1 that refills slowly; snoozes when empty.
struct RateLimited;

#[async_trait]
impl JobHandler for RateLimited {
    type Payload = serde_json::Value;
    const TYPE: &'static str = "rate_limited";
    async fn run(&self, _: serde_json::Value, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let key = format!("test-api:{}", ctx.workspace_id());
        if !ctx.take_token(&key, 1.0, 0.5).await? {
            return Ok(Outcome::Snooze(offload::ratelimit::wait_for_token(0.5)));
        }
        Ok(Outcome::Completed(None))
    }
}

#[tokio::test]
async fn an_empty_rate_limit_snoozes_the_job_without_using_an_attempt() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(10));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let jobs = db
        .insert(&[
            new_job(ws, "rate_limited", json!({})),
            new_job(ws, "rate_limited", json!({})),
        ])
        .await;
    enqueue(&db, &*q, &jobs).await;
    let worker = db.worker_with(
        q.clone(),
        WorkerConfig::default(),
        Registry::builtin().with(RateLimited),
    );
    let source = event_source(q.clone(), worker);
    let msgs = q
        .receive(Q, 10, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        source.invoke(msgs).await,
        0,
        "the snoozed one's message is replaced by a fresh, delayed one"
    );
    let states: Vec<(JobStatus, i32)> = {
        let mut v = Vec::new();
        for j in &jobs {
            let j = db.job(j.id).await;
            v.push((j.status, j.attempts));
        }
        v.sort_by_key(|s| s.0 as u8);
        v
    };
    assert!(states.contains(&(JobStatus::Completed, 1)));
    assert!(states.contains(&(JobStatus::Queued, 0)), "{states:?}");
    let d = q.depth(Q).await.unwrap();
    assert_eq!(
        (d.visible, d.in_flight, d.delayed),
        (0, 0, 1),
        "one fresh message, delayed until a token is back"
    );
}

/// Snoozes its first three runs, then fails three times, then completes.
struct Flappy(Arc<AtomicUsize>);

#[async_trait]
impl JobHandler for Flappy {
    type Payload = serde_json::Value;
    const TYPE: &'static str = "flappy";
    async fn run(&self, _: serde_json::Value, _: &mut JobContext) -> Result<Outcome, JobError> {
        match self.0.fetch_add(1, Ordering::SeqCst) {
            0..=2 => Ok(Outcome::Snooze(Duration::from_millis(200))),
            3..=5 => Err(JobError::Retryable("not yet".into())),
            _ => Ok(Outcome::Completed(None)),
        }
    }
}

/// A job that comes back more often than the queue's maxReceiveCount
/// (snoozes, and retries with attempts left) completes instead of being
/// dead-lettered: snoozes send a fresh message, and a retry whose next
/// receive would reach the count does too.
async fn comes_back_more_often_than_max_receive_count(q: Arc<dyn Queue>, db: &TestDb) {
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let job = db
        .insert(&[new_job(ws, "flappy", json!({}))])
        .await
        .remove(0);
    enqueue(db, &*q, std::slice::from_ref(&job)).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let config = WorkerConfig {
        backoff_base: Duration::from_millis(100),
        max_receive_count: 2,
        ..WorkerConfig::default()
    };
    let worker = db.worker_with(
        q.clone(),
        config,
        Registry::builtin().with(Flappy(runs.clone())),
    );
    let source = event_source(q.clone(), worker);
    let j = run_until_finished(db, &source, job.id, Duration::from_secs(40)).await;
    assert_eq!(
        (j.status, j.attempts, runs.load(Ordering::SeqCst)),
        (JobStatus::Completed, 4, 7),
        "{j:?}"
    );
}

#[tokio::test]
async fn coming_back_does_not_spend_receives_on_postgres() {
    let db = TestDb::new().await;
    comes_back_more_often_than_max_receive_count(Arc::new(db.pg_queue(2)), &db).await;
}

#[tokio::test]
async fn coming_back_does_not_spend_receives_on_sqs() {
    let db = TestDb::new().await;
    comes_back_more_often_than_max_receive_count(Arc::new(sqs_queue(2).await), &db).await;
}
