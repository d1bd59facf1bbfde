//! `contact_import` against real tables and the storage folder: good and bad
//! rows, files that are not CSV, upserts, and a 100 000-row import that
//! crosses many hand-offs or a crash and still ends with exactly its rows.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use offload::config::WorkerConfig;
use offload::ids::WorkspaceId;
use offload::job::{ErrorKind, JobStatus};
use offload::queue::Queue;
use offload::testing::{enqueue, event_source, new_job, run_until_finished, TestDb};
use offload::workspace::Tier;
use offload::Job;
use serde_json::{json, Value};

async fn run(
    db: &TestDb,
    ws: WorkspaceId,
    payload: Value,
    config: WorkerConfig,
    timeout: Duration,
) -> Job {
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let job = db
        .insert(&[new_job(ws, "contact_import", payload)])
        .await
        .remove(0);
    enqueue(db, &*q, std::slice::from_ref(&job)).await;
    let mut source = event_source(q.clone(), db.worker(q.clone(), config));
    source.invocation_timeout = timeout;
    run_until_finished(db, &source, job.id, Duration::from_secs(120)).await
}

fn mapping() -> Value {
    json!({"email": "Email", "first_name": "First name", "company": "Company", "stage": "Stage"})
}

#[tokio::test]
async fn good_rows_are_imported_and_bad_ones_reported_by_row_and_column() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let csv = "Email,First name,Company,Stage\n\
               ann@acme.io,Ann,Acme,mql\n\
               not-an-address,Bob,,\n\
               ,Carl,,\n\
               dee@acme.io,Dee,,customer\n\
               ann@acme.io,Ann again,,\n\
               eve@acme.io,Eve,,galaxy\n";
    let j = run(
        &db,
        ws,
        json!({"source": {"inline": csv}, "mapping": mapping()}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let r = j.result.clone().unwrap();
    assert_eq!(
        (
            r["rows"].as_u64(),
            r["imported"].as_u64(),
            r["skipped"].as_u64(),
            r["invalid"].as_u64()
        ),
        (Some(6), Some(2), Some(1), Some(3)),
        "{r}"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM contacts").await, 2);
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM contacts WHERE email = 'dee@acme.io' AND stage = 'customer'"
        )
        .await,
        1
    );
    let report = error_report(&db, &j).await;
    assert_eq!(
        report,
        "row,column,reason\n2,email,\"\"\"not-an-address\"\" is not an e-mail address\"\n3,email,e-mail is required\n6,stage,\"unknown stage \"\"galaxy\"\"; use lead, mql, sql, opportunity, customer\"\n"
    );
}

#[tokio::test]
async fn existing_contacts_are_skipped_or_updated_as_asked() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let first = "Email,First name\nann@acme.io,Ann\nbob@acme.io,Bob\n";
    let m = json!({"email": "Email", "first_name": "First name"});
    run(
        &db,
        ws,
        json!({"source": {"inline": first}, "mapping": m}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    let second = "Email,First name\nANN@acme.io,Annie\ncat@acme.io,Cat\n";
    let j = run(
        &db,
        ws,
        json!({"source": {"inline": second}, "mapping": m}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    let r = j.result.unwrap();
    assert_eq!(
        (
            r["imported"].as_u64(),
            r["skipped"].as_u64(),
            r["updated"].as_u64()
        ),
        (Some(1), Some(1), Some(0))
    );
    let j = run(
        &db,
        ws,
        json!({"source": {"inline": second}, "mapping": m, "update_existing": true}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    let r = j.result.unwrap();
    assert_eq!(
        (r["imported"].as_u64(), r["updated"].as_u64()),
        (Some(0), Some(2)),
        "{r}"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM contacts WHERE first_name = 'Annie'")
            .await,
        1
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM contacts").await, 3);
}

#[tokio::test]
async fn a_file_that_is_not_csv_fails_at_once_for_good() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let storage = db.storage();
    let mut binary = b"Email,First name\n".to_vec();
    binary.extend([0u8, 159, 146, 150, 0, 1, 2, 255, 254, b'\n']);
    storage
        .put(
            &format!("workspaces/{ws}/uploads/photo.csv"),
            Bytes::from(binary),
        )
        .await
        .unwrap();
    storage
        .put(
            &format!("workspaces/{ws}/uploads/latin1.csv"),
            Bytes::from(b"Email\nj\xe9r\xf4me@acme.io\n".to_vec()),
        )
        .await
        .unwrap();
    for key in [
        format!("workspaces/{ws}/uploads/photo.csv"),
        format!("workspaces/{ws}/uploads/latin1.csv"),
    ] {
        let j = run(
            &db,
            ws,
            json!({"source": {"object": key}, "mapping": {"email": "Email"}}),
            WorkerConfig::default(),
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(
            (j.status, j.attempts, j.error_kind),
            (JobStatus::Dead, 1, Some(ErrorKind::Permanent)),
            "{key}"
        );
        assert!(
            j.error_message.unwrap().contains("not a CSV text file"),
            "{key}"
        );
    }
    let j = run(
        &db,
        ws,
        json!({"source": {"inline": "Name,Phone\nAnn,1\n"}, "mapping": {"email": "Email"}}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(j.status, JobStatus::Dead);
    assert!(j
        .error_message
        .unwrap()
        .contains("\"Email\" (mapped to email) is not in the header row"));
    let j = run(
        &db,
        ws,
        json!({"source": {"object": format!("workspaces/{ws}/uploads/missing.csv")}, "mapping": {"email": "Email"}}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!((j.status, j.attempts), (JobStatus::Dead, 1));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM contacts").await, 0);
}

fn big_csv(rows: usize) -> Bytes {
    let mut s = String::with_capacity(rows * 40);
    s.push_str("Email,First name,Company,Stage\n");
    for i in 0..rows {
        s.push_str(&format!(
            "person{i}@example{}.com,Person {i},Co {},lead\n",
            i % 97,
            i % 13
        ));
    }
    Bytes::from(s)
}

#[tokio::test]
async fn a_100k_row_import_across_many_hand_offs_has_exactly_its_rows() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    db.storage()
        .put(
            &format!("workspaces/{ws}/uploads/big.csv"),
            big_csv(100_000),
        )
        .await
        .unwrap();
    // Each invocation ends a millisecond into its hand-off margin: one batch each.
    let config = WorkerConfig {
        handoff_margin: Duration::from_secs(1),
        ..WorkerConfig::default()
    };
    let j = run(
        &db,
        ws,
        json!({"source": {"object": format!("workspaces/{ws}/uploads/big.csv")}, "mapping": mapping(), "batch_size": 5000}),
        config,
        Duration::from_millis(1001),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let r = j.result.unwrap();
    assert_eq!(
        (r["imported"].as_u64(), r["invalid"].as_u64()),
        (Some(100_000), Some(0)),
        "{r}"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM contacts").await,
        100_000
    );
    assert_eq!(
        db.scalar_i64("SELECT count(DISTINCT lower(email)) FROM contacts")
            .await,
        100_000
    );
    let hand_offs = db
        .scalar_i64("SELECT count(*) FROM job_logs WHERE message LIKE 'handed off%'")
        .await;
    assert!(hand_offs >= 10, "only {hand_offs} hand-offs");
    assert_eq!(j.attempts, 1);
}

#[tokio::test]
async fn an_import_killed_mid_way_resumes_to_the_same_rows() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    db.storage()
        .put(&format!("workspaces/{ws}/uploads/mid.csv"), big_csv(30_000))
        .await
        .unwrap();
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let job = db
        .insert(&[new_job(ws, "contact_import", json!({"source": {"object": format!("workspaces/{ws}/uploads/mid.csv")}, "mapping": mapping(), "batch_size": 500}))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    // A worker that dies (its task is dropped) after a few batches.
    let dying = WorkerConfig {
        lease: Duration::from_secs(1),
        heartbeat: Duration::from_millis(250),
        ..WorkerConfig::default()
    };
    let source = event_source(q.clone(), db.worker(q.clone(), dying));
    let task = tokio::spawn(async move { source.drain().await });
    loop {
        let n = db.scalar_i64("SELECT count(*) FROM contacts").await;
        if n >= 3000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    task.abort();
    let _ = task.await;
    let done_before = db.scalar_i64("SELECT count(*) FROM contacts").await;
    assert!(done_before < 30_000, "it finished before the crash");
    // The lease expires; a fresh worker takes the job over from its checkpoint.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let healthy = event_source(q.clone(), db.worker(q.clone(), WorkerConfig::default()));
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while !db.job(job.id).await.status.is_terminal() {
        assert!(tokio::time::Instant::now() < end);
        let scheduler = offload::scheduler::Scheduler {
            store: db.store.clone(),
            queue: q.clone(),
            clock: offload::clock::Clock::System,
            config: Default::default(),
        };
        scheduler.run_once().await;
        healthy.drain().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let j = db.job(job.id).await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    assert_eq!(j.attempts, 2, "resumed by a second attempt");
    let r = j.result.unwrap();
    assert_eq!(
        (r["imported"].as_u64(), r["skipped"].as_u64()),
        (Some(30_000), Some(0)),
        "{r}"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM contacts").await, 30_000);
}

#[tokio::test]
async fn a_report_longer_than_a_page_lists_every_bad_row_once_in_order() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    // 12 000 rows without an e-mail: more than two pages of the report.
    let mut csv = String::from("Email,First name\n");
    for i in 0..12_000 {
        csv.push_str(&format!(",Person {i}\n"));
    }
    db.storage()
        .put(&format!("workspaces/{ws}/many-bad.csv"), Bytes::from(csv))
        .await
        .unwrap();
    let j = run(
        &db,
        ws,
        json!({"source": {"object": format!("workspaces/{ws}/many-bad.csv")}, "mapping": {"email": "Email", "first_name": "First name"}}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let r = j.result.clone().unwrap();
    assert_eq!(r["invalid"].as_u64(), Some(12_000));
    let report = error_report(&db, &j).await;
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines.len(), 12_001, "a header and one line per bad row");
    assert_eq!(lines[0], "row,column,reason");
    for (i, line) in lines[1..].iter().enumerate() {
        assert_eq!(
            *line,
            format!("{},email,e-mail is required", i + 1),
            "line {}",
            i + 1
        );
    }
}

/// The job's error report, after checking its result names it.
async fn error_report(db: &TestDb, j: &offload::Job) -> String {
    let r = j.result.as_ref().unwrap();
    assert_eq!(r["files"], json!(["errors.csv"]), "{r}");
    assert_eq!(
        r["error_report_url"],
        offload::storage::job_file_path(j.workspace_id, j.id, "errors.csv")
    );
    let key = offload::storage::job_file_key(j.workspace_id, j.id, "errors.csv");
    let mut s = db.storage().get_stream(&key).await.unwrap();
    let mut out = Vec::new();
    while let Some(c) = futures::StreamExt::next(&mut s).await {
        out.extend_from_slice(&c.unwrap());
    }
    String::from_utf8(out).unwrap()
}
