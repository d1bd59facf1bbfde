//! Each scheduler duty: rows put in a precise state, the duty run once, the
//! rows that changed and those that did not asserted.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use offload::clock::Clock;
use offload::job::{JobMessage, JobStatus, QueueName};
use offload::queue::Queue;
use offload::scheduler::{Scheduler, SchedulerConfig};
use offload::testing::{new_job, receive_batch, HookedQueue, SendHook, TestDb};
use offload::workspace::Tier;
use serde_json::json;

fn scheduler(db: &TestDb, queue: Arc<dyn Queue>, clock: Clock) -> Scheduler {
    Scheduler {
        store: db.store.clone(),
        queue,
        clock,
        config: SchedulerConfig::default(),
    }
}

#[tokio::test]
async fn the_outbox_sends_unsent_jobs_once_even_with_overlapping_runs() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    // Created while the queue was down: committed as pending, no message.
    let jobs = db
        .insert(
            &(0..50)
                .map(|_| new_job(ws, "noop", json!({})))
                .collect::<Vec<_>>(),
        )
        .await;
    let clock = Clock::manual(Utc::now());
    let s = scheduler(&db, q.clone(), clock.clone());
    assert_eq!(
        s.run_once().await.sent,
        0,
        "young pending jobs are left to their request"
    );

    clock.advance(chrono::Duration::seconds(11));
    let (a, b, c) = tokio::join!(s.run_once(), s.run_once(), s.run_once());
    assert_eq!(a.sent + b.sent + c.sent, 50);
    assert_eq!(q.depth(QueueName::Default).await.unwrap().visible, 50);
    for j in &jobs {
        assert_eq!(db.job(j.id).await.status, JobStatus::Queued);
    }
    assert_eq!(s.run_once().await.sent, 0);
}

#[tokio::test]
async fn a_job_delayed_twenty_minutes_is_sent_when_due_not_before() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let t0 = Utc::now();
    let mut nj = new_job(ws, "noop", json!({}));
    nj.run_at = t0 + chrono::Duration::minutes(20);
    let job = db.insert(&[nj]).await.remove(0);
    let clock = Clock::manual(t0 + chrono::Duration::seconds(30));
    let s = scheduler(&db, q.clone(), clock.clone());
    assert_eq!(
        s.run_once().await.sent,
        0,
        "20 minutes is beyond SQS's 15-minute delay"
    );
    assert_eq!(db.job(job.id).await.status, JobStatus::Pending);

    // Within 15 minutes of run_at it goes out with the rest of the wait as a delay.
    clock.advance(chrono::Duration::minutes(6));
    assert_eq!(s.run_once().await.sent, 1);
    let d = q.depth(QueueName::Default).await.unwrap();
    assert_eq!(
        (d.visible, d.delayed),
        (0, 1),
        "sent, but invisible until due"
    );
}

#[tokio::test]
async fn an_expired_lease_is_rescued_and_resent() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let job = db.insert(&[new_job(ws, "noop", json!({}))]).await.remove(0);
    let t0 = Utc::now();
    db.store
        .claim(&[job.id], "crashed", t0, chrono::Duration::seconds(60), &[])
        .await
        .unwrap();
    let clock = Clock::manual(t0 + chrono::Duration::seconds(30));
    let s = scheduler(&db, q.clone(), clock.clone());
    assert_eq!(s.run_once().await.rescued, 0, "the lease is still live");

    clock.advance(chrono::Duration::seconds(31));
    let r = s.run_once().await;
    assert_eq!(r.rescued, 1);
    assert_eq!(
        q.depth(QueueName::Default).await.unwrap().visible,
        1,
        "a fresh message at once"
    );
    let j = db.job(job.id).await;
    assert_eq!((j.status, j.attempts), (JobStatus::Queued, 1));
    assert!(j.error_message.unwrap().contains("lease expired"));
}

#[tokio::test]
async fn the_dead_letter_queue_is_drained_into_dead_jobs() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let jobs = db
        .insert(&[
            new_job(ws, "noop", json!({})),
            new_job(ws, "noop", json!({})),
        ])
        .await;
    let body = JobMessage {
        job_id: jobs[0].id,
        workspace_id: ws,
    }
    .body();
    q.send(QueueName::DeadLetter, body, Duration::ZERO)
        .await
        .unwrap();
    q.send(QueueName::DeadLetter, "garbage".into(), Duration::ZERO)
        .await
        .unwrap();
    let s = scheduler(&db, q.clone(), Clock::System);
    assert_eq!(s.run_once().await.dead_lettered, 2);
    let j = db.job(jobs[0].id).await;
    assert_eq!(j.status, JobStatus::Dead);
    assert!(j.error_message.unwrap().contains("dead-letter queue"));
    assert_eq!(
        db.job(jobs[1].id).await.status,
        JobStatus::Pending,
        "other jobs untouched"
    );
    assert_eq!(q.depth(QueueName::DeadLetter).await.unwrap().visible, 0);
}

#[tokio::test]
async fn finished_jobs_older_than_retention_are_pruned() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let jobs = db
        .insert(&[
            new_job(ws, "noop", json!({})),
            new_job(ws, "noop", json!({})),
        ])
        .await;
    db.store
        .request_cancel(ws, jobs[0].id, Utc::now())
        .await
        .unwrap();
    // A depth sample from eight days before the scheduler's clock.
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO workspace_depth_minutes (workspace_id, minute, waiting, running) \
             VALUES ($1, date_trunc('minute', now()), 7, 0)",
            &[&ws.0],
        )
        .await
        .unwrap();
    let clock = Clock::manual(Utc::now() + chrono::Duration::days(8));
    let mut s = scheduler(&db, q.clone(), clock);
    s.config.outbox_grace = Duration::from_secs(10 * 86_400);
    assert_eq!(
        db.scalar_i64("SELECT sum(cancelled)::int8 FROM job_stats_minutes")
            .await,
        1,
        "the cancel is in the rollups"
    );
    assert_eq!(s.run_once().await.pruned, 1);
    assert!(db.store.get_any(jobs[0].id).await.unwrap().is_none());
    for table in ["job_stats_log", "job_stats_minutes"] {
        assert_eq!(
            db.scalar_i64(&format!("SELECT count(*) FROM {table}"))
                .await,
            0,
            "{table}: pruned as older than two days"
        );
    }
    assert!(
        db.store.get_any(jobs[1].id).await.unwrap().is_some(),
        "unfinished jobs stay"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM workspace_depth_minutes")
            .await,
        1,
        "the sample from eight days before is pruned"
    );
    assert_eq!(
        db.scalar_i64("SELECT waiting FROM workspace_depth_minutes")
            .await,
        1,
        "the run sampled the waiting job for the stats' depth"
    );
}

fn spec(cron: &str, tz: &str) -> offload::schedule::ScheduleSpec {
    offload::schedule::ScheduleSpec {
        name: "nightly".into(),
        cron: cron.into(),
        timezone: tz.into(),
        job_type: "noop".into(),
        payload: json!({}),
        queue: QueueName::Low,
        priority: 2,
        max_attempts: 3,
        tags: vec!["recurring".into()],
        enabled: true,
    }
}

#[tokio::test]
async fn a_schedule_that_missed_many_runs_runs_once_and_overlapping_runs_do_not_double_it() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, user) = db.workspace(Tier::Unlimited).await;
    let t0 = Utc::now();
    let conn = db.pool.get().await.unwrap();
    let s = offload::schedule::create(
        &**conn,
        ws,
        Some(user),
        &spec("*/5 * * * *", "Europe/Paris"),
        t0,
    )
    .await
    .unwrap()
    .unwrap();
    assert!(s.next_run_at > t0 && s.next_run_at <= t0 + chrono::Duration::minutes(5));

    // The scheduler was down for three hours: 36 runs were missed.
    let clock = Clock::manual(t0 + chrono::Duration::hours(3));
    let sch = scheduler(&db, q.clone(), clock.clone());
    let (a, b) = tokio::join!(sch.run_once(), sch.run_once());
    assert_eq!(
        a.scheduled + b.scheduled,
        1,
        "one job, not one per missed run"
    );
    let job_rows = db.scalar_i64("SELECT count(*) FROM jobs").await;
    assert_eq!(job_rows, 1);
    let conn = db.pool.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT queue, priority, max_attempts, tags, created_by, status FROM jobs",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "low");
    assert_eq!(row.get::<_, i16>(1), 2);
    assert_eq!(row.get::<_, i32>(2), 3);
    assert_eq!(row.get::<_, Vec<String>>(3), vec!["recurring".to_string()]);
    assert_eq!(row.get::<_, Option<uuid::Uuid>>(4), Some(user.0));
    assert_eq!(row.get::<_, &str>(5), "queued", "sent in the same run");
    let s = offload::schedule::get(&**conn, ws, s.id)
        .await
        .unwrap()
        .unwrap();
    assert!(
        s.next_run_at > clock.now(),
        "next run is in the future: {}",
        s.next_run_at
    );
    assert_eq!(s.last_run_at, Some(clock.now()));

    assert_eq!(sch.run_once().await.scheduled, 0);
    clock.advance(chrono::Duration::minutes(5));
    assert_eq!(
        sch.run_once().await.scheduled,
        1,
        "the next run comes on time"
    );
}

#[tokio::test]
async fn invalid_schedules_are_refused_with_a_reason() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let conn = db.pool.get().await.unwrap();
    let err = offload::schedule::create(&**conn, ws, None, &spec("every day", "UTC"), Utc::now())
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.contains("invalid cron"), "{err}");
    let err = offload::schedule::create(
        &**conn,
        ws,
        None,
        &spec("0 2 * * *", "Moon/Base"),
        Utc::now(),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(err.contains("time zone"), "{err}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM schedules").await, 0);
}

#[tokio::test]
async fn pruning_keeps_up_with_a_busy_system() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    // 30 000 jobs finished two weeks ago, 10 finished now.
    let pool = db.pool.get().await.unwrap();
    pool.execute(
        "INSERT INTO jobs (id, workspace_id, job_type, status, finished_at) \
         SELECT gen_random_uuid(), $1, 'noop', 'completed', now() - interval '14 days' \
         FROM generate_series(1, 30000)",
        &[&ws.0],
    )
    .await
    .unwrap();
    pool.execute(
        "INSERT INTO jobs (id, workspace_id, job_type, status, finished_at) \
         SELECT gen_random_uuid(), $1, 'noop', 'completed', now() FROM generate_series(1, 10)",
        &[&ws.0],
    )
    .await
    .unwrap();
    let r = scheduler(&db, q, Clock::System).run_once().await;
    // Ten batches of 1 000 a run pruned 170 jobs/s at most.
    assert_eq!(r.pruned, 30_000);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM jobs").await, 10);
}

/// Sends wait until told to go on.
#[derive(Default)]
struct Stall {
    entered: tokio::sync::Notify,
    go: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl SendHook for Stall {
    async fn before_send(&self) {
        self.entered.notify_one();
        self.go.notified().await;
    }
}

#[tokio::test]
async fn an_outbox_run_with_a_stalled_queue_holds_no_row_lock() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let job = db.insert(&[new_job(ws, "noop", json!({}))]).await.remove(0);
    let q = Arc::new(HookedQueue {
        inner: db.pg_queue(5),
        hook: Stall::default(),
    });
    let s = Scheduler {
        store: db.store.clone(),
        queue: q.clone(),
        clock: Clock::manual(Utc::now() + chrono::Duration::seconds(30)),
        config: SchedulerConfig::default(),
    };
    let run = tokio::spawn(async move { s.run_once().await });
    q.hook.entered.notified().await;
    // While the queue stalls, the row can be locked at once (a cancel, a
    // claim): the outbox holds nothing across the call.
    let conn = db.pool.get().await.unwrap();
    let locked = conn
        .query(
            "SELECT id FROM jobs WHERE id = $1 FOR UPDATE NOWAIT",
            &[&job.id.0],
        )
        .await;
    q.hook.go.notify_one();
    let report = run.await.unwrap();
    assert!(locked.is_ok(), "the row was locked: {locked:?}");
    assert_eq!(report.sent, 1);
    assert_eq!(db.job(job.id).await.status, JobStatus::Queued);
}

#[tokio::test]
async fn a_queued_job_whose_message_was_lost_is_sent_again() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Standard).await;
    let t0 = Utc::now() - chrono::Duration::hours(3);
    let mut lost = new_job(ws, "noop", json!({}));
    lost.run_at = t0;
    let mut parked = new_job(ws, "noop", json!({}));
    parked.run_at = t0;
    let lost = db.insert(&[lost]).await.remove(0);
    let parked = db.insert(&[parked]).await.remove(0);
    let fresh = db.insert(&[new_job(ws, "noop", json!({}))]).await.remove(0);
    // All three queued with no message: the queue was purged, but the
    // parked one waits for a slot on purpose and the fresh one is recent.
    let conn = db.pool.get().await.unwrap();
    conn.execute(
        "UPDATE jobs SET status = 'queued', enqueued_at = run_at, \
         parked_at = CASE WHEN id = $1 THEN now() END",
        &[&parked.id.0],
    )
    .await
    .unwrap();
    let r = scheduler(&db, q.clone(), Clock::System).run_once().await;
    assert_eq!((r.resent, r.sent), (1, 1), "{r:?}");
    let msgs = receive_batch(&*q).await;
    let ids: Vec<JobMessage> = msgs
        .iter()
        .map(|m| serde_json::from_str(&m.body).unwrap())
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(ids[0].job_id, lost.id);
    assert_eq!(db.job(lost.id).await.status, JobStatus::Queued);
    assert_eq!(db.job(fresh.id).await.status, JobStatus::Queued);
}
