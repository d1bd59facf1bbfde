//! `send_email_batch` into an SMTP sink (aiosmtpd, counting what arrives)
//! and through SES on moto: a batch of 1 000 killed mid-way and resumed
//! gives no contact the step twice, skips the do-not-contact list and the
//! unsubscribed, renders merge variables with HTML escaping; a send begun
//! before a crash is resolved the safe way (not sent again).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use offload::clock::Clock;
use offload::config::WorkerConfig;
use offload::email::{Mailer, SesMailer, SmtpMailer};
use offload::handlers::{Registry, SendEmailBatch};
use offload::ids::WorkspaceId;
use offload::job::JobStatus;
use offload::queue::Queue;
use offload::scheduler::{Scheduler, SchedulerConfig};
use offload::testing::{
    enqueue, event_source, new_job, run_until_finished, sqs_endpoint, SmtpSink, TestDb,
};
use offload::workspace::Tier;
use offload::Job;
use serde_json::json;
use uuid::Uuid;

fn registry(mailer: Arc<dyn Mailer>) -> Registry {
    Registry::builtin().with(SendEmailBatch {
        mailer,
        rate: 100_000.0,
        warmup_days: 0,
    })
}

/// A sequence with one step sent from `from`; (sequence, step).
async fn step(db: &TestDb, ws: WorkspaceId, from: &str) -> (Uuid, Uuid) {
    let (seq, step) = (Uuid::now_v7(), Uuid::now_v7());
    let conn = db.pool.get().await.unwrap();
    conn.execute(
        "INSERT INTO sequences (id, workspace_id, name) VALUES ($1, $2, 'Welcome')",
        &[&seq, &ws.0],
    )
    .await
    .unwrap();
    conn.execute(
        "INSERT INTO sequence_steps (id, sequence_id, workspace_id, position, from_address, subject, body_html) \
         VALUES ($1, $2, $3, 1, $4, 'Hi {{ first_name | default(\"there\") }}', \
           '<p>Hello {{ first_name }} of {{ company | default(\"your team\") }}</p>')",
        &[&step, &seq, &ws.0, &from],
    )
    .await
    .unwrap();
    (seq, step)
}

/// `n` contacts `{prefix}{i}@acme.io`; every 100th on the do-not-contact
/// list, every 200th (from the 7th) unsubscribed, the 3rd with markup in
/// its name and a company.
async fn contacts(db: &TestDb, ws: WorkspaceId, n: i32, prefix: &str) -> Vec<Uuid> {
    let conn = db.pool.get().await.unwrap();
    let ids: Vec<Uuid> = conn
        .query(
            "INSERT INTO contacts (id, workspace_id, email, first_name, company, opted_out) \
             SELECT gen_random_uuid(), $1, $3 || i || '@acme.io', \
               CASE WHEN i = 3 THEN '<b>Ann</b> & Co' ELSE 'P' || i END, \
               CASE WHEN i = 3 THEN 'Acme' END, i % 200 = 7 \
             FROM generate_series(1, $2) AS i ORDER BY i RETURNING id",
            &[&ws.0, &n, &prefix],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    conn.execute(
        "INSERT INTO do_not_contact (workspace_id, email, reason) \
         SELECT $1, upper($3 || i || '@acme.io'), 'legal hold' FROM generate_series(100, $2, 100) AS i",
        &[&ws.0, &n, &prefix],
    )
    .await
    .unwrap();
    ids
}

/// Messages at the sink per recipient.
fn received(sink: &SmtpSink) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for m in sink.messages() {
        for to in m["to"].as_array().unwrap() {
            *n.entry(to.as_str().unwrap().to_string()).or_default() += 1;
        }
    }
    n
}

async fn status_counts(db: &TestDb, job: &Job) -> HashMap<String, i64> {
    db.pool
        .get()
        .await
        .unwrap()
        .query(
            "SELECT status, count(*) FROM email_deliveries WHERE job_id = $1 GROUP BY status",
            &[&job.id.0],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn a_batch_of_1000_killed_mid_way_and_resumed_gives_no_contact_the_step_twice() {
    let sink = SmtpSink::start();
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let (seq, st) = step(&db, ws, "Sales <sales@acme.io>").await;
    let ids = contacts(&db, ws, 1000, "m").await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let job = db
        .insert(&[new_job(
            ws,
            "send_email_batch",
            json!({"sequence_id": seq, "sequence_step_id": st, "contact_ids": ids, "batch_size": 50}),
        )])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    let mailer: Arc<dyn Mailer> = Arc::new(SmtpMailer::new(&sink.url()).unwrap());
    let worker = db.worker_with(q.clone(), WorkerConfig::default(), registry(mailer.clone()));
    let first = event_source(q.clone(), worker);
    let run = tokio::spawn(async move { first.drain().await });
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while sink.messages().len() < 400 {
        assert!(
            tokio::time::Instant::now() < end,
            "the sink got {}",
            sink.messages().len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The kill: the worker stops where it is, its lease left to expire.
    run.abort();
    let _ = run.await;
    let at_kill = sink.messages().len();
    assert!(at_kill < 985, "killed mid-way, at {at_kill}");
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
    let scheduler = Scheduler {
        store: db.store.clone(),
        queue: q.clone(),
        clock: Clock::System,
        config: SchedulerConfig::default(),
    };
    scheduler.run_once().await;
    let worker = db.worker_with(q.clone(), WorkerConfig::default(), registry(mailer));
    let j = run_until_finished(
        &db,
        &event_source(q, worker),
        job.id,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    assert!(j.attempts >= 2, "it ran again after the kill");
    let r = j.result.clone().unwrap();

    let got = received(&sink);
    assert!(
        got.values().all(|n| *n == 1),
        "no contact got the step twice: {:?}",
        got.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    let rows = status_counts(&db, &j).await;
    let (sent, unknown) = (
        rows.get("sent").copied().unwrap_or(0),
        rows.get("unknown").copied().unwrap_or(0),
    );
    assert!(
        unknown <= 8,
        "only the sends in flight at the kill (8 at most) can be unknown: {rows:?}"
    );
    assert_eq!(r["sent"], sent, "{r}");
    assert_eq!(r["unknown"], unknown);
    assert!(
        (sent..=sent + unknown).contains(&(got.len() as i64)),
        "the sink got {} for {sent} sent and {unknown} unknown",
        got.len()
    );
    assert_eq!(r["skipped"], 15, "10 on the list, 5 unsubscribed: {r}");
    assert_eq!(sent + unknown, 985, "{r} {rows:?}");
    let reasons: Vec<&str> = r["skipped_reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons.iter().filter(|x| **x == "do_not_contact").count(),
        10
    );
    assert_eq!(reasons.iter().filter(|x| **x == "unsubscribed").count(), 5);
    for i in [100, 500, 1000, 7, 207] {
        assert!(
            !got.contains_key(&format!("m{i}@acme.io")),
            "m{i} must not be mailed"
        );
    }
    let third = sink
        .messages()
        .into_iter()
        .find(|m| m["to"][0] == "m3@acme.io");
    if let Some(m) = third {
        assert_eq!(
            m["subject"], "Hi <b>Ann</b> & Co",
            "the subject is text, not HTML"
        );
        assert!(
            m["html"]
                .as_str()
                .unwrap()
                .contains("Hello &lt;b&gt;Ann&lt;&#x2f;b&gt; &amp; Co of Acme"),
            "{m}"
        );
    }
    let m5 = sink
        .messages()
        .into_iter()
        .find(|m| m["to"][0] == "m5@acme.io")
        .unwrap();
    assert_eq!(m5["subject"], "Hi P5");
    assert!(
        m5["html"]
            .as_str()
            .unwrap()
            .contains("Hello P5 of your team"),
        "{m5}"
    );
    assert_eq!(m5["from"], "sales@acme.io");
    assert!(m5["message_id"].as_str().unwrap().ends_with("@offload>"));
}

#[tokio::test]
async fn a_send_begun_before_a_crash_is_not_sent_again_and_another_job_skips_the_sent() {
    let sink = SmtpSink::start();
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let (seq, st) = step(&db, ws, "sales@acme.io").await;
    let ids = contacts(&db, ws, 3, "k").await;
    let payload = json!({"sequence_id": seq, "sequence_step_id": st, "contact_ids": ids});
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let job = db
        .insert(&[new_job(ws, "send_email_batch", payload.clone())])
        .await
        .remove(0);
    // What a crash between the row and the provider's answer leaves.
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO email_deliveries (step_id, contact_id, workspace_id, job_id, status, message_id) \
             VALUES ($1, $2, $3, $4, 'sending', 'x')",
            &[&st, &ids[0], &ws.0, &job.id.0],
        )
        .await
        .unwrap();
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    let mailer: Arc<dyn Mailer> = Arc::new(SmtpMailer::new(&sink.url()).unwrap());
    let worker = db.worker_with(q.clone(), WorkerConfig::default(), registry(mailer.clone()));
    let source = event_source(q.clone(), worker);
    let j = run_until_finished(&db, &source, job.id, Duration::from_secs(30)).await;
    let r = j.result.unwrap();
    assert_eq!(
        (r["sent"].clone(), r["unknown"].clone()),
        (json!(2), json!(1)),
        "{r}"
    );
    assert!(
        !received(&sink).contains_key("k1@acme.io"),
        "maybe sent before: not sent again"
    );
    let rows = status_counts(&db, &job).await;
    assert_eq!(rows.get("unknown"), Some(&1));

    // Another job for the same step: nobody gets it twice.
    let again = db
        .insert(&[new_job(ws, "send_email_batch", payload)])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&again)).await;
    let j = run_until_finished(&db, &source, again.id, Duration::from_secs(30)).await;
    let r = j.result.unwrap();
    assert_eq!(r["sent"], 0, "{r}");
    assert_eq!(r["skipped"], 3);
    assert_eq!(sink.messages().len(), 2);
}

#[tokio::test]
async fn through_ses_on_moto_each_contact_is_sent_once_with_the_providers_id() {
    let endpoint = sqs_endpoint();
    // SES sends only from a verified identity.
    let ses = aws_sdk_sesv2::Client::new(
        &offload::config::aws_sdk_config("us-east-1", Some(&endpoint)).await,
    );
    ses.create_email_identity()
        .email_identity("acme.io")
        .send()
        .await
        .expect("verify acme.io on moto");
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let (seq, st) = step(&db, ws, "sales@acme.io").await;
    let ids = contacts(&db, ws, 5, "s").await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let job = db
        .insert(&[new_job(
            ws,
            "send_email_batch",
            json!({"sequence_id": seq, "sequence_step_id": st, "contact_ids": ids}),
        )])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    let mailer: Arc<dyn Mailer> = Arc::new(SesMailer::new("us-east-1", Some(&endpoint)));
    let worker = db.worker_with(q.clone(), WorkerConfig::default(), registry(mailer));
    let j = run_until_finished(
        &db,
        &event_source(q, worker),
        job.id,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    assert_eq!(j.result.unwrap()["sent"], 5);
    let ids: Vec<Option<String>> = db
        .pool
        .get()
        .await
        .unwrap()
        .query(
            "SELECT provider_message_id FROM email_deliveries WHERE job_id = $1 AND status = 'sent'",
            &[&j.id.0],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 5);
    assert!(
        ids.iter()
            .all(|i| i.as_deref().is_some_and(|s| !s.is_empty())),
        "{ids:?}"
    );
}

#[tokio::test]
async fn the_relays_password_never_reaches_the_job_its_result_or_its_logs() {
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let (seq, st) = step(&db, ws, "sales@acme.io").await;
    let ids = contacts(&db, ws, 2, "r").await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    let job = db
        .insert(&[offload::store::NewJob {
            max_attempts: 2,
            ..new_job(
                ws,
                "send_email_batch",
                json!({"sequence_id": seq, "sequence_step_id": st, "contact_ids": ids}),
            )
        }])
        .await
        .remove(0);
    enqueue(&db, &*q, std::slice::from_ref(&job)).await;
    // A port nobody listens on: every send fails with the relay's URL in
    // the transport's error.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("smtp://mailer:Hunter2Secret@127.0.0.1:{port}?tls=opportunistic");
    let mailer: Arc<dyn Mailer> = Arc::new(SmtpMailer::new(&url).unwrap());
    let cfg = WorkerConfig {
        backoff_base: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(20),
        ..WorkerConfig::default()
    };
    let worker = db.worker_with(q.clone(), cfg, registry(mailer));
    let j = run_until_finished(
        &db,
        &event_source(q, worker),
        job.id,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(j.status, JobStatus::Dead, "{:?}", j.error_message);
    let seen = serde_json::to_string(&j).unwrap();
    assert!(
        seen.contains("127.0.0.1"),
        "the error still says where: {seen}"
    );
    let conn = db.pool.get().await.unwrap();
    let logs: Vec<String> = conn
        .query(
            "SELECT message || coalesce(metadata::text, '') FROM job_logs WHERE job_id = $1",
            &[&j.id.0],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!logs.is_empty());
    let deliveries: Vec<Option<String>> = conn
        .query(
            "SELECT error FROM email_deliveries WHERE job_id = $1",
            &[&j.id.0],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (what, text) in [("job", seen)]
        .into_iter()
        .chain(logs.into_iter().map(|l| ("log", l)))
        .chain(deliveries.into_iter().flatten().map(|d| ("delivery", d)))
    {
        assert!(!text.contains("Hunter2Secret"), "{what}: {text}");
        assert!(!text.contains("tls=opportunistic"), "{what}: {text}");
    }
}
