//! The sample API Gateway events of `events/` through the api function's
//! handler (the path a request takes in Lambda, bearer token included),
//! and through its built binary started as Lambda starts it (against the
//! Runtime API stand-in).

use std::sync::Arc;

use http_body_util::BodyExt;
use offload::ids::{JobId, UserId, WorkspaceId};
use offload::testing::{new_job, Invoked, LambdaRuntime, TestDb, TEST_SECRET};
use offload::workspace::{self, Role, Tier};
use serde_json::{json, Value};

const WS: &str = "0ff10ad0-0000-4000-8000-00000000d3e0";
const USER: &str = "0ff10ad0-0000-4000-8000-0000000000a1";
const JOB: &str = "0ff10ad0-0000-4000-8000-00000000e001";

async fn setup() -> (TestDb, axum::Router) {
    let db = TestDb::new().await;
    let conn = db.pool.get().await.unwrap();
    let ws: WorkspaceId = WS.parse().unwrap();
    workspace::ensure_workspace(&**conn, ws, "Sample", Tier::Standard)
        .await
        .unwrap();
    workspace::add_member(&**conn, ws, USER.parse::<UserId>().unwrap(), Role::Member)
        .await
        .unwrap();
    let app = offload::api::router(db.api_state(Arc::new(db.pg_queue(5))));
    (db, app)
}

fn event_text(event_file: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../../events/{event_file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

async fn invoke(app: axum::Router, event_file: &str) -> (u16, Value) {
    let raw = event_text(event_file);
    let req = lambda_http::request::from_str(&raw).expect("a valid API Gateway event");
    let resp = offload_api::handle(app, req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_create_event_creates_a_job_for_the_tokens_user() {
    let (db, app) = setup().await;
    let (status, job) = invoke(app, "api-create-job.json").await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["type"], "sleep");
    assert_eq!(job["workspace_id"], WS);
    assert_eq!(job["tags"], json!(["sample"]));
    let stored = db.job(job["id"].as_str().unwrap().parse().unwrap()).await;
    assert_eq!(stored.created_by, Some(USER.parse().unwrap()));
}

#[tokio::test]
async fn the_get_event_reads_the_job() {
    let (db, app) = setup().await;
    let mut nj = new_job(WS.parse().unwrap(), "noop", json!({}));
    nj.id = JOB.parse::<JobId>().unwrap();
    db.insert(&[nj]).await;
    let (status, job) = invoke(app, "api-get-job.json").await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["id"], JOB);
    assert_eq!(job["status"], "pending");
}

#[tokio::test]
async fn the_built_binary_answers_the_create_and_get_events() {
    let (db, _) = setup().await;
    let mut nj = new_job(WS.parse().unwrap(), "noop", json!({}));
    nj.id = JOB.parse::<JobId>().unwrap();
    db.insert(&[nj]).await;
    let mut rt = LambdaRuntime::serve().await;
    rt.start(
        env!("CARGO_BIN_EXE_api"),
        "offload-api",
        &[
            ("DATABASE_URL", db.url.clone()),
            ("OFFLOAD_JWT_SECRET", TEST_SECRET.into()),
        ],
    );
    for (file, status, check) in [
        ("api-create-job.json", 202, ("type", "sleep")),
        ("api-get-job.json", 200, ("id", JOB)),
    ] {
        let event: Value = serde_json::from_str(&event_text(file)).unwrap();
        let Invoked::Response(r) = rt.invoke(event, std::time::Duration::from_secs(30)).await
        else {
            panic!("{file} failed");
        };
        assert_eq!(r["statusCode"], status, "{file}: {r}");
        let body: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
        assert_eq!(body[check.0], check.1, "{file}: {body}");
    }
    assert!(rt.init_duration().is_some());
}

#[tokio::test]
async fn the_gateways_claims_without_a_valid_token_are_not_taken_on_trust() {
    let (_db, app) = setup().await;
    let mut event: Value = serde_json::from_str(&event_text("api-get-job.json")).unwrap();
    // Authorizer claims naming a member, but no token the function verifies.
    event["headers"]
        .as_object_mut()
        .unwrap()
        .remove("authorization");
    let req = lambda_http::request::from_str(&event.to_string()).unwrap();
    let resp = offload_api::handle(app, req).await.unwrap();
    assert_eq!(resp.status(), 401);
}

#[test]
fn inside_lambda_the_api_refuses_to_start_without_token_verification() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_api"))
        .env_clear()
        .env("AWS_LAMBDA_FUNCTION_NAME", "offload-api")
        .env("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9")
        // Refused before it connects anywhere.
        .env("DATABASE_URL", "postgres://offload@127.0.0.1:9/none")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("no token verification is configured"))
        .unwrap_or_else(|| panic!("no line names the cause: {stderr}"));
    assert!(line.contains("OFFLOAD_JWT_ISSUER"), "{line}");
}
