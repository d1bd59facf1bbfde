//! Hostile input: tokens of every wrong kind, SQL-injection-shaped values in
//! every filter and path, and property tests that throw generated bodies at
//! the API, the worker's SQS records and the job payload parsers. Nothing
//! panics, nothing answers 5xx, nothing gets in, nothing accepted is lost.

use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use offload::config::WorkerConfig;
use offload::handlers::Registry;
use offload::ids::UserId;
use offload::job::{JobMessage, JobStatus};
use offload::testing::{expect_problem as problem, new_job, token, TestApp, TestDb, TEST_SECRET};
use offload::workspace::Tier;
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestRunner};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Sha256;

/// A JWT with this header and claims, HMAC-SHA256-signed with `secret`
/// whatever the header says (how algorithm-confusion attacks are built).
fn hmac_token(header: Value, claims: Value, secret: &str) -> String {
    let signing_input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(signing_input.as_bytes());
    let sig = B64.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

fn claims(user: &str) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({"sub": user, "iat": now, "exp": now + 3600})
}

#[tokio::test]
async fn tokens_of_every_wrong_kind_are_refused() {
    let app = TestApp::spawn().await;
    let user = app.user.to_string();
    let good = hmac_token(
        json!({"alg": "HS256", "typ": "JWT"}),
        claims(&user),
        TEST_SECRET,
    );
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &claims(&user),
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .unwrap();
    let payload = B64.encode(claims(&user).to_string());
    let now = chrono::Utc::now().timestamp();
    let cases: Vec<(&str, String)> = vec![
        ("no scheme", good.clone()),
        (
            "basic scheme",
            format!("Basic {}", B64.encode("admin:admin")),
        ),
        ("empty bearer", "Bearer ".into()),
        ("bearer only", "Bearer".into()),
        ("not a jwt", "Bearer hello".into()),
        ("three empty parts", "Bearer ..".into()),
        ("garbage parts", "Bearer a.b.c".into()),
        ("non-base64", "Bearer !!!.@@@.###".into()),
        (
            "header not json",
            format!("Bearer {}.{payload}.", B64.encode("nope")),
        ),
        (
            "alg none",
            format!(
                "Bearer {}.{payload}.",
                B64.encode(r#"{"alg":"none","typ":"JWT"}"#)
            ),
        ),
        (
            "alg None, signed",
            format!(
                "Bearer {}",
                hmac_token(json!({"alg": "None"}), claims(&user), TEST_SECRET)
            ),
        ),
        (
            // RS/HS confusion: the header claims RS256, the signature is an
            // HMAC made with the secret, as if it were a public key.
            "RS256 header, HMAC signature",
            format!(
                "Bearer {}",
                hmac_token(
                    json!({"alg": "RS256", "typ": "JWT"}),
                    claims(&user),
                    TEST_SECRET
                )
            ),
        ),
        (
            "ES256 header, HMAC signature",
            format!(
                "Bearer {}",
                hmac_token(json!({"alg": "ES256"}), claims(&user), TEST_SECRET)
            ),
        ),
        ("HS512 with the right secret", format!("Bearer {hs512}")),
        (
            "forged: another secret",
            format!(
                "Bearer {}",
                hmac_token(
                    json!({"alg": "HS256"}),
                    claims(&user),
                    "guessed-secret-guessed-secret-guessed"
                )
            ),
        ),
        (
            "signature stripped",
            format!("Bearer {}.", good.rsplit_once('.').unwrap().0),
        ),
        (
            "claims swapped after signing",
            format!(
                "Bearer {}.{}.{}",
                good.split('.').next().unwrap(),
                B64.encode(claims(&UserId::new().to_string()).to_string()),
                good.rsplit('.').next().unwrap()
            ),
        ),
        (
            "expired",
            format!(
                "Bearer {}",
                hmac_token(
                    json!({"alg": "HS256"}),
                    json!({"sub": user, "iat": now - 7200, "exp": now - 3600}),
                    TEST_SECRET
                )
            ),
        ),
        (
            "no exp",
            format!(
                "Bearer {}",
                hmac_token(
                    json!({"alg": "HS256"}),
                    json!({"sub": user, "iat": now}),
                    TEST_SECRET
                )
            ),
        ),
        (
            "exp as a string",
            format!(
                "Bearer {}",
                hmac_token(
                    json!({"alg": "HS256"}),
                    json!({"sub": user, "exp": "never"}),
                    TEST_SECRET
                )
            ),
        ),
        (
            "sub longer than 255 characters",
            format!(
                "Bearer {}",
                hmac_token(
                    json!({"alg": "HS256"}),
                    claims(&"u".repeat(256)),
                    TEST_SECRET
                )
            ),
        ),
        ("huge", format!("Bearer {}", "A".repeat(64 * 1024))),
    ];
    for (what, header) in cases {
        let resp = app
            .client
            .get(app.jobs_url())
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        assert!(
            resp.status() == StatusCode::UNAUTHORIZED
                || resp.status() == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "{what}: {}",
            resp.status()
        );
        if resp.status() == StatusCode::UNAUTHORIZED {
            problem(resp, StatusCode::UNAUTHORIZED).await;
        }
    }
    // Any subject is a user's, and one that is no member's opens nothing:
    // 404, as for a workspace that does not exist.
    let stranger = hmac_token(json!({"alg": "HS256"}), claims("' OR 1=1 --"), TEST_SECRET);
    let resp = app
        .client
        .get(app.jobs_url())
        .header("authorization", format!("Bearer {stranger}"))
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::NOT_FOUND).await;
    // The same token, properly presented, gets in: the refusals above are
    // about the tokens, not about this workspace.
    let resp = app
        .client
        .get(app.jobs_url())
        .bearer_auth(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// Values shaped like SQL injection, wildcards and encodings that have
/// broken query builders.
const NASTY: &[&str] = &[
    "' OR '1'='1",
    "' OR 1=1 --",
    "x'; DROP TABLE jobs; --",
    "\" OR \"\"=\"",
    "1) OR (1=1",
    "%",
    "_",
    "*",
    "\\",
    "%00",
    "%27",
    "queued' UNION SELECT * FROM workspaces --",
    "$1",
    "{\"$ne\": null}",
    "../../etc/passwd",
    "𝕏",
];

#[tokio::test]
async fn injection_shaped_filters_match_nothing_and_break_nothing() {
    let app = TestApp::spawn().await;
    for i in 0..3 {
        app.create_job(json!({"type": "noop", "tags": [format!("t{i}")]}))
            .await;
    }
    // A second workspace whose jobs must never show up here.
    let (other_ws, other_user) = app.db.workspace(Tier::Standard).await;
    let mut other = app.db.insert(&[new_job(other_ws, "noop", json!({}))]).await;
    let other_job = other.remove(0);
    let own: Vec<String> = app
        .req("GET", "/jobs")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(own.len(), 3);

    // Every query parameter the document says the list takes.
    let doc = serde_json::to_value(offload::api::openapi()).unwrap();
    let params: Vec<String> = doc["paths"]["/api/workspaces/{ws}/jobs"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["in"] == "query")
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(params.len(), 7, "{params:?}");
    for param in &params {
        for value in NASTY {
            let resp = app
                .req("GET", "/jobs")
                .query(&[(param, value)])
                .send()
                .await
                .unwrap();
            let status = resp.status();
            if status == StatusCode::OK {
                let body: Value = resp.json().await.unwrap();
                for j in body["jobs"].as_array().unwrap() {
                    assert!(
                        own.contains(&j["id"].as_str().unwrap().to_string()),
                        "{param}={value:?} showed a job that is not this workspace's: {j}"
                    );
                }
                if param == "type" || param == "tag" {
                    assert_eq!(body["jobs"], json!([]), "{param}={value:?} matched a job");
                }
            } else {
                assert_eq!(status, StatusCode::BAD_REQUEST, "{param}={value:?}");
                problem(resp, StatusCode::BAD_REQUEST).await;
            }
        }
    }
    // The other paged lists and the paths that take ids.
    for value in NASTY {
        for path in ["/schedules", &format!("/jobs/{}/logs", own[0]), "/stats"] {
            for param in ["cursor", "limit", "window"] {
                let resp = app
                    .req("GET", path)
                    .query(&[(param, value)])
                    .send()
                    .await
                    .unwrap();
                assert!(
                    resp.status() == StatusCode::OK || resp.status() == StatusCode::BAD_REQUEST,
                    "{path}?{param}={value:?}: {}",
                    resp.status()
                );
                if resp.status() == StatusCode::BAD_REQUEST {
                    problem(resp, StatusCode::BAD_REQUEST).await;
                }
            }
        }
        let enc: String = url_encode(value);
        for path in [
            format!("/api/workspaces/{enc}/jobs"),
            format!("/api/workspaces/{}/jobs/{enc}", app.workspace),
            format!("/api/workspaces/{}/jobs/{enc}/cancel", app.workspace),
            format!("/api/workspaces/{}/schedules/{enc}", app.workspace),
        ] {
            let method = if path.ends_with("/cancel") {
                "POST"
            } else {
                "GET"
            };
            let resp = app
                .client
                .request(method.parse().unwrap(), format!("{}{path}", app.base))
                .bearer_auth(&app.token)
                .send()
                .await
                .unwrap();
            assert!(
                matches!(resp.status().as_u16(), 400 | 404),
                "{method} {path}: {}",
                resp.status()
            );
            let status = resp.status();
            problem(resp, status).await;
        }
    }
    // Nothing was dropped or changed, here or in the other workspace.
    assert_eq!(app.db.scalar_i64("SELECT count(*) FROM jobs").await, 4);
    assert_eq!(
        app.db.job(other_job.id).await.updated_at,
        other_job.updated_at
    );
    let stranger = token(other_user);
    let resp = app
        .client
        .get(format!("{}/api/workspaces/{other_ws}/jobs", app.base))
        .bearer_auth(stranger)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<Value>().await.unwrap()["jobs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Any JSON value, a few levels deep, with the keys the job payloads use
/// mixed into the random ones so generated objects reach past the first check.
fn any_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("ms".to_string()),
        Just("url".to_string()),
        Just("contact_ids".to_string()),
        Just("sequence_id".to_string()),
        Just("file".to_string()),
        Just("mapping".to_string()),
        Just("format".to_string()),
        Just("tag".to_string()),
        Just("steps".to_string()),
        Just("filter".to_string()),
        "[a-z_]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,24}".prop_map(Value::from),
        Just(json!("00000000-0000-0000-0000-000000000000")),
        Just(json!("https://example.com/hook")),
        Just(json!(u64::MAX)),
    ];
    leaf.prop_recursive(3, 32, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn every_job_type_judges_any_payload_without_panicking() {
    let registry = Registry::builtin();
    let types: Vec<&str> = registry.types().collect();
    let mut runner = TestRunner::new(PropConfig::with_cases(cases(3_000)));
    runner
        .run(
            &(prop::sample::select(types), any_json()),
            |(t, payload)| {
                if let Err(e) = registry.validate(t, &payload, offload::ids::WorkspaceId::new()) {
                    prop_assert!(
                        !e.to_string().is_empty(),
                        "{t}: an empty error for {payload}"
                    );
                }
                Ok(())
            },
        )
        .unwrap();
}

/// Valid create bodies, one per job type: the seeds the generator mutates.
fn valid_bodies() -> Vec<Value> {
    let id = "00000000-0000-4000-8000-000000000001";
    vec![
        json!({"type": "noop"}),
        json!({"type": "sleep", "payload": {"ms": 10, "steps": 2}, "priority": 3}),
        json!({"type": "webhook", "payload": {"url": "https://example.com/h", "body": {"a": 1}}}),
        json!({"type": "sequence_subscription", "payload": {"sequence_id": id, "contact_ids": [id]}}),
        json!({"type": "bulk_tag", "payload": {"contact_ids": [id], "add": ["vip"]}, "tags": ["x"]}),
        json!({"type": "lead_scoring", "payload": {}, "queue": "low"}),
        json!({"type": "contact_import", "payload": {"source": {"inline": "Email\na@b.co\n"}, "mapping": {"email": "Email"}}}),
        json!({"type": "bulk_export", "payload": {"filters": {"tag": "vip"}, "format": "csv"}, "max_attempts": 3}),
    ]
}

/// Replaces, drops or adds one value somewhere in `v`, picked by `path`.
fn mutate(v: &mut Value, path: &[usize], replacement: Value) {
    let Some((&first, rest)) = path.split_first() else {
        *v = replacement;
        return;
    };
    match v {
        Value::Object(m) if !m.is_empty() => {
            let key = m.keys().nth(first % m.len()).unwrap().clone();
            if rest.is_empty() && first % 3 == 0 {
                m.remove(&key);
            } else if rest.is_empty() && first % 3 == 1 {
                m.insert(format!("{key}_extra"), replacement);
            } else {
                mutate(m.get_mut(&key).unwrap(), rest, replacement);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let i = first % a.len();
            mutate(&mut a[i], rest, replacement);
        }
        _ => *v = replacement,
    }
}

/// A create body: a valid one, a valid one with one or two values changed,
/// or anything at all.
fn any_create_body() -> impl Strategy<Value = Value> {
    let seeds = valid_bodies();
    let mutation = (prop::collection::vec(any::<usize>(), 0..4), any_json());
    prop_oneof![
        1 => prop::sample::select(seeds.clone()),
        4 => (prop::sample::select(seeds), prop::collection::vec(mutation, 1..3)).prop_map(
            |(mut body, mutations)| {
                for (path, replacement) in mutations {
                    mutate(&mut body, &path, replacement);
                }
                body
            }
        ),
        1 => any_json(),
    ]
}

/// `PROPTEST_CASES` when set (for long runs), else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A runtime for the property tests, whose generators are not `Send` and
/// so drive async code from a plain test thread.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn generated_create_bodies_get_a_job_or_a_problem_never_a_5xx() {
    let rt = runtime();
    let app = rt.block_on(TestApp::spawn());
    let mut runner = TestRunner::new(PropConfig::with_cases(cases(400)));
    let accepted = std::cell::Cell::new(0i64);
    runner
        .run(&any_create_body(), |body| {
            let (status, resp) = rt.block_on(async {
                let resp = app.create_job(body.clone()).await;
                let status = resp.status();
                let ct = resp.headers().get("content-type").cloned();
                let json: Value = resp.json().await.unwrap_or(Value::Null);
                (status, (ct, json))
            });
            prop_assert!(!status.is_server_error(), "{body} → {status}: {resp:?}");
            if status == StatusCode::ACCEPTED {
                accepted.set(accepted.get() + 1);
                prop_assert_eq!(&resp.1["type"], &body["type"]);
                // The answer is the job as stored: reading it back gives the
                // same object.
                let id = resp.1["id"].as_str().unwrap_or_default().to_string();
                let stored: Value = rt
                    .block_on(async { app.get_job(&id).await.json().await.unwrap_or(Value::Null) });
                prop_assert_eq!(&resp.1, &stored);
            } else {
                prop_assert!(status.is_client_error(), "{body} → {status}");
                prop_assert_eq!(
                    resp.0.as_ref().map(|v| v.to_str().unwrap()),
                    Some("application/problem+json")
                );
                prop_assert!(resp.1["detail"].as_str().is_some_and(|d| !d.is_empty()));
            }
            Ok(())
        })
        .unwrap();
    eprintln!("{} generated bodies were accepted", accepted.get());
    // Exactly the accepted bodies became jobs.
    assert_eq!(
        rt.block_on(app.db.scalar_i64("SELECT count(*) FROM jobs")),
        accepted.get()
    );
}

fn any_body() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,64}",
        any_json().prop_map(|v| v.to_string()),
        any::<Vec<u8>>().prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        any_json().prop_map(|v| json!({"job_id": v, "workspace_id": v}).to_string()),
        Just(r#"{"job_id":"00000000-0000-0000-0000-000000000000"}"#.to_string()),
    ]
}

#[test]
fn generated_sqs_records_fail_alone_and_real_jobs_still_complete() {
    let rt = runtime();
    let d = rt.block_on(TestDb::new());
    let (ws, _) = rt.block_on(d.workspace(Tier::Unlimited));
    let mut runner = TestRunner::new(PropConfig::with_cases(cases(40)));
    let strategy = (prop::collection::vec(any_body(), 1..8), 0usize..3);
    runner
        .run(&strategy, |(bodies, real)| {
            rt.block_on(async {
                let q = Arc::new(d.pg_queue(5));
                let jobs = d
                    .insert(
                        &(0..real)
                            .map(|_| new_job(ws, "noop", json!({})))
                            .collect::<Vec<_>>(),
                    )
                    .await;
                let mut event = SqsEvent::default();
                let mut expected_failures = Vec::new();
                let records = bodies.iter().cloned().chain(jobs.iter().map(|j| {
                    JobMessage {
                        job_id: j.id,
                        workspace_id: ws,
                    }
                    .body()
                }));
                for (i, body) in records.enumerate() {
                    if serde_json::from_str::<JobMessage>(&body).is_err() {
                        expected_failures.push(format!("m{i}"));
                    }
                    let mut m = SqsMessage::default();
                    m.message_id = Some(format!("m{i}"));
                    m.body = Some(body);
                    event.records.push(m);
                }
                let resp = d
                    .worker(q, WorkerConfig::default())
                    .handle(event, tokio::time::Instant::now() + Duration::from_secs(60))
                    .await;
                let failed: Vec<String> = resp
                    .batch_item_failures
                    .iter()
                    .map(|f| f.item_identifier.clone())
                    .collect();
                prop_assert_eq!(failed, expected_failures);
                for j in &jobs {
                    prop_assert_eq!(d.job(j.id).await.status, JobStatus::Completed);
                }
                Ok(())
            })
        })
        .unwrap();
}

#[tokio::test]
async fn a_nul_character_is_refused_with_its_place_and_an_escaped_one_is_kept() {
    let app = TestApp::spawn().await;
    // PostgreSQL cannot store U+0000 in jsonb: a clear 422, not a 500.
    let p = problem(
        app.create_job(json!({"type": "webhook",
            "payload": {"url": "https://example.com/h", "body": ["ok", "a\u{0}b"]}}))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(p["field"], "payload.body[1]");
    assert!(p["detail"].as_str().unwrap().contains("NUL"), "{p}");
    let resp = app
        .client
        .post(format!(
            "{}/api/workspaces/{}/schedules",
            app.base, app.workspace
        ))
        .bearer_auth(&app.token)
        .json(&json!({"name": "n\u{0}", "cron": "@daily", "type": "noop"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await["field"],
        "name"
    );
    assert_eq!(app.db.scalar_i64("SELECT count(*) FROM jobs").await, 0);
    // A backslash followed by "u0000" is ordinary text.
    let resp = app
        .create_job(json!({"type": "webhook",
            "payload": {"url": "https://example.com/h", "body": "\\u0000"}}))
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["payload"]["body"], "\\u0000");
}

#[tokio::test]
async fn tiny_and_huge_numbers_read_back_exactly_as_created() {
    // PostgreSQL prints jsonb numbers as long plain decimals; reading those
    // back must give the very float that was sent (found by the property
    // test: the last digit of -8.434828378087277e-243 came back changed).
    let app = TestApp::spawn().await;
    let body = json!([-8.434828378087277e-243, 1e-300, 1.7976931348623157e308, 0.1]);
    let created: Value = app
        .create_job(json!({"type": "webhook",
            "payload": {"url": "https://example.com/h", "body": body}}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(created["payload"]["body"], body);
    let stored: Value = app
        .get_job(created["id"].as_str().unwrap())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(stored, created);
}
