//! The API over real HTTP against a real Postgres: the job routes, auth and
//! workspace isolation, and bad input answered with problem bodies.

use std::sync::Arc;

use offload::ids::UserId;
use offload::job::QueueName;
use offload::queue::{OutgoingMessage, Queue, QueueDepth, QueueError, ReceivedMessage};
use offload::testing::{expect_problem as problem, token, TestApp, TestDb, JOB_FIELDS};
use offload::workspace::Tier;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test]
async fn create_answers_202_with_the_job_object_and_get_returns_it() {
    let app = TestApp::spawn().await;
    let resp = app
        .create_job(
            json!({"type": "sleep", "payload": {"ms": 10}, "priority": 3, "tags": ["campaign:1"]}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let job: Value = resp.json().await.unwrap();
    let keys: Vec<&str> = job
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    for k in JOB_FIELDS {
        assert!(keys.contains(&k), "missing {k} in {job}");
    }
    assert_eq!(keys.len(), JOB_FIELDS.len(), "no extra fields: {keys:?}");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["type"], "sleep");
    assert_eq!(job["priority"], 3);
    assert_eq!(job["tags"], json!(["campaign:1"]));
    for k in [
        "total",
        "processed",
        "failed",
        "percentage",
        "stage",
        "message",
    ] {
        assert!(job["progress"].get(k).is_some(), "progress.{k}");
    }

    let got = app.get_job(job["id"].as_str().unwrap()).await;
    assert_eq!(got.status(), StatusCode::OK);
    assert!(got.headers().contains_key("etag"));
    let got: Value = got.json().await.unwrap();
    assert_eq!(got["id"], job["id"]);
    assert_eq!(
        app.queue.depth(QueueName::Default).await.unwrap().visible,
        1
    );
}

#[tokio::test]
async fn list_filters_and_pages_with_a_cursor() {
    let app = TestApp::spawn().await;
    for i in 0..5 {
        let tag = if i % 2 == 0 { "even" } else { "odd" };
        app.create_job(json!({"type": "noop", "tags": [tag]})).await;
    }
    app.create_job(json!({"type": "sleep", "payload": {"ms": 1}}))
        .await;
    let get = |q: &str| {
        let url = format!("{}?{q}", app.jobs_url());
        let req = app.client.get(url).bearer_auth(&app.token);
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let page1 = get("limit=4").await;
    assert_eq!(page1["jobs"].as_array().unwrap().len(), 4);
    let cursor = page1["next_cursor"].as_str().unwrap().to_string();
    let page2 = get(&format!("limit=4&cursor={cursor}")).await;
    assert_eq!(page2["jobs"].as_array().unwrap().len(), 2);
    assert_eq!(page2["next_cursor"], Value::Null);
    let mut ids: Vec<Value> = page1["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["jobs"].as_array().unwrap())
        .map(|j| j["id"].clone())
        .collect();
    ids.dedup();
    assert_eq!(ids.len(), 6, "pages do not overlap");

    assert_eq!(get("tag=even").await["jobs"].as_array().unwrap().len(), 3);
    assert_eq!(get("type=sleep").await["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(
        get("status=queued").await["jobs"].as_array().unwrap().len(),
        6
    );
    assert_eq!(
        get("status=dead").await["jobs"].as_array().unwrap().len(),
        0
    );
}

#[tokio::test]
async fn bad_input_gets_a_problem_naming_the_field_and_creates_nothing() {
    let app = TestApp::spawn().await;
    let cases = [
        (json!({"type": "nope"}), "type"),
        (
            json!({"type": "sleep", "payload": {"ms": "x"}}),
            "payload.ms",
        ),
        (
            json!({"type": "sleep", "payload": {"ms": 1, "extra": 1}}),
            "payload",
        ),
        (json!({"type": "noop", "priority": 11}), "priority"),
        (json!({"type": "noop", "queue": "urgent"}), "queue"),
        (
            json!({"type": "noop", "run_at": "2001-01-01T00:00:00Z"}),
            "run_at",
        ),
        (
            json!({"type": "noop", "run_at": "2999-01-01T00:00:00Z"}),
            "run_at",
        ),
        (json!({"type": "noop", "max_attempts": 0}), "max_attempts"),
        (json!({"type": "noop", "surprise": true}), ""),
    ];
    for (body, field) in cases {
        let p = problem(
            app.create_job(body.clone()).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        if !field.is_empty() {
            assert!(
                p["field"].as_str().unwrap_or("").starts_with(field),
                "{body}: {p}"
            );
        }
    }
    let resp = app
        .client
        .post(app.jobs_url())
        .bearer_auth(&app.token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::BAD_REQUEST).await;
    let resp = app
        .client
        .post(app.jobs_url())
        .bearer_auth(&app.token)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    let resp = app
        .client
        .post(app.jobs_url())
        .bearer_auth(&app.token)
        .header("content-type", "application/json")
        .body(vec![b' '; 2 << 20])
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::PAYLOAD_TOO_LARGE).await;
    problem(app.get_job("not-a-uuid").await, StatusCode::BAD_REQUEST).await;
    assert_eq!(app.db.scalar_i64("SELECT count(*) FROM jobs").await, 0);
}

#[tokio::test]
async fn tokens_are_required_and_checked() {
    let app = TestApp::spawn().await;
    let url = app.jobs_url();
    problem(
        app.client.get(&url).send().await.unwrap(),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let forged = offload::auth::Keys::new("some-other-secret-that-is-long-enough-yes").issue(
        app.user,
        chrono::Utc::now(),
        chrono::Utc::now() + chrono::Duration::hours(1),
    );
    problem(
        app.client
            .get(&url)
            .bearer_auth(forged)
            .send()
            .await
            .unwrap(),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let expired = offload::auth::Keys::new(offload::testing::TEST_SECRET).issue(
        app.user,
        chrono::Utc::now() - chrono::Duration::hours(2),
        chrono::Utc::now() - chrono::Duration::hours(1),
    );
    let p = problem(
        app.client
            .get(&url)
            .bearer_auth(expired)
            .send()
            .await
            .unwrap(),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("expired"));
}

#[tokio::test]
async fn another_workspace_sees_nothing_of_this_one() {
    let app = TestApp::spawn().await;
    let job: Value = app
        .create_job(json!({"type": "noop"}))
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    let (other_ws, other_user) = app.db.workspace(Tier::Standard).await;
    let stranger = token(other_user);
    // A member of another workspace, on this workspace's routes: 404, as if it did not exist.
    for (method, path) in [
        ("GET", format!("/jobs/{id}")),
        ("GET", "/jobs".to_string()),
        ("POST", format!("/jobs/{id}/cancel")),
        ("POST", format!("/jobs/{id}/retry")),
        ("GET", format!("/jobs/{id}/logs")),
        ("DELETE", format!("/jobs/{id}")),
    ] {
        let url = format!("{}/api/workspaces/{}{path}", app.base, app.workspace);
        let req = app
            .client
            .request(method.parse().unwrap(), url)
            .bearer_auth(&stranger);
        problem(req.send().await.unwrap(), StatusCode::NOT_FOUND).await;
        // And this job's id under their own workspace: also 404.
        if path.contains(id) {
            let url = format!("{}/api/workspaces/{other_ws}{path}", app.base);
            let req = app
                .client
                .request(method.parse().unwrap(), url)
                .bearer_auth(&stranger);
            problem(req.send().await.unwrap(), StatusCode::NOT_FOUND).await;
        }
    }
    // A user who is in no workspace at all.
    let nobody = token(UserId::new());
    problem(
        app.client
            .get(app.jobs_url())
            .bearer_auth(nobody)
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn cancel_of_a_queued_job_is_immediate_and_retry_reruns_it() {
    let app = TestApp::spawn().await;
    let job: Value = app
        .create_job(json!({"type": "noop"}))
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    let url = format!("{}/{id}", app.jobs_url());
    let resp = app
        .client
        .post(format!("{url}/cancel"))
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "cancelled");
    let again = app
        .client
        .post(format!("{url}/cancel"))
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    problem(again, StatusCode::CONFLICT).await;

    let resp = app
        .client
        .post(format!("{url}/retry"))
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let retried: Value = resp.json().await.unwrap();
    assert_eq!(
        (retried["status"].as_str(), retried["attempts"].as_i64()),
        (Some("queued"), Some(0))
    );

    let del = app
        .client
        .delete(&url)
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    problem(del, StatusCode::CONFLICT).await;
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_same_job() {
    let app = TestApp::spawn().await;
    let post = |body: Value| {
        app.client
            .post(app.jobs_url())
            .bearer_auth(&app.token)
            .header("Idempotency-Key", "order-7")
            .json(&body)
            .send()
    };
    let first = post(json!({"type": "noop"})).await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();
    let second = post(json!({"type": "noop"})).await.unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(second.json::<Value>().await.unwrap()["id"], first["id"]);
    problem(
        post(json!({"type": "sleep", "payload": {"ms": 1}}))
            .await
            .unwrap(),
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(app.db.scalar_i64("SELECT count(*) FROM jobs").await, 1);
}

/// A queue that refuses every send, as SQS does during an outage.
struct DownQueue;

#[async_trait::async_trait]
impl Queue for DownQueue {
    async fn send_batch(&self, _: QueueName, _: &[OutgoingMessage]) -> Result<(), QueueError> {
        Err(QueueError::Unavailable("connection refused".into()))
    }
    async fn receive(
        &self,
        _: QueueName,
        _: usize,
        _: std::time::Duration,
        _: std::time::Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        Err(QueueError::Unavailable("connection refused".into()))
    }
    async fn change_visibility(
        &self,
        _: QueueName,
        _: &str,
        _: std::time::Duration,
    ) -> Result<(), QueueError> {
        Err(QueueError::Unavailable("connection refused".into()))
    }
    async fn delete_batch(&self, _: QueueName, _: &[String]) -> Result<(), QueueError> {
        Err(QueueError::Unavailable("connection refused".into()))
    }
    async fn depth(&self, _: QueueName) -> Result<QueueDepth, QueueError> {
        Err(QueueError::Unavailable("connection refused".into()))
    }
    fn max_receive_batch(&self) -> usize {
        10
    }
    fn arn(&self, _: QueueName) -> String {
        "arn:down".into()
    }
}

#[tokio::test]
async fn a_queue_outage_still_accepts_the_job_as_pending() {
    let db = TestDb::new().await;
    let app = TestApp::spawn_with(db, Arc::new(DownQueue)).await;
    let resp = app.create_job(json!({"type": "noop"})).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["status"], "pending");
    assert_eq!(
        app.db
            .scalar_i64("SELECT count(*) FROM jobs WHERE status = 'pending'")
            .await,
        1
    );
}

#[tokio::test]
async fn health_checks_the_database() {
    let app = TestApp::spawn().await;
    let resp = app
        .client
        .get(format!("{}/health", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap()["database"], "ok");
    problem(
        app.client
            .get(format!("{}/nope", app.base))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
}
