//! `bulk_export` into a storage folder and into S3 (moto's server): the
//! rows matching the filters, the chosen fields, CSV or JSON lines, across
//! hand-offs, downloaded through the API's files route.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use offload::config::WorkerConfig;
use offload::handlers::Registry;
use offload::ids::WorkspaceId;
use offload::job::JobStatus;
use offload::queue::Queue;
use offload::storage::Storage;
use offload::testing::{
    enqueue, event_source, new_job, run_until_finished, s3_bucket, TestApp, TestDb,
};
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
    assert_eq!(
        r["download_url"],
        offload::storage::job_file_path(ws, j.id, "contacts.csv")
    );
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

/// The API over `storage`, and a finished export of 40 contacts made by a
/// worker writing to the same storage.
async fn exported(storage: Storage) -> (TestApp, Job) {
    let db = TestDb::new().await;
    let queue: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let app =
        TestApp::spawn_state(db, queue, Tier::Unlimited, |s| s.storage = storage.clone()).await;
    seed(&app.db, app.workspace, 40).await;
    let j = run(
        &app.db,
        app.workspace,
        storage,
        json!({"fields": ["email"]}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    (app, j)
}

#[tokio::test]
async fn an_export_to_s3_is_downloaded_through_a_link_made_when_asked() {
    let storage = s3_bucket().await;
    let (app, j) = exported(storage.clone()).await;
    let r = j.result.clone().unwrap();
    let path = format!(
        "/api/workspaces/{}/jobs/{}/files/contacts.csv",
        app.workspace, j.id
    );
    assert_eq!(r["download_url"], path);
    assert_eq!(r["files"], json!(["contacts.csv"]));
    assert!(
        r["key"]
            .as_str()
            .unwrap()
            .starts_with(&format!("workspaces/{}/", app.workspace)),
        "{r}"
    );

    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get_as = |token: String| {
        no_redirects
            .get(format!("{}{path}", app.base))
            .bearer_auth(token)
            .send()
    };
    let resp = get_as(app.token.clone()).await.unwrap();
    assert_eq!(resp.status(), 302);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let link = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(
        link.contains("X-Amz-Signature") && link.contains("X-Amz-Expires=300"),
        "a link valid for five minutes, made now: {link}"
    );
    let body = reqwest::get(&link).await.unwrap();
    assert!(body.status().is_success(), "{}", body.status());
    assert_eq!(
        body.text().await.unwrap().lines().count(),
        41,
        "header and 40 rows"
    );

    // Someone outside the workspace learns nothing, with or without the path.
    let stranger = offload::testing::token(offload::ids::UserId::new());
    assert_eq!(get_as(stranger).await.unwrap().status(), 404);

    // Once the file is gone (the bucket's lifecycle), the answer says so.
    storage.delete(r["key"].as_str().unwrap()).await.unwrap();
    let resp = get_as(app.token.clone()).await.unwrap();
    assert_eq!(resp.status(), 410);
    let problem: Value = resp.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("no longer kept"),
        "{problem}"
    );
}

#[tokio::test]
async fn on_local_storage_the_api_serves_the_file_itself_and_only_the_jobs_own() {
    let folder = std::env::temp_dir().join(format!("offload-files-{}", uuid::Uuid::new_v4()));
    let (app, j) = exported(Storage::local(folder).unwrap()).await;
    let files = format!("/jobs/{}/files", j.id);
    let resp = app
        .req("GET", &format!("{files}/contacts.csv"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/csv; charset=utf-8");
    assert_eq!(
        resp.headers()["content-disposition"],
        "attachment; filename=\"contacts.csv\""
    );
    let text = resp.text().await.unwrap();
    assert_eq!(text.lines().next(), Some("email"));
    assert_eq!(text.lines().count(), 41);

    // Only what the job's result lists: not its chunks, not another name.
    for name in ["chunks", "contacts.jsonl", ".env", "errors.csv"] {
        let resp = app
            .req("GET", &format!("{files}/{name}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{name}");
    }
    let other = app
        .db
        .insert(&[new_job(app.workspace, "noop", json!({}))])
        .await;
    let resp = app
        .req("GET", &format!("/jobs/{}/files/contacts.csv", other[0].id))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "a job without files");
}
