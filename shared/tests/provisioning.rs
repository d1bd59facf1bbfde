//! A web app provisions its tenants and users: a platform key creates
//! workspaces (safe to repeat by external id), changes and deletes them, and
//! adds members by the subject their identity provider gives them; browser
//! tokens open only the jobs they name.

use std::time::Duration;

use offload::browser_token::{BrowserKeys, Grant, Scope};
use offload::config::WorkerConfig;
use offload::ids::{JobId, WorkspaceId};
use offload::job::JobStatus;
use offload::platform::PLATFORM_WORKSPACE;
use offload::testing::{event_source, expect_problem, run_until_finished, TestApp, TEST_SECRET};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// An HS256 token for `subject`, with `iss` when given.
fn token_for(subject: &str, issuer: Option<&str>) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut claims = json!({"sub": subject, "iat": now, "exp": now + 3600});
    if let Some(iss) = issuer {
        claims["iss"] = json!(iss);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .unwrap()
}

struct Platform {
    app: TestApp,
    key: String,
}

impl Platform {
    async fn spawn() -> Platform {
        let app = TestApp::spawn().await;
        let conn = app.db.pool.get().await.unwrap();
        let (_, key) = offload::platform::create_key(&**conn, "acme web app")
            .await
            .unwrap();
        Platform { app, key }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/workspaces{path}", self.app.base)
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        bearer: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut r = self
            .app
            .client
            .request(method.parse().unwrap(), self.url(path))
            .bearer_auth(bearer);
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send().await.unwrap()
    }

    async fn json(&self, method: &str, path: &str, body: Value, status: StatusCode) -> Value {
        let resp = self.send(method, path, &self.key, Some(body)).await;
        assert_eq!(resp.status(), status, "{method} {path}");
        resp.json().await.unwrap()
    }
}

#[tokio::test]
async fn provisioning_by_external_id_is_safe_to_repeat_and_only_a_platform_key_may() {
    let p = Platform::spawn().await;
    let ws = p
        .json(
            "POST",
            "",
            json!({"name": "Acme", "external_id": "org_2ab", "tier": "free"}),
            StatusCode::CREATED,
        )
        .await;
    assert_eq!(ws["tier"], "free");
    assert_eq!(ws["external_id"], "org_2ab");
    let again = p
        .json(
            "POST",
            "",
            json!({"name": "Acme again", "external_id": "org_2ab"}),
            StatusCode::OK,
        )
        .await;
    assert_eq!(again["id"], ws["id"]);
    assert_eq!(again["name"], "Acme", "a repeat changes nothing");
    assert_eq!(
        p.app
            .db
            .scalar_i64("SELECT count(*) FROM workspaces WHERE external_id = 'org_2ab'")
            .await,
        1
    );
    let found: Value = p
        .send("GET", "?external_id=org_2ab", &p.key, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(found["workspaces"][0]["id"], ws["id"]);
    let none: Value = p
        .send("GET", "?external_id=nobody", &p.key, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(none["workspaces"], json!([]));

    let id = ws["id"].as_str().unwrap();
    let changed = p
        .json(
            "PATCH",
            &format!("/{id}"),
            json!({"tier": "enterprise", "limits": {"max_running": 3}}),
            StatusCode::OK,
        )
        .await;
    assert_eq!(changed["tier"], "enterprise");
    assert_eq!(changed["limits"]["max_running"], 3);
    let limits = offload::workspace::limits(
        &**p.app.db.pool.get().await.unwrap(),
        WorkspaceId(id.parse().unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(limits.max_running, Some(3));
    assert_eq!(
        limits.max_unfinished,
        Some(1_000_000),
        "the enterprise tier's"
    );
    let cleared = p
        .json(
            "PATCH",
            &format!("/{id}"),
            json!({"limits": {"max_running": null}}),
            StatusCode::OK,
        )
        .await;
    assert_eq!(cleared["limits"]["max_running"], Value::Null);
    assert_eq!(cleared["tier"], "enterprise", "what was not given stays");

    // Garbage gets a problem naming the field, and changes nothing.
    for (body, field) in [
        (json!({"name": ""}), "name"),
        (
            json!({"name": "x", "limits": {"max_running": 0}}),
            "limits.max_running",
        ),
        (
            json!({"name": "x", "external_id": "e".repeat(256)}),
            "external_id",
        ),
        (json!({"name": "x", "tier": "gold"}), "tier"),
    ] {
        let resp = p.send("POST", "", &p.key, Some(body)).await;
        let problem = expect_problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(problem["field"], field, "{problem}");
    }

    // Nothing else provisions: a user's token, an API key, a made-up key.
    let made_up = format!("ofp_{}", "A".repeat(43));
    let resp = p
        .send("POST", "", &made_up, Some(json!({"name": "x"})))
        .await;
    expect_problem(resp, StatusCode::UNAUTHORIZED).await;
    let resp = p
        .send("POST", "", &p.app.token, Some(json!({"name": "x"})))
        .await;
    expect_problem(resp, StatusCode::FORBIDDEN).await;
    // And a platform key opens no job route.
    let resp = p
        .app
        .client
        .get(format!("{}/api/workspaces/{id}/jobs", p.app.base))
        .bearer_auth(&p.key)
        .send()
        .await
        .unwrap();
    expect_problem(resp, StatusCode::FORBIDDEN).await;
    let resp = p
        .app
        .client
        .post(format!("{}/api/workspaces/{id}/jobs", p.app.base))
        .bearer_auth(&p.key)
        .json(&json!({"type": "noop", "payload": {}}))
        .send()
        .await
        .unwrap();
    expect_problem(resp, StatusCode::FORBIDDEN).await;
}

#[tokio::test]
async fn members_of_any_identity_provider_are_users_and_a_removal_closes_the_door_at_once() {
    let p = Platform::spawn().await;
    let ws = p
        .json("POST", "", json!({"name": "Acme"}), StatusCode::CREATED)
        .await;
    let id = ws["id"].as_str().unwrap().to_string();
    let jobs = format!("{}/api/workspaces/{id}/jobs", p.app.base);
    let opens = |token: String| {
        let (client, jobs) = (p.app.client.clone(), jobs.clone());
        async move {
            client
                .get(jobs)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let members = format!("/{id}/members");
    for subject in [
        "auth0|65f0c2b9e4a1d2c3b4a5f6e7",
        "user_2abCdEfGhIjKlMnOpQrStUvWxYz",
        "Xy3kQ9pL2mN8rT5vW7zA1bC4dE6f", // Firebase: 28 characters
        "00u1a2b3c4D5e6F7g8h9",         // Okta
    ] {
        let added = p
            .json(
                "POST",
                &members,
                json!({"subject": subject, "role": "member"}),
                StatusCode::CREATED,
            )
            .await;
        assert_eq!(added["subject"], subject);
        assert_eq!(added["issuer"], Value::Null);
        assert_eq!(
            opens(token_for(subject, None)).await,
            StatusCode::OK,
            "{subject}"
        );
        // From any issuer the deployment accepts, when added without one.
        assert_eq!(
            opens(token_for(subject, Some("https://idp.example"))).await,
            StatusCode::OK
        );
    }

    // One subject under two issuers: two users, each with its own role.
    let (a, b) = ("https://a.example/", "https://b.example/");
    let under_a = p
        .json(
            "POST",
            &members,
            json!({"subject": "shared-sub", "issuer": a, "role": "admin"}),
            StatusCode::CREATED,
        )
        .await;
    let under_b = p
        .json(
            "POST",
            &members,
            json!({"subject": "shared-sub", "issuer": b, "role": "member"}),
            StatusCode::CREATED,
        )
        .await;
    assert_ne!(under_a["id"], under_b["id"]);
    let keys_url = format!("{}/api/workspaces/{id}/api-keys", p.app.base);
    let admin_only = |token: String| {
        let (client, url) = (p.app.client.clone(), keys_url.clone());
        async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(
        admin_only(token_for("shared-sub", Some(a))).await,
        StatusCode::OK
    );
    assert_eq!(
        admin_only(token_for("shared-sub", Some(b))).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        opens(token_for("shared-sub", Some("https://c.example/"))).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        opens(token_for("shared-sub", None)).await,
        StatusCode::NOT_FOUND
    );

    // The same subject again: the role changes, 200, one member.
    let promoted = p
        .json(
            "POST",
            &members,
            json!({"subject": "shared-sub", "issuer": b, "role": "admin"}),
            StatusCode::OK,
        )
        .await;
    assert_eq!(promoted["id"], under_b["id"]);
    assert_eq!(
        admin_only(token_for("shared-sub", Some(b))).await,
        StatusCode::OK
    );

    // An admin manages members too; a member may not.
    let as_admin = token_for("shared-sub", Some(a));
    let resp = p
        .send(
            "POST",
            &members,
            &as_admin,
            Some(json!({"subject": "invited", "role": "member"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let as_member = token_for("invited", None);
    let resp = p
        .send(
            "POST",
            &members,
            &as_member,
            Some(json!({"subject": "x", "role": "admin"})),
        )
        .await;
    expect_problem(resp, StatusCode::FORBIDDEN).await;
    let listed: Value = p
        .send("GET", &members, &p.key, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["members"].as_array().unwrap().len(), 7);

    // A job created by a member names them.
    let created: Value = p
        .app
        .client
        .post(&jobs)
        .bearer_auth(token_for("invited", None))
        .json(&json!({"type": "noop", "payload": {}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let invited = listed["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["subject"] == "invited")
        .unwrap();
    assert_eq!(created["created_by"], invited["id"]);

    // Removed: their very next request is refused.
    let resp = p
        .send(
            "DELETE",
            &format!("{members}/{}", invited["id"].as_str().unwrap()),
            &p.key,
            None,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(opens(as_member).await, StatusCode::NOT_FOUND);
    let resp = p
        .send(
            "DELETE",
            &format!("{members}/{}", invited["id"].as_str().unwrap()),
            &p.key,
            None,
        )
        .await;
    expect_problem(resp, StatusCode::NOT_FOUND).await;
    for (body, field) in [
        (json!({"subject": "", "role": "member"}), "subject"),
        (
            json!({"subject": "s".repeat(256), "role": "member"}),
            "subject",
        ),
        (
            json!({"subject": "s", "issuer": "", "role": "member"}),
            "issuer",
        ),
        (json!({"subject": "s", "role": "owner"}), "role"),
    ] {
        let resp = p.send("POST", &members, &p.key, Some(body)).await;
        let problem = expect_problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(problem["field"], field, "{problem}");
    }
}

#[tokio::test]
async fn an_admin_cannot_leave_the_workspace_without_one_but_the_platform_may() {
    let p = Platform::spawn().await;
    let ws = p
        .json("POST", "", json!({"name": "Solo"}), StatusCode::CREATED)
        .await;
    let members = format!("/{}/members", ws["id"].as_str().unwrap());
    let solo = p
        .json(
            "POST",
            &members,
            json!({"subject": "user_solo", "role": "admin"}),
            StatusCode::CREATED,
        )
        .await;
    let own = token_for("user_solo", None);
    let demote = json!({"subject": "user_solo", "role": "member"});
    let resp = p.send("POST", &members, &own, Some(demote.clone())).await;
    expect_problem(resp, StatusCode::CONFLICT).await;
    let me = format!("{members}/{}", solo["id"].as_str().unwrap());
    expect_problem(
        p.send("DELETE", &me, &own, None).await,
        StatusCode::CONFLICT,
    )
    .await;
    // With a second admin, either may go.
    let resp = p
        .send(
            "POST",
            &members,
            &own,
            Some(json!({"subject": "user_two", "role": "admin"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = p.send("POST", &members, &own, Some(demote)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // The platform may leave a workspace without admins (its app decides).
    let two: Value = p
        .send("GET", &members, &p.key, None)
        .await
        .json()
        .await
        .unwrap();
    let two = two["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["subject"] == "user_two")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = p
        .send("DELETE", &format!("{members}/{two}"), &p.key, None)
        .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn a_deleted_workspace_closes_at_once_and_a_job_removes_its_jobs_contacts_and_files() {
    let p = Platform::spawn().await;
    let ws = p
        .json(
            "POST",
            "",
            json!({"name": "Leaving", "external_id": "org_gone"}),
            StatusCode::CREATED,
        )
        .await;
    let id: WorkspaceId = ws["id"].as_str().unwrap().parse().unwrap();
    p.json(
        "POST",
        &format!("/{id}/members"),
        json!({"subject": "user_owner", "role": "admin"}),
        StatusCode::CREATED,
    )
    .await;
    let owner = token_for("user_owner", None);
    let jobs = format!("{}/api/workspaces/{id}/jobs", p.app.base);
    for _ in 0..3 {
        let resp = p
            .app
            .client
            .post(&jobs)
            .bearer_auth(&owner)
            .json(&json!({"type": "noop", "payload": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
    }
    {
        let conn = p.app.db.pool.get().await.unwrap();
        for i in 0..5 {
            conn.execute(
                "INSERT INTO contacts (id, workspace_id, email, first_name) VALUES ($1, $2, $3, 'A')",
                &[&uuid::Uuid::now_v7(), &id.0, &format!("a{i}@example.com")],
            )
            .await
            .unwrap();
        }
    }
    let storage = p.app.db.storage();
    let file = offload::storage::job_file_key(id, JobId::new(), "export.csv");
    storage.put(&file, "a,b\n".into()).await.unwrap();
    // A tenant of its own cannot aim the removal at anyone.
    let resp = p
        .app
        .client
        .post(&jobs)
        .bearer_auth(&owner)
        .json(&json!({"type": "workspace_delete", "payload": {"workspace_id": p.app.workspace}}))
        .send()
        .await
        .unwrap();
    expect_problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;

    let deletion = p
        .json(
            "DELETE",
            &format!("/{id}"),
            json!(null),
            StatusCode::ACCEPTED,
        )
        .await;
    assert!(deletion["workspace"]["deleting_at"].is_string());
    let job_id: JobId = deletion["job"]["id"].as_str().unwrap().parse().unwrap();
    let again = p
        .json(
            "DELETE",
            &format!("/{id}"),
            json!(null),
            StatusCode::ACCEPTED,
        )
        .await;
    assert_eq!(
        again["job"]["id"], deletion["job"]["id"],
        "one job, however often asked"
    );
    // Closed at once, before anything is removed.
    let resp = p
        .app
        .client
        .get(&jobs)
        .bearer_auth(&owner)
        .send()
        .await
        .unwrap();
    expect_problem(resp, StatusCode::NOT_FOUND).await;
    let resp = p
        .send(
            "POST",
            &format!("/{id}/members"),
            &p.key,
            Some(json!({"subject": "late", "role": "member"})),
        )
        .await;
    expect_problem(resp, StatusCode::NOT_FOUND).await;
    let resp = p
        .send(
            "POST",
            "",
            &p.key,
            Some(json!({"name": "x", "external_id": "org_gone"})),
        )
        .await;
    expect_problem(resp, StatusCode::CONFLICT).await;

    let worker = p
        .app
        .db
        .worker(p.app.queue.clone(), WorkerConfig::default());
    let source = event_source(p.app.queue.clone(), worker);
    let done = run_until_finished(&p.app.db, &source, job_id, Duration::from_secs(30)).await;
    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(done.workspace_id, PLATFORM_WORKSPACE);
    assert_eq!(done.result.as_ref().unwrap()["jobs"], 3);
    assert_eq!(done.result.as_ref().unwrap()["contacts"], 5);
    assert_eq!(done.result.as_ref().unwrap()["files"], 1);
    assert_eq!(done.progress.percentage, Some(100.0));
    let q = |sql: &str| sql.replace("$WS", &format!("'{id}'"));
    for table in [
        "workspaces WHERE id",
        "jobs WHERE workspace_id",
        "contacts WHERE workspace_id",
        "workspace_members WHERE workspace_id",
    ] {
        assert_eq!(
            p.app
                .db
                .scalar_i64(&q(&format!("SELECT count(*) FROM {table} = $WS")))
                .await,
            0,
            "{table}"
        );
    }
    assert!(!storage.exists(&file).await.unwrap());
    let resp = p.send("GET", &format!("/{id}"), &p.key, None).await;
    expect_problem(resp, StatusCode::NOT_FOUND).await;
    // The other tenant is untouched.
    assert_eq!(
        p.app.get_job(&JobId::new().to_string()).await.status(),
        StatusCode::NOT_FOUND
    );
    let resp = p
        .app
        .client
        .get(p.app.jobs_url())
        .bearer_auth(&p.app.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

async fn created(app: &TestApp, body: Value) -> Value {
    let resp = app.create_job(body).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn a_browser_token_opens_the_jobs_it_names_and_nothing_else() {
    let app = TestApp::spawn().await;
    let a = created(&app, json!({"type": "sleep", "payload": {"ms": 60000}})).await;
    let b = created(
        &app,
        json!({"type": "sleep", "payload": {"ms": 60000}, "tags": ["report:7"]}),
    )
    .await;
    let mint = |body: Value| {
        let req = app.req("POST", "/browser-tokens").json(&body);
        async move { req.send().await.unwrap() }
    };
    let resp = mint(json!({"jobs": [a["id"]]})).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body: Value = resp.json().await.unwrap();
    let token = body["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("ofb_"));
    let expires: chrono::DateTime<chrono::Utc> =
        body["expires_at"].as_str().unwrap().parse().unwrap();
    let ttl = expires - chrono::Utc::now();
    assert!(ttl > chrono::Duration::seconds(890) && ttl <= chrono::Duration::seconds(900));

    let get = |path: String, token: String| {
        let url = format!("{}/api/workspaces/{}{path}", app.base, app.workspace);
        let client = app.client.clone();
        async move { client.get(url).bearer_auth(token).send().await.unwrap() }
    };
    let (ida, idb) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    let job: Value = get(format!("/jobs/{ida}"), token.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(job["id"], a["id"]);
    assert_eq!(
        get(format!("/jobs/{ida}/logs"), token.clone())
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        get(format!("/jobs/{ida}/children"), token.clone())
            .await
            .status(),
        StatusCode::OK
    );
    expect_problem(
        get(format!("/jobs/{idb}"), token.clone()).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    expect_problem(
        get(format!("/jobs/{idb}/logs"), token.clone()).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    expect_problem(
        get("/jobs".into(), token.clone()).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    expect_problem(
        get("/stats".into(), token.clone()).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    let resp = app
        .client
        .post(app.jobs_url())
        .bearer_auth(&token)
        .json(&json!({"type": "noop", "payload": {}}))
        .send()
        .await
        .unwrap();
    expect_problem(resp, StatusCode::FORBIDDEN).await;
    // Another workspace's path: not there.
    let other = format!(
        "{}/api/workspaces/{}/jobs/{ida}",
        app.base,
        WorkspaceId::new()
    );
    let resp = app
        .client
        .get(other)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    expect_problem(resp, StatusCode::NOT_FOUND).await;

    // Cancel only with the scope.
    let cancel = |id: String, token: String| {
        let url = format!("{}/{id}/cancel", app.jobs_url());
        let client = app.client.clone();
        async move { client.post(url).bearer_auth(token).send().await.unwrap() }
    };
    expect_problem(
        cancel(ida.into(), token.clone()).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(
        app.db.job(ida.parse().unwrap()).await.status,
        JobStatus::Queued
    );
    let canceller: Value = mint(json!({"jobs": [a["id"]], "scopes": ["read", "cancel"]}))
        .await
        .json()
        .await
        .unwrap();
    let canceller = canceller["token"].as_str().unwrap().to_string();
    expect_problem(
        cancel(idb.into(), canceller.clone()).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(cancel(ida.into(), canceller).await.status(), StatusCode::OK);
    assert_eq!(
        app.db.job(idb.parse().unwrap()).await.status,
        JobStatus::Queued
    );

    // By tag: the tagged job, not the other.
    let tagged: Value = mint(json!({"tags": ["report:7"], "ttl_s": 60}))
        .await
        .json()
        .await
        .unwrap();
    let tagged = tagged["token"].as_str().unwrap().to_string();
    assert_eq!(
        get(format!("/jobs/{idb}"), tagged.clone()).await.status(),
        StatusCode::OK
    );
    expect_problem(
        get(format!("/jobs/{ida}"), tagged).await,
        StatusCode::NOT_FOUND,
    )
    .await;

    // Expired, tampered, or signed by another key: 401.
    let keys = BrowserKeys::new(TEST_SECRET.as_bytes());
    let now = chrono::Utc::now();
    let expired = keys.sign(&Grant::new(
        app.workspace,
        vec![ida.parse().unwrap()],
        vec![],
        vec![Scope::Read],
        now - chrono::Duration::hours(2),
        now - chrono::Duration::hours(1),
    ));
    expect_problem(
        get(format!("/jobs/{ida}"), expired).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let forged = BrowserKeys::generated().sign(&Grant::new(
        app.workspace,
        vec![idb.parse().unwrap()],
        vec![],
        vec![Scope::Read, Scope::Cancel],
        now,
        now + chrono::Duration::hours(1),
    ));
    expect_problem(
        get(format!("/jobs/{idb}"), forged).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let mut tampered = token.clone();
    tampered.push('x');
    expect_problem(
        get(format!("/jobs/{ida}"), tampered).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;

    // What cannot be granted is refused by name.
    for (body, field) in [
        (json!({}), "jobs"),
        (json!({"jobs": [a["id"]], "ttl_s": 86401}), "ttl_s"),
        (json!({"jobs": [a["id"]], "ttl_s": 0}), "ttl_s"),
        (
            json!({"jobs": [a["id"]], "scopes": ["delete"]}),
            "scopes[0]",
        ),
    ] {
        let problem = expect_problem(mint(body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(problem["field"], field, "{problem}");
    }
    // A browser token makes no browser tokens.
    let resp = app
        .client
        .post(format!(
            "{}/api/workspaces/{}/browser-tokens",
            app.base, app.workspace
        ))
        .bearer_auth(&token)
        .json(&json!({"jobs": [b["id"]]}))
        .send()
        .await
        .unwrap();
    expect_problem(resp, StatusCode::FORBIDDEN).await;
}

#[tokio::test]
async fn the_migration_keeps_uuid_members_and_their_jobs_without_a_step_by_hand() {
    let url = offload::testing::database_at(16).await;
    let conn = offload::db::connect(&url).await.unwrap();
    let (ws, user) = (uuid::Uuid::now_v7(), uuid::Uuid::new_v4());
    conn.batch_execute(&format!(
        "INSERT INTO workspaces (id, name, tier) VALUES ('{ws}', 'Old', 'standard');
         INSERT INTO workspace_members (workspace_id, user_id, role) VALUES ('{ws}', '{user}', 'admin');
         INSERT INTO jobs (id, workspace_id, created_by, job_type, status)
             VALUES ('{}', '{ws}', '{user}', 'noop', 'completed');",
        uuid::Uuid::now_v7()
    ))
    .await
    .unwrap();
    offload::db::migrate(&url).await.unwrap();
    let row = conn
        .query_one(
            "SELECT m.subject, m.issuer, m.user_id, (SELECT count(*) FROM jobs j WHERE j.created_by = m.user_id) \
             FROM workspace_members m WHERE workspace_id = $1",
            &[&ws],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), user.to_string());
    assert_eq!(row.get::<_, String>(1), "");
    assert_eq!(row.get::<_, uuid::Uuid>(2), user);
    assert_eq!(row.get::<_, i64>(3), 1, "their jobs still name them");
    // Their token (a UUID subject, from any issuer) still finds them.
    let pool = offload::db::pool(&url, 2).unwrap();
    let found = offload::workspace::member_role(
        &pool.get().await.unwrap(),
        WorkspaceId(ws),
        &offload::auth::Identity {
            issuer: Some("https://project.supabase.co/auth/v1".into()),
            subject: user.to_string(),
        },
    )
    .await
    .unwrap();
    assert_eq!(
        found,
        Some((offload::ids::UserId(user), offload::workspace::Role::Admin))
    );
    // Code of the release before inserts members without a subject.
    let late = uuid::Uuid::new_v4();
    conn.execute(
        "INSERT INTO workspace_members (workspace_id, user_id, role) VALUES ($1, $2, 'member')",
        &[&ws, &late],
    )
    .await
    .unwrap();
    let subject: String = conn
        .query_one(
            "SELECT subject FROM workspace_members WHERE user_id = $1",
            &[&late],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(subject, late.to_string());
}

#[tokio::test]
async fn the_dashboard_is_told_where_live_changes_come_from_and_may_connect_there() {
    let db = offload::testing::TestDb::new().await;
    let queue: std::sync::Arc<dyn offload::queue::Queue> = std::sync::Arc::new(db.pg_queue(5));
    let url = "wss://abc123.execute-api.eu-west-1.amazonaws.com/live";
    let app = TestApp::spawn_state(db, queue, offload::workspace::Tier::Standard, |s| {
        s.settings.realtime_url = Some(url.into())
    })
    .await;
    let resp = app
        .client
        .get(format!("{}/", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "the dashboard is built into the binary (scripts/test.sh builds it first)"
    );
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("connect-src 'self' wss://abc123.execute-api.eu-west-1.amazonaws.com;"),
        "{csp}"
    );
    let page = resp.text().await.unwrap();
    assert!(
        page.contains(&format!(
            "<meta name=\"offload-realtime\" content=\"{url}\"></head>"
        )),
        "{page}"
    );
}
