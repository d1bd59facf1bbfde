//! `sync_crm` against a HubSpot-shaped CRM on loopback that answers 429 and
//! 503 on some calls: a first sync links both sides; a bidirectional sync
//! with records changed on both sides resolves each conflict by the later
//! write and moves its cursor once per committed page; a sync with nothing
//! new writes nothing; `manual_review` parks conflicts and leaves both
//! sides alone until a person resolves them; a batch the CRM rejects is
//! sent again one record at a time; a write whose answer is lost is not
//! made twice; a sync killed mid-way resumes from its last committed page
//! and creates nothing twice; a refused token ends the job.

use std::sync::Arc;
use std::time::Duration;

use offload::config::WorkerConfig;
use offload::handlers::{resolve_conflict, Keep, Registry, Resolved, SyncCrm};
use offload::ids::WorkspaceId;
use offload::job::JobStatus;
use offload::queue::Queue;
use offload::testing::{
    enqueue, event_source, new_job, run_until_finished, Failures, FakeCrm, TestDb,
};
use offload::workspace::Tier;
use offload::Job;
use serde_json::{json, Value};
use uuid::Uuid;

fn registry() -> Registry {
    Registry::builtin().with(SyncCrm {
        allow_private: true,
    })
}

/// Configures `fake` as CRM `hub` of `ws`.
async fn configure(db: &TestDb, ws: WorkspaceId, fake: &FakeCrm, token: &str, batch: i32) {
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO crm_providers (workspace_id, name, base_url, access_token, batch_size, requests_per_10s) \
             VALUES ($1, 'hub', $2, $3, $4, 10000)",
            &[&ws.0, &fake.base_url, &token, &batch],
        )
        .await
        .unwrap();
}

async fn sync(db: &TestDb, ws: WorkspaceId, payload: Value) -> Job {
    run(db, ws, payload, false).await
}

/// Runs a sync; with `hand_offs`, each invocation is so short that the job
/// hands off to a fresh message after every page.
async fn run(db: &TestDb, ws: WorkspaceId, payload: Value, hand_offs: bool) -> Job {
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let job = db
        .insert(&[new_job(ws, "sync_crm", payload)])
        .await
        .remove(0);
    enqueue(db, &*q, std::slice::from_ref(&job)).await;
    let mut config = WorkerConfig::default();
    if hand_offs {
        config.handoff_margin = Duration::from_secs(1);
    }
    let worker = db.worker_with(q.clone(), config, registry());
    let mut source = event_source(q, worker);
    if hand_offs {
        source.invocation_timeout = Duration::from_millis(1001);
    }
    run_until_finished(db, &source, job.id, Duration::from_secs(90)).await
}

fn both(on_conflict: &str) -> Value {
    json!({"provider": "hub", "direction": "bidirectional", "entity_types": ["contacts"],
           "on_conflict": on_conflict})
}

/// Inserts a contact; its id.
async fn contact(db: &TestDb, ws: WorkspaceId, email: &str, first: &str) -> Uuid {
    let id = Uuid::new_v4();
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO contacts (id, workspace_id, email, first_name, last_name) VALUES ($1, $2, $3, $4, 'Local')",
            &[&id, &ws.0, &email, &first],
        )
        .await
        .unwrap();
    id
}

/// A contact's (first_name, last_name, updated_at) by e-mail.
async fn local(
    db: &TestDb,
    ws: WorkspaceId,
    email: &str,
) -> (
    Option<String>,
    Option<String>,
    chrono::DateTime<chrono::Utc>,
) {
    let r = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT first_name, last_name, updated_at FROM contacts WHERE workspace_id = $1 AND email = $2",
            &[&ws.0, &email],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

async fn exec(db: &TestDb, sql: &str, ws: WorkspaceId) {
    db.pool
        .get()
        .await
        .unwrap()
        .execute(sql, &[&ws.0])
        .await
        .unwrap();
}

/// The CRM's contact with this e-mail: (id, properties).
fn remote(fake: &FakeCrm, email: &str) -> (String, serde_json::Map<String, Value>) {
    let found: Vec<_> = fake
        .all("contacts")
        .into_iter()
        .filter(|(_, p)| p.get("email").and_then(Value::as_str) == Some(email))
        .collect();
    assert_eq!(found.len(), 1, "one CRM contact holds {email}: {found:?}");
    found.into_iter().next().unwrap()
}

/// (pulled_to, pushed_to, pages) of the contacts cursor.
async fn cursor(
    db: &TestDb,
    ws: WorkspaceId,
) -> (
    Option<chrono::DateTime<chrono::Utc>>,
    Option<chrono::DateTime<chrono::Utc>>,
    i64,
) {
    let r = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT pulled_to, pushed_to, pages FROM crm_sync_cursors \
             WHERE workspace_id = $1 AND provider = 'hub' AND entity = 'contacts'",
            &[&ws.0],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// Both sides after a first sync: a1..a3 ours, b1..b3 the CRM's, and
/// same@z.io on both with the same values.
async fn linked(db: &TestDb, ws: WorkspaceId, fake: &FakeCrm) {
    for i in 1..=3 {
        contact(db, ws, &format!("a{i}@x.io"), &format!("A{i}")).await;
        fake.create(
            "contacts",
            json!({"email": format!("b{i}@y.io"), "firstname": format!("B{i}"), "lastname": "Remote"}),
        );
    }
    contact(db, ws, "same@z.io", "Sam").await;
    fake.create(
        "contacts",
        json!({"email": "same@z.io", "firstname": "Sam", "lastname": "Local"}),
    );
    let j = sync(db, ws, both("last_write_wins")).await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let c = &j.result.unwrap()["counts"]["contacts"];
    assert_eq!(c["pulled_created"], 3, "{c}");
    assert_eq!(c["pushed_created"], 3, "{c}");
    assert_eq!(c["manual_review"], 0, "{c}");
    assert_eq!(fake.all("contacts").len(), 7);
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM contacts WHERE workspace_id = '{}'",
            ws.0
        ))
        .await,
        7
    );
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM crm_links WHERE workspace_id = '{}'",
            ws.0
        ))
        .await,
        7,
        "every record is linked, same@z.io to the CRM's record with its address"
    );
}

#[tokio::test]
async fn a_bidirectional_sync_resolves_conflicts_on_both_sides_by_the_later_write_and_moves_its_cursor_once(
) {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let fake = FakeCrm::start(Failures {
        too_many_every: Some(6),
        unavailable_every: Some(4),
    })
    .await;
    configure(&db, ws, &fake, &fake.token, 100).await;
    linked(&db, ws, &fake).await;
    let writes_before = fake.writes("contacts");
    let (pulled_before, _, pages_before) = cursor(&db, ws).await;

    // a1 changes here only; b1 there only.
    exec(&db, "UPDATE contacts SET first_name = 'A1-here', updated_at = now() WHERE workspace_id = $1 AND email = 'a1@x.io'", ws).await;
    let b1 = remote(&fake, "b1@y.io").0;
    fake.edit("contacts", &b1, json!({"firstname": "B1-there"}), None);
    // a2 changes there, then here later: ours wins.
    let a2 = remote(&fake, "a2@x.io").0;
    fake.edit("contacts", &a2, json!({"lastname": "A2-there"}), None);
    exec(&db, "UPDATE contacts SET last_name = 'A2-here', updated_at = now() + interval '1 second' WHERE workspace_id = $1 AND email = 'a2@x.io'", ws).await;
    // b2 changes here, then there later: theirs wins.
    exec(&db, "UPDATE contacts SET last_name = 'B2-here', updated_at = now() - interval '1 hour' WHERE workspace_id = $1 AND email = 'b2@y.io'", ws).await;
    let b2 = remote(&fake, "b2@y.io").0;
    fake.edit(
        "contacts",
        &b2,
        json!({"lastname": "B2-there", "jobtitle": "CTO"}),
        None,
    );
    // New on each side; and a field that is not synced changes here.
    let c1 = fake.create("contacts", json!({"email": "C1@Y.io", "firstname": "C1"}));
    contact(&db, ws, "d1@x.io", "D1").await;
    exec(&db, "UPDATE contacts SET score = 90, updated_at = now() WHERE workspace_id = $1 AND email = 'same@z.io'", ws).await;
    let newest_there = fake.get("contacts", &c1).unwrap().1;

    let j = sync(&db, ws, both("last_write_wins")).await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    assert_eq!(
        j.attempts, 1,
        "429s snoozed and 503s were called again; no attempt was spent"
    );
    let r = j.result.unwrap();
    let c = &r["counts"]["contacts"];
    assert_eq!(c["kept_local"], 1, "{r}");
    assert_eq!(c["kept_remote"], 1, "{r}");
    assert_eq!(c["pulled_created"], 1, "{r}");
    assert_eq!(c["pulled_updated"], 1, "{r}");
    assert_eq!(c["pushed_created"], 1, "{r}");
    assert_eq!(c["pushed_updated"], 2, "{r}");
    assert_eq!(c["failed"], 0, "{r}");
    assert_eq!(r["manual_review"], json!([]));
    assert!(fake.calls() > 4, "{r}");

    // Each side holds the winner.
    assert_eq!(remote(&fake, "a1@x.io").1["firstname"], "A1-here");
    assert_eq!(
        local(&db, ws, "b1@y.io").await.0.as_deref(),
        Some("B1-there")
    );
    assert_eq!(remote(&fake, "a2@x.io").1["lastname"], "A2-here");
    assert_eq!(
        local(&db, ws, "a2@x.io").await.1.as_deref(),
        Some("A2-here")
    );
    assert_eq!(
        local(&db, ws, "b2@y.io").await.1.as_deref(),
        Some("B2-there")
    );
    assert_eq!(
        db.scalar_i64(&format!("SELECT count(*) FROM contacts WHERE workspace_id = '{}' AND email = 'b2@y.io' AND title = 'CTO'", ws.0)).await,
        1
    );
    assert_eq!(
        local(&db, ws, "c1@y.io").await.0.as_deref(),
        Some("C1"),
        "addresses are kept in lower case"
    );
    assert_eq!(remote(&fake, "d1@x.io").1["firstname"], "D1");

    // Written there: a1 and a2 once each, d1 created; nothing else.
    let writes = fake.writes("contacts");
    let more: Vec<(&String, u32)> = writes
        .iter()
        .map(|(id, n)| (id, n - writes_before.get(id).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let d1 = remote(&fake, "d1@x.io").0;
    let a1 = remote(&fake, "a1@x.io").0;
    let mut expected = vec![(&a1, 1), (&a2, 1), (&d1, 1)];
    expected.sort();
    let mut more = more;
    more.sort();
    assert_eq!(
        more, expected,
        "b2 (theirs won) and same@z.io (a field not synced) were not written"
    );

    // One pull page and one push page: the cursor moved once each, the
    // pull side to the newest CRM change it saw.
    let (pulled, pushed, pages) = cursor(&db, ws).await;
    assert_eq!(pages, pages_before + 2);
    assert!(pulled > pulled_before);
    assert!(pulled.unwrap() >= newest_there, "{pulled:?} {newest_there}");
    assert!(pushed.is_some());

    // Nothing new: nothing is written on either side, and the echoes of
    // its own writes are not changes.
    let snapshot = fake.writes("contacts");
    let max_before: String = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT max(updated_at)::text FROM contacts WHERE workspace_id = $1",
            &[&ws.0],
        )
        .await
        .unwrap()
        .get(0);
    let j = sync(&db, ws, both("last_write_wins")).await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let c = &j.result.unwrap()["counts"]["contacts"];
    for k in [
        "pulled_created",
        "pulled_updated",
        "pushed_created",
        "pushed_updated",
        "kept_local",
        "kept_remote",
    ] {
        assert_eq!(c[k], 0, "{k}: {c}");
    }
    assert_eq!(fake.writes("contacts"), snapshot);
    let max_after: String = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT max(updated_at)::text FROM contacts WHERE workspace_id = $1",
            &[&ws.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(max_after, max_before, "nothing was written here");
}

#[tokio::test]
async fn manual_review_parks_conflicts_and_leaves_both_sides_until_resolved() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let fake = FakeCrm::start(Failures::default()).await;
    configure(&db, ws, &fake, &fake.token, 100).await;
    linked(&db, ws, &fake).await;
    let a1 = remote(&fake, "a1@x.io").0;
    let b1 = remote(&fake, "b1@y.io").0;
    fake.edit("contacts", &a1, json!({"firstname": "A1-there"}), None);
    exec(&db, "UPDATE contacts SET first_name = 'A1-here', updated_at = now() + interval '1 second' WHERE workspace_id = $1 AND email = 'a1@x.io'", ws).await;
    exec(&db, "UPDATE contacts SET first_name = 'B1-here', updated_at = now() WHERE workspace_id = $1 AND email = 'b1@y.io'", ws).await;
    fake.edit("contacts", &b1, json!({"firstname": "B1-there"}), None);
    let writes = fake.writes("contacts");

    let j = sync(&db, ws, both("manual_review")).await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let r = j.result.unwrap();
    assert_eq!(r["manual_review_total"], 2, "{r}");
    let listed: Vec<&str> = r["manual_review"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["remote_id"].as_str().unwrap())
        .collect();
    assert!(
        listed.contains(&a1.as_str()) && listed.contains(&b1.as_str()),
        "{r}"
    );
    assert_eq!(
        fake.writes("contacts"),
        writes,
        "nothing written to the CRM"
    );
    assert_eq!(remote(&fake, "a1@x.io").1["firstname"], "A1-there");
    assert_eq!(
        local(&db, ws, "a1@x.io").await.0.as_deref(),
        Some("A1-here")
    );
    assert_eq!(
        local(&db, ws, "b1@y.io").await.0.as_deref(),
        Some("B1-here")
    );

    // Again: the parked records wait; no second conflict row.
    let j = sync(&db, ws, both("manual_review")).await;
    let r = j.result.unwrap();
    assert_eq!(r["manual_review_total"], 0, "{r}");
    assert!(
        r["counts"]["contacts"]["awaiting_review"].as_u64().unwrap() >= 1,
        "{r}"
    );
    let open = format!(
        "SELECT count(*) FROM crm_conflicts WHERE workspace_id = '{}' AND status = 'open'",
        ws.0
    );
    assert_eq!(db.scalar_i64(&open).await, 2);
    assert_eq!(fake.writes("contacts"), writes);

    // A person keeps ours for a1 and theirs for b1; the next sync carries
    // ours there.
    let ids: Vec<(i64, String)> = db
        .pool
        .get()
        .await
        .unwrap()
        .query(
            "SELECT id, remote_id FROM crm_conflicts WHERE workspace_id = $1 ORDER BY id",
            &[&ws.0],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut conn = db.pool.get().await.unwrap();
    for (id, remote_id) in &ids {
        let keep = if *remote_id == a1 {
            Keep::Local
        } else {
            Keep::Remote
        };
        let done = resolve_conflict(&mut conn, ws.0, *id, keep, chrono::Utc::now())
            .await
            .unwrap();
        assert_eq!(done, Resolved::Done);
        let again = resolve_conflict(&mut conn, ws.0, *id, keep, chrono::Utc::now())
            .await
            .unwrap();
        assert!(matches!(again, Resolved::Already(_)), "{again:?}");
    }
    drop(conn);
    assert_eq!(db.scalar_i64(&open).await, 0);
    assert_eq!(
        local(&db, ws, "b1@y.io").await.0.as_deref(),
        Some("B1-there")
    );
    let j = sync(&db, ws, both("manual_review")).await;
    let r = j.result.unwrap();
    assert_eq!(r["counts"]["contacts"]["pushed_updated"], 1, "{r}");
    assert_eq!(remote(&fake, "a1@x.io").1["firstname"], "A1-here");
    assert_eq!(remote(&fake, "b1@y.io").1["firstname"], "B1-there");
}

#[tokio::test]
async fn a_rejected_record_fails_alone_and_a_lost_answer_does_not_create_twice() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let fake = FakeCrm::start(Failures::default()).await;
    configure(&db, ws, &fake, &fake.token, 3).await;
    let mut ids = Vec::new();
    for i in 1..=7 {
        ids.push(contact(&db, ws, &format!("p{i}@x.io"), &format!("P{i}")).await);
    }
    exec(&db, "UPDATE contacts SET email = 'not-an-address' WHERE workspace_id = $1 AND email = 'p4@x.io'", ws).await;
    // Every other write is made and its answer lost.
    fake.lose_answers(2);
    let j = run(
        &db,
        ws,
        json!({"provider": "hub", "direction": "push", "entity_types": ["contacts"]}),
        true,
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let r = j.result.unwrap();
    let c = &r["counts"]["contacts"];
    assert_eq!(c["pushed_created"], 6, "{r}");
    assert_eq!(c["failed"], 1, "{r}");
    assert_eq!(r["pages"], 3, "7 records in pages of 3: {r}");
    assert!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM job_logs WHERE job_id = '{}' AND message LIKE 'handed off%'",
            j.id.0
        ))
        .await
            >= 1,
        "it resumed from its checkpoint in a fresh message"
    );
    let there = fake.all("contacts");
    assert_eq!(
        there.len(),
        6,
        "one CRM record per contact, though some writes were made twice: {there:?}"
    );
    for id in ids
        .iter()
        .filter(|id| there.values().any(|p| p["offload_id"] == id.to_string()))
    {
        let n = db
            .scalar_i64(&format!(
                "SELECT count(*) FROM crm_links WHERE local_id = '{id}'"
            ))
            .await;
        assert_eq!(n, 1);
    }
    let logs = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM job_logs WHERE job_id = '{}' AND message LIKE '%not-an-address%'",
            j.id.0
        ))
        .await;
    assert!(logs >= 1, "the rejected record is named in the log");
}

#[tokio::test]
async fn accounts_sync_with_companies_and_values_that_do_not_fit_are_refused() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let fake = FakeCrm::start(Failures::default()).await;
    configure(&db, ws, &fake, &fake.token, 100).await;
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO accounts (id, workspace_id, name, domain, employee_count, revenue) \
             VALUES (gen_random_uuid(), $1, 'Ours', 'ours.io', 12, 1000.50)",
            &[&ws.0],
        )
        .await
        .unwrap();
    fake.create(
        "companies",
        json!({"name": "Theirs", "domain": "Theirs.io", "numberofemployees": "250", "annualrevenue": "12500000"}),
    );
    let bad = fake.create(
        "companies",
        json!({"name": "Bad", "domain": "bad.io", "numberofemployees": "many"}),
    );
    let j = sync(
        &db,
        ws,
        json!({"provider": "hub", "direction": "bidirectional", "entity_types": ["accounts"]}),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let c = &j.result.unwrap()["counts"]["accounts"];
    assert_eq!(c["pulled_created"], 1, "{c}");
    assert_eq!(c["pushed_created"], 1, "{c}");
    assert_eq!(c["failed"], 1, "{c}");
    let row = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT name, employee_count, revenue::text FROM accounts WHERE workspace_id = $1 AND domain = 'theirs.io'",
            &[&ws.0],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "Theirs");
    assert_eq!(row.get::<_, i32>(1), 250);
    assert_eq!(row.get::<_, String>(2), "12500000.00");
    let ours = fake
        .all("companies")
        .into_values()
        .find(|p| p["domain"] == "ours.io")
        .expect("ours was created there");
    assert_eq!(ours["numberofemployees"], "12");
    assert_eq!(ours["annualrevenue"], "1000.5");
    let logs = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM job_logs WHERE job_id = '{}' AND message LIKE '%{bad}%numberofemployees%'",
            j.id.0
        ))
        .await;
    assert_eq!(
        logs, 1,
        "the company that does not fit is named with its field"
    );
}

#[tokio::test]
async fn a_refused_token_or_an_unknown_crm_ends_the_job() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let fake = FakeCrm::start(Failures::default()).await;
    configure(&db, ws, &fake, "wrong-token", 100).await;
    let j = sync(&db, ws, both("manual_review")).await;
    assert_eq!(j.status, JobStatus::Dead);
    assert!(
        j.error_message
            .as_deref()
            .unwrap_or_default()
            .contains("refused the access token"),
        "{:?}",
        j.error_message
    );
    let j = sync(
        &db,
        ws,
        json!({"provider": "nope", "direction": "pull", "entity_types": ["contacts"]}),
    )
    .await;
    assert_eq!(j.status, JobStatus::Dead);
    assert!(j.error_message.unwrap().contains("no CRM \"nope\""));
    let reg = registry();
    for (payload, field) in [
        (
            json!({"provider": "hub", "direction": "sideways", "entity_types": ["contacts"]}),
            "direction",
        ),
        (
            json!({"provider": "hub", "direction": "pull", "entity_types": []}),
            "entity_types",
        ),
        (
            json!({"provider": "hub", "direction": "pull", "entity_types": ["contacts", "contacts"]}),
            "entity_types[1]",
        ),
        (
            json!({"provider": "hub", "direction": "pull", "entity_types": ["deals"]}),
            "entity_types[0]",
        ),
        (
            json!({"provider": "Hub!", "direction": "pull", "entity_types": ["contacts"]}),
            "provider",
        ),
    ] {
        let e = reg.validate("sync_crm", &payload, ws).unwrap_err();
        assert_eq!(e.field.as_deref(), Some(field), "{payload}: {e:?}");
    }
}

#[tokio::test]
async fn admins_configure_crms_and_members_review_parked_conflicts_through_the_api() {
    use offload::ids::UserId;
    use offload::testing::{expect_problem as problem, token, TestApp};
    use offload::workspace::{self, Role};
    use reqwest::StatusCode;

    let app = TestApp::spawn().await;
    let fake = FakeCrm::start(Failures::default()).await;
    let path = "/crm-providers/hub";
    let body = json!({"base_url": fake.base_url, "access_token": fake.token, "batch_size": 50});
    let resp = app.req("PUT", path).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let saved: Value = resp.json().await.unwrap();
    assert_eq!(
        saved["access_token_ends"],
        fake.token[fake.token.len() - 4..]
    );
    assert_eq!(saved["requests_per_10s"], 100, "HubSpot's limit by default");
    assert_eq!(saved["kind"], "hubspot");
    let listed = app.get_json("/crm-providers").await;
    assert_eq!(listed["providers"][0]["batch_size"], 50);
    assert!(!listed.to_string().contains(&fake.token), "{listed}");
    for (bad, field) in [
        (json!({"batch_size": 101}), "batch_size"),
        (json!({"requests_per_10s": 0}), "requests_per_10s"),
        (json!({"base_url": "ftp://x"}), "base_url"),
        (json!({"access_token": ""}), "access_token"),
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
    let member = UserId::new();
    let conn = app.db.pool.get().await.unwrap();
    workspace::add_member(&**conn, app.workspace, member, Role::Member)
        .await
        .unwrap();
    drop(conn);
    let as_member = |method: reqwest::Method, p: &str| {
        app.client
            .request(
                method,
                format!("{}/api/workspaces/{}{p}", app.base, app.workspace),
            )
            .bearer_auth(token(member))
    };
    problem(
        as_member(reqwest::Method::PUT, path)
            .json(&body)
            .send()
            .await
            .unwrap(),
        StatusCode::FORBIDDEN,
    )
    .await;

    // The same person on both sides, different before any sync: parked.
    let ws = app.workspace;
    contact(&app.db, ws, "pat@x.io", "Pat").await;
    let theirs = fake.create(
        "contacts",
        json!({"email": "pat@x.io", "firstname": "Patricia", "jobtitle": "CFO"}),
    );
    let j = sync(&app.db, ws, both("manual_review")).await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let listed: Value = as_member(reqwest::Method::GET, "/crm-conflicts")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let c = &listed["conflicts"][0];
    assert_eq!(c["remote_id"], theirs.as_str(), "{listed}");
    assert_eq!(c["local"]["firstname"], "Pat");
    assert_eq!(c["remote"]["firstname"], "Patricia");
    assert_eq!(c["status"], "open");
    let resolve = format!("/crm-conflicts/{}/resolve", c["id"]);
    problem(
        as_member(reqwest::Method::POST, &resolve)
            .json(&json!({"keep": "both"}))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let resp = as_member(reqwest::Method::POST, &resolve)
        .json(&json!({"keep": "remote"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let done: Value = resp.json().await.unwrap();
    assert_eq!(done["status"], "kept_remote");
    assert_eq!(
        local(&app.db, ws, "pat@x.io").await.0.as_deref(),
        Some("Patricia")
    );
    problem(
        as_member(reqwest::Method::POST, &resolve)
            .json(&json!({"keep": "local"}))
            .send()
            .await
            .unwrap(),
        StatusCode::CONFLICT,
    )
    .await;
    let open = app.get_json("/crm-conflicts").await;
    assert_eq!(open["conflicts"], json!([]));
    let all = app.get_json("/crm-conflicts?status=all").await;
    assert_eq!(all["conflicts"].as_array().unwrap().len(), 1);
    problem(
        app.req("GET", "/crm-conflicts?status=closed")
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    // Linked now: the next sync finds nothing to do for it.
    let j = sync(&app.db, ws, both("manual_review")).await;
    let r = j.result.unwrap();
    assert_eq!(r["manual_review_total"], 0, "{r}");
    assert_eq!(fake.writes("contacts")[&theirs], 0, "{r}");
}

#[tokio::test]
async fn a_sync_killed_mid_way_resumes_from_its_last_committed_page_and_creates_nothing_twice() {
    use offload::clock::Clock;
    use offload::scheduler::{Scheduler, SchedulerConfig};

    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let fake = FakeCrm::start(Failures::default()).await;
    configure(&db, ws, &fake, &fake.token, 50).await;
    exec(
        &db,
        "INSERT INTO contacts (id, workspace_id, email, first_name) \
         SELECT gen_random_uuid(), $1, 'ours' || i || '@x.io', 'O' || i FROM generate_series(1, 1000) AS i",
        ws,
    )
    .await;
    for i in 0..1000 {
        fake.create(
            "contacts",
            json!({"email": format!("theirs{i}@y.io"), "firstname": format!("T{i}")}),
        );
    }
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let job = db
        .insert(&[new_job(ws, "sync_crm", both("manual_review"))])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    let first = event_source(
        q.clone(),
        db.worker_with(q.clone(), WorkerConfig::default(), registry()),
    );
    let run = tokio::spawn(async move { first.drain().await });
    // Killed once the push is under way: 20 pages pulled, some pushed.
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while fake.all("contacts").len() < 1300 {
        assert!(tokio::time::Instant::now() < end, "the push did not start");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    run.abort();
    let _ = run.await;
    assert!(fake.all("contacts").len() < 2000, "killed mid-way");
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
            &[&job.id.0],
        )
        .await
        .unwrap();
    Scheduler {
        store: db.store.clone(),
        queue: q.clone(),
        clock: Clock::System,
        config: SchedulerConfig::default(),
    }
    .run_once()
    .await;
    let worker = db.worker_with(q.clone(), WorkerConfig::default(), registry());
    let j = run_until_finished(
        &db,
        &event_source(q, worker),
        job.id,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    assert!(j.attempts >= 2, "it ran again after the kill");
    let r = j.result.unwrap();
    let c = &r["counts"]["contacts"];
    assert_eq!(c["pulled_created"], 1000, "{r}");
    assert_eq!(c["pushed_created"], 1000, "{r}");
    assert_eq!(c["failed"], 0, "{r}");
    let count = |sql: &str| {
        let sql = sql.replace("$ws", &ws.0.to_string());
        let db = &db;
        async move { db.scalar_i64(&sql).await }
    };
    assert_eq!(
        count("SELECT count(*) FROM contacts WHERE workspace_id = '$ws'").await,
        2000
    );
    assert_eq!(
        fake.all("contacts").len(),
        2000,
        "no record created twice there"
    );
    assert_eq!(
        count("SELECT count(DISTINCT remote_id) FROM crm_links WHERE workspace_id = '$ws'").await,
        2000
    );
    let pages =
        count("SELECT sum(pages)::int8 FROM crm_sync_cursors WHERE workspace_id = '$ws'").await;
    assert_eq!(
        pages,
        r["pages"].as_i64().unwrap(),
        "the cursor moved once for each page the job committed, none twice"
    );
    for (_, p) in fake.all("contacts") {
        let email = p["email"].as_str().unwrap();
        let first = local(&db, ws, email).await.0;
        assert_eq!(first.as_deref(), p["firstname"].as_str(), "{email}");
    }
}

#[tokio::test]
async fn a_malformed_record_in_a_crm_page_is_skipped_and_named_once_while_the_rest_sync() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let fake = FakeCrm::start(Failures::default()).await;
    // Two records a page, so the unreadable ones share pages with good
    // ones and the search pages past them.
    configure(&db, ws, &fake, &fake.token, 2).await;
    let t0 = chrono::Utc::now() - chrono::Duration::hours(1);
    let mut ids = Vec::new();
    for (i, name) in ["good1", "noid", "notime", "good2"].into_iter().enumerate() {
        let id = fake.create(
            "contacts",
            json!({"email": format!("{name}@y.io"), "firstname": name}),
        );
        fake.edit(
            "contacts",
            &id,
            json!({}),
            Some(t0 + chrono::Duration::seconds(i as i64)),
        );
        ids.push(id);
    }
    fake.serve_without("contacts", &ids[1], "id");
    fake.serve_without("contacts", &ids[2], "updatedAt");

    let j = sync(
        &db,
        ws,
        json!({"provider": "hub", "direction": "pull", "entity_types": ["contacts"]}),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let c = &j.result.unwrap()["counts"]["contacts"];
    assert_eq!(
        (c["pulled_created"].clone(), c["failed"].clone()),
        (json!(2), json!(2)),
        "{c}"
    );
    for (email, kept) in [
        ("good1@y.io", 1),
        ("good2@y.io", 1),
        ("noid@y.io", 0),
        ("notime@y.io", 0),
    ] {
        let n = db
            .scalar_i64(&format!(
                "SELECT count(*) FROM contacts WHERE workspace_id = '{}' AND email = '{email}'",
                ws.0
            ))
            .await;
        assert_eq!(n, kept, "{email}");
    }
    for (id, what) in [(&ids[1], "an id"), (&ids[2], "updatedAt")] {
        let named = db
            .scalar_i64(&format!(
                "SELECT count(*) FROM job_logs WHERE job_id = '{}' AND message LIKE '%{id}%{what}%'",
                j.id.0
            ))
            .await;
        assert_eq!(named, 1, "record {id} is named once, with what it lacks");
    }
}
