//! Workflows that neither a tenant nor time can break: a member's
//! idempotency key never becomes a parent's child, key expiry never breaks
//! a re-run, retention keeps a parent's children while the parent exists,
//! a retried fan_out re-runs only the children that did not complete, a
//! handler that lost its lease creates no children, tokens wake and expire
//! only the wait they belong to, a retried approval waits on a fresh token,
//! and a database that never gives a connection ends a job instead of
//! snoozing it for ever.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use offload::config::WorkerConfig;
use offload::handlers::TokenState;
use offload::handlers::{ChildJob, JobContext, JobError, JobHandler, Outcome, Registry};
use offload::ids::JobId;
use offload::job::JobStatus;
use offload::queue::Queue;
use offload::store::{Completion, NewJob};
use offload::testing::{
    enqueue, event_source, expect_problem, new_job, run_until_finished, TestApp, TestDb,
};
use offload::workspace::Tier;
use serde_json::{json, Value};

fn quick() -> WorkerConfig {
    WorkerConfig {
        backoff_base: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(20),
        batch_failure_delay: Duration::from_millis(20),
        ..WorkerConfig::default()
    }
}

/// Doubles its payload's `n`.
struct Double;

#[async_trait]
impl JobHandler for Double {
    type Payload = Value;
    const TYPE: &'static str = "double";
    async fn run(&self, p: Value, _: &mut JobContext) -> Result<Outcome, JobError> {
        Ok(Outcome::Completed(Some(
            json!({ "n": p["n"].as_i64().unwrap_or(0) * 2 }),
        )))
    }
}

/// Fails for good while its switch is on, then completes.
struct Switch {
    failing: Arc<AtomicBool>,
}

#[async_trait]
impl JobHandler for Switch {
    type Payload = Value;
    const TYPE: &'static str = "switch";
    async fn run(&self, _: Value, _: &mut JobContext) -> Result<Outcome, JobError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(JobError::Permanent("the dependency is down".into()));
        }
        Ok(Outcome::Completed(Some(json!({ "ok": true }))))
    }
}

fn registry(failing: Arc<AtomicBool>) -> Registry {
    Registry::builtin()
        .with(Double)
        .with(Switch { failing })
        .with(LosesLease)
        .with(TwoTokens)
        .with(NeverAConnection)
}

async fn children(db: &TestDb, parent: JobId) -> Vec<offload::Job> {
    db.store.children(parent, None, 1000).await.unwrap()
}

#[tokio::test]
async fn a_members_idempotency_key_never_becomes_a_parents_child() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Standard).await;
    let source = event_source(
        q.clone(),
        db.worker_with(q.clone(), quick(), registry(Arc::default())),
    );
    let parent = new_job(
        ws,
        "fan_out",
        json!({ "jobs": [
            { "type": "double", "payload": { "n": 1 } },
            { "type": "double", "payload": { "n": 2 } },
        ]}),
    );
    // A member who learnt the parent's id before it ran takes its children's
    // old keys, with jobs of their own.
    // The API refuses such keys now; jobs that took them before (an older
    // release) are what this test puts in place.
    let app_refuses = TestApp::spawn().await;
    let refused = app_refuses
        .client
        .post(app_refuses.jobs_url())
        .bearer_auth(&app_refuses.token)
        .header("Idempotency-Key", format!("child:{}:0", parent.id))
        .json(&json!({ "type": "noop" }))
        .send()
        .await
        .unwrap();
    let body = expect_problem(refused, reqwest::StatusCode::BAD_REQUEST).await;
    assert_eq!(body["field"], "Idempotency-Key", "{body}");
    let hostile: Vec<NewJob> = (0..2)
        .map(|i| NewJob {
            idempotency_key: Some(format!("child:{}:{i}", parent.id)),
            ..new_job(ws, "noop", json!({}))
        })
        .collect();
    let hostile = db.insert(&hostile).await;
    let parent = db.insert(&[parent]).await.remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&parent)).await;
    // A parent that took the member's jobs as its children waited on rows
    // it never made and spun inside one drain: bounded here.
    let done = tokio::time::timeout(
        Duration::from_secs(30),
        run_until_finished(&db, &source, parent.id, Duration::from_secs(20)),
    )
    .await
    .expect("the parent spun without finishing");
    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(
        done.result.unwrap()["results"],
        json!([{ "n": 2 }, { "n": 4 }])
    );
    let kids = children(&db, parent.id).await;
    assert_eq!(kids.len(), 2);
    for h in hostile {
        assert!(
            kids.iter().all(|k| k.id != h.id),
            "the member's job became a child"
        );
        let h = db.job(h.id).await;
        assert_eq!((h.parent_id, h.job_type.as_str()), (None, "noop"));
    }
}

#[tokio::test]
async fn expired_idempotency_keys_never_break_a_parents_re_run() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let source = event_source(
        q.clone(),
        db.worker_with(q.clone(), quick(), registry(Arc::default())),
    );
    let failing = (0..3)
        .map(|n| json!({ "type": "double", "payload": { "n": n } }))
        .collect::<Vec<_>>();
    let parent = db
        .insert(&[new_job(ws, "fan_out", json!({ "jobs": failing }))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&parent)).await;
    let done = run_until_finished(&db, &source, parent.id, Duration::from_secs(20)).await;
    assert_eq!(done.status, JobStatus::Completed);
    let before: Vec<JobId> = children(&db, parent.id)
        .await
        .iter()
        .map(|k| k.id)
        .collect();

    // Every key of the workspace expires (what the API does to a key older
    // than its lifetime), then the parent runs again from the start.
    let conn = db.pool.get().await.unwrap();
    for i in 0..3 {
        db.store
            .expire_idempotency_key(&conn, ws, &format!("child:{}:{i}", parent.id), Utc::now())
            .await
            .unwrap();
    }
    conn.execute(
        "UPDATE jobs SET status = 'cancelled', finished_at = now() WHERE id = $1",
        &[&parent.id.0],
    )
    .await
    .unwrap();
    let retried = db
        .store
        .manual_retry(ws, parent.id, Utc::now())
        .await
        .unwrap()
        .unwrap();
    enqueue(&db, &*q, std::slice::from_ref(&retried)).await;
    let done = run_until_finished(&db, &source, parent.id, Duration::from_secs(20)).await;
    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(done.attempts, 1, "no attempt failed on the unique index");
    let after: Vec<JobId> = children(&db, parent.id)
        .await
        .iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(before, after, "the same children, none made again");
}

#[tokio::test]
async fn retention_keeps_a_waiting_parents_children_and_it_completes_once() {
    let app = TestApp::spawn().await;
    let db = &app.db;
    let q = app.queue.clone();
    let source = event_source(
        q.clone(),
        db.worker_with(q.clone(), quick(), registry(Arc::default())),
    );
    let resp = app
        .create_job(json!({ "type": "fan_out", "payload": { "jobs": [
            { "type": "noop" },
            { "type": "approval", "payload": { "name": "go", "timeout_s": 3600 } },
        ]}}))
        .await;
    let parent: JobId = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // The parent waits; its first child completes, the approval waits.
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    let approval = loop {
        source.drain().await;
        let kids = children(db, parent).await;
        if kids.len() == 2
            && kids[0].status == JobStatus::Completed
            && kids[1].status == JobStatus::Waiting
        {
            break kids[1].clone();
        }
        assert!(tokio::time::Instant::now() < end, "{kids:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(db.job(parent).await.status, JobStatus::Waiting);
    // Long past retention, the finished child is still kept: its parent reads it.
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE jobs SET finished_at = now() - interval '30 days' WHERE parent_id = $1 \
             AND status = 'completed'",
            &[&parent.0],
        )
        .await
        .unwrap();
    assert_eq!(db.store.prune(Utc::now(), 1000).await.unwrap(), 0);
    assert_eq!(children(db, parent).await.len(), 2);
    // Nor can an admin delete it while its parent exists.
    let first = children(db, parent).await[0].id;
    let refused = app
        .req("DELETE", &format!("/jobs/{first}"))
        .send()
        .await
        .unwrap();
    let body = expect_problem(refused, reqwest::StatusCode::CONFLICT).await;
    assert!(
        body.to_string().contains("delete the parent first"),
        "{body}"
    );

    let token = approval.wait.unwrap().token.unwrap();
    let ok = app
        .req("POST", &format!("/tokens/{token}/complete"))
        .json(&json!({ "data": { "yes": true } }))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let done = run_until_finished(db, &source, parent, Duration::from_secs(20)).await;
    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(done.attempts, 1, "{done:?}");
    let result = done.result.unwrap();
    assert_eq!(result["completed"], 2, "{result}");
    assert_eq!(result["results"][1], json!({ "data": { "yes": true } }));

    // Once the parent itself is past retention, it goes first, then its children.
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE jobs SET finished_at = now() - interval '30 days' \
             WHERE id = $1 OR parent_id = $1",
            &[&parent.0],
        )
        .await
        .unwrap();
    assert_eq!(db.store.prune(Utc::now(), 1000).await.unwrap(), 1);
    assert_eq!(db.store.prune(Utc::now(), 1000).await.unwrap(), 2);
}

#[tokio::test]
async fn a_retried_fan_out_re_runs_only_the_children_that_did_not_complete() {
    let app = TestApp::spawn().await;
    let db = &app.db;
    let q = app.queue.clone();
    let failing = Arc::new(AtomicBool::new(true));
    let source = event_source(
        q.clone(),
        db.worker_with(q.clone(), quick(), registry(failing.clone())),
    );
    let parent = db
        .insert(&[new_job(
            app.workspace,
            "fan_out",
            json!({ "continue_on_failure": true, "jobs": [
                { "type": "double", "payload": { "n": 5 } },
                { "type": "switch", "max_attempts": 1 },
                { "type": "double", "payload": { "n": 7 } },
            ]}),
        )])
        .await
        .remove(0);
    enqueue(db, &*q, std::slice::from_ref(&parent)).await;
    let first = run_until_finished(db, &source, parent.id, Duration::from_secs(20)).await;
    assert_eq!(first.result.as_ref().unwrap()["dead"], 1, "{first:?}");
    // Continue-on-failure completed it; a person cancels-and-retries it the
    // way a dead one is retried. The children finished long ago; retention
    // ran meanwhile.
    let conn = db.pool.get().await.unwrap();
    conn.execute(
        "UPDATE jobs SET status = 'dead' WHERE id = $1",
        &[&parent.id.0],
    )
    .await
    .unwrap();
    conn.execute(
        "UPDATE jobs SET finished_at = now() - interval '30 days' WHERE parent_id = $1",
        &[&parent.id.0],
    )
    .await
    .unwrap();
    db.store
        .prune(Utc::now() - chrono::Duration::days(7), 1000)
        .await
        .unwrap();
    let before = children(db, parent.id).await;
    assert_eq!(
        before.len(),
        3,
        "children outlive retention while their parent exists"
    );

    // A child still stopping (asked to when its parent died): no retry yet,
    // since it could end cancelled after the retry looked.
    conn.execute(
        "UPDATE jobs SET status = 'running', cancel_requested_at = now(), finished_at = NULL \
         WHERE id = $1",
        &[&before[1].id.0],
    )
    .await
    .unwrap();
    let refused = app
        .req("POST", &format!("/jobs/{}/retry", parent.id))
        .send()
        .await
        .unwrap();
    let body = expect_problem(refused, reqwest::StatusCode::CONFLICT).await;
    assert!(
        body.to_string().contains("1 of its children still run"),
        "{body}"
    );
    conn.execute(
        "UPDATE jobs SET status = 'dead', cancel_requested_at = NULL, \
           finished_at = now() - interval '30 days' WHERE id = $1",
        &[&before[1].id.0],
    )
    .await
    .unwrap();

    failing.store(false, Ordering::SeqCst);
    let resp = app
        .req("POST", &format!("/jobs/{}/retry", parent.id))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    let done = run_until_finished(db, &source, parent.id, Duration::from_secs(20)).await;
    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    let result = done.result.unwrap();
    assert_eq!(
        (result["completed"].clone(), result["dead"].clone()),
        (json!(3), json!(0)),
        "{result}"
    );
    assert_eq!(
        result["results"],
        json!([{ "n": 10 }, { "ok": true }, { "n": 14 }])
    );
    let after = children(db, parent.id).await;
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a.id, b.id, "the same child, never a new one");
    }
    // The completed ones did not run again: same start, one attempt.
    for i in [0, 2] {
        assert_eq!(after[i].started_at, before[i].started_at);
        assert_eq!(after[i].attempts, 1);
    }
    assert_eq!(after[1].status, JobStatus::Completed);
}

/// Loses its lease (another worker's rescue takes the job), then tries to
/// create a child.
struct LosesLease;

#[async_trait]
impl JobHandler for LosesLease {
    type Payload = Value;
    const TYPE: &'static str = "loses_lease";
    async fn run(&self, p: Value, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let url = p["db"].as_str().unwrap().to_string();
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .execute(
                "UPDATE jobs SET attempts = attempts + 1, worker_id = 'rescuer' WHERE id = $1",
                &[&ctx.job_id().0],
            )
            .await
            .unwrap();
        // Two children: on a free tier (one at a time) they go in parked,
        // the other insert's path.
        ctx.create_children(
            0,
            &[
                ChildJob::new("noop", json!({})),
                ChildJob::new("noop", json!({})),
            ],
        )
        .await?;
        Ok(Outcome::Completed(None))
    }
}

#[tokio::test]
async fn a_handler_that_lost_its_lease_creates_no_children() {
    let db = TestDb::new().await;
    for tier in [Tier::Unlimited, Tier::Free] {
        let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
        let (ws, _) = db.workspace(tier).await;
        let source = event_source(
            q.clone(),
            db.worker_with(q.clone(), quick(), registry(Arc::default())),
        );
        let job = db
            .insert(&[new_job(ws, "loses_lease", json!({ "db": db.url }))])
            .await
            .remove(0);
        enqueue(&db, &*q, std::slice::from_ref(&job)).await;
        source.drain().await;
        let n = db
            .scalar_i64(&format!(
                "SELECT count(*) FROM jobs WHERE parent_id = '{}'",
                job.id
            ))
            .await;
        assert_eq!(n, 0, "{tier:?}: a child made after the lease was lost");
        let j = db.job(job.id).await;
        assert_eq!(
            (j.status, j.worker_id.as_deref()),
            (JobStatus::Running, Some("rescuer")),
            "the old worker wrote nothing"
        );
    }
}

/// Makes two tokens, `a` (timing out in `a_s` seconds) and `b` (an hour),
/// and waits on `b` alone.
struct TwoTokens;

#[async_trait]
impl JobHandler for TwoTokens {
    type Payload = Value;
    const TYPE: &'static str = "two_tokens";
    async fn run(&self, p: Value, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let a_s = p["a_s"].as_u64().unwrap_or(3600);
        ctx.create_token("a", Duration::from_secs(a_s)).await?;
        let b = ctx.create_token("b", Duration::from_secs(3600)).await?;
        match ctx.token_state(&b).await? {
            TokenState::Completed(data) => Ok(Outcome::Completed(Some(data))),
            TokenState::TimedOut => Err(JobError::Permanent("b timed out".into())),
            TokenState::Open => Ok(ctx.wait_for_token(&json!({}), &b)),
        }
    }
}

async fn token_named(db: &TestDb, job: JobId, name: &str) -> String {
    let row = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT token FROM wait_tokens WHERE job_id = $1 AND name = $2",
            &[&job.0, &name],
        )
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test]
async fn a_token_wakes_and_times_out_only_the_wait_it_belongs_to() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Standard).await;
    let source = event_source(
        q.clone(),
        db.worker_with(q.clone(), quick(), registry(Arc::default())),
    );
    let job = db
        .insert(&[new_job(ws, "two_tokens", json!({ "a_s": 60 }))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    source.drain().await;
    let waiting = db
        .wait_for_status(job.id, JobStatus::Waiting, Duration::from_secs(10))
        .await;
    let b = token_named(&db, job.id, "b").await;
    assert_eq!(waiting.wait.unwrap().token.as_deref(), Some(b.as_str()));

    // Token `a` times out: the job waits on `b`, so it stays waiting.
    let later = Utc::now() + chrono::Duration::seconds(61);
    db.store.expire_tokens(later, 100).await.unwrap();
    assert_eq!(db.job(job.id).await.status, JobStatus::Waiting);

    // Completing another token of the job does not wake it either.
    let fresh = db
        .insert(&[new_job(ws, "two_tokens", json!({}))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&fresh)).await;
    source.drain().await;
    let _ = db
        .wait_for_status(fresh.id, JobStatus::Waiting, Duration::from_secs(10))
        .await;
    let fresh_a = token_named(&db, fresh.id, "a").await;
    match db
        .store
        .complete_token(ws, &fresh_a, &json!("a"), Utc::now())
        .await
        .unwrap()
    {
        Completion::Done { woken, .. } => assert!(woken.is_none(), "{woken:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(db.job(fresh.id).await.status, JobStatus::Waiting);
    // Its own token does.
    let fresh_b = token_named(&db, fresh.id, "b").await;
    let done = db
        .store
        .complete_token(ws, &fresh_b, &json!("b"), Utc::now())
        .await
        .unwrap();
    assert!(
        matches!(done, Completion::Done { woken: Some(_), .. }),
        "{done:?}"
    );
}

#[tokio::test]
async fn a_retried_approval_waits_on_a_fresh_token_and_the_old_one_answers_409() {
    let app = TestApp::spawn().await;
    let q = app.queue.clone();
    let source = event_source(
        q.clone(),
        app.db
            .worker_with(q.clone(), quick(), registry(Arc::default())),
    );
    let resp = app
        .create_job(
            json!({ "type": "approval", "payload": { "name": "refund", "timeout_s": 3600 } }),
        )
        .await;
    let id: JobId = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    source.drain().await;
    let old = app
        .db
        .wait_for_status(id, JobStatus::Waiting, Duration::from_secs(10))
        .await
        .wait
        .unwrap()
        .token
        .unwrap();
    let cancel = app
        .req("POST", &format!("/jobs/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert!(cancel.status().is_success());
    let retry = app
        .req("POST", &format!("/jobs/{id}/retry"))
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), 202);
    source.drain().await;
    let new = app
        .db
        .wait_for_status(id, JobStatus::Waiting, Duration::from_secs(10))
        .await
        .wait
        .unwrap()
        .token
        .unwrap();
    assert_ne!(new, old, "the re-run waits on a fresh token");
    let stale = app
        .req("POST", &format!("/tokens/{old}/complete"))
        .json(&json!({ "data": { "approved": true } }))
        .send()
        .await
        .unwrap();
    let body = expect_problem(stale, reqwest::StatusCode::CONFLICT).await;
    assert!(body.to_string().contains("earlier run"), "{body}");
    assert_eq!(app.db.job(id).await.status, JobStatus::Waiting);
    let ok = app
        .req("POST", &format!("/tokens/{new}/complete"))
        .json(&json!({ "data": { "approved": "yes" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let done = run_until_finished(&app.db, &source, id, Duration::from_secs(20)).await;
    assert_eq!(
        done.result,
        Some(json!({ "data": { "approved": "yes" } })),
        "{done:?}"
    );
}

/// Finds no database connection, every time.
struct NeverAConnection;

#[async_trait]
impl JobHandler for NeverAConnection {
    type Payload = Value;
    const TYPE: &'static str = "never_a_connection";
    async fn run(&self, _: Value, _: &mut JobContext) -> Result<Outcome, JobError> {
        Err(JobError::Busy(
            "database busy: no connection available: timed out waiting".into(),
        ))
    }
}

#[tokio::test]
async fn a_database_that_never_has_a_connection_ends_the_job_instead_of_cycling_it() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Standard).await;
    let cfg = WorkerConfig {
        max_busy_snoozes: 3,
        ..quick()
    };
    let source = event_source(
        q.clone(),
        db.worker_with(q.clone(), cfg, registry(Arc::default())),
    );
    let job = db
        .insert(&[NewJob {
            max_attempts: 2,
            ..new_job(ws, "never_a_connection", json!({}))
        }])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    let done = run_until_finished(&db, &source, job.id, Duration::from_secs(30)).await;
    assert_eq!(
        (done.status, done.attempts),
        (JobStatus::Dead, 2),
        "{done:?}"
    );
    let error = done.error_message.unwrap_or_default();
    assert!(
        error.contains("4 runs in a row found no free connection"),
        "{error}"
    );
    let busy_lines = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM job_logs WHERE job_id = '{}' AND message LIKE 'database busy%'",
            job.id
        ))
        .await;
    assert!(
        busy_lines >= 6,
        "each snooze is in the job's log: {busy_lines}"
    );
}
