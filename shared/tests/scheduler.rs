//! Each scheduler duty: rows put in a precise state, the duty run once, the
//! rows that changed and those that did not asserted.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use offload::clock::Clock;
use offload::job::{JobMessage, JobStatus, QueueName};
use offload::queue::Queue;
use offload::scheduler::{Scheduler, SchedulerConfig};
use offload::testing::{new_job, TestDb};
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
    let clock = Clock::manual(Utc::now() + chrono::Duration::days(8));
    let mut s = scheduler(&db, q.clone(), clock);
    s.config.outbox_grace = Duration::from_secs(10 * 86_400);
    assert_eq!(s.run_once().await.pruned, 1);
    assert!(db.store.get_any(jobs[0].id).await.unwrap().is_none());
    assert!(
        db.store.get_any(jobs[1].id).await.unwrap().is_some(),
        "unfinished jobs stay"
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
