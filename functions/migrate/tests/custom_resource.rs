//! The migrate function as CloudFormation drives it: a request with a
//! pre-signed response URL (here a local server that records the answer),
//! against a real PostgreSQL.

use std::sync::{Arc, Mutex};

use aws_lambda_events::event::cloudformation::CloudFormationCustomResourceRequest;
use axum::routing::put;
use serde_json::{json, Value};

/// A database of the test's own, empty (no schema yet); dropped at the end.
struct EmptyDb {
    url: String,
    name: String,
}

impl EmptyDb {
    async fn new() -> EmptyDb {
        let name = format!("offload_m_{}", uuid::Uuid::new_v4().simple());
        let url = offload::testing::with_db(&offload::testing::server_url(), &name);
        assert!(offload::db::ensure_database(&url).await.unwrap());
        EmptyDb { url, name }
    }

    async fn tables(&self) -> i64 {
        offload::db::connect(&self.url)
            .await
            .unwrap()
            .query_one(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn drop(self) {
        let admin = offload::testing::with_db(&offload::testing::server_url(), "postgres");
        let _ = offload::db::connect(&admin)
            .await
            .unwrap()
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

/// Each PUT's content type and body.
type Answers = Arc<Mutex<Vec<(Option<String>, Value)>>>;

/// Where CloudFormation would read the answer: records each PUT.
struct ResponseUrl {
    url: String,
    got: Answers,
}

async fn response_url() -> ResponseUrl {
    let got: Answers = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/cfn-response",
        put(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let ct = headers
                        .get("content-type")
                        .map(|v| v.to_str().unwrap_or_default().to_string());
                    sink.lock()
                        .unwrap()
                        .push((ct, serde_json::from_slice(&body).unwrap()));
                    ""
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    ResponseUrl {
        url: format!("http://{addr}/cfn-response?X-Amz-Signature=abc"),
        got,
    }
}

fn request(
    kind: &str,
    response_url: &str,
    properties: Value,
) -> CloudFormationCustomResourceRequest {
    let mut r = json!({
        "RequestType": kind,
        "ServiceToken": "arn:aws:lambda:eu-west-1:123456789012:function:offload-migrate",
        "ResponseURL": response_url,
        "StackId": "arn:aws:cloudformation:eu-west-1:123456789012:stack/offload/1",
        "RequestId": "req-1",
        "ResourceType": "Custom::SchemaMigrations",
        "LogicalResourceId": "SchemaMigrations",
        "ResourceProperties": properties
    });
    if kind != "Create" {
        r["PhysicalResourceId"] = json!(offload_migrate::PHYSICAL_ID);
    }
    if kind == "Update" {
        r["OldResourceProperties"] = json!({"ServiceToken": "arn", "CodeVersion": "6"});
    }
    serde_json::from_value(r).unwrap()
}

async fn answered(kind: &str, database_url: Result<&str, String>) -> (Option<String>, Value) {
    answered_with(
        kind,
        database_url,
        json!({"ServiceToken": "arn", "CodeVersion": "7"}),
    )
    .await
}

async fn answered_with(
    kind: &str,
    database_url: Result<&str, String>,
    properties: Value,
) -> (Option<String>, Value) {
    let target = response_url().await;
    let http = reqwest::Client::new();
    offload_migrate::handle(&http, database_url, &request(kind, &target.url, properties))
        .await
        .unwrap();
    let got = target.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "one answer per request");
    got.into_iter().next().unwrap()
}

#[tokio::test]
async fn create_and_update_apply_pending_migrations_and_answer_success() {
    let db = EmptyDb::new().await;
    let (ct, body) = answered("Create", Ok(&db.url)).await;
    assert_eq!(
        ct.as_deref(),
        Some(""),
        "the signed URL wants no content type"
    );
    assert_eq!(body["Status"], "SUCCESS");
    assert_eq!(body["PhysicalResourceId"], offload_migrate::PHYSICAL_ID);
    assert_eq!(
        body["StackId"],
        "arn:aws:cloudformation:eu-west-1:123456789012:stack/offload/1"
    );
    assert_eq!(body["RequestId"], "req-1");
    assert_eq!(body["LogicalResourceId"], "SchemaMigrations");
    assert_eq!(
        body["Data"]["SchemaVersion"],
        offload::db::required_version().to_string()
    );
    assert!(body["Data"]["Applied"]
        .as_str()
        .unwrap()
        .starts_with("V1__"));
    let pool = offload::db::pool(&db.url, 1).unwrap();
    offload::db::check_schema(&pool)
        .await
        .expect("the schema is current");
    pool.close();

    // A later deploy: nothing pending, still SUCCESS.
    let (_, body) = answered("Update", Ok(&db.url)).await;
    assert_eq!(body["Status"], "SUCCESS");
    assert_eq!(body["Data"]["Applied"], "");
    db.drop().await;
}

#[tokio::test]
async fn a_database_it_cannot_reach_answers_failed_with_the_reason() {
    let (_, body) = answered("Update", Ok("postgres://postgres:x@127.0.0.1:1/offload")).await;
    assert_eq!(body["Status"], "FAILED");
    let reason = body["Reason"].as_str().unwrap();
    assert!(
        reason.starts_with("migrations failed: cannot reach the database at 127.0.0.1:1/offload"),
        "{reason}"
    );
    // A configuration that never got as far as a URL is answered too.
    let (_, body) = answered(
        "Create",
        Err("configuration: DATABASE_URL: not a valid URL".into()),
    )
    .await;
    assert_eq!(body["Status"], "FAILED");
    assert!(body["Reason"].as_str().unwrap().contains("DATABASE_URL"));
}

fn with_budget(limit: u64, api: u64, worker: u64) -> Value {
    json!({"ServiceToken": "arn", "CodeVersion": "7", "ConnectionBudget": {
        "DatabaseMaxConnections": limit.to_string(), "PoolSize": "2",
        "ApiConcurrency": api.to_string(), "WorkerConcurrencyPerQueue": worker.to_string(),
        "WorkerQueues": "3", "ViaProxy": "false"
    }})
}

#[tokio::test]
async fn a_deploy_that_could_exhaust_the_database_fails_before_migrating() {
    let db = EmptyDb::new().await;
    // 2 x (40 + 3 x 20 + 1) + 1 = 203 connections against a share of 90.
    let (_, body) = answered_with("Create", Ok(&db.url), with_budget(90, 40, 20)).await;
    assert_eq!(body["Status"], "FAILED");
    let reason = body["Reason"].as_str().unwrap();
    assert!(
        reason.contains("can hold 203 connections") && reason.contains("is 90"),
        "{reason}"
    );
    assert_eq!(db.tables().await, 0, "nothing was migrated");

    // A share larger than the server itself accepts (this server: 100).
    let (_, body) = answered_with("Create", Ok(&db.url), with_budget(5_000, 10, 10)).await;
    assert_eq!(body["Status"], "FAILED");
    let reason = body["Reason"].as_str().unwrap();
    assert!(
        reason.contains("DatabaseMaxConnections is 5000 but the server accepts"),
        "{reason}"
    );
    assert_eq!(db.tables().await, 0);

    // Within both: migrated, and the arithmetic is reported.
    // 2 x (10 + 3 x 10 + 1) + 1 = 83.
    let (_, body) = answered_with("Create", Ok(&db.url), with_budget(90, 10, 10)).await;
    assert_eq!(body["Status"], "SUCCESS", "{body}");
    assert_eq!(body["Data"]["ConnectionBudget"], "83 of 90 connections");
    assert!(db.tables().await > 0);
    db.drop().await;
}

#[tokio::test]
async fn delete_answers_success_and_leaves_the_database_alone() {
    let db = EmptyDb::new().await;
    let (_, body) = answered("Delete", Ok(&db.url)).await;
    assert_eq!(body["Status"], "SUCCESS");
    assert_eq!(body["PhysicalResourceId"], offload_migrate::PHYSICAL_ID);
    assert_eq!(db.tables().await, 0, "nothing was created or dropped");
    db.drop().await;
}

#[tokio::test]
async fn the_sample_event_of_events_is_applied_and_answered() {
    let db = offload::testing::TestDb::new().await;
    let raw = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../events/cfn-schema-migrations.json"
    ))
    .unwrap();
    let target = response_url().await;
    let mut event: Value = serde_json::from_str(&raw).unwrap();
    event["ResponseURL"] = json!(target.url);
    let request: CloudFormationCustomResourceRequest = serde_json::from_value(event).unwrap();
    let http = reqwest::Client::new();
    let r = offload_migrate::handle(&http, Ok(&db.url), &request)
        .await
        .unwrap();
    let got = target.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1["Status"], "SUCCESS");
    assert_eq!(
        got[0].1["RequestId"],
        "5e6f7a8b-1111-2222-3333-444455556666"
    );
    assert_eq!(serde_json::to_value(&r).unwrap(), got[0].1);
}

#[tokio::test]
async fn the_built_binary_answers_cloudformation_even_when_misconfigured() {
    use offload::testing::{Invoked, LambdaRuntime};
    let db = offload::testing::TestDb::new().await;
    let raw = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../events/cfn-schema-migrations.json"
    ))
    .unwrap();
    for (url, status) in [
        (db.url.clone(), "SUCCESS"),
        ("mysql://nope".to_string(), "FAILED"),
    ] {
        let target = response_url().await;
        let mut event: Value = serde_json::from_str(&raw).unwrap();
        event["ResponseURL"] = json!(target.url);
        let mut rt = LambdaRuntime::serve().await;
        rt.start(
            env!("CARGO_BIN_EXE_migrate"),
            "offload-migrate",
            &[("DATABASE_URL", url)],
        );
        let Invoked::Response(r) = rt.invoke(event, std::time::Duration::from_secs(30)).await
        else {
            panic!("the invocation failed");
        };
        assert_eq!(r["Status"], status, "{r}");
        let got = target.got.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "CloudFormation got its answer");
        assert_eq!(got[0].1["Status"], status);
    }
}
