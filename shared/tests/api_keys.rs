//! Workspace API keys: servers calling the API without a user.

use offload::testing::{expect_problem, TestApp};
use offload::workspace::Tier;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Creates a key as the workspace's admin; returns its view (with `key`).
async fn create_key(app: &TestApp, name: &str, role: &str) -> Value {
    let resp = app
        .req("POST", "/api-keys")
        .json(&json!({"name": name, "role": role}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    resp.json().await.unwrap()
}

fn as_key(app: &TestApp, method: &str, ws: &str, path: &str, key: &str) -> reqwest::RequestBuilder {
    app.client
        .request(
            method.parse().unwrap(),
            format!("{}/api/workspaces/{ws}{path}", app.base),
        )
        .bearer_auth(key)
}

#[tokio::test]
async fn a_key_is_shown_once_used_on_its_workspace_and_dead_once_revoked() {
    let app = TestApp::spawn().await;
    let ws = app.workspace.to_string();
    let created = create_key(&app, "billing cron", "member").await;
    let key = created["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("ofk_") && key.len() > 40, "{key}");
    assert!(key.starts_with(created["prefix"].as_str().unwrap()));
    assert_eq!(created["role"], "member");
    assert!(created["last_used_at"].is_null());

    // The server creates a job with the key alone.
    let resp = as_key(&app, "POST", &ws, "/jobs", &key)
        .json(&json!({"type": "noop"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["workspace_id"], ws);

    // The list shows the key, its use, and never its secret.
    let list: Value = app.get_json("/api-keys").await;
    let keys = list["api_keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["name"], "billing cron");
    assert!(keys[0]["last_used_at"].is_string(), "{list}");
    assert!(keys[0].get("key").is_none(), "{list}");
    assert!(!list.to_string().contains(&key));

    // Nor is the secret in the database: only its hash.
    let conn = app.db.pool.get().await.unwrap();
    let stored: Vec<u8> = conn
        .query_one("SELECT secret_hash FROM api_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(stored, key.as_bytes());
    let dump: String = conn
        .query_one("SELECT row_to_json(k)::text FROM api_keys k", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !dump.contains(&key[4..]),
        "the table holds no copy of the secret"
    );

    let id = created["id"].as_str().unwrap();
    let revoke = app
        .req("DELETE", &format!("/api-keys/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), StatusCode::NO_CONTENT);
    let after = as_key(&app, "GET", &ws, "/jobs", &key)
        .send()
        .await
        .unwrap();
    let body = expect_problem(after, StatusCode::UNAUTHORIZED).await;
    assert!(
        body["detail"].as_str().unwrap().contains("API key"),
        "{body}"
    );
    let again = app
        .req("DELETE", &format!("/api-keys/{id}"))
        .send()
        .await
        .unwrap();
    expect_problem(again, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn a_key_opens_nothing_outside_its_workspace_and_its_role() {
    let app = TestApp::spawn().await;
    let (other_ws, _) = app.db.workspace(Tier::Standard).await;
    let member = create_key(&app, "webhook receiver", "member").await;
    let key = member["key"].as_str().unwrap();

    // Another workspace's routes do not exist for this key.
    for (method, path) in [("GET", "/jobs"), ("POST", "/api-keys"), ("GET", "/stats")] {
        let resp = as_key(&app, method, &other_ws.to_string(), path, key)
            .json(&json!({"name": "x", "role": "admin"}))
            .send()
            .await
            .unwrap();
        expect_problem(resp, StatusCode::NOT_FOUND).await;
    }

    // A member key cannot do what only admins may: manage keys, schedules.
    let ws = app.workspace.to_string();
    let escalate = as_key(&app, "POST", &ws, "/api-keys", key)
        .json(&json!({"name": "mine now", "role": "admin"}))
        .send()
        .await
        .unwrap();
    expect_problem(escalate, StatusCode::FORBIDDEN).await;
    let list = as_key(&app, "GET", &ws, "/api-keys", key)
        .send()
        .await
        .unwrap();
    expect_problem(list, StatusCode::FORBIDDEN).await;
    let schedule = as_key(&app, "POST", &ws, "/schedules", key)
        .json(&json!({"name": "n", "cron": "@daily", "type": "noop"}))
        .send()
        .await
        .unwrap();
    expect_problem(schedule, StatusCode::FORBIDDEN).await;
    // Destructive job types are for admins too (README's job-type table).
    let delete_all =
        json!({"type": "bulk_delete", "payload": {"contact_ids": [uuid::Uuid::now_v7()]}});
    let refused = as_key(&app, "POST", &ws, "/jobs", key)
        .json(&delete_all)
        .send()
        .await
        .unwrap();
    let body = expect_problem(refused, StatusCode::FORBIDDEN).await;
    assert!(
        body["detail"].as_str().unwrap().contains("bulk_delete"),
        "{body}"
    );
    let batch = as_key(&app, "POST", &ws, "/jobs/batch", key)
        .json(&json!({"jobs": [{"type": "noop"}, delete_all.clone()]}))
        .send()
        .await
        .unwrap();
    expect_problem(batch, StatusCode::FORBIDDEN).await;
    assert_eq!(
        app.db.scalar_i64("SELECT count(*) FROM jobs").await,
        0,
        "a refused batch creates nothing"
    );

    // An admin key can.
    let admin = create_key(&app, "ops", "admin").await;
    let made = as_key(
        &app,
        "POST",
        &ws,
        "/api-keys",
        admin["key"].as_str().unwrap(),
    )
    .json(&json!({"name": "made by a key", "role": "member"}))
    .send()
    .await
    .unwrap();
    assert_eq!(made.status(), StatusCode::CREATED);
    let deleting = as_key(&app, "POST", &ws, "/jobs", admin["key"].as_str().unwrap())
        .json(&delete_all)
        .send()
        .await
        .unwrap();
    assert_eq!(deleting.status(), StatusCode::ACCEPTED);

    // Garbage is refused by name; a made-up key is 401, not a server error.
    let bad_role = app
        .req("POST", "/api-keys")
        .json(&json!({"name": "n", "role": "owner"}))
        .send()
        .await
        .unwrap();
    let body = expect_problem(bad_role, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(body["field"], "role", "{body}");
    let no_name = app
        .req("POST", "/api-keys")
        .json(&json!({"name": "  ", "role": "member"}))
        .send()
        .await
        .unwrap();
    expect_problem(no_name, StatusCode::UNPROCESSABLE_ENTITY).await;
    let made_up = as_key(&app, "GET", &ws, "/jobs", "ofk_made-up")
        .send()
        .await
        .unwrap();
    expect_problem(made_up, StatusCode::UNAUTHORIZED).await;
}
