//! The webhook job type against a local HTTP server: success, a 5xx that
//! recovers, a permanent 4xx, a timeout, and a refused internal address.

use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use offload::config::WorkerConfig;
use offload::enqueue::send_jobs;
use offload::handlers::{Registry, Webhook};
use offload::job::{ErrorKind, JobStatus};
use offload::queue::Queue;
use offload::testing::{event_source, new_job, run_until_finished, TestDb};
use offload::workspace::Tier;
use offload::Job;
use serde_json::{json, Value};

/// The idempotency key and attempt number of each call to /flaky.
type Calls = Arc<std::sync::Mutex<Vec<(String, String)>>>;

/// A local server: /ok 200, /flaky 500 once then 200, /bad 400, /slow 3 s.
async fn server() -> (String, Calls) {
    let flaky: Calls = Arc::default();
    let f = flaky.clone();
    let app = Router::new()
        .route(
            "/ok",
            post(|body: String| async move { format!("got {body}") }),
        )
        .route(
            "/flaky",
            post(move |headers: axum::http::HeaderMap| {
                let f = f.clone();
                async move {
                    let h = |k: &str| {
                        headers
                            .get(k)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string()
                    };
                    let mut calls = f.lock().unwrap();
                    calls.push((h("idempotency-key"), h("offload-attempt")));
                    if calls.len() == 1 {
                        (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "try later")
                    } else {
                        (axum::http::StatusCode::OK, "fine now")
                    }
                }
            }),
        )
        .route("/nul", post(|| async { "before\u{0}after" }))
        .route(
            "/bad",
            post(|| async { (axum::http::StatusCode::BAD_REQUEST, "missing field email") }),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                "late"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, flaky)
}

async fn run(db: &TestDb, allow_private: bool, payload: Value, max_attempts: i32) -> Job {
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(10));
    let mut nj = new_job(ws, "webhook", payload);
    nj.max_attempts = max_attempts;
    let job = db.insert(&[nj]).await.remove(0);
    send_jobs(&db.store, &*q, &[&job], chrono::Utc::now())
        .await
        .unwrap();
    let config = WorkerConfig {
        backoff_base: Duration::from_millis(50),
        ..WorkerConfig::default()
    };
    let registry = Registry::builtin().with(Webhook { allow_private });
    let source = event_source(q.clone(), db.worker_with(q.clone(), config, registry));
    run_until_finished(db, &source, job.id, Duration::from_secs(20)).await
}

#[tokio::test]
async fn a_200_completes_with_the_response() {
    let (base, _) = server().await;
    let db = TestDb::new().await;
    let j = run(
        &db,
        true,
        json!({"url": format!("{base}/ok"), "body": {"email": "a@b.co"}}),
        5,
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed);
    let r = j.result.unwrap();
    assert_eq!(r["status"], 200);
    assert_eq!(r["response"], "got {\"email\":\"a@b.co\"}");
}

#[tokio::test]
async fn an_answer_with_a_nul_character_is_stored_with_it_replaced() {
    // PostgreSQL refuses U+0000 in jsonb; the job must still complete (a
    // failed write would return the whole batch again and again).
    let (base, _) = server().await;
    let db = TestDb::new().await;
    let j = run(&db, true, json!({"url": format!("{base}/nul")}), 5).await;
    assert_eq!((j.status, j.attempts), (JobStatus::Completed, 1));
    assert_eq!(j.result.unwrap()["response"], "before\u{FFFD}after");
}

#[tokio::test]
async fn a_500_is_retried_and_then_succeeds() {
    let (base, flaky) = server().await;
    let db = TestDb::new().await;
    let j = run(&db, true, json!({"url": format!("{base}/flaky")}), 5).await;
    assert_eq!((j.status, j.attempts), (JobStatus::Completed, 2));
    // Both attempts carried the job's id as their idempotency key, so the
    // receiver can tell a repeat from a new call.
    let key = j.id.to_string();
    assert_eq!(
        *flaky.lock().unwrap(),
        [(key.clone(), "1".to_string()), (key, "2".to_string())]
    );
}

#[tokio::test]
async fn a_400_is_permanent() {
    let (base, _) = server().await;
    let db = TestDb::new().await;
    let j = run(&db, true, json!({"url": format!("{base}/bad")}), 5).await;
    assert_eq!(
        (j.status, j.attempts, j.error_kind),
        (JobStatus::Dead, 1, Some(ErrorKind::Permanent))
    );
    assert!(j.error_message.unwrap().contains("400"));
}

#[tokio::test]
async fn a_timeout_is_retried_until_attempts_run_out() {
    let (base, _) = server().await;
    let db = TestDb::new().await;
    let j = run(
        &db,
        true,
        json!({"url": format!("{base}/slow"), "timeout_ms": 200}),
        2,
    )
    .await;
    assert_eq!((j.status, j.attempts), (JobStatus::Dead, 2));
    assert!(j
        .error_message
        .unwrap()
        .contains("did not answer within 200 ms"));
}

#[tokio::test]
async fn an_internal_address_is_refused_by_default() {
    let (base, _) = server().await;
    let db = TestDb::new().await;
    for url in [
        format!("{base}/ok"),
        "http://169.254.169.254/latest/meta-data".to_string(),
        "http://localhost:1/".to_string(),
    ] {
        let j = run(&db, false, json!({"url": url}), 5).await;
        assert_eq!(
            (j.status, j.error_kind),
            (JobStatus::Dead, Some(ErrorKind::Permanent)),
            "{url}"
        );
        assert!(
            j.error_message.unwrap().contains("internal address"),
            "{url}"
        );
    }
}

#[test]
fn bad_webhook_payloads_are_refused_at_creation() {
    let reg = Registry::builtin();
    for (payload, field) in [
        (json!({"url": "ftp://x.example/"}), "url"),
        (json!({"url": "not a url"}), "url"),
        (
            json!({"url": "https://x.example/", "timeout_ms": 60000}),
            "timeout_ms",
        ),
        (
            json!({"url": "https://x.example/", "headers": {"bad header": "x"}}),
            "headers.bad header",
        ),
    ] {
        let e = reg
            .validate("webhook", &payload, offload::ids::WorkspaceId::new())
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some(field), "{payload}: {e}");
    }
}

#[tokio::test]
async fn an_endless_response_body_is_cut_off_and_never_read_whole() {
    // A raw HTTP server: 200, chunked, 1 MiB chunks without end; it counts
    // what it managed to write before the client stopped reading.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/firehose", listener.local_addr().unwrap());
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let w = written.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut req = [0u8; 4096];
        let _ = sock.read(&mut req).await;
        let head =
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
        if sock.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = format!("100000\r\n{}\r\n", "x".repeat(1 << 20));
        for _ in 0..4096 {
            if sock.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
            w.fetch_add(1 << 20, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let db = TestDb::new().await;
    let job = run(
        &db,
        true,
        json!({"url": url, "body": {}, "timeout_ms": 20000}),
        1,
    )
    .await;
    assert_eq!(job.status, JobStatus::Completed, "{job:?}");
    let result = job.result.unwrap();
    assert_eq!(result["truncated"], true);
    assert_eq!(result["response"].as_str().unwrap().len(), 4096);
    let sent = written.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        sent < 64 << 20,
        "the worker read on: the server wrote {} MiB",
        sent >> 20
    );
}

#[tokio::test]
async fn one_workspaces_spent_calls_to_a_host_do_not_hold_up_anothers() {
    let (base, _) = server().await;
    let db = TestDb::new().await;
    let (busy, _) = db.workspace(Tier::Unlimited).await;
    // The busy workspace has spent its calls to this host, and its bucket
    // does not refill while the test runs.
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO rate_limits (key, tokens, capacity, refill_per_sec) VALUES ($1, 0, 10, 0)",
            &[&format!("webhook:{busy}:127.0.0.1")],
        )
        .await
        .unwrap();
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(10));
    let job = db
        .insert(&[new_job(
            busy,
            "webhook",
            json!({"url": format!("{base}/ok"), "body": {}}),
        )])
        .await
        .remove(0);
    send_jobs(&db.store, &*q, &[&job], chrono::Utc::now())
        .await
        .unwrap();
    let registry = Registry::builtin().with(Webhook {
        allow_private: true,
    });
    let source = event_source(
        q.clone(),
        db.worker_with(q.clone(), WorkerConfig::default(), registry),
    );
    source.drain().await;
    let waiting = db.job(job.id).await;
    assert_eq!(
        (waiting.status, waiting.attempts),
        (JobStatus::Queued, 0),
        "the busy workspace's call waits for its own bucket, spending no attempt"
    );

    // Another workspace calls the same host at once.
    let j = run(
        &db,
        true,
        json!({"url": format!("{base}/ok"), "body": {}}),
        5,
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed);
}

#[tokio::test]
async fn a_hook_that_cannot_be_reached_is_reported_without_its_url_secrets() {
    // A port nobody listens on: the connection is refused. Hooks keep their
    // secret in the path (Slack's, Discord's) or the query string.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let db = TestDb::new().await;
    let j = run(
        &db,
        true,
        json!({"url": format!("http://hook-user:hook-pass@127.0.0.1:{port}/services/T0/s3cr3t-path?token=s3cr3t-query")}),
        1,
    )
    .await;
    assert_eq!(j.status, JobStatus::Dead, "{j:?}");
    let msg = j.error_message.unwrap();
    assert!(msg.contains("cannot reach 127.0.0.1"), "{msg}");
    assert!(msg.contains("refused"), "the cause is kept: {msg}");
    for secret in ["s3cr3t-path", "s3cr3t-query", "hook-pass"] {
        assert!(!msg.contains(secret), "{secret} leaked into {msg:?}");
    }
}
