//! Child jobs and `fan_out`: the `waiting` state, the wake-up by the last
//! child, fail-fast and cancel cascades, idempotent children across a
//! crashed parent, the scheduler's recovery of a lost wake-up message, and
//! the API's view (parent_id, wait, children pages, validation of children).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{SubsecRound, Utc};
use offload::clock::Clock;
use offload::config::WorkerConfig;
use offload::event_source::EventSource;
use offload::handlers::{ChildJob, JobContext, JobError, JobHandler, Outcome, Registry};
use offload::ids::JobId;
use offload::job::{JobStatus, QueueName};
use offload::queue::Queue;
use offload::scheduler::{Scheduler, SchedulerConfig};
use offload::testing::{
    enqueue, event_source, expect_problem, new_job, run_until_finished, sqs_queue, TestApp, TestDb,
};
use offload::workspace::Tier;
use serde::Deserialize;
use serde_json::{json, Value};

/// Fails permanently (with its payload's `why`), for dead children.
struct Fails;

#[derive(Deserialize)]
struct FailsPayload {
    why: String,
}

#[async_trait]
impl JobHandler for Fails {
    type Payload = FailsPayload;
    const TYPE: &'static str = "fails";
    async fn run(&self, p: FailsPayload, _: &mut JobContext) -> Result<Outcome, JobError> {
        Err(JobError::Permanent(p.why))
    }
}

/// Echoes its payload's `n` doubled, so a parent can check each result.
struct Double;

#[derive(Deserialize)]
struct DoublePayload {
    n: i64,
}

#[async_trait]
impl JobHandler for Double {
    type Payload = DoublePayload;
    const TYPE: &'static str = "double";
    async fn run(&self, p: DoublePayload, _: &mut JobContext) -> Result<Outcome, JobError> {
        Ok(Outcome::Completed(Some(json!({ "n": p.n * 2 }))))
    }
}

/// Creates 100 `double` children and, on its first attempt, crashes right
/// after (the children are committed, its wait is not); then waits, and
/// completes with the sum of its children's results.
struct CrashyParent {
    runs: Arc<AtomicU32>,
}

#[async_trait]
impl JobHandler for CrashyParent {
    type Payload = Value;
    const TYPE: &'static str = "crashy_parent";
    async fn run(&self, _: Value, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let children: Vec<ChildJob> = (0..100)
            .map(|i| ChildJob::new("double", json!({ "n": i })))
            .collect();
        ctx.create_children(0, &children).await?;
        if ctx.attempt() == 1 {
            return Err(JobError::Retryable(
                "crashed after creating its children".into(),
            ));
        }
        let kids = ctx.children(None, 1000).await?;
        if kids.iter().any(|k| !k.status.is_terminal()) {
            return Ok(ctx.wait_for_children(&json!({}), true));
        }
        let sum: i64 = kids
            .iter()
            .map(|k| k.result.as_ref().and_then(|r| r["n"].as_i64()).unwrap_or(0))
            .sum();
        Ok(Outcome::Completed(Some(
            json!({ "children": kids.len(), "sum": sum }),
        )))
    }
}

/// One receive of the default queue, invoked: runs what is due now, once.
async fn drain_once(source: &EventSource) {
    let m = source
        .queue
        .receive(
            QueueName::Default,
            10,
            Duration::from_secs(30),
            Duration::ZERO,
        )
        .await
        .expect("receive");
    assert!(!m.is_empty(), "a message was due");
    source.invoke(m).await;
}

/// Checks a problem answer of `status` whose body names `needle`.
async fn problem(resp: reqwest::Response, status: u16, needle: &str) {
    let body = expect_problem(resp, reqwest::StatusCode::from_u16(status).unwrap()).await;
    assert!(
        body.to_string().contains(needle),
        "{needle:?} not in {body}"
    );
}

fn registry() -> Registry {
    Registry::builtin().with(Fails).with(Double)
}

fn quick() -> WorkerConfig {
    WorkerConfig {
        backoff_base: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(20),
        ..WorkerConfig::default()
    }
}

/// A `fan_out` of five `double` children runs to `completed` on `q`:
/// `waiting` in between, the children's results in order.
async fn fan_out_completes(db: &TestDb, q: Arc<dyn Queue>) {
    let (ws, _) = db.workspace(Tier::Standard).await;
    let source = event_source(q.clone(), db.worker_with(q.clone(), quick(), registry()));
    let jobs: Vec<Value> = (0..5)
        .map(|n| json!({ "type": "double", "payload": { "n": n }, "tags": ["kid"] }))
        .collect();
    let parent = db
        .insert(&[new_job(ws, "fan_out", json!({ "jobs": jobs }))])
        .await
        .remove(0);
    enqueue(db, &*q, std::slice::from_ref(&parent)).await;

    // One receive runs the parent: it creates the children and waits.
    drain_once(&source).await;
    let waiting = db.job(parent.id).await;
    assert_eq!(waiting.status, JobStatus::Waiting, "{waiting:?}");
    let wait = waiting.wait.as_ref().expect("a waiting job says what for");
    assert_eq!(
        serde_json::to_value(wait).unwrap(),
        json!({ "kind": "children", "until": null, "token": null })
    );
    assert_eq!(waiting.attempts, 0, "a wait gives its attempt back");
    // A duplicate of the parent's message while it waits runs nothing and is
    // acknowledged: what ends the wait sends a message of its own.
    enqueue(db, &*q, std::slice::from_ref(&parent)).await;

    let done = run_until_finished(db, &source, parent.id, Duration::from_secs(30)).await;
    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(
        done.result,
        Some(json!({
            "completed": 5, "dead": 0, "cancelled": 0,
            "results": [{"n": 0}, {"n": 2}, {"n": 4}, {"n": 6}, {"n": 8}]
        }))
    );
    assert!(done.wait.is_none());
    source.drain().await;
    let depth = q.depth(QueueName::Default).await.unwrap();
    assert_eq!(
        (depth.visible, depth.in_flight, depth.delayed),
        (0, 0, 0),
        "every message acknowledged, none coming back"
    );
    let kids = db.store.children(parent.id, None, 100).await.unwrap();
    assert_eq!(kids.len(), 5);
    assert!(kids
        .iter()
        .all(|k| k.parent_id == Some(parent.id) && k.tags == ["kid"]));
}

#[tokio::test]
async fn fan_out_waits_for_its_children_and_completes_with_their_results_on_postgres() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    fan_out_completes(&db, q).await;
}

#[tokio::test]
async fn fan_out_waits_for_its_children_and_completes_with_their_results_on_sqs() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(sqs_queue(5).await);
    fan_out_completes(&db, q).await;
}

#[tokio::test]
async fn a_dead_child_makes_the_parent_dead_and_cancels_its_unfinished_siblings() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Standard).await;
    let source = event_source(q.clone(), db.worker_with(q.clone(), quick(), registry()));
    let payload = json!({ "jobs": [
        { "type": "fails", "payload": { "why": "bad address" } },
        // Far in the future for this test: still queued when its sibling dies.
        { "type": "sleep", "payload": { "ms": 60000 }, "queue": "low" },
        { "type": "double", "payload": { "n": 1 } },
    ]});
    let parent = db
        .insert(&[new_job(ws, "fan_out", payload)])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&parent)).await;
    let done = run_until_finished(&db, &source, parent.id, Duration::from_secs(30)).await;
    assert_eq!(done.status, JobStatus::Dead, "{done:?}");
    let error = done.error_message.unwrap_or_default();
    assert!(
        error.contains("child 0 (fails") && error.contains("bad address"),
        "{error}"
    );
    let kids = db.store.children(parent.id, None, 10).await.unwrap();
    let statuses: Vec<JobStatus> = kids.iter().map(|k| k.status).collect();
    assert_eq!(
        statuses,
        [JobStatus::Dead, JobStatus::Cancelled, JobStatus::Completed]
    );

    // With continue_on_failure the parent waits for all and reports counts.
    let payload = json!({ "continue_on_failure": true, "jobs": [
        { "type": "fails", "payload": { "why": "nope" } },
        { "type": "double", "payload": { "n": 21 } },
    ]});
    let parent = db
        .insert(&[new_job(ws, "fan_out", payload)])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&parent)).await;
    let done = run_until_finished(&db, &source, parent.id, Duration::from_secs(30)).await;
    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(
        done.result,
        Some(json!({ "completed": 1, "dead": 1, "cancelled": 0, "results": [null, {"n": 42}] }))
    );
}

#[tokio::test]
async fn a_parent_with_100_children_survives_a_crash_and_gets_the_same_children() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Standard).await;
    let runs = Arc::new(AtomicU32::new(0));
    let reg = registry().with(CrashyParent { runs: runs.clone() });
    let workers =
        offload::testing::Workers::start(&db, q.clone(), db.worker_with(q.clone(), quick(), reg));
    let parent = db
        .insert(&[new_job(ws, "crashy_parent", json!({}))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&parent)).await;
    let done = db
        .wait_for_status(parent.id, JobStatus::Completed, Duration::from_secs(60))
        .await;
    workers.stop().await;
    assert_eq!(
        done.result,
        Some(json!({ "children": 100, "sum": 9900 })),
        "each child counted once: 2 × (0 + … + 99)"
    );
    assert!(
        runs.load(Ordering::SeqCst) >= 2,
        "the crash made it run again"
    );
    let children = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM jobs WHERE parent_id = '{}'",
            parent.id
        ))
        .await;
    assert_eq!(children, 100, "the second run created no second set");
    let counters = db
        .scalar_i64(&format!(
            "SELECT (unfinished + dead)::int8 FROM job_children WHERE parent_id = '{}'",
            parent.id
        ))
        .await;
    assert_eq!(counters, 0);
}

#[tokio::test]
async fn a_lost_wake_up_message_is_sent_by_the_scheduler() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Standard).await;
    let source = event_source(q.clone(), db.worker_with(q.clone(), quick(), registry()));
    let jobs: Vec<Value> = (0..3)
        .map(|n| json!({ "type": "double", "payload": { "n": n } }))
        .collect();
    let parent = db
        .insert(&[new_job(ws, "fan_out", json!({ "jobs": jobs }))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&parent)).await;
    drain_once(&source).await;
    assert_eq!(db.job(parent.id).await.status, JobStatus::Waiting);

    // The children finish by a path that sends nothing (their messages and
    // the worker that would have sent the parent's are gone).
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE jobs SET status = 'completed', result = '{\"n\": 0}', finished_at = now() \
             WHERE parent_id = $1",
            &[&parent.id.0],
        )
        .await
        .unwrap();
    let lost = q
        .receive(
            QueueName::Default,
            10,
            Duration::from_secs(30),
            Duration::ZERO,
        )
        .await
        .unwrap();
    let handles: Vec<String> = lost.iter().map(|m| m.receipt_handle.clone()).collect();
    q.delete_batch(QueueName::Default, &handles).await.unwrap();
    let woken = db.job(parent.id).await;
    assert_eq!(woken.status, JobStatus::Pending, "the last child woke it");
    assert!(woken.wait.is_none());

    let clock = Clock::manual(Utc::now() + chrono::Duration::seconds(11));
    let scheduler = Scheduler {
        store: db.store.clone(),
        queue: q.clone(),
        clock,
        config: SchedulerConfig::default(),
    };
    assert_eq!(scheduler.run_once().await.sent, 1);
    let done = run_until_finished(&db, &source, parent.id, Duration::from_secs(30)).await;
    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(done.result.unwrap()["completed"], 3);
}

#[tokio::test]
async fn cancelling_a_waiting_parent_cancels_its_children() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Standard).await;
    let source = event_source(q.clone(), db.worker_with(q.clone(), quick(), registry()));
    let jobs: Vec<Value> = (0..4)
        .map(|_| json!({ "type": "sleep", "payload": { "ms": 60000 } }))
        .collect();
    let parent = db
        .insert(&[new_job(ws, "fan_out", json!({ "jobs": jobs }))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&parent)).await;
    drain_once(&source).await;
    assert_eq!(db.job(parent.id).await.status, JobStatus::Waiting);

    let cancelled = db
        .store
        .request_cancel(ws, parent.id, Utc::now())
        .await
        .unwrap()
        .expect("a waiting job can be cancelled");
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    let kids = db.store.children(parent.id, None, 10).await.unwrap();
    assert!(
        kids.iter().all(|k| k.status == JobStatus::Cancelled),
        "{:?}",
        kids.iter().map(|k| k.status).collect::<Vec<_>>()
    );
    // Their messages, when they come, run nothing.
    source.drain().await;
    for k in kids {
        assert_eq!(db.job(k.id).await.status, JobStatus::Cancelled);
    }
    assert_eq!(db.job(parent.id).await.status, JobStatus::Cancelled);
}

#[tokio::test]
async fn a_retried_dead_parent_retries_its_dead_children() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Standard).await;
    let source = event_source(q.clone(), db.worker_with(q.clone(), quick(), registry()));
    let parent = db
        .insert(&[new_job(
            ws,
            "fan_out",
            json!({ "jobs": [{ "type": "fails", "payload": { "why": "down" } }] }),
        )])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&parent)).await;
    let done = run_until_finished(&db, &source, parent.id, Duration::from_secs(30)).await;
    assert_eq!(done.status, JobStatus::Dead);
    let child: JobId = db.store.children(parent.id, None, 1).await.unwrap()[0].id;

    let retried = db
        .store
        .manual_retry(ws, parent.id, Utc::now())
        .await
        .unwrap()
        .expect("a dead job can be retried");
    assert_eq!(retried.status, JobStatus::Pending);
    let kid = db.job(child).await;
    assert_eq!((kid.status, kid.attempts), (JobStatus::Pending, 0));
    let unfinished = db
        .scalar_i64(&format!(
            "SELECT unfinished::int8 FROM job_children WHERE parent_id = '{}'",
            parent.id
        ))
        .await;
    assert_eq!(unfinished, 1, "the parent counts its retried child again");
}

#[tokio::test]
async fn the_api_shows_parents_waits_and_pages_of_children() {
    let app = TestApp::spawn().await;
    let jobs: Vec<Value> = (0..7)
        .map(|i| json!({ "type": "noop", "tags": [format!("n{i}")] }))
        .collect();
    let resp = app
        .create_job(json!({ "type": "fan_out", "payload": { "jobs": jobs } }))
        .await;
    assert_eq!(resp.status(), 202);
    let parent: Value = resp.json().await.unwrap();
    assert_eq!(parent["parent_id"], Value::Null);
    assert_eq!(parent["wait"], Value::Null);
    let id = parent["id"].as_str().unwrap().to_string();
    let pid: JobId = id.parse().unwrap();

    let source = event_source(
        app.queue.clone(),
        app.db.worker_with(app.queue.clone(), quick(), registry()),
    );
    drain_once(&source).await;
    let waiting = app.get_json(&format!("/jobs/{id}")).await;
    assert_eq!(waiting["status"], "waiting", "{waiting}");
    assert_eq!(waiting["wait"]["kind"], "children");
    let listed = app.get_json("/jobs?status=waiting").await;
    assert_eq!(listed["jobs"][0]["id"], id.as_str());

    // Pages of three, in creation order, each child naming its parent.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = cursor.map_or(String::new(), |c| format!("&cursor={c}"));
        let page = app
            .get_json(&format!("/jobs/{id}/children?limit=3{q}"))
            .await;
        for j in page["jobs"].as_array().unwrap() {
            assert_eq!(j["parent_id"], id.as_str());
            seen.push(j["tags"][0].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, ["n0", "n1", "n2", "n3", "n4", "n5", "n6"]);

    let done = run_until_finished(&app.db, &source, pid, Duration::from_secs(30)).await;
    assert_eq!(done.result.unwrap()["completed"], 7);
    let bad = app
        .req("GET", &format!("/jobs/{id}/children?cursor=x"))
        .send()
        .await
        .unwrap();
    problem(bad, 400, "cursor").await;
    let other = app
        .req("GET", &format!("/jobs/{}/children", JobId::new()))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
}

#[tokio::test]
async fn children_are_checked_like_jobs_of_their_own_at_creation() {
    let app = TestApp::spawn().await;
    let cases = [
        (
            json!({ "jobs": [{ "type": "noop" }, { "type": "nope" }] }),
            "payload.jobs[1].type",
        ),
        (
            json!({ "jobs": [{ "type": "sleep", "payload": { "ms": -1 } }] }),
            "payload.jobs[0].payload.ms",
        ),
        (
            json!({ "jobs": [{ "type": "fan_out", "payload": { "jobs": [{ "type": "noop" }] } }] }),
            "payload.jobs[0].type",
        ),
        (json!({ "jobs": [] }), "payload.jobs"),
        (
            json!({ "jobs": [{ "type": "noop", "max_attempts": 0 }] }),
            "payload.jobs[0].max_attempts",
        ),
        (
            json!({ "jobs": [{ "type": "noop", "colour": "red" }] }),
            "payload.jobs[0]",
        ),
    ];
    for (payload, field) in cases {
        let resp = app
            .create_job(json!({ "type": "fan_out", "payload": payload }))
            .await;
        problem(resp, 422, field).await;
    }
    let too_many: Vec<Value> = (0..1001).map(|_| json!({ "type": "noop" })).collect();
    let resp = app
        .create_job(json!({ "type": "fan_out", "payload": { "jobs": too_many } }))
        .await;
    problem(resp, 422, "1000").await;
    assert_eq!(app.db.scalar_i64("SELECT count(*) FROM jobs").await, 0);
}

#[tokio::test]
async fn a_member_cannot_reach_an_admin_only_type_through_a_fan_out() {
    let app = TestApp::spawn().await;
    let member = offload::ids::UserId::new();
    let db = app.db.pool.get().await.unwrap();
    offload::workspace::add_member(
        &**db,
        app.workspace,
        member,
        offload::workspace::Role::Member,
    )
    .await
    .unwrap();
    let resp = app
        .client
        .post(app.jobs_url())
        .bearer_auth(offload::testing::token(member))
        .json(&json!({ "type": "fan_out", "payload": { "jobs": [
            { "type": "noop" },
            { "type": "bulk_delete", "payload": { "contact_ids": [uuid::Uuid::now_v7()] } },
        ]}}))
        .send()
        .await
        .unwrap();
    problem(resp, 403, "bulk_delete").await;
}

/// Waits `secs` once, then completes with the clock's time when it woke.
struct Nap {
    secs: u64,
}

#[async_trait]
impl JobHandler for Nap {
    type Payload = Value;
    const TYPE: &'static str = "nap";
    async fn run(&self, _: Value, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        if ctx.checkpoint::<Value>().is_none() {
            return Ok(ctx.wait_for(&json!({ "napped": true }), Duration::from_secs(self.secs)));
        }
        Ok(Outcome::Completed(Some(
            json!({ "attempt": ctx.attempt() }),
        )))
    }
}

#[tokio::test]
async fn a_twenty_minute_wait_holds_no_invocation_and_resumes_on_time() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Standard).await;
    let job = db.insert(&[new_job(ws, "nap", json!({}))]).await.remove(0);
    // Microseconds, as PostgreSQL keeps times.
    let t0 = (Utc::now() + chrono::Duration::seconds(1)).trunc_subsecs(6);
    let clock = Clock::manual(t0);
    let worker = offload::worker::Worker::new(
        db.store.clone(),
        q.clone(),
        Arc::new(Registry::builtin().with(Nap { secs: 20 * 60 })),
        quick(),
        clock.clone(),
        "test-worker",
        db.storage(),
    );
    let source = event_source(q.clone(), worker);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    drain_once(&source).await;

    let due = t0 + chrono::Duration::minutes(20);
    let waiting = db.job(job.id).await;
    assert_eq!(waiting.status, JobStatus::Waiting);
    assert_eq!(waiting.wait.as_ref().unwrap().until, Some(due));
    assert_eq!(waiting.lease_expires_at, None, "no worker holds it");
    let depth = q.depth(QueueName::Default).await.unwrap();
    assert_eq!(
        (depth.visible, depth.in_flight, depth.delayed),
        (0, 0, 0),
        "beyond a queue's 15-minute delay no message carries it yet"
    );

    let scheduler = Scheduler {
        store: db.store.clone(),
        queue: q.clone(),
        clock: clock.clone(),
        config: SchedulerConfig::default(),
    };
    clock.advance(chrono::Duration::minutes(4));
    assert_eq!(scheduler.run_once().await.waits_released, 0, "not yet");
    clock.advance(chrono::Duration::minutes(2));
    let report = scheduler.run_once().await;
    assert_eq!(report.waits_released, 1, "{report:?}");
    clock.advance(chrono::Duration::minutes(1));
    assert_eq!(scheduler.run_once().await.sent, 1);
    let depth = q.depth(QueueName::Default).await.unwrap();
    assert_eq!(depth.delayed, 1, "sent with the delay left, 13 minutes");
    assert_eq!(db.job(job.id).await.run_at, due);

    // Thirteen minutes pass: the delayed message comes due.
    clock.advance(chrono::Duration::minutes(13) + chrono::Duration::seconds(1));
    db.pool
        .get()
        .await
        .unwrap()
        .execute("UPDATE queue_messages SET vt = now()", &[])
        .await
        .unwrap();
    source.drain().await;
    let done = db.job(job.id).await;
    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(
        done.result,
        Some(json!({ "attempt": 1 })),
        "the wait spent no attempt"
    );
    assert!(done.finished_at.unwrap() >= due);
}

/// A short wait ends by its delayed message alone, on `q`.
async fn short_wait_resumes(db: &TestDb, q: Arc<dyn Queue>) {
    let (ws, _) = db.workspace(Tier::Standard).await;
    let source = event_source(
        q.clone(),
        db.worker_with(
            q.clone(),
            quick(),
            Registry::builtin().with(Nap { secs: 1 }),
        ),
    );
    let job = db.insert(&[new_job(ws, "nap", json!({}))]).await.remove(0);
    enqueue(db, &*q, std::slice::from_ref(&job)).await;
    drain_once(&source).await;
    assert_eq!(db.job(job.id).await.status, JobStatus::Waiting);
    let started = std::time::Instant::now();
    let done = run_until_finished(db, &source, job.id, Duration::from_secs(30)).await;
    assert_eq!(done.status, JobStatus::Completed);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_short_wait_resumes_by_its_delayed_message_on_postgres() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    short_wait_resumes(&db, q).await;
}

#[tokio::test]
async fn a_short_wait_resumes_by_its_delayed_message_on_sqs() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(sqs_queue(5).await);
    short_wait_resumes(&db, q).await;
}

/// An `approval` created through the API waits for its token, which is
/// completed once (a second completion is a 409) and not at all from
/// another workspace (404); the job then completes with the data.
async fn approval_completes_once(app: TestApp) {
    let resp = app
        .create_job(
            json!({ "type": "approval", "payload": { "name": "campaign 7", "timeout_s": 3600 } }),
        )
        .await;
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let source = event_source(
        app.queue.clone(),
        app.db.worker_with(app.queue.clone(), quick(), registry()),
    );
    drain_once(&source).await;
    let waiting = app.get_json(&format!("/jobs/{id}")).await;
    assert_eq!(waiting["status"], "waiting", "{waiting}");
    assert_eq!(waiting["wait"]["kind"], "token");
    let token = waiting["wait"]["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("wt_") && token.len() == 67, "{token}");

    // Another workspace's member cannot see or complete it.
    let (other_ws, other_user) = app.db.workspace(Tier::Standard).await;
    let resp = app
        .client
        .post(format!(
            "{}/api/workspaces/{other_ws}/tokens/{token}/complete",
            app.base
        ))
        .bearer_auth(offload::testing::token(other_user))
        .json(&json!({ "data": { "approved": false } }))
        .send()
        .await
        .unwrap();
    problem(resp, 404, "token").await;

    let bad = app
        .req("POST", &format!("/tokens/{token}/complete"))
        .json(&json!({ "approved": true }))
        .send()
        .await
        .unwrap();
    problem(bad, 422, "approved").await;

    let first = app
        .req("POST", &format!("/tokens/{token}/complete"))
        .json(&json!({ "data": { "approved": true, "by": "ana" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let body: Value = first.json().await.unwrap();
    assert_eq!(body["job_id"], id.as_str());
    let again = app
        .req("POST", &format!("/tokens/{token}/complete"))
        .json(&json!({ "data": { "approved": false } }))
        .send()
        .await
        .unwrap();
    problem(again, 409, "completed already").await;

    let done = run_until_finished(
        &app.db,
        &source,
        id.parse().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(
        done.result,
        Some(json!({ "data": { "approved": true, "by": "ana" } }))
    );
}

#[tokio::test]
async fn an_approval_token_completed_twice_acts_once_on_postgres() {
    approval_completes_once(TestApp::spawn().await).await;
}

#[tokio::test]
async fn an_approval_token_completed_twice_acts_once_on_sqs() {
    let db = TestDb::new().await;
    let q: Arc<dyn Queue> = Arc::new(sqs_queue(5).await);
    approval_completes_once(TestApp::spawn_with(db, q).await).await;
}

#[tokio::test]
async fn an_approval_that_times_out_ends_dead_and_its_token_refuses_completion() {
    let app = TestApp::spawn().await;
    let resp = app
        .create_job(json!({ "type": "approval", "payload": { "name": "refund", "timeout_s": 60 } }))
        .await;
    let id: JobId = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let source = event_source(
        app.queue.clone(),
        app.db.worker_with(app.queue.clone(), quick(), registry()),
    );
    drain_once(&source).await;
    let token = app.db.job(id).await.wait.unwrap().token.unwrap();
    let clock = Clock::manual(Utc::now() + chrono::Duration::seconds(61));
    let scheduler = Scheduler {
        store: app.db.store.clone(),
        queue: app.queue.clone(),
        clock,
        config: SchedulerConfig::default(),
    };
    assert_eq!(scheduler.run_once().await.tokens_expired, 1);
    let dead = app.db.job(id).await;
    assert_eq!(dead.status, JobStatus::Dead);
    assert!(
        dead.error_message
            .as_deref()
            .unwrap_or("")
            .contains("timed out"),
        "{dead:?}"
    );
    let late = app
        .req("POST", &format!("/tokens/{token}/complete"))
        .json(&json!({ "data": null }))
        .send()
        .await
        .unwrap();
    problem(late, 409, "timed out").await;
    for (payload, field) in [
        (json!({ "name": "x", "timeout_s": 0 }), "payload.timeout_s"),
        (
            json!({ "name": "x", "timeout_s": 2_592_001 }),
            "payload.timeout_s",
        ),
        (json!({ "name": "", "timeout_s": 10 }), "payload.name"),
    ] {
        let resp = app
            .create_job(json!({ "type": "approval", "payload": payload }))
            .await;
        problem(resp, 422, field).await;
    }
}

/// Appends `n` chunks `{"i": i}`, a few milliseconds apart, then completes.
struct Talker {
    n: usize,
}

#[async_trait]
impl JobHandler for Talker {
    type Payload = Value;
    const TYPE: &'static str = "talker";
    async fn run(&self, _: Value, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        for i in 0..self.n {
            ctx.stream(&json!({ "i": i })).await?;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        Ok(Outcome::Completed(None))
    }
}

/// Server-sent events as (event, id, data), read from `resp` until `stop`
/// says so (after the event it is given) or the response ends.
async fn read_events(
    mut resp: reqwest::Response,
    mut stop: impl FnMut(&(String, Option<String>, String)) -> bool,
) -> Vec<(String, Option<String>, String)> {
    let mut buf = String::new();
    let mut out = Vec::new();
    while let Ok(Some(bytes)) = resp.chunk().await {
        buf.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut event, mut id, mut data) = ("message".to_string(), None, String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if data.is_empty() && id.is_none() {
                continue; // a comment, a keep-alive or the retry field
            }
            let e = (event, id, data);
            let done = stop(&e);
            out.push(e);
            if done {
                return out;
            }
        }
    }
    out
}

#[tokio::test]
async fn a_stream_read_again_from_its_last_event_misses_nothing_and_repeats_nothing() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let app = TestApp::spawn_with(db, q.clone()).await;
    let workers = offload::testing::Workers::start(
        &app.db,
        q.clone(),
        app.db.worker_with(
            q.clone(),
            quick(),
            Registry::builtin().with(Talker { n: 60 }),
        ),
    );
    let job = app
        .db
        .insert(&[new_job(app.workspace, "talker", json!({}))])
        .await
        .remove(0);
    enqueue(&app.db, &*q, std::slice::from_ref(&job)).await;
    let path = format!("/jobs/{}/stream", job.id);

    // The first reader leaves after 20 chunks, while the job still talks.
    let first = app.req("GET", &path).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["content-type"], "text/event-stream");
    let mut n = 0;
    let part1 = read_events(first, |_| {
        n += 1;
        n == 20
    })
    .await;
    let last = part1.last().unwrap().1.clone().unwrap();
    // It comes back with the last id it saw, as EventSource does.
    let again = app
        .req("GET", &path)
        .header("Last-Event-ID", &last)
        .send()
        .await
        .unwrap();
    let part2 = read_events(again, |e| e.0 == "end").await;
    workers.stop().await;

    let chunks: Vec<i64> = part1
        .iter()
        .chain(part2.iter())
        .filter(|e| e.0 == "chunk")
        .map(|e| {
            serde_json::from_str::<Value>(&e.2).unwrap()["i"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        chunks,
        (0..60).collect::<Vec<i64>>(),
        "each chunk once, in order"
    );
    let end = part2.last().unwrap();
    assert_eq!(
        (end.0.as_str(), end.2.as_str()),
        ("end", r#"{"status":"completed"}"#)
    );

    // After the end, from a cursor: the rest, then the end at once.
    let ids: Vec<String> = part1
        .iter()
        .chain(part2.iter())
        .filter_map(|e| e.1.clone())
        .collect();
    let tail = app
        .req("GET", &format!("{path}?cursor={}", ids[49]))
        .send()
        .await
        .unwrap();
    let rest = read_events(tail, |e| e.0 == "end").await;
    assert_eq!(rest.len(), 11, "chunks 50 to 59 and the end: {rest:?}");
    let bad = app
        .req("GET", &path)
        .header("Last-Event-ID", "soon")
        .send()
        .await
        .unwrap();
    problem(bad, 400, "Last-Event-ID").await;
}
