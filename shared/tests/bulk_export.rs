//! `bulk_export` into a storage folder and into S3 (moto's server): the
//! rows matching the filters, the chosen fields, CSV, JSON lines or .xlsx, across
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

/// A workbook's sheet names and the rows of all its sheets, in order.
async fn read_xlsx(storage: &Storage, key: &str) -> (Vec<String>, Vec<Vec<calamine::Data>>) {
    use calamine::Reader;
    let mut s = storage.get_stream(key).await.unwrap();
    let mut bytes = Vec::new();
    while let Some(c) = s.next().await {
        bytes.extend_from_slice(&c.unwrap());
    }
    let mut book: calamine::Xlsx<_> =
        calamine::open_workbook_from_rs(std::io::Cursor::new(bytes)).expect("a valid .xlsx");
    let names = book.sheet_names();
    let mut rows = Vec::new();
    for n in &names {
        let range = book.worksheet_range(n).unwrap();
        rows.extend(range.rows().map(|r| r.to_vec()));
    }
    (names, rows)
}

#[tokio::test]
async fn an_export_to_xlsx_holds_every_row_once_with_typed_cells_across_hand_offs() {
    use calamine::Data;
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    seed(&db, ws, 25_000).await;
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE contacts SET first_name = '=HYPERLINK(\"http://evil\")', \
               estimated_value = 1234.5 WHERE email = 'p4@acme.io'",
            &[],
        )
        .await
        .unwrap();
    let storage = db.storage();
    let config = WorkerConfig {
        handoff_margin: Duration::from_secs(1),
        ..WorkerConfig::default()
    };
    let fields = [
        "email",
        "first_name",
        "score",
        "estimated_value",
        "created_at",
    ];
    let j = run(
        &db,
        ws,
        storage.clone(),
        json!({"format": "xlsx", "filters": {"stage": "customer"}, "fields": fields}),
        config,
        Duration::from_millis(1001),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let r = j.result.unwrap();
    assert_eq!(r["rows"], 12_500);
    assert_eq!(r["files"], json!(["contacts.xlsx"]));
    assert!(
        db.scalar_i64("SELECT count(*) FROM job_logs WHERE message LIKE 'handed off%'")
            .await
            >= 1
    );
    let (sheets, rows) = read_xlsx(&storage, r["key"].as_str().unwrap()).await;
    assert_eq!(sheets, ["Contacts"]);
    let header: Vec<String> = rows[0].iter().map(|c| c.to_string()).collect();
    assert_eq!(header, fields);
    let data = &rows[1..];
    assert_eq!(data.len(), 12_500, "one row per matching contact");
    let emails: std::collections::HashSet<String> = data.iter().map(|r| r[0].to_string()).collect();
    let want: std::collections::HashSet<String> = (1..=25_000)
        .filter(|i| i % 2 == 0)
        .map(|i| format!("p{i}@acme.io"))
        .collect();
    assert_eq!(emails, want, "each customer exactly once");
    let row = |email: &str| data.iter().find(|r| r[0] == email).unwrap();
    assert_eq!(row("p2@acme.io")[1], Data::String("P, \"2\"".into()));
    assert_eq!(
        row("p2@acme.io")[2],
        Data::Float(2.0),
        "a score is a number"
    );
    assert_eq!(row("p2@acme.io")[3], Data::Empty, "null is an empty cell");
    let p4 = row("p4@acme.io");
    assert_eq!(
        p4[1],
        Data::String("=HYPERLINK(\"http://evil\")".into()),
        "text that looks like a formula stays text"
    );
    assert_eq!(p4[3], Data::Float(1234.5));
    let Data::DateTime(t) = &p4[4] else {
        panic!("created_at is a date and time: {:?}", p4[4])
    };
    let age = chrono::Utc::now().naive_utc() - t.as_datetime().unwrap();
    assert!(age.num_minutes().abs() < 60, "created_at {t:?}");
}

#[tokio::test]
async fn an_xlsx_export_goes_to_s3_in_parts_and_an_empty_one_keeps_its_header() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    seed(&db, ws, 40).await;
    let storage = s3_bucket().await;
    let j = run(
        &db,
        ws,
        storage.clone(),
        json!({"format": "xlsx", "fields": ["email", "stage"]}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let r = j.result.unwrap();
    let (_, rows) = read_xlsx(&storage, r["key"].as_str().unwrap()).await;
    assert_eq!(rows.len(), 41);
    assert_eq!(
        rows.iter().skip(1).filter(|r| r[1] == "customer").count(),
        20
    );
    let j = run(
        &db,
        ws,
        storage.clone(),
        json!({"format": "xlsx", "filters": {"tag": "nobody"}}),
        WorkerConfig::default(),
        Duration::from_secs(60),
    )
    .await;
    let r = j.result.unwrap();
    assert_eq!(r["rows"], 0);
    let (sheets, rows) = read_xlsx(&storage, r["key"].as_str().unwrap()).await;
    assert_eq!(sheets, ["Contacts"]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][0].to_string(), "id");
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
