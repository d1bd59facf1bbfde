//! `enrich_contact` and `enrich_account` against a provider on loopback that
//! answers 429 and 503 on some calls: every record enriched once, with a
//! snapshot of what changed; the hourly quota snoozes the job (no attempt
//! spent) and it resumes where it stopped; a refused key, an unknown
//! provider, records the provider does not know or rejects.

use std::sync::Arc;
use std::time::Duration;

use offload::clock::Clock;
use offload::config::WorkerConfig;
use offload::handlers::{EnrichAccount, EnrichContact, Registry};
use offload::ids::WorkspaceId;
use offload::job::JobStatus;
use offload::queue::Queue;
use offload::scheduler::{Scheduler, SchedulerConfig};
use offload::testing::{
    enqueue, event_source, new_job, run_until_finished, Failures, FakeProvider, TestDb,
};
use offload::workspace::Tier;
use offload::Job;
use serde_json::{json, Value};
use uuid::Uuid;

fn registry() -> Registry {
    Registry::builtin()
        .with(EnrichContact {
            allow_private: true,
        })
        .with(EnrichAccount {
            allow_private: true,
        })
}

/// Configures `fake` as provider `acme` of `ws`, with `per_hour` calls.
async fn configure(
    db: &TestDb,
    ws: WorkspaceId,
    fake: &FakeProvider,
    api_key: &str,
    per_hour: i32,
) {
    let map = json!({
        "title": "person.title",
        "phone": "person.phone",
        "company": "person.organization.name",
        "linkedin_url": "person.linkedin",
        "name": "company.name",
        "industry": "company.industry",
        "employee_count": "company.employees",
        "revenue": "company.annual_revenue",
        "technologies": "company.tech",
        "social_links": "company.links",
    });
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO enrichment_providers (workspace_id, name, base_url, api_key, field_map, calls_per_hour) \
             VALUES ($1, 'acme', $2, $3, $4, $5)",
            &[&ws.0, &fake.base_url, &api_key, &map, &per_hour],
        )
        .await
        .unwrap();
}

/// `n` contacts `p{i}@acme.io` (first name set, the rest empty), their ids.
async fn contacts(db: &TestDb, ws: WorkspaceId, n: i32, prefix: &str) -> Vec<Uuid> {
    db.pool
        .get()
        .await
        .unwrap()
        .query(
            "INSERT INTO contacts (id, workspace_id, email, first_name) \
             SELECT gen_random_uuid(), $1, $3 || i || '@acme.io', 'P' || i \
             FROM generate_series(1, $2) AS i RETURNING id",
            &[&ws.0, &n, &prefix],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn start(
    db: &TestDb,
    q: &Arc<dyn Queue>,
    ws: WorkspaceId,
    job_type: &str,
    payload: Value,
) -> Job {
    let job = db.insert(&[new_job(ws, job_type, payload)]).await.remove(0);
    enqueue(db, &**q, std::slice::from_ref(&job)).await;
    job
}

async fn run(db: &TestDb, ws: WorkspaceId, job_type: &str, payload: Value) -> Job {
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let job = start(db, &q, ws, job_type, payload).await;
    let worker = db.worker_with(q.clone(), WorkerConfig::default(), registry());
    run_until_finished(
        db,
        &event_source(q, worker),
        job.id,
        Duration::from_secs(90),
    )
    .await
}

#[tokio::test]
async fn five_hundred_contacts_are_each_enriched_once_through_429s_and_503s() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let fake = FakeProvider::start(Failures {
        too_many_every: Some(97),
        unavailable_every: Some(50),
    })
    .await;
    configure(&db, ws, &fake, &fake.api_key, 100_000).await;
    let ids = contacts(&db, ws, 500, "p").await;
    let j = run(
        &db,
        ws,
        "enrich_contact",
        json!({"contact_ids": ids, "provider": "acme",
               "enrich_fields": ["title", "phone", "company", "linkedin_url"]}),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let r = j.result.unwrap();
    assert_eq!(r["enriched"], 500, "{r}");
    assert!(fake.calls() > 500, "some calls failed and were made again");
    assert!(
        fake.answered().values().all(|n| *n == 1) && fake.answered().len() == 500,
        "the provider answered each contact once"
    );
    assert_eq!(
        j.attempts, 1,
        "429s snooze and 503s are called again: no attempt spent"
    );
    let rows = db
        .pool
        .get()
        .await
        .unwrap()
        .query(
            "SELECT c.email, c.title, c.company, c.linkedin_url, c.first_name, h.before, h.after \
             FROM contacts c JOIN enrichment_history h ON h.entity_id = c.id \
             WHERE c.workspace_id = $1 AND h.job_id = $2",
            &[&ws.0, &j.id.0],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 500, "one snapshot per contact");
    for row in &rows {
        let email: String = row.get(0);
        let title: Option<String> = row.get(1);
        assert_eq!(
            title.as_deref(),
            Some(FakeProvider::title_of(&email).as_str())
        );
        assert_eq!(
            row.get::<_, Option<String>>(2).as_deref(),
            Some("Org of acme.io")
        );
        let local = email.split('@').next().unwrap();
        assert_eq!(
            row.get::<_, Option<String>>(3),
            Some(format!("https://linkedin.test/in/{local}"))
        );
        assert!(
            row.get::<_, String>(4).starts_with('P'),
            "fields not asked for are kept"
        );
        let (before, after): (Value, Value) = (row.get(5), row.get(6));
        assert_eq!(
            before,
            json!({"title": null, "phone": null, "company": null, "linkedin_url": null})
        );
        assert_eq!(after["title"], json!(title.unwrap()));
        assert_eq!(after.as_object().unwrap().len(), 4);
    }
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM job_logs WHERE job_id = '{}' AND message LIKE 'contact %: acme set %'",
            j.id
        ))
        .await,
        500,
        "a log line per record"
    );
}

#[tokio::test]
async fn an_empty_hourly_quota_snoozes_the_job_and_it_resumes_where_it_stopped() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let fake = FakeProvider::start(Failures::default()).await;
    configure(&db, ws, &fake, &fake.api_key, 3).await;
    let ids = contacts(&db, ws, 5, "q").await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let job = start(
        &db,
        &q,
        ws,
        "enrich_contact",
        json!({"contact_ids": ids, "provider": "acme", "enrich_fields": ["title"]}),
    )
    .await;
    let worker = db.worker_with(q.clone(), WorkerConfig::default(), registry());
    let source = event_source(q.clone(), worker);
    source.drain().await;
    let j = db.job(job.id).await;
    assert!(!j.status.is_terminal(), "{:?}", j.status);
    assert_eq!(
        j.checkpoint.as_ref().unwrap()["next"],
        3,
        "{:?}",
        j.checkpoint
    );
    let wait = (j.run_at - chrono::Utc::now()).num_seconds();
    assert!(
        (1000..=1250).contains(&wait),
        "snoozed {wait} s: until a call is back (3 an hour)"
    );
    assert_eq!(fake.answered().len(), 3);
    assert_eq!(
        j.status,
        JobStatus::Pending,
        "past SQS's 15 minutes: the scheduler sends it"
    );
    // An hour on: the bucket is full again, the job due, and the
    // scheduler's outbox sends it.
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute(&format!(
            "UPDATE rate_limits SET updated_at = updated_at - interval '1 hour'; \
             UPDATE jobs SET run_at = now() WHERE id = '{}'",
            job.id
        ))
        .await
        .unwrap();
    let scheduler = Scheduler {
        store: db.store.clone(),
        queue: q.clone(),
        clock: Clock::manual(chrono::Utc::now() + chrono::Duration::seconds(11)),
        config: SchedulerConfig::default(),
    };
    assert_eq!(scheduler.run_once().await.sent, 1);
    let j = run_until_finished(&db, &source, job.id, Duration::from_secs(60)).await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    assert_eq!(j.result.unwrap()["enriched"], 5);
    assert_eq!(j.attempts, 1, "snoozing spent no attempt");
    assert_eq!(fake.answered().len(), 5);
    assert!(fake.answered().values().all(|n| *n == 1));
    assert_eq!(
        db.scalar_i64("SELECT count(DISTINCT entity_id) FROM enrichment_history")
            .await,
        5
    );
}

#[tokio::test]
async fn an_account_gets_typed_values_and_a_second_enrichment_finds_nothing_new() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let fake = FakeProvider::start(Failures::default()).await;
    configure(&db, ws, &fake, &fake.api_key, 1000).await;
    let account = Uuid::now_v7();
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO accounts (id, workspace_id, name, domain) VALUES ($1, $2, 'Acme', 'acme.io')",
            &[&account, &ws.0],
        )
        .await
        .unwrap();
    let payload = json!({"account_id": account, "provider": "acme"});
    let j = run(&db, ws, "enrich_account", payload.clone()).await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    assert_eq!(j.result.unwrap()["enriched"], 1);
    let row = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT name, industry, employee_count, revenue::text, technologies, social_links \
             FROM accounts WHERE id = $1",
            &[&account],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "acme Inc.");
    assert_eq!(row.get::<_, String>(1), "Software");
    assert_eq!(
        row.get::<_, i32>(2),
        250,
        "a count given as text is stored as a number"
    );
    assert_eq!(row.get::<_, String>(3), "12500000.50");
    assert_eq!(row.get::<_, Vec<String>>(4), ["rust", "postgres"]);
    assert_eq!(
        row.get::<_, Value>(5),
        json!({"linkedin": "https://linkedin.test/company/acme.io"})
    );
    let (before, after): (Value, Value) = {
        let r = db
            .pool
            .get()
            .await
            .unwrap()
            .query_one(
                "SELECT before, after FROM enrichment_history WHERE job_id = $1",
                &[&j.id.0],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(before["name"], "Acme");
    assert_eq!(before["employee_count"], Value::Null);
    assert_eq!(after["name"], "acme Inc.");
    assert_eq!(after["revenue"], 12500000.5);
    let again = run(&db, ws, "enrich_account", payload).await;
    assert_eq!(again.result.unwrap()["unchanged"], 1);
    let after: Value = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT after FROM enrichment_history WHERE job_id = $1",
            &[&again.id.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, json!({}), "nothing changed the second time");
}

#[tokio::test]
async fn refused_keys_unknown_providers_and_records_the_provider_cannot_use() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let (other, _) = db.workspace(Tier::Unlimited).await;
    let fake = FakeProvider::start(Failures::default()).await;
    configure(&db, ws, &fake, "a wrong key", 1000).await;
    let ids = contacts(&db, ws, 2, "r").await;
    let j = run(
        &db,
        ws,
        "enrich_contact",
        json!({"contact_ids": ids, "provider": "acme"}),
    )
    .await;
    assert_eq!(j.status, JobStatus::Dead);
    assert!(
        j.error_message
            .as_deref()
            .unwrap()
            .contains("refused the API key"),
        "{:?}",
        j.error_message
    );
    assert_eq!(j.attempts, 1, "a refused key is not tried again");
    let j = run(
        &db,
        ws,
        "enrich_contact",
        json!({"contact_ids": ids, "provider": "nope"}),
    )
    .await;
    assert_eq!(j.status, JobStatus::Dead);
    assert!(j
        .error_message
        .unwrap()
        .contains("no enrichment provider \"nope\""));

    configure(&db, other, &fake, &fake.api_key, 1000).await;
    let mut ids = contacts(&db, other, 1, "nobody").await;
    ids.extend(contacts(&db, other, 1, "invalid").await);
    ids.extend(contacts(&db, other, 1, "s").await);
    ids.push(contacts(&db, ws, 1, "theirs").await[0]);
    let j = run(
        &db,
        other,
        "enrich_contact",
        json!({"contact_ids": ids, "provider": "acme"}),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    assert_eq!(
        j.result.unwrap(),
        json!({"enriched": 1, "unchanged": 0, "not_found": 1, "failed": 1, "missing": 1, "calls": 3}),
        "unknown to the provider, rejected by it, enriched, and another workspace's contact"
    );

    let reg = registry();
    let bad = |p: Value| reg.validate("enrich_contact", &p, ws).unwrap_err();
    let many: Vec<Uuid> = (0..1001).map(|_| Uuid::now_v7()).collect();
    assert_eq!(
        bad(json!({"contact_ids": many, "provider": "acme"}))
            .field
            .as_deref(),
        Some("contact_ids")
    );
    assert_eq!(
        bad(
            json!({"contact_ids": [Uuid::now_v7()], "provider": "acme", "enrich_fields": ["email"]})
        )
        .field
        .as_deref(),
        Some("enrich_fields[0]")
    );
    assert_eq!(
        bad(json!({"contact_ids": [Uuid::now_v7()], "provider": "../etc"}))
            .field
            .as_deref(),
        Some("provider")
    );
}

#[tokio::test]
async fn admins_configure_providers_through_the_api_and_the_key_is_never_shown() {
    use offload::ids::UserId;
    use offload::testing::{expect_problem as problem, token, TestApp};
    use offload::workspace::{self, Role};
    use reqwest::StatusCode;

    let app = TestApp::spawn().await;
    let path = "/enrichment-providers/acme";
    let body = json!({
        "base_url": "https://api.example.com/v1",
        "api_key": "sk_live_1234567890abcd",
        "field_map": {"title": "person.title", "employee_count": "company.employees"},
        "calls_per_hour": 500,
    });
    let resp = app.req("PUT", path).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let saved: Value = resp.json().await.unwrap();
    assert_eq!(saved["api_key_ends"], "abcd");
    assert!(saved.get("api_key").is_none(), "{saved}");
    assert_eq!(saved["calls_per_hour"], 500);
    let listed = app.get_json("/enrichment-providers").await;
    assert_eq!(listed["providers"][0]["name"], "acme");
    assert!(!listed.to_string().contains("sk_live"), "{listed}");
    let conn = app.db.pool.get().await.unwrap();
    let config = offload::handlers::ProviderConfig::load(&conn, app.workspace.0, "acme")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(config.api_key, "sk_live_1234567890abcd");
    assert_eq!(config.field_map["title"], "person.title");

    for (bad, field) in [
        (
            json!({"field_map": {"email": "person.email"}}),
            "field_map.email",
        ),
        (
            json!({"field_map": {"title": "person..title"}}),
            "field_map.title",
        ),
        (json!({"base_url": "ftp://example.com"}), "base_url"),
        (json!({"api_key": ""}), "api_key"),
        (json!({"calls_per_hour": 0}), "calls_per_hour"),
    ] {
        let mut b = body.clone();
        b.as_object_mut()
            .unwrap()
            .extend(bad.as_object().unwrap().clone());
        let p = problem(
            app.req("PUT", path).json(&b).send().await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert_eq!(p["field"], field, "{p}");
    }
    problem(
        app.req("PUT", "/enrichment-providers/Bad%20Name")
            .json(&body)
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;

    let member = UserId::new();
    workspace::add_member(&**conn, app.workspace, member, Role::Member)
        .await
        .unwrap();
    problem(
        app.client
            .put(format!(
                "{}/api/workspaces/{}{path}",
                app.base, app.workspace
            ))
            .bearer_auth(token(member))
            .json(&body)
            .send()
            .await
            .unwrap(),
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(
        app.req("DELETE", path).send().await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    problem(
        app.req("DELETE", path).send().await.unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
}
