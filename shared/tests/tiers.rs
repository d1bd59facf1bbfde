//! Workspaces with a concurrency limit (every real tier) drain at the speed
//! their limit allows: jobs over the limit wait in the database, not in the
//! queue, and finishing jobs start the next ones. Run through the worker
//! loops as `offload dev` runs them, against a real Postgres.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use offload::clock::Clock;
use offload::config::WorkerConfig;
use offload::ids::WorkspaceId;
use offload::job::{Job, JobStatus};
use offload::scheduler::{Scheduler, SchedulerConfig};
use offload::store::NewJob;
use offload::testing::{enqueue, new_job, TestDb, Workers};
use offload::workspace::Tier;
use serde_json::json;

async fn create(db: &TestDb, q: &offload::queue::PgQueue, jobs: Vec<NewJob>) -> Vec<Job> {
    let mut out = Vec::new();
    for chunk in jobs.chunks(1000) {
        let made = db.insert(chunk).await;
        enqueue(db, q, &made).await;
        out.extend(made);
    }
    out
}

fn noops(ws: WorkspaceId, n: usize) -> Vec<NewJob> {
    (0..n).map(|_| new_job(ws, "noop", json!({}))).collect()
}

async fn unfinished(db: &TestDb, ws: WorkspaceId) -> i64 {
    db.scalar_i64(&format!(
        "SELECT count(*) FROM jobs WHERE workspace_id = '{ws}' \
         AND status NOT IN ('completed', 'cancelled', 'dead')"
    ))
    .await
}

/// Milliseconds from creation to start of a job that has started.
async fn start_latency_ms(db: &TestDb, job: &Job) -> i64 {
    let j = db
        .wait_for_status(job.id, JobStatus::Completed, Duration::from_secs(10))
        .await;
    (j.started_at.expect("started") - j.created_at).num_milliseconds()
}

/// Polls the running count of a workspace while `until` is false; returns
/// the most ever seen running at once (from the rows, not the counter).
async fn max_running_while(db: &TestDb, ws: WorkspaceId, secs: u64) -> (i64, bool) {
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut max = 0;
    loop {
        let running = db
            .scalar_i64(&format!(
                "SELECT count(*) FROM jobs WHERE workspace_id = '{ws}' AND status = 'running'"
            ))
            .await;
        max = max.max(running);
        if unfinished(db, ws).await == 0 {
            return (max, true);
        }
        if tokio::time::Instant::now() > end {
            return (max, false);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn an_enterprise_workspace_drains_a_thousand_jobs_in_seconds_and_others_start_at_once() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ent, _) = db.workspace(Tier::Enterprise).await;
    let (other, _) = db.workspace(Tier::Standard).await;
    let workers = Workers::start(
        &db,
        q.clone(),
        db.worker(q.clone(), WorkerConfig::default()),
    );
    let started = tokio::time::Instant::now();
    create(&db, &q, noops(ent, 1000)).await;
    let watch = max_running_while(&db, ent, 30);
    let probes = async {
        let mut latencies = Vec::new();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(60)).await;
            let job = create(&db, &q, noops(other, 1)).await.remove(0);
            latencies.push(start_latency_ms(&db, &job).await);
        }
        latencies
    };
    let ((max_running, drained), mut latencies) = tokio::join!(watch, probes);
    let took = started.elapsed();
    workers.stop().await;
    assert!(drained, "1000 jobs not drained in 30 s");
    // Before parking: ~12 jobs/s, so 1000 took well over a minute.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        max_running <= 20,
        "{max_running} running at once; the limit is 20"
    );
    latencies.sort();
    assert!(
        latencies[2] <= 100,
        "another workspace's jobs waited {latencies:?} ms to start"
    );
    assert!(latencies[4] <= 1000, "{latencies:?}");
    for j in db.store.list(ent, &Default::default()).await.unwrap() {
        assert_eq!(j.attempts, 1, "waiting for a slot uses no attempt");
    }
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT running::int8 FROM workspaces WHERE id = '{ent}'"
        ))
        .await,
        0
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM queue_messages").await,
        0,
        "no message left behind"
    );
}

#[tokio::test]
async fn five_thousand_blocked_jobs_do_not_delay_another_workspace() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (busy, _) = db.workspace(Tier::Standard).await;
    let (other, _) = db.workspace(Tier::Standard).await;
    let workers = Workers::start(
        &db,
        q.clone(),
        db.worker(q.clone(), WorkerConfig::default()),
    );
    let jobs: Vec<NewJob> = (0..5000)
        .map(|_| new_job(busy, "sleep", json!({"ms": 50})))
        .collect();
    create(&db, &q, jobs).await;
    let mut latencies = Vec::new();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let job = create(&db, &q, noops(other, 1)).await.remove(0);
        latencies.push(start_latency_ms(&db, &job).await);
    }
    // The busy workspace's excess waits in the database, not in the queue.
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut messages = i64::MAX;
    while messages > 20 && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        messages = db.scalar_i64("SELECT count(*) FROM queue_messages").await;
    }
    let parked = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM jobs WHERE workspace_id = '{busy}' AND parked_at IS NOT NULL"
        ))
        .await;
    let running = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM jobs WHERE workspace_id = '{busy}' AND status = 'running'"
        ))
        .await;
    workers.stop().await;
    assert!(
        latencies.iter().all(|&ms| ms <= 1000),
        "another workspace's jobs waited {latencies:?} ms"
    );
    assert!(running <= 5, "{running} running; the limit is 5");
    assert!(messages <= 20, "{messages} messages still in the queue");
    assert!(parked > 3000, "only {parked} parked ({running} running)");
}

#[tokio::test]
async fn parked_jobs_start_highest_priority_first() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (free, _) = db.workspace(Tier::Free).await;
    // One job holds the only slot while the others arrive and are parked.
    let first = create(&db, &q, vec![new_job(free, "sleep", json!({"ms": 400}))]).await;
    let workers = Workers::start(
        &db,
        q.clone(),
        db.worker(q.clone(), WorkerConfig::default()),
    );
    db.wait_for_status(first[0].id, JobStatus::Running, Duration::from_secs(5))
        .await;
    let mut rest = Vec::new();
    for prio in [0i16, 5, 10, 1] {
        let mut j = new_job(free, "noop", json!({}));
        j.priority = prio;
        rest.push(j);
    }
    let rest = create(&db, &q, rest).await;
    for j in &rest {
        db.wait_for_status(j.id, JobStatus::Completed, Duration::from_secs(10))
            .await;
    }
    workers.stop().await;
    let mut order: Vec<(chrono::DateTime<Utc>, i16)> = Vec::new();
    for j in &rest {
        let j = db.job(j.id).await;
        order.push((j.started_at.unwrap(), j.priority));
    }
    order.sort();
    let prios: Vec<i16> = order.into_iter().map(|o| o.1).collect();
    assert_eq!(prios, [10, 5, 1, 0]);
}

#[tokio::test]
async fn the_scheduler_releases_parked_jobs_nobody_took() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let (ws, _) = db.workspace(Tier::Standard).await;
    let jobs = db.insert(&noops(ws, 8)).await;
    // Parked with free slots and nothing moving: what a lost wake-up leaves.
    db.scalar_i64(&format!(
        "WITH p AS (UPDATE jobs SET status = 'queued', parked_at = now() \
         WHERE workspace_id = '{ws}' RETURNING 1) SELECT count(*) FROM p"
    ))
    .await;
    let scheduler = |grace: u64| Scheduler {
        store: db.store.clone(),
        queue: q.clone(),
        clock: Clock::System,
        config: SchedulerConfig {
            release_grace: Duration::from_secs(grace),
            ..SchedulerConfig::default()
        },
    };
    // The workspace's slots changed just now (at creation): within the grace
    // nothing is released.
    assert_eq!(scheduler(3600).run_once().await.released, 0);
    let report = scheduler(0).run_once().await;
    assert_eq!(
        report.released, 5,
        "as many as the standard tier's free slots"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM queue_messages").await,
        5
    );
    let queued = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM jobs WHERE workspace_id = '{ws}' \
             AND status = 'queued' AND parked_at IS NULL AND enqueued_at IS NOT NULL"
        ))
        .await;
    assert_eq!(queued, 5);
    // A workspace whose slots are all taken gets nothing.
    db.scalar_i64(&format!(
        "WITH p AS (UPDATE workspaces SET running = 5, \
         slots_changed_at = now() - interval '1 hour' WHERE id = '{ws}' RETURNING 1) \
         SELECT count(*) FROM p"
    ))
    .await;
    assert_eq!(scheduler(0).run_once().await.released, 0);
    assert_eq!(jobs.len(), 8);
}

#[tokio::test]
async fn a_batch_beyond_the_limit_goes_in_parked_with_a_message_per_free_slot() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let app = offload::testing::TestApp::spawn_full(
        db,
        q.clone(),
        Tier::Standard,
        offload::api::ApiSettings::default(),
    )
    .await;
    let body = json!({"jobs": (0..1000).map(|_| json!({"type": "noop"})).collect::<Vec<_>>()});
    let resp = app
        .req("POST", "/jobs/batch")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert!(answer["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["status"] == "queued"));
    let db = &app.db;
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM queue_messages").await,
        5,
        "a message for each free slot, not for each job"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM jobs WHERE parked_at IS NOT NULL")
            .await,
        995
    );
    let workers = Workers::start(db, q.clone(), db.worker(q.clone(), WorkerConfig::default()));
    let (max_running, drained) = max_running_while(db, app.workspace, 30).await;
    workers.stop().await;
    assert!(drained, "never drained");
    assert!(max_running <= 5, "{max_running} running at once");
}

#[tokio::test]
async fn a_workspaces_limit_is_looked_up_once_however_many_of_its_jobs_ask() {
    // The worker asks with one id per finished job; the answer names each
    // workspace once (duplicates made every refill of a full group scan the
    // jobs table for twenty copies of its candidates).
    let db = TestDb::new().await;
    let (ent, _) = db.workspace(Tier::Enterprise).await;
    let (std_ws, _) = db.workspace(Tier::Standard).await;
    let (free_for_all, _) = db.workspace(Tier::Unlimited).await;
    let cache = offload::workspace::LimitCache::default();
    let asked = [ent, std_ws, ent, free_for_all, ent, std_ws];
    for _ in 0..2 {
        // The first call reads the database, the second the cache.
        let mut limits = cache.max_running(&db.pool, &asked).await.unwrap();
        limits.sort();
        let mut want = vec![(ent, 20), (std_ws, 5)];
        want.sort();
        assert_eq!(limits, want);
    }
}
