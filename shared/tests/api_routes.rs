//! The rest of the API over real HTTP: batch creates, long-polling and
//! ETags, stats, schedules, creation limits, roles, CORS and the OpenAPI
//! document.

use std::sync::Arc;
use std::time::{Duration, Instant};

use offload::api::ApiSettings;
use offload::config::WorkerConfig;
use offload::ids::UserId;
use offload::testing::{
    event_source, expect_problem as problem, token, TestApp, TestDb, JOB_FIELDS,
};
use offload::workspace::{self, Role, Tier};
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test]
async fn a_batch_creates_all_in_order_or_nothing() {
    let app = TestApp::spawn().await;
    let jobs: Vec<Value> = (0..25)
        .map(|i| json!({"type": "sleep", "payload": {"ms": i}}))
        .collect();
    let resp = app
        .req("POST", "/jobs/batch")
        .json(&json!({ "jobs": jobs }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let body: Value = resp.json().await.unwrap();
    let got = body["jobs"].as_array().unwrap();
    assert_eq!(got.len(), 25);
    for (i, j) in got.iter().enumerate() {
        assert_eq!(j["payload"]["ms"], i, "order kept");
        assert_eq!(j["status"], "queued");
    }

    let mut bad: Vec<Value> = (0..5).map(|_| json!({"type": "noop"})).collect();
    bad[3] = json!({"type": "sleep", "payload": {"ms": "slow"}});
    let p = problem(
        app.req("POST", "/jobs/batch")
            .json(&json!({ "jobs": bad }))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(p["field"], "jobs[3].payload.ms");
    let too_many: Vec<Value> = (0..1001).map(|_| json!({"type": "noop"})).collect();
    let p = problem(
        app.req("POST", "/jobs/batch")
            .json(&json!({ "jobs": too_many }))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(p["field"], "jobs");
    problem(
        app.req("POST", "/jobs/batch")
            .json(&json!({ "jobs": [] }))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(app.db.scalar_i64("SELECT count(*) FROM jobs").await, 25);
}

#[tokio::test]
async fn a_long_poll_returns_as_soon_as_the_job_changes_and_times_out_cleanly() {
    let app = TestApp::spawn().await;
    let job: Value = app
        .create_job(json!({"type": "sleep", "payload": {"ms": 50}}))
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    let first = app.get_job(&id).await;
    let etag = first.headers()["etag"].to_str().unwrap().to_string();

    // Unchanged: 304, cheaply.
    let resp = app
        .req("GET", &format!("/jobs/{id}"))
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);

    // Nobody runs it: the long-poll waits its full time and answers 304.
    let t = Instant::now();
    let resp = app
        .req("GET", &format!("/jobs/{id}?wait=1"))
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "returned early: {:?}",
        t.elapsed()
    );

    // A worker picks it up: the long-poll answers well before its 10 s.
    let source = event_source(
        app.queue.clone(),
        app.db.worker(app.queue.clone(), WorkerConfig::default()),
    );
    let run = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        source.drain().await
    });
    let t = Instant::now();
    let resp = app
        .req("GET", &format!("/jobs/{id}?wait=10"))
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let changed: Value = resp.json().await.unwrap();
    assert_ne!(changed["status"], "queued");
    run.await.unwrap();
    problem(
        app.req("GET", &format!("/jobs/{id}?wait=99"))
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
}

#[tokio::test]
async fn cancelling_a_running_job_answers_202_and_it_ends_cancelled() {
    let app = TestApp::spawn().await;
    let job: Value = app
        .create_job(json!({"type": "sleep", "payload": {"ms": 3000, "steps": 30}}))
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    let source = event_source(
        app.queue.clone(),
        app.db.worker(app.queue.clone(), WorkerConfig::default()),
    );
    let run = tokio::spawn(async move { source.drain().await });
    app.db
        .wait_for_status(
            id.parse().unwrap(),
            offload::job::JobStatus::Running,
            Duration::from_secs(5),
        )
        .await;
    let resp = app
        .req("POST", &format!("/jobs/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    run.await.unwrap();
    let done: Value = app.get_job(&id).await.json().await.unwrap();
    assert_eq!(done["status"], "cancelled");
    assert!(done["result"]["steps_done"].as_u64().unwrap() < 30);
    let logs: Value = app.get_json(&format!("/jobs/{id}/logs")).await;
    assert!(logs["logs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["message"].as_str().unwrap().contains("cancel")));
}

#[tokio::test]
async fn stats_count_by_status_and_queue_and_report_latencies() {
    let app = TestApp::spawn().await;
    for _ in 0..3 {
        app.create_job(json!({"type": "noop"})).await;
    }
    app.create_job(
        json!({"type": "sleep", "payload": {"ms": 0, "fail_attempts": 1, "permanent": true}}),
    )
    .await;
    let worker = app.db.worker(app.queue.clone(), WorkerConfig::default());
    event_source(app.queue.clone(), worker).drain().await;
    app.create_job(json!({"type": "noop", "queue": "low"}))
        .await;
    app.create_job(json!({"type": "noop", "queue": "high"}))
        .await;

    let s: Value = app.get_json("/stats").await;
    assert_eq!(s["by_status"]["completed"], 3, "{s}");
    assert_eq!(s["by_status"]["dead"], 1);
    assert_eq!(s["by_status"]["queued"], 2);
    assert_eq!(s["by_status"]["running"], 0);
    assert_eq!(s["by_queue"]["low"]["queued"], 1);
    assert_eq!(s["by_queue"]["high"]["queued"], 1);
    assert_eq!(s["by_queue"]["default"]["queued"], 0);
    assert_eq!(s["failure_rate"].as_f64().unwrap(), 0.25);
    let minute = &s["throughput"][0];
    assert_eq!(
        (minute["completed"].as_i64(), minute["failed"].as_i64()),
        (Some(3), Some(1))
    );
    assert_eq!(s["wait_ms"]["samples"], 4);
    assert!(s["wait_ms"]["p99"].as_f64().unwrap() >= s["wait_ms"]["p50"].as_f64().unwrap());
    assert_eq!(s["run_ms"]["samples"], 4);
    problem(
        app.req("GET", "/stats?window=5").send().await.unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
}

#[tokio::test]
async fn schedules_can_be_created_read_changed_and_deleted() {
    let app = TestApp::spawn().await;
    let body = json!({"name": "nightly scoring", "cron": "0 2 * * *", "timezone": "Europe/Paris",
                      "type": "noop", "queue": "low", "tags": ["nightly"]});
    let resp = app
        .req("POST", "/schedules")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let s: Value = resp.json().await.unwrap();
    let id = s["id"].as_str().unwrap().to_string();
    // The next five runs, each at 02:00 in Paris, a day apart.
    let upcoming: Vec<chrono::DateTime<chrono::Utc>> = s["upcoming"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(upcoming.len(), 5, "{s}");
    assert_eq!(s["upcoming"][0], s["next_run_at"]);
    for t in &upcoming {
        let paris = t.with_timezone(&chrono_tz::Europe::Paris);
        assert_eq!(paris.format("%H:%M").to_string(), "02:00", "{t}");
    }
    assert!(upcoming
        .windows(2)
        .all(|w| w[1] - w[0] >= chrono::Duration::hours(23)));
    assert_eq!(s["timezone"], "Europe/Paris");
    assert!(s["next_run_at"].as_str().unwrap().ends_with(":00:00Z"));

    let list: Value = app.get_json("/schedules").await;
    assert_eq!(list["schedules"].as_array().unwrap().len(), 1);
    let mut changed = body.clone();
    changed["cron"] = json!("30 3 * * 1");
    changed["enabled"] = json!(false);
    let resp = app
        .req("PUT", &format!("/schedules/{id}"))
        .json(&changed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got: Value = app.get_json(&format!("/schedules/{id}")).await;
    assert_eq!(
        (got["cron"].as_str(), got["enabled"].as_bool()),
        (Some("30 3 * * 1"), Some(false))
    );

    for (field, value) in [
        ("cron", json!("whenever")),
        ("timezone", json!("Atlantis/Central")),
        ("type", json!("nope")),
    ] {
        let mut bad = body.clone();
        bad[field] = value;
        let p = problem(
            app.req("POST", "/schedules")
                .json(&bad)
                .send()
                .await
                .unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert_eq!(p["field"], field, "{p}");
    }
    assert_eq!(
        app.req("DELETE", &format!("/schedules/{id}"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    problem(
        app.req("GET", &format!("/schedules/{id}"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;

    // The nightly lead scoring of the README runs at 02:00 in its own zone.
    let resp = app
        .req("POST", "/schedules")
        .json(&json!({"name": "nightly lead scoring", "cron": "0 2 * * *",
                      "timezone": "America/New_York", "type": "lead_scoring"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let s: Value = resp.json().await.unwrap();
    let next = chrono::DateTime::parse_from_rfc3339(s["next_run_at"].as_str().unwrap()).unwrap();
    use chrono::Timelike;
    assert_eq!(next.with_timezone(&chrono_tz::America::New_York).hour(), 2);
}

#[tokio::test]
async fn members_read_but_only_admins_delete_jobs_or_change_schedules() {
    let app = TestApp::spawn().await;
    let member = UserId::new();
    let conn = app.db.pool.get().await.unwrap();
    workspace::add_member(&**conn, app.workspace, member, Role::Member)
        .await
        .unwrap();
    let as_member = |method: &str, path: &str| {
        app.client
            .request(
                method.parse().unwrap(),
                format!("{}/api/workspaces/{}{path}", app.base, app.workspace),
            )
            .bearer_auth(token(member))
    };
    let job: Value = app
        .create_job(json!({"type": "noop"}))
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    app.req("POST", &format!("/jobs/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        as_member("GET", &format!("/jobs/{id}"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    problem(
        as_member("DELETE", &format!("/jobs/{id}"))
            .send()
            .await
            .unwrap(),
        StatusCode::FORBIDDEN,
    )
    .await;
    problem(
        as_member("POST", "/schedules")
            .json(&json!({"name": "x", "cron": "@daily", "type": "noop"}))
            .send()
            .await
            .unwrap(),
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(
        app.req("DELETE", &format!("/jobs/{id}"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn another_workspaces_member_cannot_reach_its_schedules() {
    let app = TestApp::spawn().await;
    let s: Value = app
        .req("POST", "/schedules")
        .json(&json!({"name": "x", "cron": "@hourly", "type": "noop"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = s["id"].as_str().unwrap();
    let (other_ws, stranger) = app.db.workspace(Tier::Standard).await;
    for (method, path) in [
        ("GET", format!("/schedules/{id}")),
        ("DELETE", format!("/schedules/{id}")),
        ("GET", "/schedules".into()),
        ("GET", "/stats".into()),
    ] {
        let url = format!("{}/api/workspaces/{}{path}", app.base, app.workspace);
        problem(
            app.client
                .request(method.parse().unwrap(), url)
                .bearer_auth(token(stranger))
                .send()
                .await
                .unwrap(),
            StatusCode::NOT_FOUND,
        )
        .await;
    }
    let url = format!("{}/api/workspaces/{other_ws}/schedules/{id}", app.base);
    problem(
        app.client
            .get(url)
            .bearer_auth(token(stranger))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn a_free_workspace_is_held_to_its_hourly_creation_limit() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let app = TestApp::spawn_full(db, q, Tier::Free, ApiSettings::default()).await;
    for _ in 0..10 {
        assert_eq!(
            app.create_job(json!({"type": "noop"})).await.status(),
            StatusCode::ACCEPTED
        );
    }
    let resp = app.create_job(json!({"type": "noop"})).await;
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&retry_after), "{retry_after}");
    let p = problem(resp, StatusCode::TOO_MANY_REQUESTS).await;
    assert!(p["detail"].as_str().unwrap().contains("per hour"), "{p}");
    let batch: Vec<Value> = (0..2).map(|_| json!({"type": "noop"})).collect();
    problem(
        app.req("POST", "/jobs/batch")
            .json(&json!({"jobs": batch}))
            .send()
            .await
            .unwrap(),
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    assert_eq!(
        app.db.scalar_i64("SELECT count(*) FROM jobs").await,
        10,
        "nothing created over the limit"
    );
}

/// A `fan_out` makes its children too: they count against the hourly
/// creation limit when it is created, and belong to its creator.
#[tokio::test]
async fn a_fan_out_counts_its_children_against_the_creation_limit() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let app = TestApp::spawn_full(db, q, Tier::Free, ApiSettings::default()).await;
    let children = |n: usize| -> Vec<Value> { (0..n).map(|_| json!({"type": "noop"})).collect() };
    // 1 + 10 jobs is more than a free user's 10 an hour.
    let p = problem(
        app.create_job(json!({"type": "fan_out", "payload": {"jobs": children(10)}}))
            .await,
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("11 jobs"), "{p}");
    assert_eq!(app.db.scalar_i64("SELECT count(*) FROM jobs").await, 0);
    // 1 + 9 is exactly the budget; after it, not even one more job.
    let resp = app
        .create_job(json!({"type": "fan_out", "payload": {"jobs": children(9)}}))
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    problem(
        app.create_job(json!({"type": "noop"})).await,
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    let worker = app.db.worker(app.queue.clone(), WorkerConfig::default());
    event_source(app.queue.clone(), worker).drain().await;
    assert_eq!(
        app.db
            .scalar_i64(
                "SELECT count(*) FROM jobs WHERE status = 'completed' \
                 AND created_by = (SELECT created_by FROM jobs WHERE job_type = 'fan_out')"
            )
            .await,
        10,
        "the fan_out and its nine children, all created by its creator"
    );
}

#[tokio::test]
async fn unfinished_jobs_are_capped_per_workspace() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let app = TestApp::spawn_full(db, q, Tier::Standard, ApiSettings::default()).await;
    app.db
        .pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE workspaces SET max_unfinished = 3 WHERE id = $1",
            &[&app.workspace.0],
        )
        .await
        .unwrap();
    let batch: Vec<Value> = (0..3).map(|_| json!({"type": "noop"})).collect();
    assert_eq!(
        app.req("POST", "/jobs/batch")
            .json(&json!({"jobs": batch}))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::ACCEPTED
    );
    let p = problem(
        app.create_job(json!({"type": "noop"})).await,
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("unfinished"), "{p}");
    // Once they finish, there is room again.
    let worker = app.db.worker(app.queue.clone(), WorkerConfig::default());
    event_source(app.queue.clone(), worker).drain().await;
    assert_eq!(
        app.db
            .scalar_i64(&format!(
                "SELECT unfinished::int8 FROM workspaces WHERE id = '{}'",
                app.workspace
            ))
            .await,
        0
    );
    assert_eq!(
        app.create_job(json!({"type": "noop"})).await.status(),
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn concurrent_requests_with_one_idempotency_key_make_one_job() {
    let app = Arc::new(TestApp::spawn().await);
    let mut handles = Vec::new();
    for _ in 0..8 {
        let app = app.clone();
        handles.push(tokio::spawn(async move {
            let resp = app
                .req("POST", "/jobs")
                .header("Idempotency-Key", "import-42")
                .json(&json!({"type": "noop"}))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let body: Value = resp.json().await.unwrap();
            (status, body["id"].as_str().unwrap().to_string())
        }));
    }
    let mut ids = Vec::new();
    let mut created = 0;
    for h in handles {
        let (status, id) = h.await.unwrap();
        if status == StatusCode::ACCEPTED {
            created += 1;
        } else {
            assert_eq!(status, StatusCode::OK);
        }
        ids.push(id);
    }
    ids.dedup();
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1);
    assert_eq!(app.db.scalar_i64("SELECT count(*) FROM jobs").await, 1);
}

#[tokio::test]
async fn an_idempotency_key_expires_after_its_ttl() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let settings = ApiSettings {
        idempotency_ttl: chrono::Duration::milliseconds(300),
        ..ApiSettings::default()
    };
    let app = TestApp::spawn_full(db, q, Tier::Enterprise, settings).await;
    let post = || {
        app.req("POST", "/jobs")
            .header("Idempotency-Key", "k")
            .json(&json!({"type": "noop"}))
            .send()
    };
    let a: Value = post().await.unwrap().json().await.unwrap();
    let b = post().await.unwrap();
    assert_eq!(b.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let c = post().await.unwrap();
    assert_eq!(
        c.status(),
        StatusCode::ACCEPTED,
        "an expired key makes a new job"
    );
    let c: Value = c.json().await.unwrap();
    assert_ne!(a["id"], c["id"]);
}

#[tokio::test]
async fn cors_answers_preflights_for_configured_origins_only() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    let settings = ApiSettings {
        cors_origins: vec!["https://app.example.com".into()],
        ..ApiSettings::default()
    };
    let app = TestApp::spawn_full(db, q, Tier::Enterprise, settings).await;
    let preflight = |origin: &str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.jobs_url())
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization,content-type",
            )
            .send()
    };
    let ok = preflight("https://app.example.com").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let other = preflight("https://evil.example.net").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn the_openapi_document_describes_every_route_with_the_job_shape() {
    let app = TestApp::spawn().await;
    let doc: Value = app
        .client
        .get(format!("{}/api/openapi.json", app.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/health", vec!["get"]),
        ("/api/workspaces/{ws}/jobs", vec!["get", "post"]),
        ("/api/workspaces/{ws}/jobs/batch", vec!["post"]),
        ("/api/workspaces/{ws}/jobs/{id}", vec!["get", "delete"]),
        ("/api/workspaces/{ws}/jobs/{id}/cancel", vec!["post"]),
        ("/api/workspaces/{ws}/jobs/{id}/retry", vec!["post"]),
        ("/api/workspaces/{ws}/jobs/{id}/logs", vec!["get"]),
        ("/api/workspaces/{ws}/stats", vec!["get"]),
        ("/api/workspaces/{ws}/schedules", vec!["get", "post"]),
        ("/api/workspaces", vec!["get", "post"]),
        ("/api/workspaces/{ws}", vec!["get", "patch", "delete"]),
        ("/api/workspaces/{ws}/members", vec!["get", "post"]),
        ("/api/workspaces/{ws}/members/{id}", vec!["delete"]),
        ("/api/workspaces/{ws}/browser-tokens", vec!["post"]),
        (
            "/api/workspaces/{ws}/schedules/{id}",
            vec!["get", "put", "delete"],
        ),
    ] {
        for m in methods {
            assert!(
                paths.get(path).and_then(|p| p.get(m)).is_some(),
                "{m} {path} is not documented"
            );
        }
    }
    let job = &doc["components"]["schemas"]["Job"]["properties"];
    let mut keys: Vec<&str> = job
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    let mut want = JOB_FIELDS.to_vec();
    want.sort();
    assert_eq!(keys, want);
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    // Every workspace route documents its path parameters and the problem
    // answers any of them can give.
    for (path, methods) in paths
        .iter()
        .filter(|(p, _)| p.starts_with("/api/workspaces/"))
    {
        for (method, op) in methods.as_object().unwrap() {
            for status in ["400", "401", "404", "503"] {
                assert_eq!(
                    op["responses"][status]["content"]["application/problem+json"]["schema"]
                        ["$ref"],
                    "#/components/schemas/Problem",
                    "{method} {path} {status}"
                );
            }
            let segments: Vec<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            let declared: Vec<&str> = op["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            assert_eq!(declared, segments, "{method} {path}");
        }
    }
    // Generated clients key their operations by id: two alike, and one
    // route's types replace another's.
    let mut ids: Vec<&str> = paths
        .values()
        .flat_map(|m| m.as_object().unwrap().values())
        .map(|op| {
            op["operationId"]
                .as_str()
                .expect("every operation has an id")
        })
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "operation ids are unique: {ids:?}");
    let limit = doc["paths"]["/api/workspaces/{ws}/jobs"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limit")
        .unwrap();
    assert_eq!(
        (&limit["schema"]["minimum"], &limit["schema"]["maximum"]),
        (&json!(1), &json!(200))
    );
    // Every documented route exists: each answers something other than the router's 404 fallback.
    for path in paths.keys() {
        let url = format!(
            "{}{}",
            app.base,
            path.replace("{ws}", &app.workspace.to_string())
                .replace("{id}", &uuid::Uuid::new_v4().to_string())
        );
        let resp = app
            .client
            .get(&url)
            .bearer_auth(&app.token)
            .send()
            .await
            .unwrap();
        if resp.status() == StatusCode::NOT_FOUND {
            let p: Value = resp.json().await.unwrap();
            assert_ne!(
                p["detail"].as_str().unwrap_or(""),
                "no such route; the API lives under /api/workspaces/{ws}/…",
                "{path}"
            );
        }
    }
}
