//! Worker crash: `offload dev` is killed with SIGKILL in the middle of its
//! batches, again and again, and restarted. Every job still ends completed,
//! and the side effects (sequence enrollments, unique per contact) happen
//! exactly once, with each job's result as if it had never been interrupted.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use offload::job::JobStatus;
use offload::testing::{enqueue, new_job, TestDb};
use offload::workspace::Tier;
use serde_json::json;
use uuid::Uuid;

fn start(db: &TestDb, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_offload"))
        .arg("dev")
        .env("DATABASE_URL", &db.url)
        .env("OFFLOAD_BIND", format!("127.0.0.1:{port}"))
        .env("OFFLOAD_LEASE_SECS", "5")
        .env("OFFLOAD_SCHEDULER_INTERVAL_SECS", "1")
        .env("OFFLOAD_BATCH_SIZE", "10")
        .env_remove("OFFLOAD_QUEUE")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start offload dev")
}

#[tokio::test]
async fn killing_the_runner_mid_batch_loses_nothing_and_duplicates_nothing() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let q: Arc<dyn offload::queue::Queue> = Arc::new(db.pg_queue(10));
    let seq = Uuid::now_v7();
    let contacts: Vec<Uuid> = (0..200).map(|_| Uuid::now_v7()).collect();
    let conn = db.pool.get().await.unwrap();
    conn.execute(
        "INSERT INTO sequences (id, workspace_id, name) VALUES ($1, $2, 'crash')",
        &[&seq, &ws.0],
    )
    .await
    .unwrap();
    conn.execute(
        "INSERT INTO contacts (id, workspace_id) SELECT unnest($1::uuid[]), $2",
        &[&contacts, &ws.0],
    )
    .await
    .unwrap();
    drop(conn);
    // 40 subscriptions of 5 distinct contacts each, and 40 slow jobs that
    // keep batches in flight when the kill comes.
    let mut specs: Vec<_> = contacts
        .chunks(5)
        .map(|c| {
            new_job(
                ws,
                "sequence_subscription",
                json!({"sequence_id": seq, "contact_ids": c}),
            )
        })
        .collect();
    specs.extend((0..40).map(|_| new_job(ws, "sleep", json!({"ms": 400, "steps": 4}))));
    let jobs = db.insert(&specs).await;
    enqueue(&db, &*q, &jobs).await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut kills = 0;
    for _ in 0..5 {
        let mut child = start(&db, port);
        tokio::time::sleep(Duration::from_millis(900)).await;
        child.kill().unwrap(); // SIGKILL: no graceful shutdown
        child.wait().unwrap();
        kills += 1;
    }
    let mut child = start(&db, port);
    let end = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let unfinished = db
            .scalar_i64("SELECT count(*) FROM jobs WHERE status <> 'completed'")
            .await;
        if unfinished == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{unfinished} jobs never completed after {kills} kills"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();

    for j in &jobs {
        let j = db.job(j.id).await;
        assert_eq!(j.status, JobStatus::Completed);
        if j.job_type == "sequence_subscription" {
            let r = j.result.unwrap();
            assert_eq!(
                (r["succeeded"].as_u64(), r["blocked"].as_u64()),
                (Some(5), Some(0)),
                "{r}"
            );
        }
    }
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM sequence_enrollments")
            .await,
        200,
        "each contact enrolled once"
    );
    let interrupted = db
        .scalar_i64("SELECT count(*) FROM jobs WHERE attempts > 1")
        .await;
    eprintln!("{kills} kills; {interrupted} jobs needed more than one attempt");
}

#[tokio::test]
async fn a_fan_out_of_100_completes_once_across_kills_of_the_runner() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Standard).await;
    let q: Arc<dyn offload::queue::Queue> = Arc::new(db.pg_queue(10));
    // Children slow enough that kills land while the parent waits and while
    // some of them run.
    let children: Vec<_> = (0..100)
        .map(|i| json!({"type": "sleep", "payload": {"ms": 150 + i % 3 * 50, "steps": 3}}))
        .collect();
    let parent = db
        .insert(&[new_job(ws, "fan_out", json!({"jobs": children}))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&parent)).await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut saw_waiting = false;
    for _ in 0..4 {
        let mut child = start(&db, port);
        tokio::time::sleep(Duration::from_millis(800)).await;
        saw_waiting |= db.job(parent.id).await.status == JobStatus::Waiting;
        child.kill().unwrap(); // SIGKILL: no graceful shutdown
        child.wait().unwrap();
    }
    let mut child = start(&db, port);
    let end = tokio::time::Instant::now() + Duration::from_secs(90);
    let done = loop {
        let j = db.job(parent.id).await;
        if j.status.is_terminal() {
            break j;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the parent never finished: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    child.kill().unwrap();
    child.wait().unwrap();

    assert!(
        saw_waiting,
        "a kill came while the parent waited for its children"
    );
    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    let result = done.result.unwrap();
    assert_eq!(
        (&result["completed"], &result["dead"], &result["cancelled"]),
        (&json!(100), &json!(0), &json!(0)),
        "{result}"
    );
    let results = result["results"].as_array().unwrap();
    assert_eq!(results.len(), 100);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(
            r,
            &json!({"slept_ms": 150 + i % 3 * 50, "steps": 3}),
            "child {i}'s result, in order"
        );
    }
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM jobs WHERE parent_id = '{}' AND status = 'completed'",
            parent.id
        ))
        .await,
        100,
        "one set of children, all completed"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM jobs").await, 101);
}
