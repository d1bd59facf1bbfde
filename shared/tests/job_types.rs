//! The built-in bulk job types against real tables: happy paths, blocked
//! and invalid cases, resumption after a hand-off, and cancellation.

use std::sync::Arc;
use std::time::Duration;

use offload::config::WorkerConfig;
use offload::enqueue::send_jobs;
use offload::ids::WorkspaceId;
use offload::job::JobStatus;
use offload::queue::Queue;
use offload::testing::{event_source, new_job, run_until_finished, TestDb};
use offload::workspace::Tier;
use offload::Job;
use serde_json::{json, Value};
use uuid::Uuid;

/// Inserts `n` contacts (e-mail `<prefix><i>@acme.io`) and returns their ids in order.
async fn contacts_named(db: &TestDb, ws: WorkspaceId, prefix: &str, n: usize) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    let emails: Vec<String> = (0..n).map(|i| format!("{prefix}{i}@acme.io")).collect();
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO contacts (id, workspace_id, email) SELECT * FROM unnest($1::uuid[], array_fill($2::uuid, ARRAY[$4::int]), $3::text[])",
            &[&ids, &ws.0, &emails, &(n as i32)],
        )
        .await
        .unwrap();
    ids
}

async fn contacts(db: &TestDb, ws: WorkspaceId, n: usize) -> Vec<Uuid> {
    contacts_named(db, ws, "c", n).await
}

async fn exec(db: &TestDb, sql: &str) {
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute(sql)
        .await
        .unwrap();
}

/// Creates and runs one job to its end; returns it.
async fn run(
    db: &TestDb,
    ws: WorkspaceId,
    job_type: &str,
    payload: Value,
    config: WorkerConfig,
    timeout: Duration,
) -> Job {
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let job = db.insert(&[new_job(ws, job_type, payload)]).await.remove(0);
    send_jobs(&db.store, &*q, &[&job], chrono::Utc::now())
        .await
        .unwrap();
    let mut source = event_source(q.clone(), db.worker(q.clone(), config));
    source.invocation_timeout = timeout;
    run_until_finished(db, &source, job.id, Duration::from_secs(30)).await
}

#[tokio::test]
async fn subscribing_contacts_enrolls_the_eligible_and_explains_the_rest() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let ids = contacts(&db, ws, 92).await;
    let seq = Uuid::now_v7();
    let other_seq = Uuid::now_v7();
    exec(&db, &format!(
        "INSERT INTO sequences (id, workspace_id, name) VALUES ('{seq}', '{ws}', 'Welcome'), ('{other_seq}', '{ws}', 'Other');
         UPDATE contacts SET opted_out = true WHERE id = '{}';
         INSERT INTO do_not_contact (workspace_id, email) VALUES ('{ws}', 'c1@acme.io');
         INSERT INTO sequence_enrollments (sequence_id, contact_id, workspace_id) VALUES ('{seq}', '{}', '{ws}');
         INSERT INTO sequence_enrollments (sequence_id, contact_id, workspace_id) VALUES ('{other_seq}', '{}', '{ws}');",
        ids[0], ids[2], ids[3]
    )).await;
    let stranger = Uuid::now_v7();
    let mut payload_ids = ids.clone();
    payload_ids.push(stranger);
    payload_ids.push(ids[5]); // a duplicate in the payload counts once
    let j = run(
        &db,
        ws,
        "sequence_subscription",
        json!({"sequence_id": seq, "contact_ids": payload_ids}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed);
    let r = j.result.unwrap();
    assert_eq!(
        (
            r["succeeded"].as_u64(),
            r["blocked"].as_u64(),
            r["failed"].as_u64()
        ),
        (Some(89), Some(3), Some(1)),
        "{r}"
    );
    let reasons: Vec<(String, String)> = r["blocked_reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["contact_id"].as_str().unwrap().to_string(),
                b["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            (ids[0].to_string(), "opted_out".to_string()),
            (ids[1].to_string(), "do_not_contact".to_string()),
            (ids[2].to_string(), "already_enrolled".to_string()),
        ]
    );
    assert_eq!(r["failed_reasons"][0]["contact_id"], stranger.to_string());
    assert_eq!(j.progress.processed + j.progress.failed, 93);
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM sequence_enrollments WHERE sequence_id = '{seq}'"
        ))
        .await,
        90
    );

    // Running the same subscription again enrolls nobody twice.
    let again = run(
        &db,
        ws,
        "sequence_subscription",
        json!({"sequence_id": seq, "contact_ids": ids}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(again.result.unwrap()["succeeded"], 0);
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM sequence_enrollments WHERE sequence_id = '{seq}'"
        ))
        .await,
        90
    );
}

#[tokio::test]
async fn a_subscription_handed_off_between_batches_ends_with_the_same_result() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let ids = contacts(&db, ws, 950).await;
    let seq = Uuid::now_v7();
    exec(
        &db,
        &format!("INSERT INTO sequences (id, workspace_id, name) VALUES ('{seq}', '{ws}', 'S')"),
    )
    .await;
    // Each invocation ends a millisecond after its hand-off margin starts:
    // one batch per invocation (the first check of a run never hands off).
    let config = WorkerConfig {
        handoff_margin: Duration::from_secs(1),
        ..WorkerConfig::default()
    };
    let j = run(
        &db,
        ws,
        "sequence_subscription",
        json!({"sequence_id": seq, "contact_ids": ids}),
        config,
        Duration::from_millis(1001),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed);
    assert_eq!(j.result.unwrap()["succeeded"], 950);
    assert_eq!(j.attempts, 1);
    assert!(
        db.scalar_i64("SELECT count(*) FROM job_logs WHERE message LIKE 'handed off%'")
            .await
            >= 9
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM sequence_enrollments")
            .await,
        950
    );
}

#[tokio::test]
async fn subscription_payloads_are_checked_at_creation() {
    let reg = offload::handlers::Registry::builtin();
    let too_many: Vec<Uuid> = (0..1001).map(|_| Uuid::now_v7()).collect();
    let e = reg
        .validate(
            "sequence_subscription",
            &json!({"sequence_id": Uuid::now_v7(), "contact_ids": too_many}),
            offload::ids::WorkspaceId::new(),
        )
        .unwrap_err();
    assert_eq!(e.field.as_deref(), Some("contact_ids"));
    let e = reg
        .validate(
            "sequence_subscription",
            &json!({"sequence_id": "x", "contact_ids": []}),
            offload::ids::WorkspaceId::new(),
        )
        .unwrap_err();
    assert_eq!(e.field.as_deref(), Some("sequence_id"));
    let e = reg
        .validate(
            "sequence_subscription",
            &json!({"sequence_id": Uuid::now_v7(), "contact_ids": [Uuid::now_v7()], "extra": 1}),
            offload::ids::WorkspaceId::new(),
        )
        .unwrap_err();
    assert!(e.message.contains("extra"), "{e}");
}

#[tokio::test]
async fn an_unknown_sequence_fails_for_good() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let ids = contacts(&db, ws, 3).await;
    let j = run(
        &db,
        ws,
        "sequence_subscription",
        json!({"sequence_id": Uuid::now_v7(), "contact_ids": ids}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!((j.status, j.attempts), (JobStatus::Dead, 1));
    assert!(j.error_message.unwrap().contains("does not exist"));
}

#[tokio::test]
async fn bulk_tag_adds_and_removes_and_a_cancel_stops_it_with_its_partial_count() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let ids = contacts(&db, ws, 50).await;
    let j = run(
        &db,
        ws,
        "bulk_tag",
        json!({"contact_ids": ids, "add": ["vip", "q4"]}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM contact_tags").await,
        100
    );
    let j = run(
        &db,
        ws,
        "bulk_tag",
        json!({"contact_ids": ids, "remove": ["q4"], "add": ["vip"]}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        j.result.unwrap()["changed"],
        50,
        "vip was already there; q4 removed from 50"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM contact_tags WHERE tag = 'q4'")
            .await,
        0
    );

    // A long one, one contact per batch, cancelled while it runs.
    let many = contacts_named(&db, ws, "m", 3000).await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let job = db
        .insert(&[new_job(
            ws,
            "bulk_tag",
            json!({"contact_ids": many, "add": ["slow"], "batch_size": 1}),
        )])
        .await
        .remove(0);
    send_jobs(&db.store, &*q, &[&job], chrono::Utc::now())
        .await
        .unwrap();
    let source = event_source(q.clone(), db.worker(q.clone(), WorkerConfig::default()));
    let running = tokio::spawn(async move { source.drain().await });
    db.wait_for_status(job.id, JobStatus::Running, Duration::from_secs(5))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    db.store
        .request_cancel(ws, job.id, chrono::Utc::now())
        .await
        .unwrap();
    running.await.unwrap();
    let j = db.job(job.id).await;
    assert_eq!(j.status, JobStatus::Cancelled);
    let processed = j.result.unwrap()["processed"].as_i64().unwrap();
    assert!((1..3000).contains(&processed), "processed {processed}");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM contact_tags WHERE tag = 'slow'")
            .await,
        processed,
        "the count matches what was done"
    );
}

#[tokio::test]
async fn bulk_delete_deletes_only_this_workspaces_contacts() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let (other, _) = db.workspace(Tier::Unlimited).await;
    let mine = contacts(&db, ws, 20).await;
    let theirs = contacts(&db, other, 5).await;
    let mut ids = mine.clone();
    ids.extend(&theirs);
    let j = run(
        &db,
        ws,
        "bulk_delete",
        json!({"contact_ids": ids, "batch_size": 7}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(j.result.unwrap()["deleted"], 20);
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM contacts WHERE workspace_id = '{other}'"
        ))
        .await,
        5
    );
}

#[tokio::test]
async fn lead_scoring_scores_a_whole_workspace() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let ids = contacts(&db, ws, 1200).await;
    exec(&db, &format!(
        "UPDATE contacts SET phone = '1', company = 'Acme', title = 'CTO', estimated_value = 60000, stage = 'customer', last_activity_at = now() WHERE id = '{}'",
        ids[0]
    )).await;
    let j = run(
        &db,
        ws,
        "lead_scoring",
        json!({}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(j.result.unwrap()["scored"], 1200);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM contacts WHERE score = 25")
            .await,
        1199,
        "e-mail on a corporate domain"
    );
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT score::int8 FROM contacts WHERE id = '{}'",
            ids[0]
        ))
        .await,
        140
    );
    let one = run(
        &db,
        ws,
        "lead_scoring",
        json!({"contact_id": Uuid::now_v7()}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(one.status, JobStatus::Dead);
}

#[test]
fn the_bulk_limit_is_configurable() {
    use offload::handlers::{BulkTag, Registry};
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    let payload = json!({"contact_ids": ids, "add": ["x"]});
    assert!(Registry::builtin()
        .validate("bulk_tag", &payload, offload::ids::WorkspaceId::new())
        .is_ok());
    let small = Registry::builtin().with(BulkTag { max_contacts: 10 });
    let e = small
        .validate("bulk_tag", &payload, offload::ids::WorkspaceId::new())
        .unwrap_err();
    assert_eq!(e.field.as_deref(), Some("contact_ids"));
    assert!(e.message.contains("1 to 10"), "{e}");
}
