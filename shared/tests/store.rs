//! Every state transition of DESIGN.md "States" against a real Postgres:
//! each is a compare-and-set, and a writer that lost its lease changes nothing.

use chrono::{Duration, SubsecRound, Utc};
use offload::job::{ErrorKind, JobStatus, Progress};
use offload::store::Lease;
use offload::testing::{new_job, TestDb};
use offload::workspace::Tier;
use serde_json::json;

fn lease_of(job: &offload::Job, worker: &str) -> Lease {
    lease_of_id(job.id, job.attempts, worker)
}

fn lease_of_id(job_id: offload::JobId, attempt: i32, worker: &str) -> Lease {
    Lease {
        job_id,
        attempt,
        worker_id: worker.into(),
    }
}

#[tokio::test]
async fn a_job_goes_pending_queued_running_completed() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Standard).await;
    let job = db.insert(&[new_job(ws, "noop", json!({}))]).await.remove(0);
    assert_eq!(job.status, JobStatus::Pending);

    let now = Utc::now();
    assert_eq!(db.store.mark_enqueued(&[job.id], now).await.unwrap(), 1);
    assert_eq!(db.job(job.id).await.status, JobStatus::Queued);

    let claimed = db
        .store
        .claim(&[job.id], "w1", now, Duration::seconds(60), &[])
        .await
        .unwrap()
        .running;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].status, JobStatus::Running);
    assert_eq!(claimed[0].attempts, 1);
    assert_eq!(claimed[0].worker_id.as_deref(), Some("w1"));

    let done = db
        .store
        .complete(
            &[(
                lease_of(&claimed[0], "w1"),
                Some(json!({"ok": true})),
                Some(Progress::of(3, 3)),
            )],
            now,
        )
        .await
        .unwrap();
    assert_eq!(done, vec![job.id]);
    let job = db.job(job.id).await;
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(job.result, Some(json!({"ok": true})));
    assert_eq!(job.progress.percentage, Some(100.0));
    assert!(job.finished_at.is_some());
}

#[tokio::test]
async fn claim_skips_jobs_not_due_finished_or_under_a_live_lease() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Standard).await;
    let mut later = new_job(ws, "noop", json!({}));
    later.run_at = Utc::now() + Duration::minutes(20);
    let jobs = db
        .insert(&[
            later,
            new_job(ws, "noop", json!({})),
            new_job(ws, "noop", json!({})),
        ])
        .await;
    let now = Utc::now();
    let (later, held, done) = (&jobs[0], &jobs[1], &jobs[2]);

    db.store
        .claim(&[held.id, done.id], "w1", now, Duration::seconds(60), &[])
        .await
        .unwrap();
    let d = db.job(done.id).await;
    db.store
        .complete(&[(lease_of(&d, "w1"), None, None)], now)
        .await
        .unwrap();

    let claimed = db
        .store
        .claim(
            &[later.id, held.id, done.id],
            "w2",
            now,
            Duration::seconds(60),
            &[],
        )
        .await
        .unwrap()
        .running;
    assert!(claimed.is_empty(), "claimed {claimed:?}");
    assert_eq!(db.job(held.id).await.worker_id.as_deref(), Some("w1"));
    assert_eq!(db.job(held.id).await.attempts, 1);
}

#[tokio::test]
async fn the_same_id_twice_in_one_claim_is_claimed_once() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Standard).await;
    let job = db.insert(&[new_job(ws, "noop", json!({}))]).await.remove(0);
    let claimed = db
        .store
        .claim(
            &[job.id, job.id, job.id],
            "w1",
            Utc::now(),
            Duration::seconds(60),
            &[],
        )
        .await
        .unwrap()
        .running;
    assert_eq!(claimed.len(), 1);
    assert_eq!(db.job(job.id).await.attempts, 1);
}

#[tokio::test]
async fn a_writer_that_lost_its_lease_changes_nothing() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Standard).await;
    let job = db.insert(&[new_job(ws, "noop", json!({}))]).await.remove(0);
    let t0 = Utc::now();
    let first = db
        .store
        .claim(&[job.id], "old", t0, Duration::seconds(30), &[])
        .await
        .unwrap()
        .running
        .remove(0);
    // The lease runs out; a redelivered message takes the job over.
    let t1 = t0 + Duration::seconds(31);
    let second = db
        .store
        .claim(&[job.id], "new", t1, Duration::seconds(30), &[])
        .await
        .unwrap()
        .running
        .remove(0);
    assert_eq!(second.attempts, 2);

    let old = lease_of(&first, "old");
    let s = &db.store;
    assert!(s
        .complete(&[(old.clone(), Some(json!(1)), None)], t1)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.set_progress(&old, &Progress::of(1, 2), t1).await.unwrap(),
        None
    );
    assert!(!s
        .save_checkpoint(&old, &json!({"at": 5}), t1)
        .await
        .unwrap());
    assert_eq!(
        s.retry_later(&old, t1, "boom", false, t1).await.unwrap(),
        None
    );
    assert!(!s
        .bury(&old, "boom", ErrorKind::Permanent, t1)
        .await
        .unwrap());
    assert!(!s.finish_cancelled(&old, None, t1).await.unwrap());
    assert_eq!(s.hand_off(&old, &json!({}), None, t1).await.unwrap(), None);
    assert_eq!(s.snooze(&old, t1, t1).await.unwrap(), None);
    assert!(s
        .heartbeat(&[lease_of_id(job.id, 1, "old")], t1, Duration::seconds(30))
        .await
        .unwrap()
        .is_empty());

    let row = db.job(job.id).await;
    assert_eq!(row.status, JobStatus::Running);
    assert_eq!(row.worker_id.as_deref(), Some("new"));
    assert_eq!(row.result, None);
    assert_eq!(row.checkpoint, None);
    assert_eq!(row.progress, Progress::default());

    // The new holder still can.
    let new = lease_of(&second, "new");
    assert_eq!(
        s.complete(&[(new, None, None)], t1).await.unwrap(),
        vec![job.id]
    );
}

#[tokio::test]
async fn retry_bury_cancel_hand_off_and_snooze_each_move_a_running_job() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Standard).await;
    let jobs = db
        .insert(
            &(0..5)
                .map(|_| new_job(ws, "noop", json!({})))
                .collect::<Vec<_>>(),
        )
        .await;
    let now = Utc::now().trunc_subsecs(6);
    let ids: Vec<_> = jobs.iter().map(|j| j.id).collect();
    let claimed = db
        .store
        .claim(&ids, "w", now, Duration::seconds(60), &[])
        .await
        .unwrap()
        .running;
    let lease = |i: usize| lease_of(claimed.iter().find(|j| j.id == ids[i]).unwrap(), "w");
    let s = &db.store;

    let later = now + Duration::seconds(8);
    assert_eq!(
        s.retry_later(&lease(0), later, "timeout", false, now)
            .await
            .unwrap(),
        Some(JobStatus::Queued)
    );
    let j = db.job(ids[0]).await;
    assert_eq!(
        (j.status, j.attempts, j.run_at),
        (JobStatus::Queued, 1, later)
    );
    assert_eq!(
        (j.error_message.as_deref(), j.error_kind),
        (Some("timeout"), Some(ErrorKind::Retryable))
    );

    assert!(s
        .bury(&lease(1), "bad input", ErrorKind::Permanent, now)
        .await
        .unwrap());
    let j = db.job(ids[1]).await;
    assert_eq!(
        (j.status, j.error_kind),
        (JobStatus::Dead, Some(ErrorKind::Permanent))
    );
    assert!(j.finished_at.is_some());

    assert!(s
        .finish_cancelled(&lease(2), Some(json!({"done": 4})), now)
        .await
        .unwrap());
    let j = db.job(ids[2]).await;
    assert_eq!(
        (j.status, j.result),
        (JobStatus::Cancelled, Some(json!({"done": 4})))
    );

    assert_eq!(
        s.hand_off(
            &lease(3),
            &json!({"row": 500}),
            Some(&Progress::of(500, 1000)),
            now
        )
        .await
        .unwrap(),
        Some(JobStatus::Pending)
    );
    let j = db.job(ids[3]).await;
    assert_eq!(
        j.status,
        JobStatus::Pending,
        "a hand-off goes through the outbox"
    );
    assert_eq!(j.attempts, 0, "a hand-off gives its attempt back");
    assert_eq!(j.checkpoint, Some(json!({"row": 500})));
    assert_eq!(j.progress.processed, 500);
    assert_eq!(j.enqueued_at, None);

    assert_eq!(
        s.snooze(&lease(4), later, now).await.unwrap(),
        Some(JobStatus::Queued)
    );
    let j = db.job(ids[4]).await;
    assert_eq!(
        (j.status, j.attempts, j.run_at),
        (JobStatus::Queued, 0, later)
    );
}

#[tokio::test]
async fn cancel_is_immediate_when_waiting_and_requested_when_running() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Standard).await;
    let jobs = db
        .insert(&[
            new_job(ws, "noop", json!({})),
            new_job(ws, "noop", json!({})),
        ])
        .await;
    let now = Utc::now();
    db.store
        .claim(&[jobs[1].id], "w", now, Duration::seconds(60), &[])
        .await
        .unwrap();

    let waiting = db
        .store
        .request_cancel(ws, jobs[0].id, now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(waiting.status, JobStatus::Cancelled);
    assert!(waiting.finished_at.is_some());

    let running = db
        .store
        .request_cancel(ws, jobs[1].id, now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(running.status, JobStatus::Running);
    assert!(running.cancel_requested_at.is_some());

    // Finished jobs and other workspaces' jobs cannot be cancelled.
    assert!(db
        .store
        .request_cancel(ws, jobs[0].id, now)
        .await
        .unwrap()
        .is_none());
    let (other, _) = db.workspace(Tier::Standard).await;
    assert!(db
        .store
        .request_cancel(other, jobs[1].id, now)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn manual_retry_starts_a_dead_job_afresh_and_refuses_others() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Standard).await;
    let job = db.insert(&[new_job(ws, "noop", json!({}))]).await.remove(0);
    let now = Utc::now();
    let c = db
        .store
        .claim(&[job.id], "w", now, Duration::seconds(60), &[])
        .await
        .unwrap()
        .running
        .remove(0);
    assert!(
        db.store
            .manual_retry(ws, job.id, now)
            .await
            .unwrap()
            .is_none(),
        "running"
    );
    db.store
        .bury(&lease_of(&c, "w"), "x", ErrorKind::Permanent, now)
        .await
        .unwrap();

    let j = db
        .store
        .manual_retry(ws, job.id, now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((j.status, j.attempts), (JobStatus::Pending, 0));
    assert_eq!(
        (j.error_message, j.error_kind, j.finished_at),
        (None, None, None)
    );
}

#[tokio::test]
async fn rescue_requeues_expired_leases_and_dead_letters_the_last_attempt_only() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Standard).await;
    let mut last = new_job(ws, "noop", json!({}));
    last.max_attempts = 1;
    let jobs = db
        .insert(&[
            new_job(ws, "noop", json!({})),
            last,
            new_job(ws, "noop", json!({})),
            new_job(ws, "noop", json!({})),
        ])
        .await;
    let t0 = Utc::now();
    let ids: Vec<_> = jobs.iter().map(|j| j.id).collect();
    let claimed = db
        .store
        .claim(&ids[..3], "w", t0, Duration::seconds(30), &[])
        .await
        .unwrap()
        .running;
    // Job 2 keeps heartbeating; job 3 was never claimed (queued).
    let c2 = claimed.iter().find(|j| j.id == ids[2]).unwrap();
    let t1 = t0 + Duration::seconds(25);
    db.store
        .heartbeat(
            &[lease_of_id(c2.id, c2.attempts, "w")],
            t1,
            Duration::seconds(30),
        )
        .await
        .unwrap();

    let t2 = t0 + Duration::seconds(40);
    let r = db.store.rescue_expired(t2, 100).await.unwrap();
    assert_eq!((r.requeued.len(), r.dead), (1, 1));
    assert_eq!(db.job(ids[0]).await.status, JobStatus::Pending);
    assert_eq!(db.job(ids[1]).await.status, JobStatus::Dead);
    assert_eq!(db.job(ids[2]).await.status, JobStatus::Running);
    assert_eq!(db.job(ids[3]).await.status, JobStatus::Pending);
    // Running it again finds nothing more.
    assert!(db
        .store
        .rescue_expired(t2, 100)
        .await
        .unwrap()
        .requeued
        .is_empty());
}

#[tokio::test]
async fn an_idempotency_key_returns_the_first_job() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Standard).await;
    let mut a = new_job(ws, "noop", json!({}));
    a.idempotency_key = Some("k-1".into());
    let mut b = new_job(ws, "noop", json!({}));
    b.idempotency_key = Some("k-1".into());
    let conn = db.pool.get().await.unwrap();
    let first = db
        .store
        .insert(&conn, &[a], Utc::now())
        .await
        .unwrap()
        .remove(0);
    let again = db
        .store
        .insert(&conn, &[b], Utc::now())
        .await
        .unwrap()
        .remove(0);
    assert!(first.1 && !again.1);
    assert_eq!(first.0.id, again.0.id);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM jobs").await, 1);
}

#[tokio::test]
async fn jobs_belong_to_a_workspace_that_exists_and_go_with_it() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Standard).await;
    let (other, _) = db.workspace(Tier::Standard).await;
    let jobs = db
        .insert(&[
            new_job(ws, "noop", json!({})),
            new_job(other, "noop", json!({})),
        ])
        .await;
    assert_eq!(jobs.len(), 2);
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT unfinished::int8 FROM workspaces WHERE id = '{ws}'"
        ))
        .await,
        1
    );

    // A batch naming a workspace that does not exist is refused whole.
    let ghost = offload::ids::WorkspaceId::new();
    let conn = db.pool.get().await.unwrap();
    let err = db
        .store
        .insert(
            &conn,
            &[
                new_job(ws, "noop", json!({})),
                new_job(ghost, "noop", json!({})),
            ],
            Utc::now(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM jobs").await, 2);

    // Deleting a workspace deletes its jobs (and their logs), nobody else's.
    conn.execute("DELETE FROM workspaces WHERE id = $1", &[&ws.0])
        .await
        .unwrap();
    assert_eq!(db.scalar_i64("SELECT count(*) FROM jobs").await, 1);
    assert_eq!(db.job(jobs[1].id).await.workspace_id, other);
}
