//! Each outcome is written when its handler ends, not when its batch ends;
//! and a cancel request wins at whichever transition comes next.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use offload::clock::Clock;
use offload::config::WorkerConfig;
use offload::event_source::to_event;
use offload::handlers::{JobContext, JobError, JobHandler, Outcome, Registry};
use offload::job::{JobStatus, QueueName};
use offload::queue::Queue;
use offload::scheduler::{Scheduler, SchedulerConfig};
use offload::testing::{enqueue, event_source, new_job, receive_batch, run_until_finished, TestDb};
use offload::workspace::Tier;
use serde::Deserialize;
use serde_json::json;

#[tokio::test]
async fn short_jobs_complete_while_a_long_neighbour_runs_and_a_kill_reruns_only_the_long_one() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(10));
    let (ws, _) = db.workspace(Tier::Enterprise).await;
    let mut batch = vec![new_job(ws, "sleep", json!({"ms": 1500, "steps": 15}))];
    batch.extend((0..9).map(|_| new_job(ws, "noop", json!({}))));
    let jobs = db.insert(&batch).await;
    enqueue(&db, &*q, &jobs).await;
    let (long, short) = (jobs[0].clone(), jobs[1..].to_vec());
    let config = WorkerConfig {
        lease: Duration::from_secs(2),
        heartbeat: Duration::from_millis(500),
        ..WorkerConfig::default()
    };
    let msgs = q
        .receive(
            QueueName::Default,
            10,
            Duration::from_secs(2),
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert_eq!(msgs.len(), 10, "one batch");
    let worker = Arc::new(db.worker(q.clone(), config.clone()));
    let w = worker.clone();
    let event = to_event(&msgs, &q.arn(QueueName::Default));
    let invocation = tokio::spawn(async move {
        w.handle(event, tokio::time::Instant::now() + Duration::from_secs(60))
            .await
    });

    // The nine short jobs read as completed while the long one still runs.
    let end = tokio::time::Instant::now() + Duration::from_millis(800);
    loop {
        let mut done = 0;
        for j in &short {
            if db.job(j.id).await.status == JobStatus::Completed {
                done += 1;
            }
        }
        if done == short.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{done} of 9 short jobs completed while the long one runs"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(db.job(long.id).await.status, JobStatus::Running);
    for j in &short {
        let j = db.job(j.id).await;
        let ran = j.finished_at.unwrap() - j.started_at.unwrap();
        assert!(
            ran.num_milliseconds() <= 100,
            "a short job recorded {ran} after it started"
        );
    }

    // The invocation dies mid-way (a crash, a timeout).
    invocation.abort();
    let _ = invocation.await;
    tokio::time::sleep(Duration::from_millis(2100)).await;

    // Every message comes back; only the unfinished job runs again.
    let source = event_source(q.clone(), db.worker(q.clone(), config));
    let long = run_until_finished(&db, &source, long.id, Duration::from_secs(20)).await;
    assert_eq!((long.status, long.attempts), (JobStatus::Completed, 2));
    for j in &short {
        let j = db.job(j.id).await;
        assert_eq!((j.status, j.attempts), (JobStatus::Completed, 1));
    }
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM queue_messages").await,
        0
    );
}

/// Asks to cancel its own job (as a user would while it runs), then ends its
/// run the way the payload says: so the worker's copy of the flag is stale.
struct CancelledMeanwhile;

#[derive(Deserialize)]
struct Then {
    then: String,
}

#[async_trait]
impl JobHandler for CancelledMeanwhile {
    type Payload = Then;
    const TYPE: &'static str = "cancelled_meanwhile";
    async fn run(&self, p: Then, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        ctx.db()
            .get()
            .await
            .map_err(|e| JobError::Retryable(e.to_string()))?
            .execute(
                "UPDATE jobs SET cancel_requested_at = now() WHERE id = $1",
                &[&ctx.job_id().0],
            )
            .await
            .map_err(|e| JobError::Retryable(e.to_string()))?;
        match p.then.as_str() {
            "retry" => Err(JobError::Retryable("503 from upstream".into())),
            "snooze" => Ok(Outcome::Snooze(Duration::from_secs(1))),
            "hand_off" => Ok(ctx.hand_off(&json!({"row": 10}))),
            other => panic!("unknown {other}"),
        }
    }
}

#[tokio::test]
async fn a_cancel_wins_over_a_retry_a_snooze_and_a_hand_off() {
    for then in ["retry", "snooze", "hand_off"] {
        let db = TestDb::new().await;
        let q = Arc::new(db.pg_queue(10));
        let (ws, _) = db.workspace(Tier::Standard).await;
        let job = db
            .insert(&[new_job(ws, "cancelled_meanwhile", json!({ "then": then }))])
            .await
            .remove(0);
        enqueue(&db, &*q, std::slice::from_ref(&job)).await;
        let worker = db.worker_with(
            q.clone(),
            WorkerConfig {
                backoff_base: Duration::from_millis(100),
                ..WorkerConfig::default()
            },
            Registry::builtin().with(CancelledMeanwhile),
        );
        let source = event_source(q.clone(), worker);
        source.drain().await;
        let j = db.job(job.id).await;
        assert_eq!(
            (j.status, j.attempts),
            (JobStatus::Cancelled, 1),
            "{then}: {j:?}"
        );
        assert!(j.finished_at.is_some(), "{then}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        source.drain().await;
        assert_eq!(db.job(job.id).await.attempts, 1, "{then}: never run again");
        assert_eq!(
            db.scalar_i64("SELECT count(*) FROM queue_messages").await,
            0,
            "{then}: no message left to deliver it again"
        );
    }
}

#[tokio::test]
async fn a_cancel_wins_over_the_rescue_of_an_expired_lease() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let job = db.insert(&[new_job(ws, "noop", json!({}))]).await.remove(0);
    let t0 = Utc::now();
    db.store
        .claim(&[job.id], "crashed", t0, chrono::Duration::seconds(60), &[])
        .await
        .unwrap();
    let asked = db.store.request_cancel(ws, job.id, t0).await.unwrap();
    assert_eq!(asked.unwrap().status, JobStatus::Running, "only requested");
    let s = Scheduler {
        store: db.store.clone(),
        queue: q.clone(),
        clock: Clock::manual(t0 + chrono::Duration::seconds(61)),
        config: SchedulerConfig::default(),
    };
    let r = s.run_once().await;
    assert_eq!(r.rescued, 0, "nothing put back to run");
    let j = db.job(job.id).await;
    assert_eq!(j.status, JobStatus::Cancelled);
    assert_eq!(q.depth(QueueName::Default).await.unwrap().visible, 0);
}

#[tokio::test]
async fn a_redelivered_message_does_not_start_a_job_whose_cancel_was_requested() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Standard).await;
    let t0 = Utc::now() - chrono::Duration::minutes(5);
    let mut nj = new_job(ws, "noop", json!({}));
    nj.run_at = t0;
    let job = db.insert(&[nj]).await.remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    // Its first worker claimed it and died; then the user cancelled it.
    db.store
        .claim(&[job.id], "crashed", t0, chrono::Duration::seconds(60), &[])
        .await
        .unwrap();
    db.store
        .request_cancel(ws, job.id, Utc::now())
        .await
        .unwrap();
    let source = event_source(q.clone(), db.worker(q.clone(), WorkerConfig::default()));
    source.drain().await;
    let j = db.job(job.id).await;
    assert_eq!(
        (j.status, j.attempts),
        (JobStatus::Cancelled, 1),
        "ended, not started again"
    );
}

#[tokio::test]
async fn an_outcome_is_recorded_through_a_passing_database_failure_not_left_running() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Enterprise).await;
    let job = db.insert(&[new_job(ws, "noop", json!({}))]).await.remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    // The first write of a completion fails as a failover would (a sequence
    // counts the tries: it is not rolled back with the failure).
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE SEQUENCE completion_tries; \
             CREATE FUNCTION fail_first_completion() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN \
               IF nextval('completion_tries') = 1 THEN \
                 RAISE EXCEPTION 'terminating connection due to administrator command' \
                   USING ERRCODE = '57P01'; \
               END IF; \
               RETURN NEW; \
             END $$; \
             CREATE TRIGGER fail_first_completion BEFORE UPDATE ON jobs FOR EACH ROW \
               WHEN (NEW.status = 'completed') EXECUTE FUNCTION fail_first_completion();",
        )
        .await
        .unwrap();
    let worker = db.worker(q.clone(), WorkerConfig::default());
    let msgs = receive_batch(&*q).await;
    let resp = worker
        .handle(
            to_event(&msgs, &q.arn(QueueName::Default)),
            tokio::time::Instant::now() + Duration::from_secs(60),
        )
        .await;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let j = db.job(job.id).await;
    assert_eq!(
        (j.status, j.attempts),
        (JobStatus::Completed, 1),
        "the outcome is written once the database answers again"
    );
    assert_eq!(
        db.scalar_i64("SELECT last_value FROM completion_tries")
            .await,
        2
    );
}
