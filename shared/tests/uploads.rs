//! Files scoped to their workspace: uploads through a short-lived URL (a
//! presigned PUT on moto's S3, the signed route on local storage), imports
//! that read only their own workspace's files, and links no one can bend
//! to another key.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use offload::config::WorkerConfig;
use offload::handlers::Registry;
use offload::ids::JobId;
use offload::job::JobStatus;
use offload::queue::Queue;
use offload::storage::Storage;
use offload::testing::{
    event_source, expect_problem, run_until_finished, s3_bucket, TestApp, TestDb,
};
use offload::workspace::Tier;
use reqwest::StatusCode;
use serde_json::{json, Value};

const CSV: &str = "Email,First name\nann@acme.io,Ann\nbob@acme.io,Bob\nnot-an-email,Carl\n";

async fn app_with(storage: Option<Storage>, max_upload: Option<u64>) -> TestApp {
    let db = TestDb::new().await;
    let queue: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    TestApp::spawn_state(db, queue, Tier::Enterprise, |s| {
        if let Some(st) = storage {
            s.storage = st;
        }
        if let Some(m) = max_upload {
            s.settings.max_upload_bytes = m;
        }
    })
    .await
}

async fn new_upload(app: &TestApp, filename: &str) -> Value {
    ask_upload(
        app,
        json!({"filename": filename, "content_type": "text/csv"}),
    )
    .await
}

/// A link for a file of `size` bytes.
async fn new_sized_upload(app: &TestApp, filename: &str, size: usize) -> Value {
    ask_upload(
        app,
        json!({"filename": filename, "content_type": "text/csv", "size": size}),
    )
    .await
}

async fn ask_upload(app: &TestApp, body: Value) -> Value {
    let resp = app
        .req("POST", "/uploads")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "{body}");
    resp.json().await.unwrap()
}

/// The object's bytes.
async fn read_all(storage: &Storage, key: &str) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut s = storage.get_stream(key).await.unwrap();
    while let Some(c) = futures::StreamExt::next(&mut s).await {
        kept.extend_from_slice(&c.unwrap());
    }
    kept
}

/// Sends `body` as the upload answer says (an absolute URL, or a path of
/// the API), with no credentials but the link's own.
async fn send(app: &TestApp, upload: &Value, body: Vec<u8>) -> reqwest::Response {
    let url = upload["url"].as_str().unwrap();
    let url = if url.starts_with('/') {
        format!("{}{url}", app.base)
    } else {
        url.to_string()
    };
    let mut req = reqwest::Client::new().put(url).body(body);
    for (k, v) in upload["headers"].as_object().unwrap() {
        req = req.header(k, v.as_str().unwrap());
    }
    req.send().await.unwrap()
}

/// Creates an import of `key` through the API and runs it with a worker on
/// `storage`.
async fn import(app: &TestApp, storage: Storage, key: &str) -> offload::Job {
    let resp = app
        .create_job(json!({"type": "contact_import", "payload": {
            "source": {"object": key}, "mapping": {"email": "Email", "first_name": "First name"}}}))
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let id: JobId = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let worker = app
        .db
        .worker_with(
            app.queue.clone(),
            WorkerConfig::default(),
            Registry::builtin(),
        )
        .with_storage(storage);
    let source = event_source(app.queue.clone(), worker);
    run_until_finished(&app.db, &source, id, Duration::from_secs(60)).await
}

#[tokio::test]
async fn a_file_uploaded_to_s3_through_its_presigned_url_is_imported() {
    let storage = s3_bucket().await;
    let app = app_with(Some(storage.clone()), None).await;
    let up = new_sized_upload(&app, "contacts.csv", CSV.len()).await;
    let key = up["key"].as_str().unwrap();
    assert!(
        key.starts_with(&format!("workspaces/{}/uploads/", app.workspace)),
        "{key}"
    );
    assert_eq!(up["method"], "PUT");
    assert_eq!(up["max_bytes"], 100 << 20);
    assert!(
        up["url"].as_str().unwrap().contains("X-Amz-Signature"),
        "{up}"
    );
    let sent = send(&app, &up, CSV.as_bytes().to_vec()).await;
    assert!(sent.status().is_success(), "{}", sent.status());

    let j = import(&app, storage, key).await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let result = j.result.unwrap();
    assert_eq!(
        (result["imported"].clone(), result["invalid"].clone()),
        (json!(2), json!(1))
    );
}

#[tokio::test]
async fn on_local_storage_the_signed_route_takes_the_file_once_within_the_limit() {
    let app = app_with(None, Some(1024)).await;
    let storage = app.db.storage();
    let up = new_upload(&app, "contacts.csv").await;
    let key = up["key"].as_str().unwrap().to_string();

    // Too large: refused, nothing kept, and the link still usable.
    let big = send(&app, &up, vec![b'a'; 4096]).await;
    let body = expect_problem(big, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert!(body["detail"].as_str().unwrap().contains("1024"), "{body}");
    assert!(!storage.exists(&key).await.unwrap());

    let sent = send(&app, &up, CSV.as_bytes().to_vec()).await;
    assert_eq!(sent.status(), StatusCode::CREATED);
    // A kept file is never overwritten through its link.
    let again = send(&app, &up, b"Email\nevil@x.io\n".to_vec()).await;
    expect_problem(again, StatusCode::CONFLICT).await;

    let j = import(&app, storage, &key).await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    assert_eq!(j.result.unwrap()["imported"], 2);
}

#[tokio::test]
async fn no_link_or_key_reaches_another_workspaces_files() {
    let app = app_with(None, None).await;
    let storage = app.db.storage();
    let (other, _) = app.db.workspace(Tier::Enterprise).await;
    let theirs =
        format!("workspaces/{other}/uploads/0190a1b2-0000-7000-8000-000000000001/secret.csv");
    storage
        .put(&theirs, bytes::Bytes::from_static(b"Email\nceo@other.io\n"))
        .await
        .unwrap();

    // Importing their key, or one that climbs out of ours, or a bare key:
    // refused at creation, naming the field.
    for key in [
        theirs.clone(),
        format!(
            "workspaces/{}/../{other}/uploads/x/secret.csv",
            app.workspace
        ),
        format!("workspaces/{}//secret.csv", app.workspace),
        "uploads/secret.csv".to_string(),
    ] {
        let resp = app
            .create_job(json!({"type": "contact_import", "payload": {
                "source": {"object": key}, "mapping": {"email": "Email"}}}))
            .await;
        let body = expect_problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(body["field"], "payload.source.object", "{key}: {body}");
    }

    // Our own upload link bent to their workspace, another name, or a later
    // expiry: refused, and nothing written.
    let up = new_upload(&app, "mine.csv").await;
    let url = up["url"].as_str().unwrap().to_string();
    let bent = [
        url.replace(&app.workspace.to_string(), &other.to_string()),
        url.replace("mine.csv", "secret.csv"),
        {
            let (head, _) = url.split_once("expires=").unwrap();
            let sig = url.split_once("&signature=").unwrap().1;
            format!("{head}expires=9999999999&signature={sig}")
        },
        url.split_once('?').unwrap().0.to_string(),
    ];
    for u in bent {
        let resp = reqwest::Client::new()
            .put(format!("{}{u}", app.base))
            .body("Email\nevil@x.io\n")
            .send()
            .await
            .unwrap();
        expect_problem(resp, StatusCode::FORBIDDEN).await;
    }
    let mut kept = String::new();
    let mut s = storage.get_stream(&theirs).await.unwrap();
    while let Some(c) = futures::StreamExt::next(&mut s).await {
        kept.push_str(std::str::from_utf8(&c.unwrap()).unwrap());
    }
    assert_eq!(kept, "Email\nceo@other.io\n", "their file is as it was");

    // Bad requests for a link are named.
    let bad = app
        .req("POST", "/uploads")
        .json(&json!({"filename": "../../etc/passwd"}))
        .send()
        .await
        .unwrap();
    let body = expect_problem(bad, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(body["field"], "filename");
}

#[tokio::test]
async fn a_job_created_before_the_rule_still_cannot_read_another_workspace() {
    // A payload that reached the database without the API's check (an
    // older release, a hand-made row) is refused by the worker, for good.
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Enterprise).await;
    let (other, _) = db.workspace(Tier::Enterprise).await;
    let key = format!("workspaces/{other}/uploads/x/secret.csv");
    db.storage()
        .put(&key, bytes::Bytes::from_static(b"Email\nceo@other.io\n"))
        .await
        .unwrap();
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let job = db
        .insert(&[offload::testing::new_job(
            ws,
            "contact_import",
            json!({"source": {"object": key}, "mapping": {"email": "Email"}}),
        )])
        .await
        .remove(0);
    offload::testing::enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    let source = event_source(q.clone(), db.worker(q.clone(), WorkerConfig::default()));
    let j = run_until_finished(&db, &source, job.id, Duration::from_secs(60)).await;
    assert_eq!(j.status, JobStatus::Dead);
    assert!(
        j.error_message
            .unwrap()
            .contains("not a file of this workspace"),
        "the reason is named"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM contacts").await, 0);
}

#[tokio::test]
async fn two_puts_to_one_local_link_at_once_keep_one_file_and_the_other_gets_409() {
    let app = app_with(None, None).await;
    let storage = app.db.storage();
    let up = new_upload(&app, "contacts.csv").await;
    let key = up["key"].as_str().unwrap().to_string();
    let url = format!("{}{}", app.base, up["url"].as_str().unwrap());
    // Each body sends its first half, then holds the rest until both have
    // started and a moment has passed, so both requests are past any check
    // made before the body is read when either finishes.
    let started = Arc::new(tokio::sync::Barrier::new(2));
    let put = |who: &'static str| {
        let (url, started) = (url.clone(), started.clone());
        async move {
            let body = format!("Email\n{who}@x.io\n{}\n", who.repeat(2000));
            let (head, tail) = body.as_bytes().split_at(body.len() / 2);
            let (head, tail) = (
                bytes::Bytes::copy_from_slice(head),
                bytes::Bytes::copy_from_slice(tail),
            );
            let chunks = futures::stream::iter([0, 1]).then(move |i| {
                let (head, tail, started) = (head.clone(), tail.clone(), started.clone());
                async move {
                    if i == 0 {
                        return Ok::<_, std::io::Error>(head);
                    }
                    started.wait().await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Ok(tail)
                }
            });
            let resp = reqwest::Client::new()
                .put(url)
                .header("content-type", "text/csv")
                .body(reqwest::Body::wrap_stream(chunks))
                .send()
                .await
                .unwrap();
            (resp.status(), body)
        }
    };
    let ((a, body_a), (b, body_b)) = tokio::join!(put("first"), put("second"));
    let mut statuses = [a, b];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::CREATED, StatusCode::CONFLICT],
        "exactly one PUT keeps its file"
    );
    let winner = if a == StatusCode::CREATED {
        body_a
    } else {
        body_b
    };
    assert_eq!(read_all(&storage, &key).await, winner.as_bytes());
    // Nothing half-written is left beside it.
    let folder = std::env::temp_dir()
        .join(format!("offload-test-{}", app.db.name))
        .join(key.rsplit_once('/').unwrap().0);
    let names: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["contacts.csv"], "{folder:?}");
}

#[tokio::test]
async fn an_s3_link_is_signed_for_the_declared_size_and_never_overwrites() {
    let storage = s3_bucket().await;
    let app = app_with(Some(storage.clone()), Some(1024)).await;
    let up = new_sized_upload(&app, "contacts.csv", CSV.len()).await;
    let key = up["key"].as_str().unwrap().to_string();
    assert_eq!(
        up["headers"]["Content-Length"],
        CSV.len().to_string(),
        "{up}"
    );
    assert_eq!(up["headers"]["If-None-Match"], "*", "{up}");
    // S3 checks the signature over these headers: a body of another length,
    // or a PUT without If-None-Match, does not match it.
    let url = reqwest::Url::parse(up["url"].as_str().unwrap()).unwrap();
    let signed: Vec<String> = url
        .query_pairs()
        .find(|(k, _)| k == "X-Amz-SignedHeaders")
        .map(|(_, v)| v.split(';').map(str::to_string).collect())
        .unwrap_or_default();
    assert_eq!(signed, ["content-length", "host", "if-none-match"], "{url}");

    let sent = send(&app, &up, CSV.as_bytes().to_vec()).await;
    assert!(sent.status().is_success(), "{}", sent.status());
    // moto honours If-None-Match: a second PUT to the link is refused.
    let again = send(&app, &up, vec![b'x'; CSV.len()]).await;
    assert_eq!(again.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(read_all(&storage, &key).await, CSV.as_bytes());
}

#[tokio::test]
async fn an_upload_link_names_its_size_and_a_file_over_the_limit_gets_none() {
    let s3 = s3_bucket().await;
    for storage in [None, Some(s3)] {
        let app = app_with(storage.clone(), Some(1024)).await;
        for (body, problem) in [
            (
                json!({"filename": "big.csv", "size": 1025}),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                json!({"filename": "big.csv", "size": -1}),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
        ] {
            let resp = app
                .req("POST", "/uploads")
                .json(&body)
                .send()
                .await
                .unwrap();
            let p = expect_problem(resp, problem).await;
            assert_eq!(p["field"], "size", "{body}: {p}");
        }
    }
    // On S3 the size is what bounds the file, so it must be given.
    let app = app_with(Some(s3_bucket().await), Some(1024)).await;
    let resp = app
        .req("POST", "/uploads")
        .json(&json!({"filename": "contacts.csv"}))
        .send()
        .await
        .unwrap();
    let p = expect_problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(p["field"], "size", "{p}");
}

#[tokio::test]
async fn a_sized_local_link_takes_exactly_that_many_bytes_and_keeps_its_size() {
    let app = app_with(None, Some(1024)).await;
    let storage = app.db.storage();
    let up = new_sized_upload(&app, "contacts.csv", CSV.len()).await;
    let key = up["key"].as_str().unwrap().to_string();
    let url = up["url"].as_str().unwrap().to_string();
    assert!(url.contains(&format!("size={}", CSV.len())), "{url}");

    // More than declared, though under the limit; less than declared.
    let put = |body: Vec<u8>| {
        reqwest::Client::new()
            .put(format!("{}{url}", app.base))
            .body(body)
            .send()
    };
    let more = put(format!("{CSV}x@y.io,X\n").into_bytes()).await.unwrap();
    expect_problem(more, StatusCode::PAYLOAD_TOO_LARGE).await;
    let less = put(CSV.as_bytes()[..10].to_vec()).await.unwrap();
    expect_problem(less, StatusCode::BAD_REQUEST).await;
    assert!(!storage.exists(&key).await.unwrap());
    // The size is part of what is signed: a link without it, or with
    // another, is refused.
    for bent in [
        url.replace(&format!("&size={}", CSV.len()), ""),
        url.replace(&format!("size={}", CSV.len()), "size=1024"),
    ] {
        assert_ne!(bent, url);
        let resp = reqwest::Client::new()
            .put(format!("{}{bent}", app.base))
            .body(vec![b'a'; 1024])
            .send()
            .await
            .unwrap();
        expect_problem(resp, StatusCode::FORBIDDEN).await;
    }
    let sent = send(&app, &up, CSV.as_bytes().to_vec()).await;
    assert_eq!(sent.status(), StatusCode::CREATED);
    assert_eq!(read_all(&storage, &key).await, CSV.as_bytes());
}

#[tokio::test]
async fn a_file_written_only_if_new_is_never_replaced_on_a_folder_or_on_s3() {
    let db = TestDb::new().await;
    for storage in [db.storage(), s3_bucket().await] {
        let key = "workspaces/w/uploads/u/once.csv";
        let write = |body: &'static [u8]| {
            let chunks = futures::stream::iter([Ok::<_, offload::storage::StorageError>(
                bytes::Bytes::from_static(body),
            )]);
            let storage = storage.clone();
            async move { storage.put_stream_new(key, chunks.boxed()).await.unwrap() }
        };
        assert!(
            write(b"first").await,
            "{storage:?}: the first write is kept"
        );
        assert!(
            !write(b"second").await,
            "{storage:?}: the second is refused"
        );
        assert_eq!(read_all(&storage, key).await, b"first", "{storage:?}");
    }
}
