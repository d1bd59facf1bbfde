//! The realtime function as API Gateway's WebSocket API calls it, against
//! a real PostgreSQL, with a local server in the place of API Gateway's
//! management API (it records each signed `POST @connections/{id}`).

use std::sync::{Arc, Mutex};

use aws_lambda_events::event::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use offload::api::AppState;
use offload::realtime::Pusher;
use offload::store::Lease;
use offload::testing::TestApp;
use serde_json::{json, Value};

/// What the management API received: (connection, message, signed).
type Posts = Arc<Mutex<Vec<(String, Value, bool)>>>;

/// A stand-in for API Gateway's management API: 410 for connections named
/// `gone…`, 200 otherwise.
async fn management_api() -> (String, Posts) {
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    let posts: Posts = Arc::default();
    let app = axum::Router::new()
        .route(
            "/live/@connections/{id}",
            axum::routing::post(
                |State(posts): State<Posts>,
                 Path(id): Path<String>,
                 headers: HeaderMap,
                 body: String| async move {
                    if id.starts_with("gone") {
                        return StatusCode::GONE;
                    }
                    let signed = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|a| {
                            a.starts_with("AWS4-HMAC-SHA256")
                                && a.contains("/execute-api/aws4_request")
                        });
                    posts
                        .lock()
                        .unwrap()
                        .push((id, serde_json::from_str(&body).unwrap(), signed));
                    StatusCode::OK
                },
            ),
        )
        .with_state(posts.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/live", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, posts)
}

fn event(
    route: &str,
    connection: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> ApiGatewayWebsocketProxyRequest {
    let mut e = json!({
        "requestContext": {"routeKey": route, "connectionId": connection, "eventType": "MESSAGE",
                           "stage": "live", "domainName": "abc.execute-api.us-east-1.amazonaws.com",
                           "apiId": "abc", "connectedAt": 0, "requestTimeEpoch": 0},
        "isBase64Encoded": false
    });
    if let Some(t) = token {
        e["queryStringParameters"] = json!({"token": t});
    }
    if let Some(b) = body {
        e["body"] = json!(b.to_string());
    }
    serde_json::from_value(e).unwrap()
}

struct Rig {
    app: TestApp,
    state: AppState,
    posts: Posts,
}

impl Rig {
    async fn new() -> Rig {
        std::env::set_var("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE");
        std::env::set_var(
            "AWS_SECRET_ACCESS_KEY",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        );
        let (url, posts) = management_api().await;
        let app = TestApp::spawn().await;
        let mut state = app.db.api_state(app.queue.clone());
        state.store = state
            .store
            .clone()
            .with_push(Some(Arc::new(Pusher::new(&url, "us-east-1"))));
        Rig { app, state, posts }
    }

    async fn call(&self, e: ApiGatewayWebsocketProxyRequest) -> ApiGatewayProxyResponse {
        offload_realtime::handle(&self.state, e).await
    }

    /// Messages posted to `connection` once at least one has come (the
    /// chunk's own send runs beside the caller), within 5 s; taken.
    async fn take_some(&self, connection: &str) -> Vec<Value> {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let got = self.take(connection);
            if !got.is_empty() || std::time::Instant::now() > until {
                return got;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Messages posted to `connection` so far (taken).
    fn take(&self, connection: &str) -> Vec<Value> {
        let mut posts = self.posts.lock().unwrap();
        assert!(
            posts.iter().all(|p| p.2),
            "every post is SigV4-signed for execute-api"
        );
        let mine = posts
            .iter()
            .filter(|p| p.0 == connection)
            .map(|p| p.1.clone())
            .collect();
        posts.retain(|p| p.0 != connection);
        mine
    }

    async fn job(&self, body: Value) -> String {
        let resp = self.app.create_job(body).await;
        assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED);
        let j: Value = resp.json().await.unwrap();
        j["id"].as_str().unwrap().to_string()
    }

    async fn browser_token(&self, body: Value) -> String {
        let resp = self
            .app
            .req("POST", "/browser-tokens")
            .json(&body)
            .send()
            .await
            .unwrap();
        let b: Value = resp.json().await.unwrap();
        b["token"].as_str().unwrap().to_string()
    }

    async fn progress(&self, job: &str, processed: u64) {
        let p = serde_json::to_value(offload::job::Progress::of(processed, 10)).unwrap();
        self.app
            .db
            .pool
            .get()
            .await
            .unwrap()
            .execute(
                "UPDATE jobs SET progress = $2, updated_at = clock_timestamp() WHERE id = $1::text::uuid",
                &[&job, &p],
            )
            .await
            .unwrap();
    }
}

fn subscribe(ws: offload::ids::WorkspaceId, jobs: &[&str]) -> Value {
    json!({"action": "subscribe", "workspace": ws, "jobs": jobs})
}

#[tokio::test]
async fn a_connection_gets_its_jobs_at_subscribe_and_every_change_after_signed() {
    let rig = Rig::new().await;
    let a = rig
        .job(json!({"type": "sleep", "payload": {"ms": 60000}}))
        .await;
    let b = rig
        .job(json!({"type": "sleep", "payload": {"ms": 60000}, "tags": ["import:1"]}))
        .await;
    let token = rig.browser_token(json!({"jobs": [a]})).await;

    assert_eq!(
        rig.call(event("$connect", "c1=", Some(&token), None))
            .await
            .status_code,
        200
    );
    assert_eq!(
        rig.call(event("$connect", "x", None, None))
            .await
            .status_code,
        401
    );
    assert_eq!(
        rig.call(event("$connect", "x", Some("ofb_forged"), None))
            .await
            .status_code,
        401
    );
    let platform = {
        let conn = rig.app.db.pool.get().await.unwrap();
        offload::platform::create_key(&**conn, "app")
            .await
            .unwrap()
            .1
    };
    assert_eq!(
        rig.call(event("$connect", "x", Some(&platform), None))
            .await
            .status_code,
        403
    );

    rig.call(event(
        "$default",
        "c1=",
        None,
        Some(subscribe(rig.app.workspace, &[&a])),
    ))
    .await;
    let got = rig.take("c1=");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["type"], "job");
    assert_eq!(got[0]["job"]["id"], a.as_str());

    // A change of the job: queued by the trigger, sent by the function
    // that made it.
    rig.progress(&a, 4).await;
    rig.state.store.push_changes().await;
    let got = rig.take("c1=");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["job"]["progress"]["processed"], 4);
    // A change of a job nobody follows queues nothing.
    rig.progress(&b, 1).await;
    assert_eq!(
        rig.app
            .db
            .scalar_i64("SELECT count(*) FROM realtime_outbox")
            .await,
        0
    );

    // What the token does not open: an error, over the connection.
    rig.call(event(
        "$default",
        "c1=",
        None,
        Some(subscribe(rig.app.workspace, &[&b])),
    ))
    .await;
    let got = rig.take("c1=");
    assert_eq!(got[0]["type"], "error");
    assert!(got[0]["detail"].as_str().unwrap().contains(&b));
    rig.call(event(
        "$default",
        "c1=",
        None,
        Some(json!({"action": "jump"})),
    ))
    .await;
    assert_eq!(rig.take("c1=")[0]["type"], "error");

    // A member by tag, with the stream; removed from the workspace, they
    // get nothing more.
    let user = offload::ids::UserId::new();
    {
        let conn = rig.app.db.pool.get().await.unwrap();
        offload::workspace::add_member(
            &**conn,
            rig.app.workspace,
            user,
            offload::workspace::Role::Member,
        )
        .await
        .unwrap();
    }
    let member_token = offload::testing::token(user);
    assert_eq!(
        rig.call(event("$connect", "m1", Some(&member_token), None))
            .await
            .status_code,
        200
    );
    rig.call(event(
        "$default",
        "m1",
        None,
        Some(json!({"action": "subscribe", "workspace": rig.app.workspace, "tags": ["import:1"]})),
    ))
    .await;
    let got = rig.take("m1");
    assert_eq!(got[0]["job"]["id"], b.as_str());
    rig.call(event(
        "$default",
        "m1",
        None,
        Some(json!({"action": "subscribe", "workspace": rig.app.workspace, "jobs": [a], "stream": true})),
    ))
    .await;
    rig.take("m1");
    // A chunk the running job appends.
    {
        let conn = rig.app.db.pool.get().await.unwrap();
        conn.execute(
            "UPDATE jobs SET status = 'running', attempts = 1, worker_id = 'w1' WHERE id = $1::text::uuid",
            &[&a],
        )
        .await
        .unwrap();
    }
    rig.state.store.push_changes().await;
    rig.take("m1");
    rig.take("c1=");
    let lease = Lease {
        job_id: a.parse().unwrap(),
        attempt: 1,
        worker_id: "w1".into(),
    };
    rig.state
        .store
        .append_stream(
            &lease,
            rig.app.workspace,
            &json!({"token": "Hi"}),
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    // Sent by the append itself (in the background), without waiting for
    // the job's next progress write.
    let got = rig.take_some("m1").await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["type"], "chunk");
    assert_eq!(got[0]["data"]["token"], "Hi");
    assert!(rig.take("c1=").is_empty(), "c1 did not ask for the stream");

    {
        let conn = rig.app.db.pool.get().await.unwrap();
        conn.execute(
            "DELETE FROM workspace_members WHERE workspace_id = $1 AND user_id = $2",
            &[&rig.app.workspace.0, &user.0],
        )
        .await
        .unwrap();
    }
    rig.progress(&b, 2).await;
    rig.progress(&a, 5).await;
    rig.state.store.push_changes().await;
    assert!(
        rig.take("m1").is_empty(),
        "a removed member gets nothing more"
    );
    assert_eq!(rig.take("c1=").len(), 1);

    // A connection found gone is forgotten; a disconnect too.
    assert_eq!(
        rig.call(event("$connect", "gone1", Some(&token), None))
            .await
            .status_code,
        200
    );
    rig.call(event(
        "$default",
        "gone1",
        None,
        Some(subscribe(rig.app.workspace, &[&a])),
    ))
    .await;
    assert_eq!(
        rig.app
            .db
            .scalar_i64("SELECT count(*) FROM realtime_connections WHERE connection_id = 'gone1'")
            .await,
        0
    );
    rig.call(event("$disconnect", "c1=", None, None)).await;
    rig.progress(&a, 6).await;
    rig.state.store.push_changes().await;
    assert!(rig.take("c1=").is_empty());
    assert_eq!(
        rig.app
            .db
            .scalar_i64("SELECT count(*) FROM realtime_subscriptions")
            .await,
        2,
        "m1's two subscriptions remain until it disconnects"
    );
}

#[tokio::test]
async fn the_worker_sends_progress_and_the_end_of_a_followed_job() {
    let rig = Rig::new().await;
    let job = rig
        .job(json!({"type": "sleep", "payload": {"ms": 600, "steps": 3}}))
        .await;
    let token = rig.browser_token(json!({"jobs": [job]})).await;
    assert_eq!(
        rig.call(event("$connect", "w1", Some(&token), None))
            .await
            .status_code,
        200
    );
    rig.call(event(
        "$default",
        "w1",
        None,
        Some(subscribe(rig.app.workspace, &[&job])),
    ))
    .await;
    assert_eq!(rig.take("w1").len(), 1);
    let worker = offload::worker::Worker::new(
        rig.state.store.clone(),
        rig.app.queue.clone(),
        Arc::new(offload::handlers::Registry::builtin()),
        offload::config::WorkerConfig::default(),
        offload::clock::Clock::System,
        "realtime-test",
        rig.app.db.storage(),
    );
    let source = offload::testing::event_source(rig.app.queue.clone(), worker);
    let done = offload::testing::run_until_finished(
        &rig.app.db,
        &source,
        job.parse().unwrap(),
        std::time::Duration::from_secs(30),
    )
    .await;
    assert_eq!(done.status, offload::job::JobStatus::Completed);
    let got = rig.take("w1");
    let statuses: Vec<&str> = got
        .iter()
        .filter_map(|m| m["job"]["status"].as_str())
        .collect();
    assert_eq!(statuses.last(), Some(&"completed"), "{got:?}");
    assert!(
        got.iter().any(|m| m["job"]["status"] == "running"
            && m["job"]["progress"]["processed"].as_u64() > Some(0)),
        "progress while running: {got:?}"
    );
}

#[tokio::test]
async fn the_sample_events_are_what_the_function_reads() {
    let rig = Rig::new().await;
    let job = rig.job(json!({"type": "noop", "payload": {}})).await;
    let token = rig.browser_token(json!({"jobs": [job]})).await;
    let read = |name: &str| {
        std::fs::read_to_string(format!(
            "{}/../../events/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    let connect: ApiGatewayWebsocketProxyRequest = serde_json::from_str(
        &read("realtime-connect.json").replace("REPLACE_WITH_A_TOKEN", &token),
    )
    .unwrap();
    assert_eq!(rig.call(connect).await.status_code, 200);
    let sample = read("realtime-subscribe.json")
        .replace(
            "0ff10ad0-0000-4000-8000-000000000001",
            &rig.app.workspace.to_string(),
        )
        .replace("01a2340c-dfbb-74f9-b2a8-2b1b3dbf0a3c", &job);
    let subscribe: ApiGatewayWebsocketProxyRequest = serde_json::from_str(&sample).unwrap();
    assert_eq!(rig.call(subscribe).await.status_code, 200);
    let got = rig.take("Bx3wYe7rDoECIcw=");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["job"]["id"], job.as_str());
}
