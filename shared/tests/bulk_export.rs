//! `bulk_export` into a storage folder and into S3 (moto's server): the
//! rows matching the filters, the chosen fields, CSV or JSON lines, across
//! hand-offs, with a download link that works.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use offload::config::WorkerConfig;
use offload::handlers::Registry;
use offload::ids::WorkspaceId;
use offload::job::JobStatus;
use offload::queue::Queue;
use offload::storage::Storage;
use offload::testing::{enqueue, event_source, new_job, run_until_finished, sqs_endpoint, TestDb};
use offload::workspace::Tier;
use offload::Job;
use serde_json::{json, Value};

async fn seed(db: &TestDb, ws: WorkspaceId, n: i32) {
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO contacts (id, workspace_id, email, first_name, stage, score) \
             SELECT gen_random_uuid(), $1, 'p' || i || '@acme.io', 'P, \"' || i || '\"', \
               CASE WHEN i % 2 = 0 THEN 'customer' ELSE 'lead' END, i % 100 \
             FROM generate_series(1, $2) AS i",
            &[&ws.0, &n],
        )
        .await
        .unwrap();
}

async fn run(
    db: &TestDb,
    ws: WorkspaceId,
    storage: Storage,
    payload: Value,
    config: WorkerConfig,
    timeout: Duration,
) -> Job {
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let job = db
        .insert(&[new_job(ws, "bulk_export", payload)])
        .await
        .remove(0);
    enqueue(db, &*q, std::slice::from_ref(&job)).await;
    let worker = db
        .worker_with(q.clone(), config, Registry::builtin())
        .with_storage(storage);
    let mut source = event_source(q.clone(), worker);
    source.invocation_timeout = timeout;
    run_until_finished(db, &source, job.id, Duration::from_secs(60)).await
}

async fn read_all(storage: &Storage, key: &str) -> String {
    let mut s = storage.get_stream(key).await.unwrap();
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn an_export_writes_the_matching_rows_as_csv_across_hand_offs() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let (other, _) = db.workspace(Tier::Unlimited).await;
    seed(&db, ws, 25_000).await;
    seed(&db, other, 10).await;
    let storage = db.storage();
    let config = WorkerConfig {
        handoff_margin: Duration::from_secs(1),
        ..WorkerConfig::default()
    };
    let j = run(
        &db,
        ws,
        storage.clone(),
        json!({"filters": {"stage": "customer"}, "fields": ["email", "first_name", "score"]}),
        config,
        Duration::from_millis(1001),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let r = j.result.unwrap();
    assert_eq!(r["rows"], 12_500);
    assert!(
        db.scalar_i64("SELECT count(*) FROM job_logs WHERE message LIKE 'handed off%'")
            .await
            >= 1
    );
    let text = read_all(&storage, r["key"].as_str().unwrap()).await;
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    assert_eq!(
        reader.headers().unwrap().iter().collect::<Vec<_>>(),
        ["email", "first_name", "score"]
    );
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    assert_eq!(
        rows.len(),
        12_500,
        "one row per matching contact, no header repeated"
    );
    let first = rows.iter().find(|r| &r[0] == "p2@acme.io").unwrap();
    assert_eq!(
        (&first[1], &first[2]),
        ("P, \"2\"", "2"),
        "quotes and commas survive"
    );
    assert!(r["download_url"].as_str().unwrap().starts_with("file://"));
}

#[tokio::test]
async fn an_export_can_be_json_lines_and_can_be_empty() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    seed(&db, ws, 30).await;
    let storage = db.storage();
    let j = run(
        &db,
        ws,
        storage.clone(),
        json!({"format": "jsonl", "filters": {"min_score": 25}, "fields": ["email", "score"]}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    let r = j.result.unwrap();
    let text = read_all(&storage, r["key"].as_str().unwrap()).await;
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert!(lines
        .iter()
        .all(|l| l["score"].as_i64().unwrap() >= 25 && l.as_object().unwrap().len() == 2));
    let j = run(
        &db,
        ws,
        storage.clone(),
        json!({"filters": {"tag": "nobody"}}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    let r = j.result.unwrap();
    assert_eq!(r["rows"], 0);
    assert!(read_all(&storage, r["key"].as_str().unwrap())
        .await
        .starts_with("id,email,"));
}

#[tokio::test]
async fn an_export_to_s3_gives_a_presigned_link_that_downloads_the_file() {
    let endpoint = sqs_endpoint();
    let bucket = format!(
        "exports-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let created = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .unwrap();
    assert!(
        created.status().is_success(),
        "create bucket: {}",
        created.status()
    );
    let storage = Storage::s3(&bucket, "us-east-1", Some(&endpoint)).unwrap();
    storage
        .put("probe.txt", Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert_eq!(read_all(&storage, "probe.txt").await, "hello");

    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    seed(&db, ws, 40).await;
    let j = run(
        &db,
        ws,
        storage.clone(),
        json!({"fields": ["email"]}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let r = j.result.unwrap();
    let url = r["download_url"].as_str().unwrap();
    assert!(
        url.contains("X-Amz-Signature") && url.contains("X-Amz-Expires=86400"),
        "{url}"
    );
    let body = reqwest::get(url).await.unwrap();
    assert!(body.status().is_success(), "{}", body.status());
    let text = body.text().await.unwrap();
    assert_eq!(text.lines().count(), 41, "header and 40 rows");
}
